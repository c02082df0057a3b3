"""Summaries of a sweep's Parquet record (mean ± std over seeds), for ``show`` and ``report``."""

from __future__ import annotations

import pandas as pd

from engine.sink import read_table

SETTING = ["data_name", "poison_method", "poison_rate"]
DETECTION_METRICS = ["auroc", "auprc", "f1", "recall_at_10"]
# a retain accuracy below this after unlearning is shown as a collapse
COLLAPSE_BELOW = 0.5


def load(out: str, table: str) -> pd.DataFrame:
    return read_table(out, table).to_pandas()


def _mean_std(frame: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    grouped = frame.groupby(by, dropna=False)
    stats = grouped[metrics].agg(["mean", "std"])
    stats.columns = [f"{metric}_{stat}" for metric, stat in stats.columns]
    stats["n"] = grouped.size()
    return stats.reset_index()


def trial_summary(trials: pd.DataFrame) -> pd.DataFrame:
    """Per setting: clean accuracy and poison success over the ``ok`` trials."""
    ok = trials[trials["status"] == "ok"]
    return _mean_std(ok, SETTING, ["clean_test_acc", "poison_success", "n_poisoned", "train_seconds"])


def detection_summary(detections: pd.DataFrame) -> pd.DataFrame:
    """Per setting and detector: AUROC, AUPRC, F1 and recall at 10 %."""
    return _mean_std(detections, SETTING + ["detector"], DETECTION_METRICS + ["seconds"])


def unlearning_summary(unlearning: pd.DataFrame) -> pd.DataFrame:
    """Per setting, selection and method: the repair, with the worst retain accuracy kept visible
    (a collapse in one seed must not be averaged away)."""
    by = SETTING + ["selection", "identified_fraction", "method"]
    stats = _mean_std(unlearning, by, ["clean_test_acc_after", "poison_success_before", "poison_success_after",
                                        "retain_acc_after", "poisons_in_forget", "seconds"])
    stats["retain_acc_after_min"] = unlearning.groupby(by, dropna=False)["retain_acc_after"].min().values
    return stats


def failures(trials: pd.DataFrame) -> pd.DataFrame:
    failed = trials[trials["status"] != "ok"]
    return failed[["trial_id", "poison_method", "poison_rate", "seed", "error"]]


def fmt(mean: float, std: float) -> str:
    """``0.912 ± 0.013``; no ± for a single value; ``–`` for undefined."""
    if pd.isna(mean):
        return "–"
    return f"{mean:.3f}" if pd.isna(std) else f"{mean:.3f}±{std:.3f}"
