"""The shape and values a sweep config may have: the defaults of a trial and of ``resources``, the allowed
keys (each mapping a ``tasks.shape.Mapping``, the one shape check), and the checks that report every problem
of one trial (each with its key, the bad value and what is allowed) without reading any data.
``poisonsweep.engine.config`` runs them in one pass over the grid."""

from __future__ import annotations

import re
from dataclasses import asdict
from numbers import Integral, Real
from typing import Any

import poisonsweep.tasks.detect  # noqa: F401  (registers the detectors)
from poisonsweep.tasks.data import DATASETS
from poisonsweep.tasks.detect.base import DETECTORS
from poisonsweep.tasks.models import MODELS
from poisonsweep.tasks.poisons import POISONS
from poisonsweep.tasks.registry import NONE, STR, Interval, check_value, with_new_names
from poisonsweep.tasks.shape import DETECTOR_ENTRY, TRIAL_SECTIONS, Mapping
from poisonsweep.tasks.train import TRAIN_CONSTRAINTS, TrainConfig

TRIAL_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "data": {"name": "digits", "n_train": None, "n_test": None, "seed": 0, "root": None, "params": {}},
    "poison": {"method": "one_shift", "rate": 0.1, "params": {}},
    "model": {"name": "keras_cnn", "params": {}},
    "train": asdict(TrainConfig()),
    "detectors": ["activation_clustering", "spectral_signature", "loss"],
    "unlearn": None,
}
RESOURCE_DEFAULTS: dict[str, Any] = {
    "cpu": 1, "gpu": 0, "max_concurrent": None, "max_failures": 1,
    "actors": 0, "actor_cpu": 1, "actor_gpu": 0,  # Ray actors per trial: influence shards, confident learning's folds
    "pack": 1,  # trials trained together in one Ray trial (engine/packs.py); 1: each alone
}
RESOURCE_CONSTRAINTS = {
    "cpu": [Interval(Real, 0, None, "neither")], "gpu": [Interval(Real, 0)],
    "max_concurrent": [NONE, Interval(Integral, 1)], "max_failures": [Interval(Integral, -1)],
    "actors": [Interval(Integral, 0)], "actor_cpu": [Interval(Real, 0)], "actor_gpu": [Interval(Real, 0)],
    "pack": [Interval(Integral, 1)],
}
# old resources keys -> their names now ("influence_actors" also ran confident learning's folds)
RESOURCE_RENAMED = {"influence_actors": "actors"}
# the config's mappings (tasks/shape.py declares a trial's; the engine adds its top level and resources)
TOP_LEVEL_KEYS = {"name", "description", "out", "sweep", "resources", "plugins"} | set(TRIAL_DEFAULTS)
TOP_LEVEL = Mapping(frozenset(TOP_LEVEL_KEYS), "a mapping of keys to values", "is not a known top-level key")
RESOURCES = Mapping(frozenset(RESOURCE_CONSTRAINTS), "a mapping (allowed keys: {keys})")
SECTIONS = {**TRIAL_SECTIONS, "train": Mapping(frozenset(TRAIN_CONSTRAINTS))}

# a seed ends up in an int64 Parquet column and in numpy/torch generators
SEED = [Interval(Integral, 0, 2**63 - 1)]
# a sweep's name becomes a directory under the output (Ray Tune's state): one plain path component
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_RULE = "1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"


def check_name(name: Any) -> list[str]:
    if isinstance(name, str) and NAME_PATTERN.fullmatch(name):
        return []
    return [f"name must be {NAME_RULE} (it names a folder in the output); got {name!r}"]


def check_shape(config: dict) -> tuple[list[str], dict]:
    """Problems with the config's structure (a section that is not a mapping, unknown keys, a detector
    entry without a name...) and the config with the broken parts dropped, so that the value checks
    can still run on the rest and report their problems in the same pass."""
    errors, clean = [], {}
    for key, value in config.items():
        if key in SECTIONS:
            if value is None:
                continue
            section_errors, kept = SECTIONS[key].problems(key, value)
            errors += section_errors
            if kept is not None:
                clean[key] = kept
        elif key == "detectors":
            detector_errors, clean[key] = _shape_detectors(value)
            errors += detector_errors
        else:
            clean[key] = value
    for section in ("data", "poison", "model"):
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
        problems, known = DETECTOR_ENTRY.problems(key, entry)
        if known is None:
            errors += problems
            kept.append(None)
            continue
        if "name" not in entry:
            problems.append(f"{key} has no 'name' (one of {', '.join(DETECTORS.names())})")
        if entry.get("label") is not None and not isinstance(entry["label"], str):
            problems.append(f"{key}.label must be a string; got {entry['label']!r}")
        if entry.get("params") is not None and not isinstance(entry["params"], dict):
            problems.append(f"{key}.params must be a mapping of parameter names to values; got {entry['params']!r}")
        errors += problems
        kept.append(None if problems else entry)
    return errors, kept


def params_with_new_names(trial: dict) -> tuple[dict, list[str], list[str]]:
    """``trial`` with every entry's old parameter names (``Entry.renamed``, any registry's: the dataset, poison,
    model, detectors and unlearning methods) given as their names now, a note for each old name used, and an
    error for a parameter given under both names (``registry.with_new_names``). Runs on the shaped trial, before
    the value checks, so that the checks, the defaults and the trial's identity see the new names."""
    notes: list[str] = []
    errors: list[str] = []

    def renamed(registry, name: Any, path: str, params: Any) -> Any:
        if not (isinstance(name, str) and name in registry and isinstance(params, dict)):
            return params
        params, entry_notes, entry_errors = registry.get(name).with_new_names(path, params)
        notes.extend(entry_notes)
        errors.extend(entry_errors)
        return params

    trial = dict(trial)
    for section, name_key, registry in (("data", "name", DATASETS), ("poison", "method", POISONS),
                                        ("model", "name", MODELS)):
        if isinstance(trial.get(section), dict) and "params" in trial[section]:
            part = trial[section]
            trial[section] = {**part, "params": renamed(registry, part.get(name_key), f"{section}.params",
                                                        part["params"])}
    if isinstance(trial.get("detectors"), list):
        trial["detectors"] = [
            {**entry, "params": renamed(DETECTORS, entry.get("name"), f"detectors[{i}].params", entry["params"])}
            if isinstance(entry, dict) and "params" in entry else entry
            for i, entry in enumerate(trial["detectors"])]
    methods = trial["unlearn"].get("methods") if isinstance(trial.get("unlearn"), dict) else None
    if isinstance(methods, list):
        from poisonsweep.tasks.unlearn import UNLEARNERS  # only a trial that unlearns loads the methods

        trial["unlearn"] = {**trial["unlearn"], "methods": [
            {**method, "params": renamed(UNLEARNERS, method.get("name"), f"unlearn.methods[{i}].params",
                                         method["params"])}
            if isinstance(method, dict) and "params" in method else method
            for i, method in enumerate(methods)]}
    return trial, notes, errors


def resources_with_new_names(resources: dict) -> tuple[dict, list[str], list[str]]:
    """``resources`` with old keys (``RESOURCE_RENAMED``) under their names now (``registry.with_new_names``)."""
    return with_new_names(resources, RESOURCE_RENAMED, "resources")


def check_resources(resources: dict) -> list[str]:
    errors, known = RESOURCES.problems("resources", resources)
    for key, value in (known or {}).items():
        if message := check_value(f"resources.{key}", value, RESOURCE_CONSTRAINTS[key]):
            errors.append(message)
    return errors


def check_trial(config: dict) -> list[str]:
    """Every problem with one resolved trial config (no data is read)."""
    errors = []
    if message := check_value("seed", config["seed"], SEED):
        errors.append(message)
    data, poison, model = config["data"], config["poison"], config["model"]
    errors += _check_entry(DATASETS, "data.name", data["name"], "data.params", data["params"])
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
    errors += data_bound_errors(config, known_counts(data))
    errors += trial_check_errors(config)
    if config.get("unlearn"):
        from poisonsweep.tasks.unlearn import check_unlearn_config

        labels = [d["label"] for d in config["detectors"] if isinstance(d, dict)]
        errors += check_unlearn_config(config["unlearn"], labels)
    return errors


def trial_check_errors(config: dict) -> list[str]:
    """What the dataset's, poison's, model's and detectors' own ``trial_check`` (registry metadata) find wrong with
    their params given the rest of the trial (e.g. the influence detector's TracIn solver needs SGD)."""
    entries = [(DATASETS, config["data"]["name"], "data", config["data"].get("params", {})),
               (POISONS, config["poison"]["method"], "poison", config["poison"]["params"]),
               (MODELS, config["model"]["name"], "model", config["model"]["params"])]
    entries += [(DETECTORS, d["name"], f"detectors[{i}]", d["params"])
                for i, d in enumerate(config["detectors"]) if d is not None]
    errors = []
    for registry, name, prefix, params in entries:
        if not (isinstance(name, str) and name in registry and isinstance(params, dict)):
            continue  # an unknown name or odd params: reported by the value checks
        entry = registry.get(name)
        if entry.trial_check is not None and (message := entry.trial_check({**entry.defaults(), **params}, config)):
            errors.append(f"{prefix}: {message}")
    return errors


def known_counts(data: dict) -> dict[str, int | None]:
    """The counts of a trial's data known without loading it: the dataset entry's ``num_classes`` and the
    config's ``data.n_train`` (None where unknown)."""
    name, n_train = data["name"], data["n_train"]
    declared = DATASETS.get(name).num_classes if isinstance(name, str) and name in DATASETS else None
    return {"classes": declared, "train_samples": n_train if Interval(Integral, 1).accepts(n_train) else None}


def data_bound_errors(config: dict, counts: dict[str, int | None]) -> list[str]:
    """Poison and detector params over a count of the trial's data (their ``BelowData`` constraints: a
    class index of a 10-class dataset >= 10, a neighbour count >= the training samples)."""
    dataset = str(config["data"]["name"])
    entries = [(POISONS, config["poison"]["method"], "poison.params", config["poison"]["params"])]
    entries += [(DETECTORS, d["name"], f"detectors[{i}].params", d["params"])
                for i, d in enumerate(config["detectors"]) if d is not None]
    errors = []
    for registry, name, prefix, params in entries:
        if isinstance(name, str) and name in registry and isinstance(params, dict):
            errors += registry.get(name).data_bound_errors(prefix, params, counts, dataset)
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
    return registry.get(name).check_params(params_key, params) + _missing_params(registry, name, params_key, params)


def _missing_params(registry, name: str, params_key: str, params: dict) -> list[str]:
    """A constrained parameter without a default (``arrays``' ``path``) that the config does not set."""
    entry = registry.get(name)
    required = [k for k in entry.constraints if k not in entry.defaults() and k not in params]
    allowed = {k: " or ".join(c.describe() for c in entry.constraints[k]) for k in required}
    return [f"{params_key}.{k} is required by {registry.kind} {name!r} ({allowed[k]})" for k in required]


def _check_detectors(detectors: list) -> list[str]:
    """Value checks of the detector entries that passed ``check_shape`` (the others are None)."""
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
