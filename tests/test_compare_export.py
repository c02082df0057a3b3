"""`poisonsweep compare` and `poisonsweep export` (issue 26, point 6) on small records written with the
sink's own writers, checked against numbers worked out by hand from the rows written."""

import io
import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from poisonsweep.engine.cli import app
from poisonsweep.engine.compare import compare, difference_se
from poisonsweep.engine.export import detector_pivot, export, latex_escape
from poisonsweep.engine.record import write_trial
from poisonsweep.tasks.registry import ConfigError

# AUROC per (rate, detector) and seed; record B adds DELTA to every value of A
AUROC = {(0.1, "loss"): [0.6, 0.8], (0.1, "spectral_signature"): [0.9, 0.7],
         (0.33, "loss"): [0.5, 0.55], (0.33, "spectral_signature"): [0.95, 0.85]}
DELTA = 0.05


def write_record(out, *, shift=0.0, model="mlp", version="v1", detector_name=None, rates=(0.1, 0.33)):
    """Two seeds per rate; ``detector_name`` renames the loss detector."""
    for rate in rates:
        for seed in (0, 1):
            tid = f"{model}-{rate}-{seed}"
            keys = {"trial_id": tid, "data_name": "digits", "poison_method": "one_shift", "poison_rate": rate,
                    "seed": seed}
            detections = [{**keys, "detector": (detector_name or detector) if detector == "loss" else detector,
                           "auroc": values[seed] + shift,
                           "f1": 0.5, "n_flagged": 10 + seed, "seconds": 0.1}
                          for (r, detector), values in AUROC.items() if r == rate]
            trial = {**keys, "sweep": "s", "model_name": model, "status": "ok", "code_version": version,
                     "clean_test_acc": 0.9 + 0.01 * seed + shift, "poison_success": 0.2, "n_poisoned": 5,
                     "train_seconds": 1.0}
            write_trial(str(out), tid, {"trials": [trial], "detections": detections})


def test_two_records_line_up_by_setting_with_their_differences_and_spread(tmp_path):
    write_record(tmp_path / "a")
    write_record(tmp_path / "b", shift=DELTA, model="keras_cnn", version="v2")
    result = compare([str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.labels == ["A", "B"]
    assert any(line.startswith("model_name: A mlp; B keras_cnn") for line in result.differences)
    assert any(line.startswith("code_version: A v1; B v2") for line in result.differences)
    assert "model_name" not in result.setting  # what differs between records is compared, not a setting
    rows = result.detections.set_index(["poison_rate", "detector"])
    for (rate, detector), values in AUROC.items():
        row = rows.loc[(rate, detector)]
        std = pd.Series(values).std()  # sample std over the two seeds, as the report
        assert row["A_auroc_mean"] == pytest.approx(sum(values) / 2)
        assert row["B_auroc_mean"] == pytest.approx(sum(values) / 2 + DELTA)
        assert row["delta_B_auroc"] == pytest.approx(DELTA)
        assert row["se_B_auroc"] == pytest.approx(math.sqrt(2 * std ** 2 / 2))
        assert row["A_auroc_n"] == row["B_auroc_n"] == 2
    assert result.trials["delta_B_clean_test_acc"].to_numpy() == pytest.approx([DELTA, DELTA])


def test_a_setting_only_one_record_has_is_kept_and_shown_missing(tmp_path):
    write_record(tmp_path / "a")
    write_record(tmp_path / "b", rates=(0.1,))
    rows = compare([str(tmp_path / "a"), str(tmp_path / "b")]).detections
    missing = rows[rows["poison_rate"] == 0.33]
    assert len(missing) == 2 and missing["B_auroc_mean"].isna().all() and missing["delta_B_auroc"].isna().all()


def test_difference_se_needs_two_seeds_on_each_side():
    assert difference_se(0.1, 4, 0.2, 4) == pytest.approx(math.sqrt(0.01 / 4 + 0.04 / 4))
    assert math.isnan(difference_se(float("nan"), 1, 0.2, 4))


def test_compare_refuses_one_record_or_an_unknown_metric(tmp_path):
    write_record(tmp_path / "a")
    with pytest.raises(ConfigError, match="at least two"):
        compare([str(tmp_path / "a")])
    with pytest.raises(ConfigError, match="metric must be one of"):
        compare([str(tmp_path / "a"), str(tmp_path / "a")], metric="accuracy")


def test_compare_cli_prints_both_records_and_the_difference(tmp_path):
    write_record(tmp_path / "a")
    write_record(tmp_path / "b", shift=DELTA)
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"A: {tmp_path / 'a'}" in result.output and "Δ B−A" in result.output
    assert "+0.050±0.1" in result.output  # delta ± its standard error
    assert "0.700±0.141" in result.output  # A's loss at 0.1: mean ± std over the two seeds


def test_the_pivot_has_detectors_as_rows_and_settings_as_columns(tmp_path):
    write_record(tmp_path / "a")
    means, stds, counts = detector_pivot(str(tmp_path / "a"))
    assert list(means.index) == ["loss", "spectral_signature"]
    assert list(means.columns) == ["0.1", "0.33"]  # only the swept value names a column
    for (rate, detector), values in AUROC.items():
        assert means.at[detector, f"{rate:g}"] == pytest.approx(sum(values) / 2)
        assert stds.at[detector, f"{rate:g}"] == pytest.approx(pd.Series(values).std())
    assert (counts == 2).all().all()


def test_latex_escapes_names_and_bolds_each_columns_best(tmp_path):
    write_record(tmp_path / "a")
    write_record(tmp_path / "odd", detector_name="my_det & 50% {x}")
    text = export(str(tmp_path / "a"), "latex")
    assert r"\begin{tabular}{lrr}" in text and r"\toprule" in text and r"\bottomrule" in text
    assert r"spectral\_signature & $\mathbf{0.800 \pm 0.141}$ & $\mathbf{0.900 \pm 0.071}$ \\" in text
    assert r"loss & $0.700 \pm 0.141$ & $0.525 \pm 0.035$ \\" in text
    odd = export(str(tmp_path / "odd"), "latex")
    assert r"my\_det \& 50\% \{x\}" in odd
    assert latex_escape(r"a\b~^$#") == r"a\textbackslash{}b\textasciitilde{}\textasciicircum{}\$\#"


def test_csv_keeps_numbers_and_markdown_escapes_pipes(tmp_path):
    write_record(tmp_path / "a", detector_name="a|b")
    frame = pd.read_csv(io.StringIO(export(str(tmp_path / "a"), "csv")), index_col="detector")
    assert list(frame.columns) == ["0.1 mean", "0.1 std", "0.1 n", "0.33 mean", "0.33 std", "0.33 n"]
    assert frame.loc["a|b", "0.1 n"] == 2
    markdown = export(str(tmp_path / "a"), "md", metric="n_flagged")
    assert r"| a\|b |" in markdown and "**" not in markdown  # a count has no best


def test_export_cli_writes_a_new_file_and_never_replaces_one(tmp_path):
    write_record(tmp_path / "a")
    target = tmp_path / "table.tex"
    first = CliRunner().invoke(app, ["export", str(tmp_path / "a"), "--format", "latex", "--to", str(target)])
    assert first.exit_code == 0, first.output
    assert r"\begin{tabular}" in target.read_text()
    target.write_text("mine")
    again = CliRunner().invoke(app, ["export", str(tmp_path / "a"), "--to", str(target)])
    assert again.exit_code == 2 and "never replaces" in again.output and target.read_text() == "mine"
    bad = CliRunner().invoke(app, ["export", str(tmp_path / "a"), "--format", "docx"])
    assert bad.exit_code == 2 and "format must be one of latex, csv, md" in bad.output


def test_both_are_in_the_python_api():
    import poisonsweep

    assert poisonsweep.compare is compare and poisonsweep.export is export
    assert {"compare", "export"} <= set(poisonsweep.__all__)
