"""The report's figures as drawn: tick labels rendered as matplotlib means them (a log axis reads
10^-1, not ``$\\mathdefault{10^{-1}}$``), user text never read as mathematics, and every summary figure
drawn against the keys the sweep varies.

The record is synthetic, written with the sink (no training): every figure is captured from the
report as it is saved, drawn on the Agg canvas and read back.
"""

import numpy as np
import pytest

from poisonsweep.engine.report import figures, galleries, write_report
from poisonsweep.engine.sink import write_trial

N_TRAIN, RATE = 300, 0.33


def _trial(out: str, trial_id: str, seed: int, detectors: list[str], **setting) -> None:
    """One ok trial: ``loss`` scores spanning four decades (a log-scale histogram), others linear."""
    rng = np.random.default_rng(seed)
    keys = {"trial_id": trial_id, "data_name": "digits", "poison_method": "one_shift", "poison_rate": RATE,
            "seed": seed, **setting}
    is_poison = np.zeros(N_TRAIN, bool)
    is_poison[: int(RATE * N_TRAIN)] = True
    scores, detections = [], []
    for detector in detectors:
        if detector == "loss":
            score = np.where(is_poison, 10 ** rng.uniform(0, 1, N_TRAIN), 10 ** rng.uniform(-3, -1, N_TRAIN))
        else:
            score = rng.normal(is_poison.astype(float), 1.0)
        flagged = score >= np.quantile(score, 1 - RATE)
        scores += [{"trial_id": trial_id, "detector": detector, "index": i, "label_given": int(i % 10),
                    "label_true": int(i % 10), "is_poison": bool(p), "score": float(s), "flagged": bool(f)}
                   for i, (p, s, f) in enumerate(zip(is_poison, score, flagged))]
        detections.append({**keys, "detector": detector, "auroc": 0.9 - 0.1 * seed, "n_flagged": int(flagged.sum())})
    trial_row = {**keys, "status": "ok", "n_train": N_TRAIN, "n_poisoned": int(is_poison.sum()),
                 "clean_test_acc": 0.9, "poison_success": 0.5, "model_name": "mlp"}
    write_trial(out, trial_id, {"trials": [trial_row], "detections": detections, "scores": scores})


@pytest.fixture
def captured(monkeypatch):
    """Every figure the report saves, by file name, drawn on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    saved = {}
    real_save = figures._save

    def save(figure, path):
        FigureCanvasAgg(figure)
        figure.canvas.draw()
        saved[path.name] = figure
        return real_save(figure, path)

    monkeypatch.setattr(figures, "_save", save)
    monkeypatch.setattr(galleries, "_save", save)
    return saved


def _width(ax, text: str, like) -> float:
    """The drawn width of ``text`` taken literally, in the font of ``like``."""
    reference = ax.text(0, 0, text, fontproperties=like.get_fontproperties(), parse_math=False)
    width = reference.get_window_extent(ax.figure.canvas.get_renderer()).width
    reference.remove()
    return width


def test_log_histogram_ticks_are_drawn_as_maths_and_user_text_literally(tmp_path, captured):
    out = str(tmp_path / "sweep")
    for seed in (0, 1):
        _trial(out, f"t{seed}", seed, ["loss", "$x$"])
    write_report(out, tmp_path / "report")
    histogram = next(f for name, f in captured.items() if name.startswith("scores_"))
    by_title = {ax.get_title().split("\n")[0]: ax for ax in histogram.axes if ax.get_visible()}
    log_axis = by_title["loss"]
    assert log_axis.get_xscale() == "log"
    renderer = histogram.canvas.get_renderer()
    low, high = log_axis.get_xlim()
    shown = [label for label, tick in zip(log_axis.get_xticklabels(), log_axis.get_xticks())
             if low <= tick <= high and label.get_text()]
    assert len(shown) >= 3
    for label in shown:  # matplotlib's text for 10^-2 is mathtext; drawn as such it is far narrower
        assert label.get_text().startswith("$\\mathdefault")
        assert label.get_window_extent(renderer).width < 0.6 * _width(log_axis, label.get_text(), label)
    boxes = sorted((label.get_window_extent(renderer) for label in shown), key=lambda box: box.x0)
    assert all(left.x1 <= right.x0 for left, right in zip(boxes, boxes[1:])), "tick labels overlap"
    # a detector called $x$ is shown as those three characters, in its panel's title and in the legend
    title = by_title["\\$x\\$"].title
    assert title.get_window_extent(renderer).width == pytest.approx(
        _width(by_title["\\$x\\$"], title.get_text().replace("\\$", "$"), title))
