"""``poisonsweep report``: tables (CSV, Markdown), figures (PNG) and one HTML page from a sweep's record.

Everything is read from the Parquet tables alone, so a report can be made while the sweep still
runs: only trials whose ``trials`` row exists are counted (a trial writes that row last), and the
report says how many trials are recorded, ok and failed, which planned ones are still missing
(when the run left ``<out>/sweep.json``, see :func:`write_plan`) and which settings have fewer
seeds than others.

The ``scores`` table can be large (every training sample × detector × trial), so it is read one
trial file at a time, only the columns needed.
"""

from __future__ import annotations

import base64
import html
import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from engine import summary
from engine.record import read_table as read_record
from engine.sink import CONFIG_COLUMNS, filesystem, read_table

PLAN_FILE = "sweep.json"
# shares of the training set checked, for the found-vs-checked curves (steps of 1 %)
FRACTIONS_CHECKED = np.round(np.linspace(0.0, 1.0, 101), 10)
# harmful training samples listed per test point in the influence table, and test points shown on the page
TOP_HARMFUL = 5
INFLUENCE_SHOWN = 40
DPI = 110
METRIC_NAMES = {"auroc": "AUROC", "auprc": "AUPRC", "f1": "F1", "recall_at_10": "recall@10%",
                "clean_test_acc": "clean acc", "poison_success": "poison success", "n_poisoned": "poisoned",
                "identified_fraction": "identified", "clean_test_acc_before": "clean acc before",
                "clean_test_acc_after": "clean acc after", "poison_success_before": "success before",
                "poison_success_after": "success after", "retain_acc_after": "retain acc after"}
COUNT_METRICS = {"n_poisoned"}


class RecordError(ValueError):
    """The directory holds nothing a report could be made from."""


# ---------------------------------------------------------------------------------------------
# the plan: which trials the latest run meant to record


def write_plan(sweep) -> None:
    """Write ``<out>/sweep.json``: every trial the sweep plans, so a report can tell what is missing.

    Call it when a run starts; the latest run's plan replaces an earlier one.
    """
    from engine.config import config_columns, trial_id

    trials = []
    for config in sweep.trials:
        columns = {k: v for k, v in config_columns(config).items() if k != "config_json"}
        trials.append({"trial_id": trial_id(config), **columns})
    text = json.dumps({"name": sweep.name, "trials": trials}, indent=1)
    fs, root = filesystem(sweep.out)
    fs.create_dir(root, recursive=True)
    final = f"{root}/{PLAN_FILE}"
    target = f"{root}/.{PLAN_FILE}.{uuid.uuid4().hex}.tmp" if isinstance(fs, pafs.LocalFileSystem) else final
    with fs.open_output_stream(target) as stream:
        stream.write(text.encode())
    if target != final:
        fs.move(target, final)


def read_plan(out: str) -> pd.DataFrame | None:
    """The planned trials (one row each, config columns) or None when no plan was written."""
    fs, root = filesystem(out)
    path = f"{root}/{PLAN_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        plan = json.loads(stream.read().decode())
    return pd.DataFrame(plan["trials"], columns=["trial_id"] + [c for c, _ in CONFIG_COLUMNS if c != "config_json"])


# ---------------------------------------------------------------------------------------------
# what is recorded


@dataclass
class RecordStatus:
    """How complete the record is."""

    recorded: int
    ok: int
    failed: int
    planned: int | None = None  # None: no plan file
    partial: int = 0  # trials with rows in other tables but no trials row yet (being written, or killed)
    unplanned: int = 0  # recorded trials the latest plan does not name (an earlier run's)
    missing: pd.DataFrame = field(default_factory=pd.DataFrame)  # planned, not yet recorded
    uneven: pd.DataFrame = field(default_factory=pd.DataFrame)  # settings with fewer ok seeds than others
    failures: pd.DataFrame = field(default_factory=pd.DataFrame)

    def lines(self) -> list[str]:
        """The status in plain sentences."""
        head = f"{self.recorded} trials recorded: {self.ok} ok, {self.failed} failed"
        if self.planned is not None:
            head += f"; {self.planned} planned, {len(self.missing)} not yet recorded"
        lines = [head + "."]
        if self.planned is None:
            lines.append(f"No {PLAN_FILE} in the directory, so trials not yet started cannot be counted.")
        if self.partial:
            lines.append(f"{self.partial} trial(s) have rows in some tables but no trials row yet (still being "
                         "written, or interrupted): they are left out.")
        if self.unplanned:
            lines.append(f"{self.unplanned} recorded trial(s) are not in the latest plan (an earlier run's); "
                         "they are included.")
        if not self.uneven.empty:
            lines.append(f"{len(self.uneven)} setting(s) have fewer ok seeds than planned or than other settings "
                         "(see 'Seeds per setting').")
        return lines


def _setting_columns(trials: pd.DataFrame, plan: pd.DataFrame | None) -> list[str]:
    frames = [trials] + ([plan] if plan is not None else [])
    return summary.setting_columns(pd.concat(frames, ignore_index=True))


def record_status(trials: pd.DataFrame, plan: pd.DataFrame | None, other_ids: set[str],
                  setting: list[str]) -> RecordStatus:
    """Counts of recorded, ok, failed and missing trials, and the settings short of seeds.

    ``other_ids`` are the trial ids seen in the other tables (to find half-written trials).
    """
    ok = trials[trials["status"] == "ok"]
    status = RecordStatus(recorded=len(trials), ok=len(ok), failed=len(trials) - len(ok),
                          partial=len(other_ids - set(trials["trial_id"])),
                          failures=summary.failures(trials))
    expected = trials
    if plan is not None:
        status.planned = len(plan)
        status.missing = plan[~plan["trial_id"].isin(trials["trial_id"])][setting + ["seed"]]
        status.unplanned = int((~trials["trial_id"].isin(plan["trial_id"])).sum())
        expected = pd.concat([plan, trials], ignore_index=True).drop_duplicates("trial_id")
    status.uneven = _uneven_settings(expected, ok, setting)
    return status


def _seed_list(seeds) -> str:
    return ", ".join(str(s) for s in sorted(set(int(s) for s in seeds)))


def _uneven_settings(expected: pd.DataFrame, ok: pd.DataFrame, setting: list[str]) -> pd.DataFrame:
    """Settings whose ok seeds are fewer than the most any setting has (or than planned)."""
    if expected.empty:
        return pd.DataFrame(columns=setting + ["ok_seeds", "expected", "missing_seeds"])
    rows = []
    # keys as strings: a NaN in a key (e.g. n_train unset) would never compare equal
    done = {tuple(map(str, key)): group for key, group in ok.groupby(setting, dropna=False)}
    most = max((len(g) for g in done.values()), default=0)
    for key, group in expected.groupby(setting, dropna=False):
        found = done.get(tuple(map(str, key)))
        seeds_ok = found["seed"] if found is not None else pd.Series([], dtype="int64")
        wanted = max(most, group["seed"].nunique())
        if len(seeds_ok) < wanted:
            missing = set(group["seed"]) - set(seeds_ok)
            rows.append({**dict(zip(setting, key)), "ok_seeds": _seed_list(seeds_ok) or "none",
                         "expected": wanted, "missing_seeds": _seed_list(missing) or "–"})
    return pd.DataFrame(rows, columns=setting + ["ok_seeds", "expected", "missing_seeds"])


def _ids_in(out: str, tables: list[str]) -> set[str]:
    ids: set[str] = set()
    for table in tables:
        ids |= set(read_table(out, table, ["trial_id"]).column("trial_id").to_pylist())
    return ids


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
    columns = setting + ["detector", "fraction_checked", "share_found_mean", "share_found_std", "n",
                         "poison_share_mean"]
    curves = [c for c in curves if not c.empty]
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
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# figures (matplotlib's object API on the Agg canvas: no pyplot, no global state)


def _new_figure(n_panels: int, ncols: int = 3, panel=(4.2, 3.3)):
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = -(-n_panels // ncols)
    # at least 7 inches wide, so that a one-panel figure still has room for its title and legend
    figure = Figure(figsize=(max(panel[0] * ncols, 7.0), panel[1] * nrows + 1.0), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return figure, axes[:n_panels]


def _percent_axis(axis) -> None:
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value * 100:.3g}%"))


def _log_rates(rates) -> bool:
    """A logarithmic rate axis when the positive rates span more than a decade (symlog if 0 is among them)."""
    positive = sorted({r for r in rates if r > 0})
    return len(positive) > 1 and positive[-1] / positive[0] > 10


def _dodge(rates: pd.Series, all_rates, i: int, k: int) -> pd.Series:
    """Shift line i of k sideways a little, so that error bars at one rate do not hide each other."""
    offset = i - (k - 1) / 2
    if _log_rates(all_rates):
        smallest = min(r for r in all_rates if r > 0)
        return (rates * 10 ** (0.012 * offset)).where(rates > 0, 0.03 * smallest * offset)
    return rates + 0.006 * _rate_span(all_rates) * offset


def _rate_span(rates) -> float:
    """The width of the rate axis: the range swept, or around a single rate, that rate (1 for 0)."""
    return (max(rates) - min(rates)) or (max(rates) or 1.0)


def _rate_axis(ax, rates) -> None:
    """Poison rates on x, ticks at the rates swept: log scale when they span more than a decade."""
    from matplotlib.ticker import FixedLocator, NullLocator

    if _log_rates(rates):
        if min(rates) > 0:
            ax.set_xscale("log")
        else:  # linear near 0, logarithmic beyond the smallest positive rate
            smallest = min(r for r in rates if r > 0)
            ax.set_xscale("symlog", linthresh=smallest, linscale=0.5)
            ax.set_xlim(-0.4 * smallest, 1.3 * max(rates))
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(rates))))
    ax.xaxis.set_minor_locator(NullLocator())
    if len(set(rates)) == 1:  # else autoscaling would zoom in onto the dodge offsets
        rate = min(rates)
        ax.set_xlim(rate - 0.5 * _rate_span(rates), rate + 0.5 * _rate_span(rates))
    _percent_axis(ax.xaxis)
    ax.set_xlabel("poison rate")


def _colors(names) -> dict:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {name: palette[i % len(palette)] for i, name in enumerate(sorted(names))}


def _panel_groups(frame: pd.DataFrame, setting: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """Panels of the per-rate figures: one per dataset × poison method (× other swept columns)."""
    by = [c for c in setting if c != "poison_rate"]
    groups = []
    for key, group in frame.groupby(by, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        extras = [f"{c}={v}" for c, v in zip(by[2:], key[2:])]
        title = f"{key[0]} · {key[1]}" + ("\n" + ", ".join(extras) if extras else "")
        groups.append((title, group))
    return groups


def _suptitle(figure, text: str) -> None:
    """The figure's title, wrapped to its width (about 9 characters per inch at this size)."""
    import textwrap

    figure.suptitle(textwrap.fill(text, width=int(figure.get_figwidth() * 9)))


def _legend(figure, handles, labels) -> None:
    if handles:
        # one row if it fits the width (about 0.09 inch per character plus the marker), else equal columns
        widths = [0.8 + 0.09 * len(label) for label in labels]
        fits = sum(widths) <= figure.get_figwidth()
        ncols = len(labels) if fits else max(1, int(figure.get_figwidth() / max(widths)))
        figure.legend(handles, labels, loc="outside lower center", ncols=ncols, frameon=False)


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)
    return path


def figure_auroc_vs_rate(table: pd.DataFrame, setting: list[str], path: Path) -> Path:
    groups = _panel_groups(table, setting)
    figure, axes = _new_figure(len(groups))
    colors = _colors(table["detector"].unique())
    legend = {}
    for ax, (title, group) in zip(axes, groups):
        detectors = sorted(group["detector"].unique())
        for i, detector in enumerate(detectors):
            rows = group[group["detector"] == detector].sort_values("poison_rate")
            x = _dodge(rows["poison_rate"], group["poison_rate"], i, len(detectors))
            legend[detector] = ax.errorbar(x, rows["auroc_mean"], yerr=rows["auroc_std"].fillna(0), marker="o",
                                           capsize=3, color=colors[detector], label=detector)
        legend.setdefault("chance (0.5)", ax.axhline(0.5, color="grey", linestyle="--", linewidth=1))
        _rate_panel(ax, group["poison_rate"], "detection AUROC", title)
    _suptitle(figure, "Detection AUROC vs poison rate (mean ± std over seeds)")
    _legend(figure, list(legend.values()), list(legend))
    return _save(figure, path)


def _rate_panel(ax, rates: pd.Series, ylabel: str, title: str) -> None:
    """The shared frame of a metric-vs-poison-rate panel: [0, 1] values, one tick per rate."""
    ax.set_ylim(0, 1.04)
    _rate_axis(ax, rates)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def figure_accuracy_vs_rate(table: pd.DataFrame, setting: list[str], path: Path) -> Path:
    groups = _panel_groups(table, setting)
    figure, axes = _new_figure(len(groups))
    lines = {"clean test accuracy": ("clean_test_acc", "tab:blue", "o"),
             "poison success": ("poison_success", "tab:red", "s")}
    legend = {}
    for ax, (title, group) in zip(axes, groups):
        group = group.sort_values("poison_rate")
        for name, (metric, color, marker) in lines.items():
            legend[name] = ax.errorbar(group["poison_rate"], group[f"{metric}_mean"],
                                       yerr=group[f"{metric}_std"].fillna(0), marker=marker, capsize=3, color=color)
        _rate_panel(ax, group["poison_rate"], "share of test set", title)
        _percent_axis(ax.yaxis)
    _suptitle(figure, "Clean accuracy and poison success vs poison rate (mean ± std over seeds)")
    _legend(figure, list(legend.values()), list(legend))
    return _save(figure, path)


def figure_found_vs_checked(curves: pd.DataFrame, setting: list[str], title: str, path: Path) -> Path:
    """One panel per poison rate (and other swept column) of one dataset × poison method."""
    # other swept columns first, then the rate: with few rates, each row of panels is one such setting
    by = [c for c in setting if c not in summary.SETTING] + ["poison_rate"]
    panels = list(curves.groupby(by, dropna=False))
    n_rates = curves["poison_rate"].nunique()
    figure, axes = _new_figure(len(panels), ncols=n_rates if n_rates <= 5 else 4, panel=(4.0, 3.6))
    colors = _colors(curves["detector"].unique())
    legend = {}
    for ax, (key, panel) in zip(axes, panels):
        key = key if isinstance(key, tuple) else (key,)
        for detector, rows in panel.groupby("detector"):
            x, mean, std = rows["fraction_checked"], rows["share_found_mean"], rows["share_found_std"].fillna(0)
            legend[detector] = ax.plot(x, mean, color=colors[detector], linewidth=1.6)[0]
            ax.fill_between(x, (mean - std).clip(0, 1), (mean + std).clip(0, 1), color=colors[detector], alpha=0.15)
        share = panel["poison_share_mean"].mean()
        legend.setdefault("random", ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)[0])
        if share > 0:
            ideal_x = np.array([0.0, share, 1.0])
            legend.setdefault("ideal", ax.plot(ideal_x, np.minimum(ideal_x / share, 1), color="black",
                                               linestyle=":", linewidth=1)[0])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        _percent_axis(ax.xaxis)
        _percent_axis(ax.yaxis)
        ax.set_xlabel("share of training data checked")
        ax.set_ylabel("share of poisons found")
        extras = [f"{c}={v}" for c, v in zip(by[:-1], key[:-1])]
        seeds = int(panel["n"].max())
        ax.set_title(f"rate {_pct(key[-1])}, {seeds} seed{'s' if seeds != 1 else ''}"
                     + ("\n" + ", ".join(extras) if extras else ""), fontsize=10)
        ax.grid(alpha=0.3)
    _suptitle(figure, f"Poisons found vs data checked, most suspicious first: {title} (mean ± std over seeds)")
    _legend(figure, list(legend.values()), list(legend))
    return _save(figure, path)


UNLEARNING_X = {"oracle": "share of poisons forgotten (oracle)", "top": "share of training set forgotten (top-scored)",
                "flagged": "share of poisons flagged (recall)"}
SELECTION_TITLES = {"oracle": "oracle (true poisons)", "top": "{selection}: top-scored",
                    "flagged": "{selection}: flagged"}


def figure_unlearning(table: pd.DataFrame, title: str, path: Path) -> Path:
    """Rows: poison success after and clean accuracy after; columns: selections; one line per method."""
    order = {kind: i for i, kind in enumerate(UNLEARNING_X)}  # oracle, then top-scored, then flagged
    columns = sorted(table.groupby(["selection", "selection_kind"]), key=lambda c: (order.get(c[0][1], 9), c[0]))
    figure, axes = _new_figure(2 * len(columns), ncols=len(columns), panel=(3.8, 3.0))
    axes = axes.reshape(2, len(columns))
    colors = _colors(table["method"].unique())
    legend = {}
    rows = [("poison_success", "poison success after"), ("clean_test_acc", "clean accuracy after")]
    for j, ((selection, kind), part) in enumerate(columns):
        for i, (metric, label) in enumerate(rows):
            ax = axes[i, j]
            for method, lines in part.groupby("method"):
                lines = lines.sort_values("identified_fraction_mean")
                legend[method] = ax.errorbar(lines["identified_fraction_mean"], lines[f"{metric}_after_mean"],
                                             yerr=lines[f"{metric}_after_std"].fillna(0), marker="o", capsize=3,
                                             color=colors[method])
            legend.setdefault("before unlearning", ax.axhline(part[f"{metric}_before_mean"].mean(), color="grey",
                                                              linestyle="--", linewidth=1))
            ax.set_xlim(-0.03, 1.03)
            ax.set_ylim(0, 1.04)
            _percent_axis(ax.xaxis)
            _percent_axis(ax.yaxis)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(SELECTION_TITLES.get(kind, "{selection} ({kind})").format(selection=selection, kind=kind),
                             fontsize=10)
            else:
                ax.set_xlabel(UNLEARNING_X.get(kind, "identified fraction"), fontsize=9)
    _suptitle(figure, f"Unlearning repair vs identified fraction: {title} (mean ± std over seeds)")
    _legend(figure, list(legend.values()), list(legend))
    return _save(figure, path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def _setting_title(key: tuple, setting: list[str]) -> str:
    values = dict(zip(setting, key))
    extras = [f"{c}={values[c]}" for c in setting[3:]]
    return ", ".join([f"{values['data_name']} · {values['poison_method']} at {_pct(values['poison_rate'])}"] + extras)


# ---------------------------------------------------------------------------------------------
# the report


@dataclass
class Report:
    """What ``write_report`` wrote."""

    directory: Path
    html: Path
    markdown: Path
    tables: list[Path]
    figures: list[Path]
    status: RecordStatus


def _write_table(frame: pd.DataFrame, directory: Path, name: str, shown: pd.DataFrame, written: list[Path]) -> str:
    frame.to_csv(directory / f"{name}.csv", index=False)
    text = markdown_table(shown)
    (directory / f"{name}.md").write_text(text + "\n")
    written += [directory / f"{name}.csv", directory / f"{name}.md"]
    return text


def _check_record(out: str, plan: pd.DataFrame | None) -> None:
    fs, root = filesystem(out)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise RecordError(f"{out!r} does not exist")
    if plan is None and fs.get_file_info(f"{root}/trials").type != pafs.FileType.Directory:
        raise RecordError(f"{out!r} holds no trials table and no {PLAN_FILE}: is it a sweep's output directory?")


def default_report_dir(out: str) -> Path:
    """``<out>/report`` for a local sweep; ``./<name>-report`` for a URI."""
    if "://" in out:
        return Path(f"{out.rstrip('/').rsplit('/', 1)[-1]}-report")
    return Path(out) / "report"


def write_report(out: str, directory: str | Path | None = None) -> Report:
    """Write the tables, figures, ``report.md`` and ``report.html`` of the sweep recorded in ``out``.

    Parameters
    ----------
    out : str
        The sweep's output directory or URI.
    directory : str or Path, optional
        Where to write; default :func:`default_report_dir`.

    Returns
    -------
    Report
        The paths written and the record's status.
    """
    plan = read_plan(out)
    _check_record(out, plan)
    directory = Path(directory) if directory is not None else default_report_dir(out)
    directory.mkdir(parents=True, exist_ok=True)
    trials = summary.load(out, "trials")
    setting = _setting_columns(trials, plan)
    status = record_status(trials, plan, _ids_in(out, ["detections", "unlearning"]), setting)
    ok = trials[trials["status"] == "ok"]
    tables: list[Path] = []
    figures: list[Path] = []
    sections: list[tuple[str, str, object]] = []  # (heading, kind, payload): kind "md" table text or "png" path

    def table(name: str, heading: str, frame: pd.DataFrame, shown: pd.DataFrame, note: str = "") -> None:
        text = _write_table(frame, directory, name, shown, tables)
        sections.append((heading, "table", (note, shown, text)))

    def figure(heading: str, path: Path) -> None:
        figures.append(path)
        sections.append((heading, "png", path))

    if not ok.empty:
        per_setting = summary.trial_summary(ok, setting)
        table("trials", "Trials per setting", per_setting,
              _display_stats(per_setting, setting, [], ["clean_test_acc", "poison_success", "n_poisoned"]))
        detections = detection_table(trials, summary.load(out, "detections"), setting)
        if not detections.empty:
            table("detections", "Detectors", detections,
                  _display_stats(detections, setting, ["detector"], summary.DETECTION_METRICS
                                 + ["clean_test_acc", "poison_success"]),
                  "Mean ± std over seeds; n = seeds. Clean accuracy and poison success are the setting's.")
            figure("Detection AUROC vs poison rate",
                   figure_auroc_vs_rate(detections, setting, directory / "auroc_vs_rate.png"))
        figure("Clean accuracy and poison success vs poison rate",
               figure_accuracy_vs_rate(per_setting, setting, directory / "accuracy_vs_rate.png"))
        curves = found_vs_checked_table(out, trials, setting)
        if not curves.empty:
            curves.to_csv(directory / "found_vs_checked.csv", index=False)
            tables.append(directory / "found_vs_checked.csv")
            defined = curves[curves["n"] > 0]  # a setting without poisons has nothing to find
            for (data, poison), part in defined.groupby(["data_name", "poison_method"]):
                path = directory / f"found_vs_checked_{_slug(data)}_{_slug(poison)}.png"
                figure(f"Poisons found vs data checked: {data} · {poison}",
                       figure_found_vs_checked(part, setting, f"{data} · {poison}", path))
        unlearning = unlearning_table(trials, summary.load(out, "unlearning"), setting)
        if not unlearning.empty:
            table("unlearning", "Unlearning", unlearning, _display_unlearning(unlearning, setting),
                  "Mean ± std over seeds; 'min retain acc' is the worst seed, so a collapse stays visible.")
            for key, part in unlearning.groupby(setting, dropna=False):
                title = _setting_title(key, setting)
                name = "unlearning_" + "_".join(_slug(f"{v:g}" if isinstance(v, float) else str(v)) for v in key)
                figure(f"Unlearning: {title}", figure_unlearning(part, title, directory / f"{name}.png"))
        influence = influence_table(out, trials, summary.load(out, "influence"), setting)
        if not influence.empty:
            shown = _display_influence(influence, setting)
            note = (f"The {TOP_HARMFUL} training samples whose removal would lower the test point's loss most "
                    "(influence functions); * marks a poison.")
            if len(shown) > INFLUENCE_SHOWN:
                note += f" The first {INFLUENCE_SHOWN} of {len(shown)} test points; all are in influence_top_harmful.csv."
            table("influence_top_harmful", "Most harmful training samples per test point", influence,
                  shown.head(INFLUENCE_SHOWN), note)
    markdown = directory / "report.md"
    markdown.write_text(_markdown(out, status, setting, sections))
    page = directory / "report.html"
    page.write_text(_html(out, status, setting, sections))
    return Report(directory, page, markdown, tables, figures, status)


def _status_tables(status: RecordStatus, setting: list[str]) -> list[tuple[str, pd.DataFrame]]:
    shown = []
    if not status.uneven.empty:
        shown.append(("Seeds per setting (settings short of seeds)",
                      pd.concat([_display_setting(status.uneven, setting),
                                 status.uneven[["ok_seeds", "expected", "missing_seeds"]]], axis=1)))
    if not status.missing.empty:
        missing = pd.concat([_display_setting(status.missing, setting), status.missing[["seed"]]], axis=1)
        shown.append(("Planned trials not yet recorded", missing))
    if not status.failures.empty:
        failed = status.failures.assign(error=status.failures["error"].fillna("unknown error").map(
            lambda e: e.strip().splitlines()[0] if e.strip() else "unknown error"))
        shown.append(("Failed trials", failed))
    return shown


def _markdown(out: str, status: RecordStatus, setting: list[str], sections) -> str:
    parts = [f"# Sweep report: {out}", "", *[f"- {line}" for line in status.lines()], ""]
    for heading, frame in _status_tables(status, setting):
        parts += [f"## {heading}", "", markdown_table(frame), ""]
    if not sections:
        parts += ["No trial has finished ok yet: no tables or figures.", ""]
    for heading, kind, payload in sections:
        parts += [f"## {heading}", ""]
        if kind == "png":
            parts += [f"![{heading}]({payload.name})", ""]
        else:
            note, _, text = payload
            parts += ([note, ""] if note else []) + [text, ""]
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f2f2f2;text-align:left}td{font-variant-numeric:tabular-nums}img{max-width:100%}
.note{color:#555}"""


def _html(out: str, status: RecordStatus, setting: list[str], sections) -> str:
    e = html.escape
    body = [f"<h1>Sweep report: {e(out)}</h1>", "<ul>" + "".join(f"<li>{e(line)}</li>" for line in status.lines())
            + "</ul>"]
    for heading, frame in _status_tables(status, setting):
        body += [f"<h2>{e(heading)}</h2>", frame.to_html(index=False, escape=True, border=0)]
    if not sections:
        body.append("<p>No trial has finished ok yet: no tables or figures.</p>")
    for heading, kind, payload in sections:
        body.append(f"<h2>{e(heading)}</h2>")
        if kind == "png":
            encoded = base64.b64encode(payload.read_bytes()).decode()
            body.append(f'<img alt="{e(heading)}" src="data:image/png;base64,{encoded}">')
        else:
            note, shown, _ = payload
            if note:
                body.append(f'<p class="note">{e(note)}</p>')
            body.append(shown.to_html(index=False, escape=True, border=0))
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Sweep report: {e(out)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
