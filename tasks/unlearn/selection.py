"""Forget-set selections and the check of an ``unlearn:`` config section.

A selection names how the forget set is found: ``oracle`` (a share of the true poisons), ``flagged``
(a detector's flagged set) or ``top`` (the top share of a detector's scores).
"""

from __future__ import annotations

from numbers import Real

import numpy as np

from poisonsweep.tasks.detect.base import Detection, flag_top
from poisonsweep.tasks.registry import ConfigError
from poisonsweep.tasks.shape import UNLEARN, UNLEARN_GUARD, UNLEARN_METHOD, UNLEARN_SELECTIONS
from poisonsweep.tasks.unlearn.methods import UNLEARNERS

SELECTION_KINDS = tuple(UNLEARN_SELECTIONS)  # oracle, flagged, top (their keys: tasks/shape.py)


def select_forget_set(selection: dict, *, detections: dict[str, Detection], is_poison: np.ndarray,
                      seed: int) -> np.ndarray:
    """The training indices (sorted) that a selection identifies as the forget set.

    Parameters
    ----------
    selection : dict
        ``{kind: oracle, fraction: f}``: a seeded random ``round(f * n_poison)`` of the true poisons
        (nested: for one seed a smaller f picks a subset of a larger f's set);
        ``{kind: flagged, detector: NAME}``: the detector's flagged samples;
        ``{kind: top, detector: NAME, fraction: q}``: the ``round(q * n_train)`` highest scores of the
        detector (ties broken by index).
    detections : dict of str to Detection
        The trial's detections by detector name.
    is_poison : ndarray of bool, shape (n_train,)
        Ground truth; only the oracle reads it.
    """
    kind = selection["kind"]
    if kind == "oracle":
        poisons = np.flatnonzero(is_poison)
        count = int(round(selection["fraction"] * len(poisons)))
        order = np.random.default_rng(seed).permutation(poisons)
        return np.sort(order[:count])
    if kind == "flagged":
        return np.flatnonzero(detections[selection["detector"]].flagged)
    if kind == "top":
        return np.flatnonzero(flag_top(detections[selection["detector"]].scores, selection["fraction"]))
    raise ConfigError(f"unknown selection kind {kind!r}; choose one of: {', '.join(SELECTION_KINDS)}")


def expand_selections(selections: list[dict]) -> list[dict]:
    """One selection per fraction: ``{kind, fractions: [a, b]}`` becomes two selections with ``fraction``."""
    expanded = []
    for selection in selections:
        if "fractions" in selection:
            base = {k: v for k, v in selection.items() if k != "fractions"}
            expanded += [{**base, "fraction": f} for f in selection["fractions"]]
        else:
            expanded.append(dict(selection))
    return expanded


def normalize_methods(methods: list) -> list[tuple[str, dict]]:
    """``[ssd, {name: finetune, params: {epochs: 2}}]`` -> ``[("ssd", {}), ("finetune", {"epochs": 2})]``."""
    return [(m, {}) if isinstance(m, str) else (m["name"], dict(m.get("params") or {})) for m in methods]


# ---------------------------------------------------------------------------------------------
# config check


def _is_fraction(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and 0 <= value <= 1


def check_unlearn_config(config: dict, detector_names: list[str]) -> list[str]:
    """Every problem with an ``unlearn:`` section, as messages naming the key path and what is allowed.

    Parameters
    ----------
    config : dict
        The ``unlearn:`` section: ``{methods: [...], selections: [...]}``.
    detector_names : list of str
        The detectors the trial runs; a selection may only name one of these.
    """
    errors, known = UNLEARN.problems("unlearn", config)
    if known is None:
        return errors
    errors += _check_guard(config.get("guard"))
    for key, check in (("methods", _check_method), ("selections", _check_selection)):
        items = config.get(key)
        if not isinstance(items, list) or not items:
            errors.append(f"unlearn.{key} must be a non-empty list; got {items!r}")
            continue
        for i, item in enumerate(items):
            errors += check(f"unlearn.{key}[{i}]", item, detector_names)
    return errors


def _check_guard(guard) -> list[str]:
    if guard is None:
        return []
    errors, known = UNLEARN_GUARD.problems("unlearn.guard", guard)
    if known is None:
        return errors
    drop = guard.get("max_retain_drop")
    if not _is_fraction(drop):
        errors.append(f"unlearn.guard.max_retain_drop must be a number in [0, 1]; got {drop!r}")
    return errors


def _check_method(path: str, method, detector_names: list[str]) -> list[str]:
    if isinstance(method, str):
        name, params = method, {}
    else:
        unknown, known = UNLEARN_METHOD.problems(path, method)
        if known is None:
            return unknown
        name, params = method.get("name"), method.get("params") or {}
        if not isinstance(params, dict):
            return unknown + [f"{path}.params must be a mapping; got {params!r}"]
        if unknown:
            return unknown
    if name not in UNLEARNERS:
        return [f"{path}.name must be one of: {', '.join(UNLEARNERS.names())}; got {name!r}"]
    return UNLEARNERS.get(name).check_params(f"{path}.params", params)


def _check_selection(path: str, selection, detector_names: list[str]) -> list[str]:
    if not isinstance(selection, dict):
        return [f"{path} must be a mapping with a kind; got {selection!r}"]
    kind = selection.get("kind")
    if kind not in SELECTION_KINDS:
        return [f"{path}.kind must be one of: {', '.join(SELECTION_KINDS)}; got {kind!r}"]
    shape = UNLEARN_SELECTIONS[kind]
    allowed = shape.keys
    errors, _ = shape.problems(path, selection)
    if "detector" in allowed:
        detector = selection.get("detector")
        if detector not in detector_names:
            listed = ", ".join(detector_names) or "none"
            errors.append(f"{path}.detector must be one of the trial's detectors ({listed}); got {detector!r}")
    if "fraction" in allowed:
        errors += _check_fractions(path, selection)
    return errors


def _check_fractions(path: str, selection: dict) -> list[str]:
    has_one, has_list = "fraction" in selection, "fractions" in selection
    if has_one == has_list:
        return [f"{path} needs exactly one of fraction (a number in [0, 1]) or fractions (a list of them)"]
    if has_one:
        value = selection["fraction"]
        return [] if _is_fraction(value) else [f"{path}.fraction must be a number in [0, 1]; got {value!r}"]
    values = selection["fractions"]
    if not isinstance(values, list) or not values:
        return [f"{path}.fractions must be a non-empty list of numbers in [0, 1]; got {values!r}"]
    return [f"{path}.fractions[{i}] must be a number in [0, 1]; got {v!r}"
            for i, v in enumerate(values) if not _is_fraction(v)]

