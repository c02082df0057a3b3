"""Sweep configs: YAML -> validated, fully resolved trial configs, before Ray starts.

A sweep file holds one base trial config (``data``, ``poison``, ``model``, ``train``,
``detectors``, ``unlearn``, ``seed``), a ``sweep:`` mapping of dotted keys to lists (the
cartesian grid), and ``resources`` (how trials run, never part of a trial's identity).
Every problem is reported at once, each with its key, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import yaml

import tasks.detect  # noqa: F401  (registers the detectors)
from tasks.data import DATASETS
from tasks.detect.base import DETECTORS
from tasks.models import MODELS
from tasks.poisons import POISONS
from tasks.registry import NONE, STR, ConfigError, Interval, check_value
from tasks.train import TRAIN_CONSTRAINTS, TrainConfig

TRIAL_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "data": {"name": "digits", "n_train": None, "n_test": None, "seed": 0, "root": None},
    "poison": {"method": "one_shift", "rate": 0.1, "params": {}},
    "model": {"name": "keras_cnn", "params": {}},
    "train": asdict(TrainConfig()),
    "detectors": ["activation_clustering", "spectral_signature", "loss"],
    "unlearn": None,
}
RESOURCE_DEFAULTS: dict[str, Any] = {
    "cpu": 1, "gpu": 0, "max_concurrent": None, "max_failures": 1,
    "influence_actors": 0, "actor_cpu": 1, "actor_gpu": 0,
    "pack": 1,  # trials trained together in one Ray trial (engine/packs.py); 1: each alone
}
RESOURCE_CONSTRAINTS = {
    "cpu": [Interval(Real, 0, None, "neither")], "gpu": [Interval(Real, 0)],
    "max_concurrent": [NONE, Interval(Integral, 1)], "max_failures": [Interval(Integral, -1)],
    "influence_actors": [Interval(Integral, 0)], "actor_cpu": [Interval(Real, 0)], "actor_gpu": [Interval(Real, 0)],
    "pack": [Interval(Integral, 1)],
}
TOP_LEVEL_KEYS = {"name", "description", "out", "sweep", "resources"} | set(TRIAL_DEFAULTS)
SECTION_KEYS = {"data": {"name", "n_train", "n_test", "seed", "root"}, "poison": {"method", "rate", "params"},
                "model": {"name", "params"}, "train": set(TRAIN_CONSTRAINTS)}
# fields that say where or how a trial runs, not what it computes: not part of its identity
NOT_IDENTITY = [("data", "root"), ("train", "device")]
DETECTOR_KEYS = {"name", "params", "label"}


class ConfigErrors(ConfigError):
    """Several config problems, reported together."""

    def __init__(self, errors: list[str], source: str = "config"):
        self.errors = list(dict.fromkeys(errors))
        super().__init__(f"{source} has {len(self.errors)} problem(s):\n" + "\n".join(f"  - {e}" for e in self.errors))


@dataclass
class Sweep:
    name: str
    out: str
    trials: list[dict]  # fully resolved trial configs, one per grid point
    resources: dict = field(default_factory=lambda: dict(RESOURCE_DEFAULTS))
    grid: dict[str, list] = field(default_factory=dict)


# a seed ends up in an int64 Parquet column and in numpy/torch generators
SEED = [Interval(Integral, 0, 2**63 - 1)]
# a sweep's name becomes a directory under the output (Ray Tune's state): one plain path component
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_RULE = "1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; read it as the number everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$"
               r"|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))
# ...but a plain integer stays an int (the float resolver above would take it too)
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:float"]
    + [(tag, regex) for tag, regex in resolvers if tag == "tag:yaml.org,2002:float"]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()}


def read_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[str, Any]:
    """``"poison.rate=0.2"`` -> ``("poison.rate", 0.2)``; the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigErrors([f"--set {text!r} must look like key=value, e.g. poison.rate=0.2"], "--set")
    try:
        return key.strip(), read_yaml(value)
    except yaml.YAMLError as error:
        problem = str(error).splitlines()[0]
        raise ConfigErrors([f"--set {text!r}: the value {value!r} is not valid YAML ({problem}); quote a string "
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
        raise ConfigErrors(errors, "--set")
    return raw


def load_sweep(path: str | Path, overrides: list[str] = (), out: str | None = None,
               data_root: str | None = None) -> Sweep:
    """Read, override, expand and validate a sweep file. Raises ``ConfigErrors`` listing every problem."""
    path = Path(path)
    if path.is_dir():
        raise ConfigErrors([f"config path {str(path)!r} is a directory; give a sweep's YAML file, "
                            "e.g. configs/quickstart.yaml"], str(path))
    if not path.is_file():
        raise ConfigErrors([f"config file {str(path)!r} does not exist"], str(path))
    try:
        raw = read_yaml(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigErrors([f"not valid YAML: {error}"], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigErrors(["the top level must be a mapping of keys to values"], str(path))
    raw = apply_overrides(raw, list(overrides))
    if data_root is not None:
        raw["data"] = raw.get("data") if isinstance(raw.get("data"), dict) else (raw.get("data") or {})
        if isinstance(raw["data"], dict):
            raw["data"]["root"] = data_root
    return build_sweep(raw, default_name=path.stem, out=out, source=str(path))


def check_name(name: Any) -> list[str]:
    if isinstance(name, str) and NAME_PATTERN.fullmatch(name):
        return []
    return [f"name must be {NAME_RULE} (it names a folder in the output); got {name!r}"]


def build_sweep(raw: dict, *, default_name: str = "sweep", out: str | None = None, source: str = "config") -> Sweep:
    """Expand the grid and check everything in one pass: every problem of every trial is reported at once."""
    errors = [f"{k} is not a known top-level key (allowed: {', '.join(sorted(TOP_LEVEL_KEYS))}); remove it"
              for k in raw if k not in TOP_LEVEL_KEYS]
    name = raw.get("name", default_name)
    errors += [e + ("" if "name" in raw else " (taken from the file name: set name: in the config)")
               for e in check_name(name)]
    if not isinstance(raw.get("resources") or {}, dict):
        errors.append(f"resources must be a mapping (allowed keys: {', '.join(sorted(RESOURCE_CONSTRAINTS))}); "
                      f"got {raw['resources']!r}")
        resources = dict(RESOURCE_DEFAULTS)
    else:
        resources = {**RESOURCE_DEFAULTS, **(raw.get("resources") or {})}
        errors += _check_resources(resources)
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

    base = {k: v for k, v in raw.items() if k in TRIAL_DEFAULTS}
    trials = []
    for point in itertools.product(*grid.values()):
        trial = copy.deepcopy(base)
        for key, value in zip(grid, point):
            if message := set_dotted(trial, key, copy.deepcopy(value)):
                errors.append(f"sweep.{key}: {message}")
        shape_errors, trial = _check_shape(trial)
        trial = _merge_defaults(trial)
        errors += shape_errors + check_trial(trial)
        if resources["gpu"] == 0 and trial["train"].get("device") == "cuda":
            errors.append("train.device is 'cuda' but resources.gpu is 0: a trial without a GPU share sees no GPU; "
                          "set resources.gpu (e.g. 0.25) or train.device: auto")
        trial["sweep"] = name
        trials.append(trial)
    if errors:
        raise ConfigErrors(errors, source)
    trials = [resolve(t) for t in trials]
    unique = {trial_id(t): t for t in trials}  # a grid that repeats a point runs it once
    return Sweep(name=name, out=out or raw.get("out") or f"results/{name}", trials=list(unique.values()),
                 resources=resources, grid=grid)


def _check_shape(config: dict) -> tuple[list[str], dict]:
    """Problems with the config's structure (a section that is not a mapping, unknown keys, a detector
    entry without a name...) and the config with the broken parts dropped, so that the value checks
    can still run on the rest and report their problems in the same pass."""
    errors, clean = [], {}
    for key, value in config.items():
        if key in SECTION_KEYS:
            allowed = SECTION_KEYS[key]
            if value is None:
                continue
            if not isinstance(value, dict):
                errors.append(f"{key} must be a mapping (keys: {', '.join(sorted(allowed))}); got {value!r}")
                continue
            errors += [f"{key}.{k} is not known (allowed: {', '.join(sorted(allowed))}); remove it"
                       for k in value if k not in allowed]
            clean[key] = {k: v for k, v in value.items() if k in allowed}
        elif key == "detectors":
            detector_errors, clean[key] = _shape_detectors(value)
            errors += detector_errors
        else:
            clean[key] = value
    for section in ("poison", "model"):
        params = clean.get(section, {}).get("params")
        if params is not None and not isinstance(params, dict):
            errors.append(f"{section}.params must be a mapping of parameter names to values; got {params!r}")
            clean[section]["params"] = {}
    return errors, clean


def _shape_detectors(detectors: Any) -> tuple[list[str], list]:
    if detectors is None:
        return [], []
    if not isinstance(detectors, list):
        return [f"detectors must be a list of detector names or {{name, params, label}} mappings, e.g. "
                f"[loss]; got {detectors!r}"], []
    errors, kept = [], []
    for i, entry in enumerate(detectors):
        key = f"detectors[{i}]"
        if isinstance(entry, str):
            kept.append(entry)
            continue
        if not isinstance(entry, dict):
            errors.append(f"{key} must be a detector name or a mapping with 'name'; got {entry!r}")
            kept.append(None)
            continue
        problems = [f"{key} has unknown keys {sorted(map(str, set(entry) - DETECTOR_KEYS))} (allowed: name, "
                    "params, label); remove them"] if set(entry) - DETECTOR_KEYS else []
        if "name" not in entry:
            problems.append(f"{key} has no 'name' (one of {', '.join(DETECTORS.names())})")
        if entry.get("label") is not None and not isinstance(entry["label"], str):
            problems.append(f"{key}.label must be a string; got {entry['label']!r}")
        if entry.get("params") is not None and not isinstance(entry["params"], dict):
            problems.append(f"{key}.params must be a mapping of parameter names to values; got {entry['params']!r}")
        errors += problems
        kept.append(None if problems else entry)
    return errors, kept


def _merge_defaults(config: dict) -> dict:
    merged = copy.deepcopy(TRIAL_DEFAULTS)
    for key, value in config.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key].update(copy.deepcopy(value))
        else:
            merged[key] = copy.deepcopy(value)
    merged["detectors"] = [normalise_detector(d) for d in (merged["detectors"] or [])]
    for section in ("poison", "model"):
        merged[section]["params"] = merged[section].get("params") or {}
    return merged


def normalise_detector(entry: Any) -> Any:
    """``"loss"`` -> ``{"name": "loss", "params": {}, "label": "loss"}``; anything odd is left for the checks."""
    if isinstance(entry, str):
        return {"name": entry, "params": {}, "label": entry}
    if isinstance(entry, dict):
        return {"name": entry["name"], "params": entry.get("params") or {},
                "label": entry.get("label") or entry["name"]}
    return entry


def _check_resources(resources: dict) -> list[str]:
    errors = []
    for key, value in resources.items():
        if key not in RESOURCE_CONSTRAINTS:
            allowed = ", ".join(sorted(RESOURCE_CONSTRAINTS))
            errors.append(f"resources.{key} is not known (allowed: {allowed}); remove it")
        elif message := check_value(f"resources.{key}", value, RESOURCE_CONSTRAINTS[key]):
            errors.append(message)
    return errors


def check_trial(config: dict) -> list[str]:
    """Every problem with one resolved trial config (no data is read)."""
    errors = []
    if message := check_value("seed", config["seed"], SEED):
        errors.append(message)
    data, poison, model = config["data"], config["poison"], config["model"]
    errors += _check_named(DATASETS, "data.name", data["name"])
    for key in ("n_train", "n_test"):
        if message := check_value(f"data.{key}", data[key], [NONE, Interval(Integral, 1)]):
            errors.append(message)
    if message := check_value("data.seed", data["seed"], SEED):
        errors.append(message)
    if message := check_value("data.root", data["root"], [NONE, STR]):
        errors.append(message)
    if message := check_value("poison.rate", poison["rate"], [Interval(Real, 0, 1)]):
        errors.append(message)
    errors += _check_entry(POISONS, "poison.method", poison["method"], "poison.params", poison["params"])
    errors += _check_entry(MODELS, "model.name", model["name"], "model.params", model["params"])
    for key, value in config["train"].items():
        if message := check_value(f"train.{key}", value, TRAIN_CONSTRAINTS[key]):
            errors.append(message)
    errors += _check_detectors(config["detectors"])
    from tasks.detect.influence import tracin_optimizer_error

    for i, detector in enumerate(config["detectors"]):
        if detector is not None and detector["name"] == "influence" and isinstance(detector["params"], dict):
            if message := tracin_optimizer_error(detector["params"].get("solver"), config["train"]["optimizer"]):
                errors.append(f"detectors[{i}]: {message}")
    if config.get("unlearn"):
        from tasks.unlearn import check_unlearn_config

        labels = [d["label"] for d in config["detectors"] if isinstance(d, dict)]
        errors += check_unlearn_config(config["unlearn"], labels)
    return errors


def _check_named(registry, key: str, name: Any) -> list[str]:
    if not isinstance(name, str) or name not in registry:
        return [f"{key} must be one of {', '.join(registry.names())}; got {name!r}"]
    return []


def _check_entry(registry, key: str, name: Any, params_key: str, params: Any) -> list[str]:
    errors = _check_named(registry, key, name)
    if errors:
        return errors
    if not isinstance(params, dict):
        return [f"{params_key} must be a mapping; got {params!r}"]
    return registry.get(name).check_params(params_key, params)


def _check_detectors(detectors: list) -> list[str]:
    """Value checks of the detector entries that passed ``_check_shape`` (the others are None)."""
    errors, labels = [], []
    for i, entry in enumerate(detectors):
        if entry is None:
            continue
        key = f"detectors[{i}]"
        errors += _check_entry(DETECTORS, f"{key}.name", entry["name"], f"{key}.params", entry["params"])
        labels.append(entry["label"])
    for label in {x for x in labels if labels.count(x) > 1}:
        errors.append(f"detectors: {label!r} appears more than once; give each entry a distinct 'label'")
    return errors


def resolve(config: dict) -> dict:
    """The trial as it runs: every registry default filled into ``params``, numbers normalised (an int
    given where a float is meant becomes a float), so that ``trial_id`` changes when a default does and
    ``rate: 1`` and ``rate: 1.0`` are one trial. Expects a config that passed ``check_trial``."""
    config = copy.deepcopy(config)
    config["poison"]["rate"] = float(config["poison"]["rate"])
    for section, registry, key in (("poison", POISONS, "method"), ("model", MODELS, "name")):
        config[section]["params"] = _resolved_params(registry, config[section][key], config[section]["params"])
    for detector in config["detectors"]:
        detector["params"] = _resolved_params(DETECTORS, detector["name"], detector["params"])
    for key, value in config["train"].items():
        if _is_float(TRAIN_CONSTRAINTS[key]) and isinstance(value, Integral) and not isinstance(value, bool):
            config["train"][key] = float(value)
    if config.get("unlearn"):
        from tasks.unlearn import UNLEARNERS, normalize_methods

        config["unlearn"]["methods"] = [{"name": name, "params": _resolved_params(UNLEARNERS, name, params)}
                                        for name, params in normalize_methods(config["unlearn"]["methods"])]
    return config


def _is_float(allowed: list) -> bool:
    """The constraints admit real numbers but no constraint is an int range."""
    intervals = [c for c in allowed if isinstance(c, Interval)]
    return bool(intervals) and all(c.kind is Real for c in intervals)


def _resolved_params(registry, name: str, params: dict) -> dict:
    entry = registry.get(name)
    resolved = {**entry.defaults(), **params}
    return {key: float(value) if isinstance(value, Integral) and not isinstance(value, bool)
            and _is_float(entry.constraints.get(key, [])) else value for key, value in resolved.items()}


def identity(config: dict) -> dict:
    """The part of a trial config that determines its results (what ``trial_id`` hashes)."""
    config = copy.deepcopy(config)
    config.pop("sweep", None)
    for section, key in NOT_IDENTITY:
        config.get(section, {}).pop(key, None)
    for params in [config.get(s, {}).get("params") or {} for s in ("poison", "model")] + [
            d.get("params") or {} for d in config.get("detectors") or []]:
        params.pop("device", None)  # where a poison or detector computes, not what
    return config


def trial_id(config: dict) -> str:
    """A stable 16-hex-digit hash of the trial's identity (same science -> same id, any machine)."""
    canonical = json.dumps(identity(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def config_columns(config: dict) -> dict:
    """The trial config flattened into the ``trials`` table's config columns."""
    dumps = lambda value: json.dumps(value, sort_keys=True)  # noqa: E731
    data, poison, model, train = config["data"], config["poison"], config["model"], config["train"]
    return {
        "sweep": config.get("sweep"), "config_json": dumps(identity(config)), "seed": config["seed"],
        "data_name": data["name"], "data_n_train": data["n_train"], "data_n_test": data["n_test"],
        "data_seed": data["seed"], "poison_method": poison["method"], "poison_rate": float(poison["rate"]),
        "poison_params": dumps(poison["params"]), "model_name": model["name"], "model_params": dumps(model["params"]),
        "train_epochs": train["epochs"], "train_batch_size": train["batch_size"], "train_lr": float(train["lr"]),
        "train_optimizer": train["optimizer"], "train_momentum": float(train["momentum"]),
        "train_weight_decay": float(train["weight_decay"]), "detectors": dumps(config["detectors"]),
        "unlearn": dumps(config.get("unlearn")),
    }


def key_columns(config: dict) -> dict:
    """The grouping columns repeated in every table."""
    return {"data_name": config["data"]["name"], "poison_method": config["poison"]["method"],
            "poison_rate": float(config["poison"]["rate"]), "seed": config["seed"]}


def check_data(sweep: Sweep) -> None:
    """Load each dataset the sweep names once and check what needs the data: that it can be found,
    that ``n_train``/``n_test`` fit, and that every poison rate is possible. Raises ``ConfigErrors``."""
    import numpy as np

    from tasks.data import load_dataset, stratified_subset
    from tasks.poisons import check_rate

    errors, loaded, checked = [], {}, set()
    for trial in sweep.trials:
        data = trial["data"]
        key = json.dumps([data, trial["poison"]], sort_keys=True, default=str)
        if key in checked:  # seeds and models repeat these checks: 10,000 trials, a few distinct ones
            continue
        checked.add(key)
        source = (data["name"], data["root"])
        if source not in loaded:
            try:
                loaded[source] = load_dataset(data["name"], root=data["root"])
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
        poison = trial["poison"]
        try:
            message = check_rate(poison["method"], poison["rate"], counts, poison["params"])
        except Exception as error:  # e.g. a class index outside the dataset
            message = f"poison.params: {error}"
        if message:
            errors.append(message)
    if errors:
        raise ConfigErrors(errors, f"sweep {sweep.name!r}")
