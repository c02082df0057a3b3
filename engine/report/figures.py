"""The report's summary figures: AUROC, clean accuracy and poison success against the keys the sweep
varies (:func:`swept_keys`: lines against a number, bars by a category, a panel per value of the
other swept keys), poisons found vs data checked, and unlearning repair vs identified fraction.

User text (config values, detector names) is escaped (:func:`literal`), never read as mathematics;
matplotlib's own tick labels (``10^{-1}`` on a log axis) are drawn as it means them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from poisonsweep.engine import summary
from poisonsweep.engine.report.tables import _pct
from poisonsweep.engine.text import printable

DPI = 110


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


def literal(text) -> str:
    """User text (a config value, a detector's name) as matplotlib shows it literally: every ``$``
    escaped, so ``$x$`` in a label is never read as mathematics (matplotlib's own tick labels still are), and
    control characters shown as escapes (``printable``), as on the terminal."""
    return printable(str(text), newlines=True).replace("$", r"\$")


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


def _numeric_axis(ax, values, key: str) -> None:
    """A swept number on x, ticks at the values swept: log scale when they span more than a decade;
    poison rates as percentages."""
    from matplotlib.ticker import FixedLocator, NullLocator

    if _log_rates(values):
        if min(values) > 0:
            ax.set_xscale("log")
        else:  # linear near 0, logarithmic beyond the smallest positive value
            smallest = min(r for r in values if r > 0)
            ax.set_xscale("symlog", linthresh=smallest, linscale=0.5)
            ax.set_xlim(-0.4 * smallest, 1.3 * max(values))
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(values))))
    ax.xaxis.set_minor_locator(NullLocator())
    if len(set(values)) == 1:  # else autoscaling would zoom in onto the dodge offsets
        value = min(values)
        ax.set_xlim(value - 0.5 * _rate_span(values), value + 0.5 * _rate_span(values))
    if key == "poison_rate":
        _percent_axis(ax.xaxis)
    else:
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlabel(key_label(key))


# ---------------------------------------------------------------------------------------------
# what a summary figure plots against: the keys the sweep varies

KEY_LABELS = {"data_name": "dataset", "poison_method": "poison method", "poison_rate": "poison rate",
              "model_name": "model"}


def key_label(key: str) -> str:
    """A setting column as the config spells it (``train_lr`` -> ``train.lr``), or its plain name."""
    return KEY_LABELS.get(key, key.replace("_", ".", 1))


def swept_keys(frame: pd.DataFrame, setting: list[str]) -> list[str]:
    """The setting columns that take more than one value in ``frame`` (the plan and the trials), as
    ``show`` counts them (``summary.swept_columns``: None and NaN are one "unset")."""
    return summary.swept_columns(frame, setting)


def _numeric(values: pd.Series) -> bool:
    return (pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
            and not values.isna().any())


def x_key(frame: pd.DataFrame, swept: list[str]) -> str | None:
    """The key on x: the poison rate if swept, else the first swept number, else the first swept key
    (None when nothing is swept); the other swept keys make the panels."""
    numbers = [c for c in swept if _numeric(frame[c])]
    if "poison_rate" in numbers:
        return "poison_rate"
    return (numbers or swept or [None])[0]


def against(frame: pd.DataFrame, swept: list[str]) -> str:
    """How a figure's title names its x: ``vs poison rate`` (lines), ``by poison method`` (bars), or
    ``(one setting)`` when the sweep varies nothing but seeds."""
    x = x_key(frame, swept)
    if x is None:
        return "(one setting)"
    return f"{'vs' if _numeric(frame[x]) else 'by'} {key_label(x)}"


def _fixed_text(frame: pd.DataFrame, setting: list[str], swept: list[str]) -> str:
    """The setting columns every row shares, as a title's tail: ``digits · one_shift · rate 33%``."""
    fixed = []
    for column in (c for c in setting if c not in swept and c in frame and len(frame)):
        value = frame[column].iloc[0]
        fixed.append(f"rate {_pct(value)}" if column == "poison_rate" else str(value) if column in summary.SETTING
                     else f"{key_label(column)}={value}")
    return " · ".join(fixed)


def _panels(frame: pd.DataFrame, by: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """One panel per combination of ``by`` (the swept keys not on x), titled ``key=value, ...``."""
    if not by:
        return [("", frame)]
    panels = []
    for key, group in frame.groupby(by, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        values = [_pct(v) if c == "poison_rate" else v for c, v in zip(by, key)]
        panels.append((", ".join(f"{key_label(c)}={v}" for c, v in zip(by, values)), group))
    return panels


def _plot_against(ax, x: str | None, curves: list[tuple], all_x: pd.Series) -> dict:
    """``curves`` (name, rows, metric, color, marker) against ``x``: lines with error bars (mean ± std
    over seeds) for a number, grouped bars for a category or when nothing is swept. Returns the legend handles."""
    handles = {}
    if x is not None and _numeric(all_x):
        values = sorted(set(all_x))
        for i, (name, rows, metric, color, marker) in enumerate(curves):
            rows = rows.sort_values(x)
            handles[name] = ax.errorbar(_dodge(rows[x], values, i, len(curves)), rows[f"{metric}_mean"],
                                        yerr=rows[f"{metric}_std"].fillna(0), marker=marker, capsize=3, color=color)
        _numeric_axis(ax, values, x)
        return handles
    categories = sorted(set(all_x.astype(str))) if x is not None else [""]
    width = 0.8 / max(1, len(curves))
    for i, (name, rows, metric, color, _) in enumerate(curves):
        where = [categories.index(str(v)) for v in rows[x]] if x is not None else [0] * len(rows)
        handles[name] = ax.bar(np.array(where) + (i - (len(curves) - 1) / 2) * width, rows[f"{metric}_mean"],
                               width * 0.9, yerr=rows[f"{metric}_std"].fillna(0), capsize=3, color=color)
    slanted = max(map(len, categories)) > 12  # long names (model params) would run into each other
    ax.set_xticks(range(len(categories)), [literal(c) for c in categories], rotation=20 if slanted else 0,
                  ha="right" if slanted else "center")
    if x is not None:
        ax.set_xlabel(key_label(x))
    return handles


def _colors(names) -> dict:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {name: palette[i % len(palette)] for i, name in enumerate(sorted(names))}


def _suptitle(figure, text: str) -> None:
    """The figure's title, wrapped to its width (about 9 characters per inch at this size)."""
    import textwrap

    figure.suptitle(textwrap.fill(literal(text), width=int(figure.get_figwidth() * 9)))


def _legend(figure, handles, labels) -> None:
    if handles:
        # one row if it fits the width (about 0.09 inch per character plus the marker), else equal columns
        widths = [0.8 + 0.09 * len(label) for label in labels]
        fits = sum(widths) <= figure.get_figwidth()
        ncols = len(labels) if fits else max(1, int(figure.get_figwidth() / max(widths)))
        figure.legend(handles, [literal(label) for label in labels], loc="outside lower center", ncols=ncols,
                      frameon=False)


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)
    return path


def figure_auroc(table: pd.DataFrame, setting: list[str], swept: list[str], path: Path) -> Path:
    """Detection AUROC against the swept key(s): one line (or bar) per detector, one panel per value of
    the other swept keys."""
    x = x_key(table, swept)
    panels = _panels(table, [c for c in swept if c != x])
    figure, axes = _new_figure(len(panels))
    colors = _colors(table["detector"].unique())
    legend = {}
    for ax, (title, group) in zip(axes, panels):
        curves = [(detector, rows, "auroc", colors[detector], "o") for detector, rows in group.groupby("detector")]
        legend.update(_plot_against(ax, x, curves, table[x] if x else group["detector"]))
        legend.setdefault("chance (0.5)", ax.axhline(0.5, color="grey", linestyle="--", linewidth=1))
        _metric_panel(ax, "detection AUROC", title)
    _suptitle(figure, f"Detection AUROC {against(table, swept)}: {_fixed_text(table, setting, swept)} "
                      "(mean ± std over seeds)")
    _legend(figure, list(legend.values()), list(legend))
    return _save(figure, path)


def _metric_panel(ax, ylabel: str, title: str) -> None:
    """The shared frame of a summary panel: [0, 1] values."""
    ax.set_ylim(0, 1.04)
    ax.set_ylabel(ylabel)
    ax.set_title(literal(title), fontsize=10)
    ax.grid(alpha=0.3)


def figure_accuracy(table: pd.DataFrame, setting: list[str], swept: list[str], path: Path) -> Path:
    """Clean accuracy and poison success against the swept key(s), one panel per value of the others."""
    x = x_key(table, swept)
    panels = _panels(table, [c for c in swept if c != x])
    figure, axes = _new_figure(len(panels))
    lines = {"clean test accuracy": ("clean_test_acc", "tab:blue", "o"),
             "poison success": ("poison_success", "tab:red", "s")}
    legend = {}
    for ax, (title, group) in zip(axes, panels):
        curves = [(name, group, metric, color, marker) for name, (metric, color, marker) in lines.items()]
        legend.update(_plot_against(ax, x, curves, table[x] if x else pd.Series([""])))
        _metric_panel(ax, "share of test set", title)
        _percent_axis(ax.yaxis)
    _suptitle(figure, f"Clean accuracy and poison success {against(table, swept)}: "
                      f"{_fixed_text(table, setting, swept)} (mean ± std over seeds)")
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
        ax.set_title(literal(f"rate {_pct(key[-1])}, {seeds} seed{'s' if seeds != 1 else ''}"
                             + ("\n" + ", ".join(extras) if extras else "")), fontsize=10)
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
                ax.set_title(literal(SELECTION_TITLES.get(kind, "{selection} ({kind})").format(selection=selection,
                                                                                                kind=kind)),
                             fontsize=10)
            else:
                ax.set_xlabel(UNLEARNING_X.get(kind, "identified fraction"), fontsize=9)
    _suptitle(figure, f"Unlearning repair vs identified fraction: {title} (mean ± std over seeds)")
    _legend(figure, list(legend.values()), list(legend))
    return _save(figure, path)
