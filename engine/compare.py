"""Two or more sweeps side by side (``poisonsweep compare A B [...]``): the same settings, each record's
mean ± std over seeds, and every later record's difference from the first with its standard error.

Settings are grouped as the report groups them (``poisonsweep.engine.summary``): a setting is the
dataset, poison method and rate, plus every key that a record sweeps (the union over the records).
Keys that differ *between* the records (a changed model, a new code version) are not part of the
setting: they are what is being compared, listed in ``Comparison.differences``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from poisonsweep.engine import summary
from poisonsweep.engine.record.tables import CONFIG_COLUMNS
from poisonsweep.tasks.registry import ConfigError

METRICS = ("auroc", "precision_at_n", "auprc", "f1", "recall_at_10", "n_flagged")
TRIAL_METRICS = ("clean_test_acc", "poison_success")
# keys listed as differences between records (the seed and bookkeeping never are)
COMPARED_KEYS = [name for name, _ in CONFIG_COLUMNS if name not in summary.NOT_SETTING] + ["code_version"]


@dataclass
class Comparison:
    records: list[str]  # the output directories, in order: A, B, ...
    labels: list[str]  # "A", "B", ...
    setting: list[str]  # the columns that make a setting
    metric: str
    detections: pd.DataFrame  # setting + detector, then per label {label}_mean/_std/_n, per later label delta_/se_
    trials: pd.DataFrame  # setting, then per label and trial metric {label}_{metric}_mean/_std/_n, delta_/se_
    differences: list[str] = field(default_factory=list)  # "model_name: A mlp; B keras_cnn"


def labels_for(count: int) -> list[str]:
    """A, B, ..., Z, then R27, R28 ... (a record is named by its letter in every table)."""
    return [chr(ord("A") + i) if i < 26 else f"R{i + 1}" for i in range(count)]


def _load(out: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    trials = summary.load(out, "trials")
    ok = trials[trials["status"] == "ok"] if not trials.empty else trials
    if ok.empty:
        raise ConfigError(f"{out!r} holds no ok trials: is it a sweep's output directory?")
    detections = summary.load(out, "detections")
    return ok, detections[detections["trial_id"].isin(ok["trial_id"])]


def shared_setting(trials: list[pd.DataFrame]) -> list[str]:
    """``summary.setting_columns`` of each record, united in order; only columns every record has."""
    columns: list[str] = []
    for frame in trials:
        columns += [c for c in summary.setting_columns(frame) if c not in columns]
    return [c for c in columns if all(c in frame for frame in trials)]


def differences(trials: list[pd.DataFrame], labels: list[str], setting: list[str]) -> list[str]:
    """One line per key whose values differ between the records (not a swept key: those are settings)."""
    lines = []
    for key in COMPARED_KEYS:
        if key in setting or not all(key in frame for frame in trials):
            continue
        values = [tuple(sorted(frame[key].dropna().astype(str).unique())) for frame in trials]
        if len(set(values)) > 1:
            lines.append(f"{key}: " + "; ".join(f"{label} {', '.join(v) or '(unset)'}" for label, v in zip(labels, values)))
    return lines


def _side_by_side(frames: list[pd.DataFrame], keys: list[str], metrics, labels: list[str]) -> pd.DataFrame:
    merged = frames[0]
    for frame in frames[1:]:
        merged = merged.merge(frame, on=keys, how="outer")  # a setting one record lacks shows as missing
    for metric in metrics:
        first = labels[0]
        for label in labels[1:]:
            merged[f"delta_{label}_{metric}"] = merged[f"{label}_{metric}_mean"] - merged[f"{first}_{metric}_mean"]
            merged[f"se_{label}_{metric}"] = [
                difference_se(sa, na, sb, nb) for sa, na, sb, nb in zip(
                    merged[f"{first}_{metric}_std"], merged[f"{first}_{metric}_n"],
                    merged[f"{label}_{metric}_std"], merged[f"{label}_{metric}_n"])]
    return merged.sort_values(keys, na_position="last").reset_index(drop=True)


def difference_se(std_a: float, n_a: float, std_b: float, n_b: float) -> float:
    """Standard error of a difference of two means over independent seeds (Welch): NaN where either side
    has a single seed (no spread to judge the difference by)."""
    if any(pd.isna(v) for v in (std_a, n_a, std_b, n_b)) or n_a < 2 or n_b < 2:
        return math.nan
    return math.sqrt(std_a ** 2 / n_a + std_b ** 2 / n_b)


def compare(outs: list[str], metric: str = "auroc") -> Comparison:
    """The records in ``outs`` side by side (the first is the baseline); ``metric`` is the detection
    metric the comparison leads with (every one of ``METRICS`` is computed)."""
    if len(outs) < 2:
        raise ConfigError("compare needs at least two sweep output directories")
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    loaded = [_load(out) for out in outs]
    labels = labels_for(len(outs))
    trials = [t for t, _ in loaded]
    setting = shared_setting(trials)
    detections = [summary.with_setting(d, t, setting) for t, d in loaded]
    by_detector = _side_by_side([summary.mean_std(d, setting + ["detector"], METRICS, f"{label}_", per_metric_n=True)
                                 for d, label in zip(detections, labels)], setting + ["detector"], METRICS, labels)
    by_setting = _side_by_side([summary.mean_std(t, setting, TRIAL_METRICS, f"{label}_", per_metric_n=True)
                                for t, label in zip(trials, labels)], setting, TRIAL_METRICS, labels)
    return Comparison(list(outs), labels, setting, metric, by_detector, by_setting,
                      differences(trials, labels, setting))


def varying_columns(frame: pd.DataFrame, setting: list[str]) -> list[str]:
    """The setting columns whose value changes among ``frame``'s rows (all of them where none does)."""
    return summary.swept_columns(frame, setting) or list(setting)


def setting_labels(frame: pd.DataFrame, setting: list[str]) -> list[str]:
    """Short names of ``frame``'s settings: the values of its ``varying_columns``, joined by spaces:
    ``one_shift 0.33``."""
    varying = varying_columns(frame, setting)
    return [" ".join(_value(row[c]) for c in varying) for _, row in frame.iterrows()]


def _value(value) -> str:
    if isinstance(value, float) and not pd.isna(value):
        return f"{value:g}"
    return "–" if pd.isna(value) else str(value)


def fmt_delta(delta: float, se: float) -> str:
    """``+0.052±0.013`` (± the standard error), ``+0.052`` without a spread, ``–`` when one side is missing."""
    if pd.isna(delta):
        return "–"
    return f"{delta:+.3f}" if pd.isna(se) else f"{delta:+.3f}±{se:.3f}"
