"""The report's figures as drawn: tick labels rendered as matplotlib means them (a log axis reads
10^-1, not ``$\\mathdefault{10^{-1}}$``), user text never read as mathematics, and every summary figure
drawn against the keys the sweep varies.

The record is synthetic, written with the sink (no training): every figure is captured from the
report as it is saved, drawn on the Agg canvas and read back.
"""

import numpy as np
import pytest

from poisonsweep.engine.report import figures, galleries, write_report
from poisonsweep.engine.record import write_trial

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


@pytest.mark.slow  # a second or more of training
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


def _summary_trials(out: str, settings: list[dict]) -> dict:
    """Two seeds per setting, AUROC set per setting and seed; returns the AUROC mean per setting key."""
    expected = {}
    for n, setting in enumerate(settings):
        aurocs = [0.55 + 0.05 * n, 0.65 + 0.05 * n]
        for seed, auroc in enumerate(aurocs):
            tid = f"s{n}-{seed}"
            keys = {"trial_id": tid, "data_name": "digits", "poison_method": "one_shift", "poison_rate": RATE,
                    "seed": seed, **{k: v for k, v in setting.items() if k != "train_lr"}}
            write_trial(out, tid, {"trials": [{**keys, **setting, "status": "ok", "n_poisoned": 10, "num_classes": 10,
                                               "clean_test_acc": 0.9, "poison_success": 0.4 + 0.1 * n}],
                                   "detections": [{**keys, "detector": "loss", "auroc": auroc},
                                                  {**keys, "detector": "knn", "auroc": 1 - auroc}]})
        expected[tuple(setting.values())] = float(np.mean(aurocs))
    return expected


def _texts(figure) -> str:
    return " ".join(t.get_text() for t in figure.findobj(lambda a: hasattr(a, "get_text")))


def test_a_swept_method_is_drawn_as_bars_by_method_and_never_vs_rate(tmp_path, captured):
    from matplotlib.container import BarContainer

    out = str(tmp_path / "sweep")
    expected = _summary_trials(out, [{"poison_method": "one_shift"}, {"poison_method": "random_flip"}])
    report = write_report(out, tmp_path / "report")
    for name in ("auroc.png", "accuracy.png"):
        [ax] = [a for a in captured[name].axes if a.get_visible()]
        assert ax.get_xlabel() == "poison method"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["one_shift", "random_flip"]
        assert "poison rate" not in _texts(captured[name])
    [ax] = [a for a in captured["auroc.png"].axes if a.get_visible()]
    bars = [container for container in ax.containers if isinstance(container, BarContainer)]
    assert [len(c.patches) for c in bars] == [2, 2]  # knn and loss, one bar per method each
    heights = sorted(round(p.get_height(), 6) for c in bars for p in c.patches)
    means = [m for m in expected.values()]
    assert heights == sorted(round(v, 6) for v in means + [1 - m for m in means])
    page = report.html.read_text()
    assert "Detection AUROC by poison method" in page and "vs poison rate" not in page


def test_a_swept_number_is_drawn_as_lines_against_it(tmp_path, captured):
    out = str(tmp_path / "sweep")
    expected = _summary_trials(out, [{"train_lr": 0.001}, {"train_lr": 0.01}, {"train_lr": 0.1}])
    write_report(out, tmp_path / "report")
    [ax] = [a for a in captured["auroc.png"].axes if a.get_visible()]
    assert ax.get_xlabel() == "train.lr" and ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.001", "0.01", "0.1"]
    loss = [line for line in ax.get_lines() if len(line.get_ydata()) == 3 and line.get_ydata()[0] > 0.5]
    assert [round(v, 6) for v in loss[0].get_ydata()] == [round(v, 6) for v in expected.values()]


def test_rate_and_method_swept_make_rate_lines_in_one_panel_per_method(tmp_path, captured):
    from matplotlib.container import BarContainer

    out = str(tmp_path / "sweep")
    _summary_trials(out, [{"poison_method": m, "poison_rate": r} for m in ("one_shift", "random_flip")
                          for r in (0.01, 0.33)])
    write_report(out, tmp_path / "report")
    axes = [a for a in captured["auroc.png"].axes if a.get_visible()]
    assert [a.get_title() for a in axes] == ["poison method=one_shift", "poison method=random_flip"]
    assert all(a.get_xlabel() == "poison rate" and not any(isinstance(c, BarContainer) for c in a.containers)
               for a in axes)
