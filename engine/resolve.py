"""From a checked trial config to the trial as it runs and as it is recorded: registry defaults filled in,
numbers normalised, the identity that ``trial_id`` hashes, and the columns the tables repeat."""

from __future__ import annotations

import copy
import hashlib
import json
from numbers import Integral, Real
from typing import Any

from poisonsweep.engine.schema import TRIAL_DEFAULTS
from poisonsweep.tasks.data import DATASETS, dataset_fingerprint
from poisonsweep.tasks.detect.base import DETECTORS
from poisonsweep.tasks.models import MODELS
from poisonsweep.tasks.poisons import POISONS
from poisonsweep.tasks.registry import Interval
from poisonsweep.tasks.train import TRAIN_CONSTRAINTS

# fields that say where or how a trial runs, not what it computes: not part of its identity
NOT_IDENTITY = [("data", "root"), ("train", "device")]


def plain_copy(value: Any) -> Any:
    """A deep copy of a config (nested dicts and lists of plain values, as YAML gives): several times
    faster than ``copy.deepcopy``, which a 10,000-trial sweep calls four times per trial. Anything else
    (a tuple, a custom object) goes through ``copy.deepcopy``."""
    if isinstance(value, dict):
        return {key: plain_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_copy(item) for item in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return copy.deepcopy(value)


def merge_defaults(config: dict) -> dict:
    """``TRIAL_DEFAULTS`` overlaid with the config, section by section; detector entries normalised."""
    merged = plain_copy(TRIAL_DEFAULTS)
    for key, value in config.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key].update(plain_copy(value))
        else:
            merged[key] = plain_copy(value)
    merged["detectors"] = [normalise_detector(d) for d in (merged["detectors"] or [])]
    for section in ("data", "poison", "model"):
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


def _fingerprint(data: dict, fingerprints: dict) -> str | None:
    key = (data["name"], json.dumps(data["params"], sort_keys=True, default=str))
    if key not in fingerprints:
        fingerprints[key] = dataset_fingerprint(data["name"], data["params"])
    return fingerprints[key]


def resolve(config: dict, fingerprints: dict | None = None) -> dict:
    """The trial as it runs: every registry default filled into ``params``, numbers normalised (an int
    given where a float is meant becomes a float), so that ``trial_id`` changes when a default does and
    ``rate: 1`` and ``rate: 1.0`` are one trial. Expects a config that passed ``check_trial``.

    ``fingerprints``: a dict shared by the trials of one sweep, so a user's dataset is read once per
    sweep, not once per grid point (a folder of images is a walk over every file)."""
    config = plain_copy(config)
    config["poison"]["rate"] = float(config["poison"]["rate"])
    for section, registry, key in (("data", DATASETS, "name"), ("poison", POISONS, "method"), ("model", MODELS, "name")):
        config[section]["params"] = _resolved_params(registry, config[section][key], config[section]["params"])
    if fingerprint := _fingerprint(config["data"], {} if fingerprints is None else fingerprints):
        config["data"]["fingerprint"] = fingerprint  # the content of a user's file is part of the identity
    for detector in config["detectors"]:
        detector["params"] = _resolved_params(DETECTORS, detector["name"], detector["params"])
    for key, value in config["train"].items():
        if _is_float(TRAIN_CONSTRAINTS[key]) and isinstance(value, Integral) and not isinstance(value, bool):
            config["train"][key] = float(value)
    if config.get("unlearn"):
        from poisonsweep.tasks.unlearn import UNLEARNERS, normalize_methods

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
    """The part of a trial config that determines its results (what ``trial_id`` hashes). A new dict
    that shares the unchanged parts with ``config``: read it (hash it, dump it), never change it."""
    config = {key: value for key, value in config.items() if key != "sweep"}
    for section, key in NOT_IDENTITY:
        if isinstance(config.get(section), dict):
            config[section] = _without(config[section], key)
    if isinstance(config.get("data"), dict) and not config["data"].get("params"):
        config["data"] = _without(config["data"], "params")  # parameterless datasets keep their earlier ids
    for section, registry, key in (("data", DATASETS, "name"), ("poison", POISONS, "method"), ("model", MODELS, "name")):
        if isinstance(config.get(section), dict) and config[section].get("params"):
            placed = _placement(registry, config[section].get(key))
            config[section] = {**config[section], "params": _without(config[section]["params"], *placed)}
    if config.get("detectors"):
        config["detectors"] = [{**d, "params": _without(d["params"], *_placement(DETECTORS, d.get("name")))}
                               if d.get("params") else d for d in config["detectors"]]
    unlearn = config.get("unlearn")
    if isinstance(unlearn, dict) and isinstance(unlearn.get("methods"), list):
        from poisonsweep.tasks.unlearn import UNLEARNERS

        methods = [{**m, "params": _without(m["params"], *_placement(UNLEARNERS, m.get("name")))}
                   if isinstance(m, dict) and isinstance(m.get("params"), dict) else m for m in unlearn["methods"]]
        if methods != unlearn["methods"]:  # only a method with placement parameters changes the dict
            config["unlearn"] = {**unlearn, "methods": methods}
    return config


def _placement(registry, name) -> frozenset:
    """The entry's placement parameters (registry metadata: where it computes, not what); none when the
    name is not registered here."""
    return registry.get(name).placement if isinstance(name, str) and name in registry else frozenset()


def _without(mapping: dict, *keys: str) -> dict:
    return {k: v for k, v in mapping.items() if k not in keys}


def trial_id(config: dict) -> str:
    """A stable 16-hex-digit hash of the trial's identity (same science -> same id, any machine)."""
    canonical = json.dumps(identity(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def config_columns(config: dict, *, with_json: bool = True) -> dict:
    """The trial config flattened into the ``trials`` table's config columns (``with_json=False``: all
    but ``config_json``, which the plan file does without)."""
    dumps = lambda value: json.dumps(value, sort_keys=True)  # noqa: E731
    data, poison, model, train = config["data"], config["poison"], config["model"], config["train"]
    return {
        "sweep": config.get("sweep"), **({"config_json": dumps(identity(config))} if with_json else {}),
        "seed": config["seed"],
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
