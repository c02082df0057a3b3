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
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import yaml

import tasks.detect  # noqa: F401  (registers the detectors)
from tasks.data import DATASETS
from tasks.detect.base import DETECTORS
from tasks.models import MODELS
from tasks.poison import POISONS
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


def parse_override(text: str) -> tuple[str, Any]:
    """``"poison.rate=0.2"`` -> ``("poison.rate", 0.2)``; the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigErrors([f"--set {text!r} must look like key=value, e.g. poison.rate=0.2"], "--set")
    return key.strip(), yaml.safe_load(value)


def set_dotted(config: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set`` overrides; a ``sweep.<key>`` override replaces that grid axis, and a plain
    override of a swept key fixes it (removes it from the grid)."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        grid = raw.setdefault("sweep", {}) or {}
        raw["sweep"] = grid
        if key.startswith("sweep."):
            grid[key[len("sweep."):]] = value
        else:
            grid.pop(key, None)
            set_dotted(raw, key, value)
    return raw


def load_sweep(path: str | Path, overrides: list[str] = (), out: str | None = None,
               data_root: str | None = None) -> Sweep:
    """Read, override, expand and validate a sweep file. Raises ``ConfigErrors`` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigErrors([f"config file {str(path)!r} does not exist"], str(path))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigErrors([f"not valid YAML: {error}"], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigErrors(["the top level must be a mapping of keys to values"], str(path))
    raw = apply_overrides(raw, list(overrides))
    if data_root is not None:
        set_dotted(raw, "data.root", data_root)
    return build_sweep(raw, default_name=path.stem, out=out, source=str(path))


def build_sweep(raw: dict, *, default_name: str = "sweep", out: str | None = None, source: str = "config") -> Sweep:
    errors = [f"{k} is not a known top-level key (allowed: {', '.join(sorted(TOP_LEVEL_KEYS))}); remove it"
              for k in raw if k not in TOP_LEVEL_KEYS]
    name = raw.get("name", default_name)
    resources = {**RESOURCE_DEFAULTS, **(raw.get("resources") or {})}
    errors += _check_resources(resources)
    grid = raw.get("sweep") or {}
    if not isinstance(grid, dict):
        errors.append(f"sweep must map dotted keys to lists of values; got {grid!r}")
        grid = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            errors.append(f"sweep.{key} must be a non-empty list of values; got {values!r}")
    if errors:
        raise ConfigErrors(errors, source)

    base = _merge_defaults({k: v for k, v in raw.items() if k in TRIAL_DEFAULTS})
    trials = []
    for point in itertools.product(*grid.values()):
        trial = copy.deepcopy(base)
        for key, value in zip(grid, point):
            if key.split(".")[0] not in TRIAL_DEFAULTS:
                errors.append(f"sweep.{key} does not name a trial setting (it must start with one of "
                              f"{', '.join(sorted(TRIAL_DEFAULTS))})")
                continue
            set_dotted(trial, key, copy.deepcopy(value))
        trial = _merge_defaults(trial)
        errors += check_trial(trial)
        if resources["gpu"] == 0 and trial["train"]["device"] == "cuda":
            errors.append("train.device is 'cuda' but resources.gpu is 0: a trial without a GPU share sees no GPU; "
                          "set resources.gpu (e.g. 0.25) or train.device: auto")
        trial["sweep"] = name
        trials.append(trial)
    if errors:
        raise ConfigErrors(errors, source)
    unique = {trial_id(t): t for t in trials}  # a grid that repeats a point runs it once
    return Sweep(name=name, out=out or raw.get("out") or f"results/{name}", trials=list(unique.values()),
                 resources=resources, grid=grid)


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
    if isinstance(entry, dict) and "name" in entry:
        extra = {k: v for k, v in entry.items() if k not in ("name", "params", "label")}
        return {"name": entry["name"], "params": entry.get("params") or {},
                "label": entry.get("label") or entry["name"], **extra}
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


def _check_section_keys(config: dict) -> list[str]:
    errors = []
    for section, allowed in SECTION_KEYS.items():
        value = config.get(section)
        if not isinstance(value, dict):
            errors.append(f"{section} must be a mapping; got {value!r}")
            continue
        errors += [f"{section}.{k} is not known (allowed: {', '.join(sorted(allowed))}); remove it"
                   for k in value if k not in allowed]
    return errors


def check_trial(config: dict) -> list[str]:
    """Every problem with one resolved trial config (no data is read)."""
    errors = _check_section_keys(config)
    if errors:
        return errors
    if message := check_value("seed", config["seed"], [Interval(Integral, 0)]):
        errors.append(message)
    data, poison, model = config["data"], config["poison"], config["model"]
    errors += _check_named(DATASETS, "data.name", data["name"])
    for key in ("n_train", "n_test"):
        if message := check_value(f"data.{key}", data[key], [NONE, Interval(Integral, 1)]):
            errors.append(message)
    if message := check_value("data.seed", data["seed"], [Interval(Integral, 0)]):
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


def _check_detectors(detectors: Any) -> list[str]:
    if not isinstance(detectors, list):
        return [f"detectors must be a list of detector names or {{name, params, label}} mappings; got {detectors!r}"]
    errors, labels = [], []
    for i, entry in enumerate(detectors):
        key = f"detectors[{i}]"
        if not isinstance(entry, dict):
            errors.append(f"{key} must be a detector name or a mapping with 'name'; got {entry!r}")
            continue
        extra = set(entry) - {"name", "params", "label"}
        if extra:
            errors.append(f"{key} has unknown keys {sorted(extra)} (allowed: name, params, label); remove them")
        errors += _check_entry(DETECTORS, f"{key}.name", entry["name"], f"{key}.params", entry["params"])
        labels.append(entry["label"])
    for label in {x for x in labels if labels.count(x) > 1}:
        errors.append(f"detectors: {label!r} appears more than once; give each entry a distinct 'label'")
    return errors


def identity(config: dict) -> dict:
    """The part of a trial config that determines its results (what ``trial_id`` hashes)."""
    config = copy.deepcopy(config)
    config.pop("sweep", None)
    for section, key in NOT_IDENTITY:
        config.get(section, {}).pop(key, None)
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
    from tasks.poison import check_rate

    errors, loaded = [], {}
    for trial in sweep.trials:
        data = trial["data"]
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
