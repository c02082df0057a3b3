"""The report's tables: detection, unlearning, found-vs-checked and influence summaries from the record,
and their display forms (formatted frames and Markdown).

The ``scores`` table can be large (every training sample × detector × trial), so it is read a batch
of trials at a time (``summary.batches``), only the columns needed.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from poisonsweep.engine import summary
from poisonsweep.engine.record.read import read_table as read_record
from poisonsweep.engine.text import markdown_text

# shares of the training set checked, for the found-vs-checked curves (steps of 1 %)
FRACTIONS_CHECKED = np.round(np.linspace(0.0, 1.0, 101), 10)
# harmful training samples listed per test point in the influence table, and test points shown on the page
TOP_HARMFUL = 5
INFLUENCE_SHOWN = 40
METRIC_NAMES = {"auroc": "AUROC", "precision_at_n": "precision@n", "auprc": "AUPRC", "f1": "F1", "n_flagged": "flagged",
                "recall_at_10": "recall@10%",
                "clean_test_acc": "clean acc", "poison_success": "poison success", "n_poisoned": "poisoned",
                "identified_fraction": "identified", "clean_test_acc_before": "clean acc before",
                "clean_test_acc_after": "clean acc after", "poison_success_before": "success before",
                "poison_success_after": "success after", "retain_acc_after": "retain acc after"}
COUNT_METRICS = {"n_poisoned", "n_flagged"}


# ---------------------------------------------------------------------------------------------
# summary tables


def detection_table(trials: pd.DataFrame, detections: pd.DataFrame, setting: list[str]) -> pd.DataFrame:
    """Per setting × detector: AUROC, AUPRC, F1, recall@10 % (mean, std, n over seeds), with the
    setting's clean accuracy and poison success."""
    ok = trials[trials["status"] == "ok"]
    detections = summary.with_setting(detections[detections["trial_id"].isin(ok["trial_id"])], ok, setting)
    stats = summary.detection_summary(detections, setting)
    per_setting = summary.trial_summary(ok, setting)
    keep = setting + [f"{m}_{s}" for m in ("clean_test_acc", "poison_success") for s in ("mean", "std")]
    return stats.merge(per_setting[keep], on=setting, how="left")


def unlearning_table(trials: pd.DataFrame, unlearning: pd.DataFrame, setting: list[str]) -> pd.DataFrame:
    ok = trials[trials["status"] == "ok"]
    unlearning = summary.with_setting(unlearning[unlearning["trial_id"].isin(ok["trial_id"])], ok, setting)
    return summary.unlearning_summary(unlearning, setting)


def found_vs_checked_table(out: str, trials: pd.DataFrame, setting: list[str]) -> pd.DataFrame:
    """Share of poisons found vs share of data checked (Koh & Liang 2017, Fig. 6), per setting × detector:
    mean and std over seeds at each of ``FRACTIONS_CHECKED``. Reads the ok trials' scores a batch at a time."""
    ok_ids = sorted(trials.loc[trials["status"] == "ok", "trial_id"])  # batches of neighbouring ids: few row groups
    curves = [summary.found_vs_checked_curves(
        read_record(out, "scores", ["trial_id", "detector", "index", "score", "is_poison"], trial_ids=batch),
        FRACTIONS_CHECKED) for batch in summary.batches(ok_ids)]
    curves = [c for c in curves if not c.empty]
    columns = setting + ["detector", "fraction_checked", "share_found_mean", "share_found_std", "n",
                         "poison_share_mean"]
    if not curves:
        return pd.DataFrame(columns=columns)
    frame = summary.with_setting(pd.concat(curves, ignore_index=True), trials, setting)
    grouped = frame.groupby(setting + ["detector", "fraction_checked"], dropna=False)
    stats = grouped["share_found"].agg(share_found_mean="mean", share_found_std="std", n="count")
    stats["poison_share_mean"] = grouped["poison_share"].mean()
    return stats.reset_index()[columns]


def influence_table(out: str, trials: pd.DataFrame, influence: pd.DataFrame, setting: list[str],
                    top: int = TOP_HARMFUL) -> pd.DataFrame:
    """The ``top`` most harmful training samples of each test point, one row each, with whether the
    sample is a poison and its given and true labels (from that trial's scores)."""
    ok = trials[trials["status"] == "ok"]
    harmful = influence[(influence["kind"] == "harmful") & (influence["rank"] <= top)
                        & influence["trial_id"].isin(ok["trial_id"])]
    columns = setting + ["seed", "trial_id", "detector", "test_index", "rank", "train_index", "influence",
                         "is_poison", "label_given", "label_true"]
    if harmful.empty:
        return pd.DataFrame(columns=columns)
    labels = read_record(out, "scores", ["trial_id", "detector", "index", "is_poison", "label_given", "label_true"],
                         trial_ids=set(harmful["trial_id"])).to_pandas().rename(columns={"index": "train_index"})
    frame = harmful.merge(labels, on=["trial_id", "detector", "train_index"], how="left")
    frame = summary.with_setting(frame, ok, setting + ["seed"])
    return frame.reindex(columns=columns).sort_values(setting + ["seed", "detector", "test_index", "rank"])


# ---------------------------------------------------------------------------------------------
# display: formatted frames for Markdown and HTML


def _pct(rate: float) -> str:
    return f"{rate * 100:.3g}%"


def _display_setting(frame: pd.DataFrame, setting: list[str]) -> pd.DataFrame:
    shown = pd.DataFrame({"data": frame["data_name"], "poison": frame["poison_method"],
                          "rate": frame["poison_rate"].map(lambda r: f"{r:g}")})
    for column in setting[len(summary.SETTING):]:
        shown[column] = frame[column].astype(str)
    return shown


def _display_stats(frame: pd.DataFrame, setting: list[str], keys: list[str], metrics: list[str]) -> pd.DataFrame:
    shown = _display_setting(frame, setting)
    for key in keys:
        shown[key] = frame[key].values
    shown["n"] = frame["n"].values
    for metric in metrics:
        fmt = _fmt_count if metric in COUNT_METRICS else summary.fmt
        shown[METRIC_NAMES.get(metric, metric)] = [fmt(m, s) for m, s in
                                                    zip(frame[f"{metric}_mean"], frame[f"{metric}_std"])]
    return shown


def _fmt_count(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:.0f}" if pd.isna(std) or std == 0 else f"{mean:.1f}±{std:.1f}"


def _display_unlearning(frame: pd.DataFrame, setting: list[str]) -> pd.DataFrame:
    shown = _display_stats(frame, setting, ["selection", "selection_kind", "method"],
                           ["identified_fraction", "clean_test_acc_before", "clean_test_acc_after",
                            "poison_success_before", "poison_success_after", "retain_acc_after"])
    shown["min retain acc"] = [f"{v:.3f}" + (" collapsed" if v < summary.COLLAPSE_BELOW else "")
                               for v in frame["retain_acc_after_min"]]
    return shown


def _display_influence(frame: pd.DataFrame, setting: list[str]) -> pd.DataFrame:
    """One row per test point: its harmful training samples, poisons marked with *."""
    rows = []
    for key, group in frame.groupby(setting + ["seed", "detector", "test_index"], dropna=False, sort=False):
        marked = [f"{int(r.train_index)}{'*' if pd.notna(r.is_poison) and r.is_poison else ''}"
                  for r in group.itertuples()]
        known = group["is_poison"].dropna()
        rows.append({**dict(zip(setting + ["seed", "detector", "test_index"], key)),
                     "most harmful (rank order, * = poison)": ", ".join(marked),
                     "poisons": f"{int(known.sum())}/{len(known)}" if len(known) else "–"})
    shown = pd.DataFrame(rows)
    if shown.empty:
        return shown
    return pd.concat([_display_setting(shown, setting), shown.drop(columns=setting)], axis=1)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency); every cell is inert text
    (``engine.text.markdown_text``: no raw HTML, no ``|`` splitting a cell, one line)."""
    lines = ["| " + " | ".join(markdown_text(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(markdown_text(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def _setting_stem(key: tuple) -> str:
    """A setting's values as a file-name stem (``mnist_badnets_0.1``)."""
    return "_".join(_slug(f"{v:g}" if isinstance(v, float) else str(v)) for v in key)


def _setting_title(key: tuple, setting: list[str]) -> str:
    values = dict(zip(setting, key))
    extras = [f"{c}={values[c]}" for c in setting[3:]]
    return ", ".join([f"{values['data_name']} · {values['poison_method']} at {_pct(values['poison_rate'])}"] + extras)
