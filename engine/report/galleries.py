"""Figures of samples: score histograms (poisons vs clean) and galleries of the most suspicious and
the missed training images, for one trial of a setting (see ``poisonsweep.engine.report.samples``).

A histogram shows what a table of AUROCs hides: a detector whose poisons sit at the *low* end of its
scores (AUROC near 0) has a signal with the wrong sign, not no signal. The detector's own flag
threshold (the lowest score it flagged) is drawn, so one sees what its label-free rule cut.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from poisonsweep.engine.report.figures import _legend, _new_figure, _save, _suptitle, literal
from poisonsweep.engine.report.samples import (flag_threshold, gallery_rows, read_scores, rebuild_images,
                                   rebuild_success_set, representative_trials, unlearning_examples)
from poisonsweep.engine.report.tables import _setting_stem, _setting_title

HISTOGRAM_BINS = 40
# scores beyond these quantiles are counted in the outermost bins, so one extreme score
# does not squeeze every other into a single bar
CLIP_QUANTILES = (0.001, 0.999)
POISON_COLOR, CLEAN_COLOR, THRESHOLD_COLOR = "tab:red", "tab:blue", "black"
TILE = (0.95, 1.3)  # inches per gallery image, with its two caption lines
NEUTRAL_FRAME = "#bbbbbb"


# non-negative scores whose top is this many times their median (losses) get a logarithmic axis
LOG_SPAN = 30.0


def _log_scale(scores: np.ndarray) -> bool:
    positive = scores[scores > 0]
    if scores.min() < 0 or len(positive) < 2:
        return False
    return np.quantile(scores, CLIP_QUANTILES[1]) > LOG_SPAN * np.median(positive)


def _bin_edges(scores: np.ndarray, threshold: float | None, log: bool) -> np.ndarray:
    low, high = np.quantile(scores[scores > 0] if log else scores, CLIP_QUANTILES)
    if threshold is not None and (threshold > 0 or not log):
        low, high = min(low, threshold), max(high, threshold)
    if not high > low:  # all scores equal
        low, high = (low / 2, high * 2) if log else (low - 0.5, high + 0.5)
    return np.geomspace(low, high, HISTOGRAM_BINS + 1) if log else np.linspace(low, high, HISTOGRAM_BINS + 1)


def figure_score_histograms(scores: pd.DataFrame, title: str, path: Path) -> Path:
    """One panel per detector: the share of poisoned and of clean training samples per score bin
    (each normalised to its own count, so a 1 % poison set stays visible), and the flag threshold."""
    detectors = sorted(scores["detector"].unique())
    figure, axes = _new_figure(len(detectors), ncols=min(4, len(detectors)), panel=(3.6, 2.7))
    legend = {}
    for ax, detector in zip(axes, detectors):
        rows = scores[scores["detector"] == detector]
        values, is_poison = rows["score"].to_numpy(dtype=float), rows["is_poison"].to_numpy(dtype=bool)
        finite = np.isfinite(values)
        values, is_poison = values[finite], is_poison[finite]
        threshold = flag_threshold(rows[finite])
        log = len(values) > 0 and _log_scale(values)
        edges = _bin_edges(values, threshold, log) if len(values) else np.linspace(0, 1, HISTOGRAM_BINS + 1)
        clipped = np.clip(values, edges[0], edges[-1])
        for name, mask, color in (("clean", ~is_poison, CLEAN_COLOR), ("poisoned", is_poison, POISON_COLOR)):
            if mask.any():
                label = f"{name} training samples"
                legend[label] = ax.hist(clipped[mask], bins=edges, weights=np.full(mask.sum(), 1 / mask.sum()),
                                        color=color, alpha=0.55, histtype="stepfilled")[2][0]
        if threshold is not None:
            legend["flag threshold (lowest flagged score)"] = ax.axvline(threshold, color=THRESHOLD_COLOR,
                                                                         linestyle="--", linewidth=1.2)
        n_flagged = int(rows["flagged"].sum())
        ax.set_title(literal(f"{detector}\n{n_flagged} flagged, {int(is_poison.sum())} poisons"), fontsize=9)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel("score (higher = more suspicious)" + (", log scale" if log else ""), fontsize=8)
        ax.set_ylabel("share of its group", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    _suptitle(figure, f"Score distributions, poisoned vs clean: {title}")
    _legend(figure, list(legend.values()), list(legend))
    return _save(figure, path)


def _rgb(image: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) in [0, 1] from a (C, H, W) image; mid grey where no image could be rebuilt."""
    if image is None:
        return np.full((*shape, 3), 0.5)
    pixels = np.clip(image.transpose(1, 2, 0), 0, 1)
    return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels


def _strip(ax, images: list, captions: list[str], colors: list[str], widths: list[float], n_columns: int,
           label: str) -> None:
    """One row of images drawn as a single mosaic (one imshow, not one axes per image: fast to
    render), each framed in its color with its caption above."""
    from matplotlib.patches import Rectangle

    shape = next((im.shape[1:] for im in images if im is not None), (8, 8))
    h, w = shape
    step = w + max(1, w // 4)
    mosaic = np.ones((h, step * n_columns, 3))
    for c, (image, caption, color, width) in enumerate(zip(images, captions, colors, widths)):
        mosaic[:, c * step:c * step + w] = _rgb(image, shape)
        ax.add_patch(Rectangle((c * step - 0.5, -0.5), w, h, fill=False, edgecolor=color, linewidth=width))
        ax.annotate(caption, (c * step + w / 2 - 0.5, -0.5), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=6.5, color=color if color != NEUTRAL_FRAME else "black")
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xlim(-1, step * n_columns - 1)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_ylabel(literal(label), fontsize=7.5, rotation=0, ha="right", va="center")


def _caption(row) -> str:
    labels = f"label {row.label_given}" + (f" (true {row.label_true})" if row.label_given != row.label_true else "")
    flag = " F" if row.flagged else ""
    return f"#{row.rank}{flag} · {row.score:.2g}\n{labels}"


def figure_gallery(rows: pd.DataFrame, images: dict[int, np.ndarray], n_train: int, title: str,
                   path: Path) -> Path:
    """Two rows of images per detector: its top-ranked training samples, and the poisons it ranked
    lowest. Poisons have a red frame; captions give rank, score, given (and true) label, F = flagged."""
    strips = [(detector, part, group) for (detector, part), group in rows.groupby(["detector", "part"], sort=False)]
    width = max(len(group) for *_, group in strips)
    figure = _gallery_canvas(len(strips), width)
    for ax, (detector, part, group) in zip(figure.subplots(len(strips), 1, squeeze=False)[:, 0], strips):
        poison = group["is_poison"].to_numpy()
        what = "most suspicious" if part == "top" else f"poisons ranked lowest\n(rank of {n_train})"
        _strip(ax, [images.get(int(i)) for i in group["index"]], [_caption(r) for r in group.itertuples()],
               [POISON_COLOR if p else NEUTRAL_FRAME for p in poison], [2.5 if p else 0.8 for p in poison], width,
               f"{detector}\n{what}")
    _suptitle(figure, f"Most suspicious training images and missed poisons: {title} "
                      "(red frame = poison; #rank, F = flagged · score; label given, true if it differs)")
    return _save(figure, path)


def _gallery_canvas(n_rows: int, n_columns: int):
    from matplotlib.figure import Figure

    return Figure(figsize=(TILE[0] * n_columns + 1.8, TILE[1] * n_rows + 0.9), layout="constrained")


# ---------------------------------------------------------------------------------------------
# the samples part of the report

GALLERY_TOP = 10  # most suspicious images shown per detector
GALLERY_MISSED = 5  # lowest-ranked poisons shown per detector
MAX_SETTINGS = 12  # settings that get histograms and galleries (the first, in setting order)


def _check_text(rebuilt) -> str:
    if not rebuilt.checked:
        return "not checked"
    if rebuilt.exact:
        return f"all {rebuilt.checked} shown samples match the record"
    return (f"WARNING: {rebuilt.mismatches} of {rebuilt.checked} shown samples differ from the record "
            "(given or true label, or poison flag): the images may not be the trial's")


def sample_figures(out: str, trials: pd.DataFrame, setting: list[str], directory: Path, *,
                   top: int = GALLERY_TOP, missed: int = GALLERY_MISSED,
                   max_settings: int = MAX_SETTINGS) -> tuple[pd.DataFrame, list[tuple[str, Path]]]:
    """Histograms and galleries of one trial per setting (the lowest seed), for the first
    ``max_settings`` settings. Returns a table of the trials shown (with the image check) and the
    figures as (heading, path)."""
    shown, figures = [], []
    for trial in representative_trials(trials, setting).head(max_settings).itertuples(index=False):
        scores = read_scores(out, trial.trial_id)
        if scores is None or scores.empty:
            continue
        key = tuple(getattr(trial, c) for c in setting)
        title = f"{_setting_title(key, setting)}, seed {trial.seed}"
        stem = _setting_stem(key)
        figures.append((f"Score distributions: {title}",
                        figure_score_histograms(scores, title, directory / f"scores_{stem}.png")))
        rows = gallery_rows(scores, top, missed)
        rebuilt = rebuild_images(trial.config_json, out, rows)
        if rebuilt.images:
            figures.append((f"Most suspicious samples: {title}",
                            figure_gallery(rows, rebuilt.images, int(trial.n_train), title,
                                           directory / f"samples_{stem}.png")))
        shown.append({**dict(zip(setting, key)), "seed": trial.seed, "trial_id": trial.trial_id,
                      "images": rebuilt.note, "check": _check_text(rebuilt)})
    return pd.DataFrame(shown, columns=setting + ["seed", "trial_id", "images", "check"]), figures


# ---------------------------------------------------------------------------------------------
# unlearning at a glance

EFFECT_COLOR, NO_EFFECT_COLOR = "tab:red", "tab:green"


def _selection_label(row) -> str:
    if row.selection_kind == "oracle":
        return f"oracle {row.identified_fraction:.0%}"
    return f"{row.selection} flagged (recall {row.identified_fraction:.0%})"


def figure_unlearning_examples(runs: pd.DataFrame, success, title: str, path: Path) -> Path:
    """The poison's test inputs (e.g. triggered images), with the class predicted before unlearning
    (first row) and after each run (one row per selection × method). Red: the poison's effect shows
    (the attacker's class for a "hit" poison, a wrong class for a "miss" one); green: it does not."""
    n = len(success.x)
    strips = [("before unlearning", list(runs["success_predictions_before"].iloc[0]))]
    strips += [(f"{r.method} after\n{_selection_label(r)}", list(r.success_predictions_after))
               for r in runs.itertuples(index=False)]
    figure = _gallery_canvas(len(strips), n)
    for ax, (label, predictions) in zip(figure.subplots(len(strips), 1, squeeze=False)[:, 0], strips):
        effect = [(p == w) == (success.kind == "hit") for p, w in zip(predictions, success.wanted)]
        _strip(ax, list(success.x), [f"predicted {p}" for p in predictions],
               [EFFECT_COLOR if e else NO_EFFECT_COLOR for e in effect], [2.0] * n, n, label)
    wanted = "attacker's class" if success.kind == "hit" else "a wrong class"
    _suptitle(figure, f"The poison's test inputs classified before and after unlearning: {title} "
                      f"(red = the poison works: {wanted}; green = it does not)")
    return _save(figure, path)


def unlearning_example_figures(out: str, trials: pd.DataFrame, unlearning_rows: pd.DataFrame, setting: list[str],
                               directory: Path, *, max_settings: int = MAX_SETTINGS) -> list[tuple[str, Path]]:
    """Per setting that unlearns (one trial, the lowest seed): the before/after picture, from the
    record's ``unlearning`` rows (read once by the report)."""
    figures = []
    recorded = "success_predictions_after" in unlearning_rows
    for trial in representative_trials(trials, setting).head(max_settings).itertuples(index=False):
        rows = unlearning_rows[unlearning_rows["trial_id"] == trial.trial_id] if recorded else None
        runs = unlearning_examples(rows) if rows is not None and not rows.empty else None
        if runs is None or runs.empty:
            continue
        success = rebuild_success_set(trial.config_json, out, len(runs["success_predictions_before"].iloc[0]))
        if success is None or len(success.x) == 0:
            continue
        key = tuple(getattr(trial, c) for c in setting)
        title = f"{_setting_title(key, setting)}, seed {trial.seed}"
        stem = _setting_stem(key)
        figures.append((f"Unlearning at a glance: {title}",
                        figure_unlearning_examples(runs, success, title, directory / f"unlearning_examples_{stem}.png")))
    return figures
