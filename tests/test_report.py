"""``poisonsweep report`` on a small record: its tables against values computed independently from
the Parquet files with DuckDB SQL, every figure written, one self-contained HTML page, and an honest
account of a record that is still incomplete.

The record is made without Ray: real tiny trials through ``poisonsweep.engine.worker.record_trial`` (two poison
methods, two rates, two seeds, one trial failed, some planned trials not yet run), plus synthetic
unlearning and influence rows written with the sink.
"""

import base64
import re

import duckdb
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from poisonsweep.engine.cli import app
from poisonsweep.engine.config import build_sweep, trial_id
from poisonsweep.engine.report import FRACTIONS_CHECKED, TOP_HARMFUL, write_plan, write_report
from poisonsweep.engine.record import write_trial_table
from poisonsweep.engine.worker import record_trial

SWEEP = {
    "name": "tiny",
    "data": {"name": "digits", "n_train": 200, "n_test": 100},
    "poison": {"method": "one_shift", "rate": 0.1},
    "model": {"name": "mlp", "params": {"hidden": 16, "depth": 1}},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "optimizer": "sgd"},
    "detectors": ["loss", "spectral_signature"],
    "sweep": {"poison.method": ["one_shift", "random_flip"], "poison.rate": [0.1, 0.3], "seed": [0, 1, 2]},
}
UNLEARN_SELECTIONS = [("oracle", "oracle", 0.5), ("oracle", "oracle", 1.0), ("loss", "top", 0.1),
                      ("loss", "top", 0.2), ("loss", "flagged", None)]


def _recorded(trial: dict) -> str:
    """Which trials this record holds: one_shift seeds 0-1 ok and seed 2 at rate 0.1 failed;
    random_flip only at rate 0.1, seeds 0-1; the rest planned but not yet run."""
    method, rate, seed = trial["poison"]["method"], trial["poison"]["rate"], trial["seed"]
    if seed < 2 and (method == "one_shift" or rate == 0.1):
        return "ok"
    if method == "one_shift" and rate == 0.1 and seed == 2:
        return "failed"
    return "missing"


def _unlearning_rows(trial: dict) -> list[dict]:
    """Made-up repair numbers that depend on the selection, method and seed."""
    seed, rows = trial["seed"], []
    for selection, kind, fraction in UNLEARN_SELECTIONS:
        identified = fraction if fraction is not None else 0.3 + 0.1 * seed  # flagged: differs per seed
        for k, method in enumerate(["finetune", "ssd"]):
            rows.append({
                "trial_id": trial_id(trial), "data_name": "digits", "poison_method": trial["poison"]["method"],
                "poison_rate": trial["poison"]["rate"], "seed": seed, "selection": selection, "selection_kind": kind,
                "identified_fraction": identified, "method": method, "clean_test_acc_before": 0.8,
                "clean_test_acc_after": 0.7 + 0.1 * identified + 0.01 * seed, "poison_success_before": 0.4,
                "poison_success_after": 0.4 - 0.3 * identified - 0.05 * k + 0.01 * seed,
                "retain_acc_after": 0.9 - 0.5 * k * identified, "poisons_in_forget": identified, "seconds": 1.0})
    return rows


def _influence_rows(trial: dict, is_poison: np.ndarray) -> list[dict]:
    """Harmful ranks 1..TOP_HARMFUL+1 mixing poisons and clean samples, plus helpful rows (left out)."""
    poisons, clean = np.flatnonzero(is_poison), np.flatnonzero(~is_poison)
    rows = []
    for test_index in (3, 7):
        chosen = [poisons[test_index], clean[test_index], poisons[test_index + 1], clean[0], poisons[0], clean[1]]
        rows += [{"trial_id": trial_id(trial), "detector": "loss", "test_index": test_index, "train_index": int(i),
                  "influence": -1.0 / rank, "rank": rank, "kind": "harmful"} for rank, i in enumerate(chosen, 1)]
        rows.append({"trial_id": trial_id(trial), "detector": "loss", "test_index": test_index, "train_index": 0,
                     "influence": 2.0, "rank": 1, "kind": "helpful"})
    return rows


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report") / "sweep")
    sweep = build_sweep(SWEEP, out=out)
    write_plan(sweep)
    for trial in sweep.trials:
        outcome = _recorded(trial)
        if outcome == "missing":
            continue
        row = record_trial(trial, out, attempt_error="RuntimeError: worker died" if outcome == "failed" else None)
        assert row["status"] == outcome, row.get("error")
        if outcome == "ok" and trial["poison"]["method"] == "one_shift":  # unlearning in two settings
            write_trial_table(out, "unlearning", row["trial_id"], _unlearning_rows(trial))
        if outcome == "ok":
            is_poison = duckdb.sql(f"select is_poison from read_parquet('{out}/scores/{row['trial_id']}.parquet') "
                                   "where detector = 'loss' order by index").fetchnumpy()["is_poison"]
            write_trial_table(out, "influence", row["trial_id"], _influence_rows(trial, is_poison))
    # a trial caught mid-write: its detections exist, its trials row does not yet
    half = next(t for t in sweep.trials if _recorded(t) == "missing")
    write_trial_table(out, "detections", trial_id(half), [{"trial_id": trial_id(half), "detector": "loss",
                                                           "auroc": 0.0}])
    report = write_report(out)
    return out, report


def sql(query: str) -> pd.DataFrame:
    return duckdb.sql(query).df()


def ok_trials(out: str) -> str:
    return f"(select * from read_parquet('{out}/trials/*.parquet') where status = 'ok')"


def test_detection_table_matches_duckdb(record):
    out, report = record
    table = pd.read_csv(report.directory / "detections.csv")
    expected = sql(f"""
        select t.data_name, t.poison_method, t.poison_rate, d.detector, count(*) as n,
               avg(d.auroc) as auroc_mean, stddev_samp(d.auroc) as auroc_std, avg(d.auprc) as auprc_mean,
               avg(d.f1) as f1_mean, avg(d.recall_at_10) as recall_at_10_mean, stddev_samp(d.f1) as f1_std
        from read_parquet('{out}/detections/*.parquet') d join {ok_trials(out)} t using (trial_id)
        group by all order by all""")
    assert len(expected) == 3 * 2  # 3 settings with ok trials x 2 detectors; the half-written trial is left out
    merged = expected.merge(table, on=["data_name", "poison_method", "poison_rate", "detector"],
                            suffixes=("", "_report"), validate="one_to_one")
    assert len(merged) == len(expected) == len(table)
    for column in ["n", "auroc_mean", "auroc_std", "auprc_mean", "f1_mean", "f1_std", "recall_at_10_mean"]:
        np.testing.assert_allclose(merged[f"{column}_report"], merged[column], rtol=1e-12, err_msg=column)
    accuracy = sql(f"""select data_name, poison_method, poison_rate, avg(clean_test_acc) as acc,
                       avg(poison_success) as success from {ok_trials(out)} group by all""")
    merged = accuracy.merge(table, on=["data_name", "poison_method", "poison_rate"])
    np.testing.assert_allclose(merged["clean_test_acc_mean"], merged["acc"], rtol=1e-12)
    np.testing.assert_allclose(merged["poison_success_mean"], merged["success"], rtol=1e-12)


def test_trials_table_matches_duckdb(record):
    out, report = record
    table = pd.read_csv(report.directory / "trials.csv").sort_values(["poison_method", "poison_rate"])
    expected = sql(f"""select poison_method, poison_rate, count(*) as n, avg(clean_test_acc) as acc,
                       stddev_samp(clean_test_acc) as acc_std, avg(n_poisoned) as poisoned
                       from {ok_trials(out)} group by all order by all""")
    assert table["n"].tolist() == expected["n"].tolist() == [2, 2, 2]
    np.testing.assert_allclose(table["clean_test_acc_mean"], expected["acc"], rtol=1e-12)
    np.testing.assert_allclose(table["clean_test_acc_std"], expected["acc_std"], rtol=1e-12)
    assert table["n_poisoned_mean"].tolist() == expected["poisoned"].tolist() == [20, 60, 20]


def test_found_vs_checked_matches_a_sql_ranking(record):
    out, report = record
    curves = pd.read_csv(report.directory / "found_vs_checked.csv")
    assert np.allclose(np.sort(curves["fraction_checked"].unique()), FRACTIONS_CHECKED)
    for fraction in (0.05, 0.1, 0.37, 1.0):
        # the poisons among the round(f * n) highest scores, ties broken by index, averaged over seeds
        expected = sql(f"""
            with ranked as (
                select s.trial_id, s.detector, s.is_poison,
                       row_number() over (partition by s.trial_id, s.detector order by s.score desc, s.index) as r,
                       count(*) over (partition by s.trial_id, s.detector) as n
                from read_parquet('{out}/scores/*.parquet') s join {ok_trials(out)} t using (trial_id)),
            per_trial as (
                select trial_id, detector, sum(case when r <= round({fraction} * n) and is_poison then 1 else 0 end)
                       / sum(case when is_poison then 1 else 0 end) as found
                from ranked group by all)
            select t.poison_method, t.poison_rate, p.detector, avg(p.found) as found, count(*) as n
            from per_trial p join {ok_trials(out)} t using (trial_id) group by all""")
        at = curves[np.isclose(curves["fraction_checked"], fraction)]
        merged = expected.merge(at, on=["poison_method", "poison_rate", "detector"], validate="one_to_one")
        assert len(merged) == len(expected) == 6
        np.testing.assert_allclose(merged["share_found_mean"], merged["found"], rtol=1e-12, err_msg=str(fraction))
        assert (merged["n_x"] == merged["n_y"]).all()
    # the curve at 10 % is the trials' own recall_at_10
    detections = pd.read_csv(report.directory / "detections.csv")
    at_10 = curves[np.isclose(curves["fraction_checked"], 0.1)].merge(detections, on=["poison_method", "poison_rate",
                                                                                      "detector"])
    np.testing.assert_allclose(at_10["share_found_mean"], at_10["recall_at_10_mean"], rtol=1e-12)


def test_unlearning_table_groups_flagged_selections_over_seeds(record):
    out, report = record
    table = pd.read_csv(report.directory / "unlearning.csv")
    expected = sql(f"""
        select t.poison_method, t.poison_rate, u.selection, u.selection_kind, u.method,
               case when u.selection_kind = 'flagged' then null else u.identified_fraction end as f,
               avg(u.identified_fraction) as identified, avg(u.poison_success_after) as success_after,
               avg(u.clean_test_acc_after) as acc_after, min(u.retain_acc_after) as retain_min, count(*) as n
        from read_parquet('{out}/unlearning/*.parquet') u join {ok_trials(out)} t using (trial_id)
        group by all""")
    assert len(table) == len(expected) == 2 * len(UNLEARN_SELECTIONS) * 2
    keys = ["poison_method", "poison_rate", "selection", "selection_kind", "method", "identified_fraction_mean"]
    merged = expected.rename(columns={"identified": "identified_fraction_mean"}).merge(
        table, on=keys, validate="one_to_one")
    assert len(merged) == len(table) and (merged["n_x"] == 2).all() and (merged["n_y"] == 2).all()
    np.testing.assert_allclose(merged["poison_success_after_mean"], merged["success_after"], rtol=1e-12)
    np.testing.assert_allclose(merged["clean_test_acc_after_mean"], merged["acc_after"], rtol=1e-12)
    np.testing.assert_allclose(merged["retain_acc_after_min"], merged["retain_min"], rtol=1e-12)
    flagged = table[table["selection_kind"] == "flagged"]
    assert np.allclose(flagged["identified_fraction_mean"], 0.35)  # seeds 0 and 1: 0.3 and 0.4


def test_influence_table_marks_poisons_from_the_scores(record):
    out, report = record
    table = pd.read_csv(report.directory / "influence_top_harmful.csv")
    expected = sql(f"""
        select i.trial_id, i.test_index, i.rank, i.train_index, s.is_poison
        from read_parquet('{out}/influence/*.parquet') i join {ok_trials(out)} t using (trial_id)
        join read_parquet('{out}/scores/*.parquet') s
          on s.trial_id = i.trial_id and s.detector = i.detector and s.index = i.train_index
        where i.kind = 'harmful' and i.rank <= {TOP_HARMFUL}""")
    assert len(table) == len(expected) == 6 * 2 * TOP_HARMFUL  # 6 ok trials x 2 test points
    merged = expected.merge(table, on=["trial_id", "test_index", "rank"], validate="one_to_one")
    assert (merged["train_index_x"] == merged["train_index_y"]).all()
    assert (merged["is_poison_x"] == merged["is_poison_y"]).all()
    assert merged["is_poison_x"].tolist().count(True) == 6 * 2 * 3  # ranks 1, 3 and 5 are poisons
    shown = (report.directory / "influence_top_harmful.md").read_text()
    assert "3/5" in shown and re.search(r"\d+\*, \d+, \d+\*, \d+, \d+\*", shown)


def test_every_figure_is_a_non_empty_png(record):
    _, report = record
    names = {p.name for p in report.figures}
    settings = ["digits_one_shift_0.1", "digits_one_shift_0.3", "digits_random_flip_0.1"]
    assert names == {"auroc.png", "accuracy.png", "found_vs_checked_digits_one_shift.png",
                     "found_vs_checked_digits_random_flip.png", "unlearning_digits_one_shift_0.1.png",
                     "unlearning_digits_one_shift_0.3.png", *[f"scores_{s}.png" for s in settings],
                     *[f"samples_{s}.png" for s in settings]}
    for path in report.figures:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, path.name


def test_html_page_is_self_contained(record):
    _, report = record
    page = report.html.read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(report.figures)
    assert {base64.b64decode(i) for i in images} == {p.read_bytes() for p in report.figures}
    assert "src=\"http" not in page and "<link" not in page
    # what was run, resolved config, seeds per setting, missing, failed, trials, detectors, samples shown,
    # unlearning, influence
    assert page.count("<table") == 10
    markdown = report.markdown.read_text()
    assert all(f"]({p.name})" in markdown for p in report.figures)


def test_status_says_what_is_recorded_and_missing(record):
    _, report = record
    status = report.status
    assert (status.recorded, status.ok, status.failed, status.planned, status.partial) == (7, 6, 1, 12, 1)
    assert len(status.missing) == 5
    uneven = status.uneven.set_index(["poison_method", "poison_rate"])
    assert set(uneven.index) == {("one_shift", 0.1), ("one_shift", 0.3), ("random_flip", 0.1), ("random_flip", 0.3)}
    assert uneven.loc[("random_flip", 0.3), "ok_seeds"] == "none"
    assert uneven.loc[("one_shift", 0.1), "missing_seeds"] == "2"
    text = report.markdown.read_text()
    assert "7 trials recorded: 6 ok, 1 failed; 12 planned, 5 not yet recorded." in text
    assert "1 trial(s) have rows in some tables but no trials row yet" in text
    assert "RuntimeError: worker died" in text


@pytest.fixture
def unfinished(tmp_path):
    """A sweep of two planned trials, one recorded as failed and none ok yet (n_train unset: null)."""
    out = str(tmp_path / "sweep")
    sweep = build_sweep({**SWEEP, "data": {"name": "digits"}, "sweep": {"seed": [0, 1]}}, out=out)
    write_plan(sweep)
    record_trial(sweep.trials[0], out, attempt_error="RuntimeError: worker died")
    return out


def test_report_of_a_sweep_with_no_finished_trial_says_so(unfinished, tmp_path):
    report = write_report(unfinished, tmp_path / "report")
    assert report.figures == [] and report.tables == []
    text = report.markdown.read_text()
    assert "1 trials recorded: 0 ok, 1 failed; 2 planned, 1 not yet recorded." in text
    assert "No trial has finished ok yet" in text
    # the plan's null n_train and the trials table's null are one setting, short of both seeds
    uneven = report.status.uneven
    assert list(uneven.columns) == ["data_name", "poison_method", "poison_rate", "ok_seeds", "expected",
                                    "missing_seeds"]
    assert uneven[["ok_seeds", "expected", "missing_seeds"]].values.tolist() == [["none", 2, "0, 1"]]


def test_cli_report_writes_to_the_given_directory(unfinished, tmp_path):
    result = CliRunner().invoke(app, ["report", unfinished, "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "1 trials recorded: 0 ok, 1 failed; 2 planned, 1 not yet recorded." in output
    assert f"open {tmp_path / 'r' / 'report.html'}" in output
    assert "RuntimeError: worker died" in (tmp_path / "r" / "report.html").read_text()


def test_cli_report_on_a_directory_without_a_record_fails_clearly(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "holds no trials table" in " ".join(result.output.split())


def test_a_swept_learning_rate_is_a_setting_not_a_seed(tmp_path):
    """Two learning rates of one poison setting are two rows, never averaged as if they were seeds;
    an unset n_train (null in every row) does not split or hide a setting."""
    from poisonsweep.engine.report import detection_table, record_status
    from poisonsweep.engine.record import write_trial
    from poisonsweep.engine.summary import load, setting_columns

    out = str(tmp_path / "sweep")
    aurocs = {(0.01, 0): 0.9, (0.01, 1): 0.7, (0.1, 0): 0.2, (0.1, 1): 0.4}
    for (lr, seed), auroc in aurocs.items():
        keys = {"trial_id": f"{lr}-{seed}", "data_name": "digits", "poison_method": "one_shift", "poison_rate": 0.1,
                "seed": seed}
        write_trial(out, keys["trial_id"], {
            "trials": [{**keys, "status": "ok", "train_lr": lr, "model_name": "mlp", "clean_test_acc": 1 - lr}],
            "detections": [{**keys, "detector": "loss", "auroc": auroc}]})
    trials = load(out, "trials")
    setting = setting_columns(trials)
    assert setting == ["data_name", "poison_method", "poison_rate", "train_lr"]
    table = detection_table(trials, load(out, "detections"), setting).set_index("train_lr")
    assert table.loc[0.01, "auroc_mean"] == pytest.approx(0.8) and table.loc[0.1, "auroc_mean"] == pytest.approx(0.3)
    assert table.loc[0.01, "clean_test_acc_mean"] == pytest.approx(0.99) and (table["n"] == 2).all()
    assert record_status(trials, None, set(), setting).uneven.empty
