"""Summaries of a sweep's Parquet record (mean ± std over seeds), for ``show`` and ``report``.

A *setting* is a point of the sweep's grid without its seed: by default the dataset, the poison
method and the poison rate, plus (:func:`setting_columns`) every other config column that takes
more than one value among the trials, so a sweep over ``train.lr`` never averages two learning
rates together as if they were seeds.
"""

from __future__ import annotations

import pandas as pd

from poisonsweep.engine.record.read import read_table
from poisonsweep.engine.record.tables import CONFIG_COLUMNS

SETTING = ["data_name", "poison_method", "poison_rate"]
DETECTION_METRICS = ["auroc", "precision_at_n", "auprc", "f1", "n_flagged", "recall_at_10"]
TRIAL_METRICS = ["clean_test_acc", "poison_success", "n_poisoned", "train_seconds"]
UNLEARNING_METRICS = ["identified_fraction", "clean_test_acc_after", "clean_test_acc_before", "poison_success_before",
                      "poison_success_after", "retain_acc_after", "poisons_in_forget", "seconds"]
# config columns that never tell two settings apart: the replicate, and bookkeeping
NOT_SETTING = {"seed", "sweep", "config_json"}
# a retain accuracy below this after unlearning is shown as a collapse
COLLAPSE_BELOW = 0.5


def load(out: str, table: str) -> pd.DataFrame:
    return read_table(out, table).to_pandas()


def setting_columns(trials: pd.DataFrame, plan: pd.DataFrame | None = None) -> list[str]:
    """``SETTING`` plus every other config column that takes more than one value within one
    ``SETTING`` group (a column that only follows the poison method, like its resolved params, adds nothing),
    among the recorded ``trials`` and the trials the latest run planned (``plan``, see ``sink.read_plan``)."""
    if plan is not None:
        trials = pd.concat([trials, plan], ignore_index=True)
    if trials.empty:
        return list(SETTING)
    groups = trials.groupby(SETTING, dropna=False)
    varying = [name for name, _ in CONFIG_COLUMNS
               if name not in NOT_SETTING and name not in SETTING and name in trials
               and (groups[name].agg(_distinct) > 1).any()]
    return SETTING + varying


def swept_columns(trials: pd.DataFrame, setting: list[str]) -> list[str]:
    """The columns of ``setting`` that take more than one value among the ``trials`` (with the plan's):
    what a setting's short label shows, the others being the same in every trial."""
    return [column for column in setting if column in trials and _distinct(trials[column]) > 1]


# a setting key's column header in a summary table (other keys: their config key, ``train.lr``)
KEY_HEADERS = {"data_name": "data", "poison_method": "poison", "poison_rate": "rate"}
# config sections whose keys are flattened to ``<section>_<key>`` columns (engine.resolve.config_columns)
_SECTIONS = ("data", "poison", "model", "train")


def config_key(column: str) -> str:
    """The config key a config column holds: ``train_lr`` -> ``train.lr``, ``detectors`` -> ``detectors``."""
    section, _, key = column.partition("_")
    return f"{section}.{key}" if section in _SECTIONS and key else column


def short_values(values: pd.Series) -> pd.Series:
    """Each value as a short label: floats by ``:g``, unset as ``–``, and a column of JSON objects (the
    ``*_params`` columns) by only the entries that differ between its values (``hidden=16``)."""
    import json

    def plain(value) -> str:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return "–"
        if not isinstance(value, float):
            return str(value)
        short = f"{value:g}"  # 6 significant digits: where two values would read alike, all of them
        return short if float(short) == value else repr(value)

    try:
        parsed = [json.loads(v) if isinstance(v, str) else None for v in values]
    except ValueError:
        parsed = []
    if not parsed or not all(isinstance(p, dict) for p in parsed):
        return values.map(plain)
    entry = lambda value: plain(value) if isinstance(value, (int, float, str)) else json.dumps(value)  # noqa: E731
    keys = sorted({k for p in parsed for k in p})
    differing = [k for k in keys if len({entry(p.get(k)) for p in parsed}) > 1]
    return pd.Series([" ".join(f"{k}={entry(p.get(k))}" for k in differing) for p in parsed], index=values.index)


def _distinct(values: pd.Series) -> int:
    """Distinct values, counting None and NaN as one (both mean "unset")."""
    return values.nunique() + int(values.isna().any())


def with_setting(frame: pd.DataFrame, trials: pd.DataFrame, setting: list[str]) -> pd.DataFrame:
    """``frame`` (keyed by ``trial_id``) with the setting columns it lacks, taken from ``trials``."""
    missing = [c for c in setting if c not in frame]
    if not missing:
        return frame
    return frame.merge(trials[["trial_id"] + missing], on="trial_id", how="inner")


def mean_std(frame: pd.DataFrame, by: list[str], metrics: list[str], prefix: str = "",
             per_metric_n: bool = False) -> pd.DataFrame:
    """Per group of ``by``: ``{prefix}{metric}_mean`` and ``_std`` over its rows (the seeds), and ``n``, the
    group's rows; with ``per_metric_n`` a ``{prefix}{metric}_n`` per metric instead (its non-missing values)."""
    grouped = frame.groupby(by, dropna=False)
    stats = grouped[list(metrics)].agg(["mean", "std", "count"] if per_metric_n else ["mean", "std"])
    stats.columns = [f"{prefix}{metric}_{'n' if stat == 'count' else stat}" for metric, stat in stats.columns]
    if not per_metric_n:
        stats["n"] = grouped.size()
    return stats.reset_index()


def trial_summary(trials: pd.DataFrame, setting: list[str] = SETTING) -> pd.DataFrame:
    """Per setting: clean accuracy and poison success over the ``ok`` trials."""
    ok = trials[trials["status"] == "ok"]
    return mean_std(ok, setting, TRIAL_METRICS)


def detection_summary(detections: pd.DataFrame, setting: list[str] = SETTING) -> pd.DataFrame:
    """Per setting and detector: AUROC, precision at n_poisoned, AUPRC, F1, flags and recall at 10 %."""
    return mean_std(detections, setting + ["detector"], DETECTION_METRICS + ["seconds"])


def unlearning_summary(unlearning: pd.DataFrame, setting: list[str] = SETTING) -> pd.DataFrame:
    """Per setting, selection and method: the repair, with the worst retain accuracy kept visible
    (a collapse in one seed must not be averaged away).

    Oracle selections are grouped by their f (a share of the poisons), top-q selections by their q (a
    share of the training set); the identified fraction of ``flagged`` and ``top`` selections is the
    share of poisons they hold, which differs per seed, so ``identified_fraction_mean`` is its mean.
    A record written before ``top_fraction`` existed kept q in ``identified_fraction``.
    """
    top_q = unlearning["top_fraction"].fillna(unlearning["identified_fraction"])
    frame = unlearning.assign(fraction_key=unlearning["identified_fraction"].where(
        unlearning["selection_kind"] == "oracle", top_q.where(unlearning["selection_kind"] == "top")))
    by = setting + ["selection", "selection_kind", "fraction_key", "method"]
    stats = mean_std(frame, by, UNLEARNING_METRICS)
    stats["retain_acc_after_min"] = frame.groupby(by, dropna=False)["retain_acc_after"].min().values
    stats["identified_fraction"] = stats["identified_fraction_mean"]
    return stats.drop(columns="fraction_key")


def failures(trials: pd.DataFrame) -> pd.DataFrame:
    failed = trials[trials["status"] != "ok"]
    return failed[["trial_id", "poison_method", "poison_rate", "seed", "error"]]


def warned(trials: pd.DataFrame) -> pd.DataFrame:
    """The ``ok`` trials whose ``warnings`` column holds something (an older record has no such column)."""
    if "warnings" not in trials:
        return trials.iloc[0:0].assign(warnings=pd.Series(dtype=object))
    flagged = trials[(trials["status"] == "ok") & trials["warnings"].notna() & (trials["warnings"] != "")]
    return flagged[["trial_id", "poison_method", "poison_rate", "seed", "warnings"]]


def fmt(mean: float, std: float, digits: int = 3, sep: str = "±") -> str:
    """``0.912±0.013``; no ± for a single value; ``–`` for undefined."""
    if pd.isna(mean):
        return "–"
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f}{sep}{std:.{digits}f}"


# trials whose scores are read into memory at once (the scores table is one row per sample × detector × trial)
TRIALS_PER_BATCH = 2000


def batches(items: list, size: int = TRIALS_PER_BATCH) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def found_vs_checked_curves(scores, fractions) -> pd.DataFrame:
    """``poisonsweep.tasks.metrics.found_vs_checked`` for every trial × detector of a ``scores`` table at once.

    Each group's samples are ranked by score, most suspicious first, ties by ``index`` (as
    ``found_vs_checked`` ranks them); the share of the group's poisons among its first
    ``round(fraction * n)`` samples is read off one cumulative sum over the whole table.
    Returns rows of trial_id, detector, fraction_checked, share_found (NaN without poisons) and
    poison_share.
    """
    import numpy as np

    frame = scores.to_pandas() if not isinstance(scores, pd.DataFrame) else scores
    columns = ["trial_id", "detector", "fraction_checked", "share_found", "poison_share"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    # one sort of integer codes: trial, detector, score (high first), index
    trial_code, trials = pd.factorize(frame["trial_id"])
    detector_code, detectors = pd.factorize(frame["detector"])
    order = np.lexsort((frame["index"].to_numpy(), -frame["score"].to_numpy(), detector_code, trial_code))
    group = (trial_code * len(detectors) + detector_code)[order]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    sizes = np.diff(np.r_[starts, len(group)])
    keys = pd.MultiIndex.from_arrays([trials[trial_code[order][starts]], detectors[detector_code[order][starts]]])
    poison = frame["is_poison"].to_numpy(dtype=np.int64)[order]
    found_before = np.concatenate([[0], np.cumsum(poison)])  # poisons among all rows before position i
    n_poison = found_before[starts + sizes] - found_before[starts]
    fractions = np.asarray(fractions, dtype=np.float64)
    checked = np.rint(np.outer(sizes, fractions)).astype(np.int64)  # half to even, like Python's round
    found = found_before[starts[:, None] + checked] - found_before[starts][:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(n_poison[:, None] > 0, found / n_poison[:, None], np.nan)
    return pd.DataFrame({
        "trial_id": np.repeat(keys.get_level_values(0), len(fractions)),
        "detector": np.repeat(keys.get_level_values(1), len(fractions)),
        "fraction_checked": np.tile(fractions, len(sizes)),
        "share_found": share.ravel(),
        "poison_share": np.repeat(n_poison / sizes, len(fractions)),
    })[columns]
