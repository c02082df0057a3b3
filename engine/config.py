"""Sweep configs: YAML -> validated, fully resolved trial configs, before Ray starts.

A sweep file holds one base trial config (``data``, ``poison``, ``model``, ``train``,
``detectors``, ``unlearn``, ``seed``), a ``sweep:`` mapping of dotted keys to lists (the
cartesian grid), and ``resources`` (how trials run, never part of a trial's identity).
Every problem is reported at once, each with its key, the bad value and what is allowed.

Modules: this one reads YAML (through ``poisonsweep.engine.yaml_reader``), applies ``--set`` overrides, expands
the grid (``build_sweep``) and checks the data (``check_data``); ``poisonsweep.engine.schema`` holds the
defaults, allowed keys and value checks; ``poisonsweep.engine.resolve`` fills registry defaults and computes a
trial's identity. Their public names are importable from here too.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from poisonsweep.engine.data_check import model_errors, source_key
from poisonsweep.engine.resolve import (  # noqa: F401  (config_columns, key_columns, trial_id: re-exported for callers)
    config_columns, identity, key_columns, merge_defaults, plain_copy, resolve, trial_id,
)
from poisonsweep.engine.schema import (
    RESOURCE_DEFAULTS, RESOURCES, TOP_LEVEL, TRIAL_DEFAULTS, check_name, check_resources, check_shape, check_trial,
    data_bound_errors, params_with_new_names, resources_with_new_names,
)
from poisonsweep.engine.yaml_reader import (  # noqa: F401  (MAX_ALIAS_VALUES, read_yaml: re-exported for callers)
    MAX_ALIAS_VALUES, YamlRefused, read_yaml,
)
from poisonsweep.tasks.registry import ConfigError


@dataclass
class Sweep:
    name: str
    out: str
    trials: list[dict]  # fully resolved trial configs, one per grid point
    resources: dict = field(default_factory=lambda: dict(RESOURCE_DEFAULTS))
    grid: dict[str, list] = field(default_factory=dict)
    plugins: list = field(default_factory=list)  # poisonsweep.engine.plugins.Plugin: imported, shipped with the job
    # shown before a run or plan: a --set that removed or narrowed an axis, an old name of a key
    warnings: list[str] = field(default_factory=list)
    _ids: list[str] = field(default_factory=list, repr=False, compare=False)

    @property
    def ids(self) -> list[str]:
        """Each trial's ``trial_id``, in plan order: hashed once (``build_sweep``), read by every step of a run."""
        if len(self._ids) != len(self.trials):
            self._ids = [trial_id(t) for t in self.trials]
        return self._ids


MAX_TRIALS = 100_000  # a grid holds at most this many points (the product of its axes' lengths)


def parse_override(text: str) -> tuple[str, Any]:
    """``"poison.rate=0.2"`` -> ``("poison.rate", 0.2)``; the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {text!r} must look like key=value, e.g. poison.rate=0.2"], "--set")
    try:
        return key.strip(), read_yaml(value)
    except yaml.YAMLError as error:
        problem = str(error).splitlines()[0]
        raise ConfigError([f"--set {text!r}: the value {value!r} is not valid YAML ({problem}); quote a string "
                            "or write a list as [a, b]"], "--set") from None


def set_dotted(config: dict, key: str, value: Any) -> str | None:
    """Set ``a.b.c`` inside nested mappings; the error message if a step is a value, not a mapping."""
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        elif not isinstance(node[part], dict):
            where = ".".join(parts[:depth + 1])
            return f"{key} cannot be set: {where} is {node[part]!r}, not a mapping"
        node = node[part]
    node[parts[-1]] = value
    return None


def _related(a: str, b: str) -> bool:
    """One dotted key is the other or lies inside it (``seed`` and ``seed.x``)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set`` overrides; a ``sweep.<key>`` override replaces that grid axis, and a plain
    override of a swept key (or of a key inside it) fixes it (removes it from the grid)."""
    raw = copy.deepcopy(raw)
    errors = []
    for text in overrides:
        key, value = parse_override(text)
        if key == "sweep":
            errors.append(f"--set {text!r}: set one grid axis at a time, e.g. --set sweep.seed=[0,1,2]")
            continue
        if not isinstance(raw.get("sweep") or {}, dict):
            errors.append(f"--set {text!r}: sweep must map dotted keys to lists; got {raw['sweep']!r}")
            continue
        grid = raw["sweep"] = raw.get("sweep") or {}
        if key.startswith("sweep."):
            grid[key[len("sweep."):]] = value
            continue
        for swept in [k for k in grid if _related(k, key)]:
            del grid[swept]
        if message := set_dotted(raw, key, value):
            errors.append(f"--set {text!r}: {message}")
    if errors:
        raise ConfigError(errors, "--set")
    return raw


def load_sweep(path: str | Path, overrides: list[str] = (), out: str | None = None,
               data_root: str | None = None) -> Sweep:
    """Read, override, expand and validate a sweep file. Raises ``ConfigError`` listing every problem."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError([f"config path {str(path)!r} is a directory; give a sweep's YAML file, "
                            "e.g. configs/quickstart.yaml"], str(path))
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist"], str(path))
    try:
        raw = read_yaml(path.read_text()) or {}
    except YamlRefused as error:
        raise ConfigError([str(error)], str(path)) from None
    except RecursionError:
        raise ConfigError(["its values are nested too deeply to read"], str(path)) from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError([f"not valid YAML: {error}"], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError(["the top level must be a mapping of keys to values"], str(path))
    return sweep_from_mapping(raw, overrides, data_root=data_root, default_name=path.stem, out=out, source=str(path),
                              base_dir=path.parent)


def sweep_from_mapping(raw: dict, overrides: Iterable[str] = (), *, data_root: str | None = None,
                       default_name: str = "sweep", out: str | None = None, source: str = "config",
                       base_dir: str | Path = ".") -> Sweep:
    """``build_sweep`` of a config mapping (left unchanged) with ``--set`` overrides and ``--data-root`` applied;
    its ``plugins:`` paths are relative to ``base_dir`` (the config file's folder)."""
    overridden = apply_overrides(raw, list(overrides))
    if data_root is not None:
        set_dotted(overridden, "data.root", data_root)  # a `data` that is not a mapping is reported by build_sweep
    sweep = build_sweep(overridden, default_name=default_name, out=out, source=source, base_dir=base_dir)
    sweep.warnings += axis_changes(raw.get("sweep"), overridden.get("sweep"), list(overrides))
    return sweep


def _axes(grid) -> dict[str, list]:
    return {k: v for k, v in grid.items() if isinstance(v, list)} if isinstance(grid, dict) else {}


def axis_changes(before, after, overrides: list[str]) -> list[str]:
    """One warning per grid axis that ``overrides`` removed (a plain ``--set`` of a swept key, or of a
    key inside a swept section) or narrowed (``--set sweep.key=[...]`` with fewer values)."""
    before, after = _axes(before), _axes(after)
    size = lambda grid: math.prod(len(v) for v in grid.values())  # noqa: E731
    change = f"the grid goes from {size(before):,} to {size(after):,} points"
    keyed = [(parse_override(text)[0], text) for text in overrides]
    warnings = []
    for key, values in before.items():
        cause = next((f"--set {text}" for set_key, text in keyed if _related(set_key, key) or set_key == f"sweep.{key}"),
                     "an override")
        if key not in after:
            paired = sorted({sub for v in values if isinstance(v, dict) for sub in v})
            section = f" (a section sweeping {', '.join(f'{key}.{k}' for k in paired)} together)" if paired else ""
            warnings.append(f"{cause} removes the sweep axis {key!r}{section}, {len(values)} values: {change}; "
                            f"to keep the axis, set its values with --set 'sweep.{key}=[...]'")
        elif len(after[key]) < len(values):
            warnings.append(f"{cause} narrows the sweep axis {key!r} from {len(values)} to "
                            f"{len(after[key])} values: {change}")
    return warnings


def build_sweep(raw: dict, *, default_name: str = "sweep", out: str | None = None, source: str = "config",
                base_dir: str | Path = ".") -> Sweep:
    """Import the plugins (``plugins:``, then the rest is checked against their entries too), expand the grid
    and check everything in one pass: every problem of every trial is reported at once."""
    from poisonsweep.engine.plugins import PluginError, load_plugins

    try:
        plugins = load_plugins(raw.get("plugins"), base_dir)
    except PluginError as error:  # the rest would only repeat it as unknown names
        raise ConfigError(error.errors, source) from None
    errors, _ = TOP_LEVEL.problems("", raw)
    name = raw.get("name", default_name)
    errors += [e + ("" if "name" in raw else " (taken from the file name: set name: in the config)")
               for e in check_name(name)]
    notes: list[str] = []  # old names used, for Sweep.warnings
    if not isinstance(raw.get("resources") or {}, dict):
        errors += RESOURCES.problems("resources", raw["resources"])[0]
        resources = dict(RESOURCE_DEFAULTS)
    else:
        given, notes, rename_errors = resources_with_new_names(raw.get("resources") or {})
        resources = {**RESOURCE_DEFAULTS, **given}
        errors += rename_errors + check_resources(resources)
    grid = raw.get("sweep") or {}
    if not isinstance(grid, dict):
        errors.append(f"sweep must map dotted keys to lists of values; got {grid!r}")
        grid = {}
    for key, values in list(grid.items()):
        if not isinstance(values, list) or not values:
            errors.append(f"sweep.{key} must be a non-empty list of values; got {values!r}")
            del grid[key]
        elif str(key).split(".")[0] not in TRIAL_DEFAULTS:
            errors.append(f"sweep.{key} does not name a trial setting (it must start with one of "
                          f"{', '.join(sorted(TRIAL_DEFAULTS))})")
            del grid[key]

    if message := grid_size_error(grid):  # counted from the axes: a grid too large is never expanded
        raise ConfigError(errors + [message], source)

    base = {k: v for k, v in raw.items() if k in TRIAL_DEFAULTS}
    trials = []
    for point in itertools.product(*grid.values()):
        trial = plain_copy(base)
        for key, value in zip(grid, point):
            if message := set_dotted(trial, key, plain_copy(value)):
                errors.append(f"sweep.{key}: {message}")
        shape_errors, trial = check_shape(trial)
        trial, trial_notes, rename_errors = params_with_new_names(trial)
        notes += [note for note in trial_notes if note not in notes]
        trial = merge_defaults(trial)
        errors += shape_errors + rename_errors + check_trial(trial)
        if resources["gpu"] == 0 and trial["train"].get("device") == "cuda":
            errors.append("train.device is 'cuda' but resources.gpu is 0: a trial without a GPU share sees no GPU; "
                          "set resources.gpu (e.g. 0.25) or train.device: auto")
        trial["sweep"] = name
        trials.append(trial)
    if errors:
        raise ConfigError(errors, source)
    fingerprints: dict = {}  # one read of a user's dataset per sweep
    trials = [resolve(t, fingerprints) for t in trials]
    unique = {trial_id(t): t for t in trials}  # a grid that repeats a point runs it once
    return Sweep(name=name, out=out or raw.get("out") or f"results/{name}", trials=list(unique.values()),
                 resources=resources, grid=grid, plugins=plugins, warnings=notes, _ids=list(unique))


def grid_size_error(grid: dict[str, list]) -> str | None:
    """The error message when the grid's points (the product of its axes' lengths) exceed ``MAX_TRIALS``."""
    size = math.prod(len(values) for values in grid.values())
    if size <= MAX_TRIALS:
        return None
    axes = " x ".join(f"{len(values):,} ({key})" for key, values in grid.items())
    return (f"sweep has {size:,} grid points ({axes}), over the limit of {MAX_TRIALS:,} trials per sweep; "
            "sweep fewer values, or split it into several sweeps (e.g. one per --set data.name=...)")


def check_data(sweep: Sweep) -> None:
    """Load each dataset the sweep names once and check what needs the data: that it can be found,
    that ``n_train``/``n_test`` fit, and that every poison rate is possible. Raises ``ConfigError``."""
    import numpy as np

    from poisonsweep.tasks.data import load_dataset, stratified_subset
    from poisonsweep.tasks.poisons import check_rate

    errors, loaded, checked = [], {}, set()
    for trial in sweep.trials:
        data = trial["data"]
        key = json.dumps([data, trial["poison"], trial["detectors"]], sort_keys=True, default=str)
        if key in checked:  # seeds and models repeat these checks: 10,000 trials, a few distinct ones
            continue
        checked.add(key)
        source = source_key(data)
        if source not in loaded:
            try:
                loaded[source] = load_dataset(data["name"], root=data["root"], params=data.get("params"))
            except Exception as error:  # missing or corrupt data: the loader's message says what to do
                loaded[source] = None
                errors.append(f"data.name {data['name']!r}: {error}")
        full = loaded[source]
        if full is None:
            continue
        for split, n_key in (("y_train", "n_train"), ("y_test", "n_test")):
            available = len(getattr(full, split))
            if data[n_key] is not None and data[n_key] > available:
                errors.append(f"data.{n_key} is {data[n_key]} but {data['name']} has only {available} "
                              f"{split[2:]} samples")
        if data["n_train"] is not None and data["n_train"] > len(full.y_train):
            continue
        labels = full.y_train.numpy()
        subset = labels[stratified_subset(labels, data["n_train"], seed=0)]  # per-class counts ignore the seed
        counts = np.bincount(subset, minlength=full.num_classes)
        errors += data_bound_errors(trial, {"classes": full.num_classes, "train_samples": len(subset)})
        poison = trial["poison"]
        try:
            message = check_rate(poison["method"], poison["rate"], counts, poison["params"])
        except Exception as error:  # e.g. a class index outside the dataset
            message = f"poison.params: {error}"
        if message:
            errors.append(message)
    errors += model_errors(sweep.trials, loaded)
    if errors:
        raise ConfigError(errors, f"sweep {sweep.name!r}")
