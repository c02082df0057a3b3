"""A real sweep through the CLI on local Ray: Parquet read back by pandas, DuckDB and polars;
a rerun adds no rows; a trial that fails on its own is recorded and the sweep goes on."""

import os
import re
import subprocess
import sys

import duckdb
import pandas as pd
import polars as pl
import pytest
import yaml

pytestmark = pytest.mark.slow  # every test starts Ray, a subprocess or a server

CONFIG = {
    "name": "e2e",
    "data": {"name": "digits", "n_train": 300, "n_test": 100},
    "poison": {"method": "one_shift", "rate": 0.1},
    "model": {"name": "mlp", "params": {"hidden": 32, "depth": 1}},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.01, "optimizer": "sgd"},
    "detectors": [{"name": "activation_clustering", "params": {"reduce": "pca"}}, "spectral_signature", "loss"],
    # lr 1e30 makes the loss explode: those trials fail on their own and must be recorded as failed
    "sweep": {"poison.rate": [0.1, 0.33], "train.lr": [0.01, 1.0e30]},
    "resources": {"cpu": 1, "max_failures": 0},
}


def poisonsweep(*args, timeout=300):
    env = {**os.environ, "COLUMNS": "160", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    return subprocess.run([sys.executable, "-m", "poisonsweep.engine.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    config = root / "e2e.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = root / "out"
    first = poisonsweep("run", str(config), "--out", str(out))
    return config, out, first


def test_sweep_writes_every_table(sweep_run):
    _, out, first = sweep_run
    assert first.returncode == 0, first.stdout + first.stderr
    assert "4 trials run" in first.stdout and "2 failed" in first.stdout
    assert "AUROC" in first.stdout  # the summary table is printed
    trials = pd.read_parquet(out / "trials")
    assert len(trials) == 4 and trials["trial_id"].is_unique
    ok, failed = trials[trials.status == "ok"], trials[trials.status == "failed"]
    assert len(ok) == 2 and set(ok.train_lr) == {0.01}
    assert failed.error.str.contains("TrainingDiverged").all()
    assert set(ok.n_poisoned) == {30, 99}  # round(0.1 * 300), round(0.33 * 300)
    assert ok.clean_test_acc.between(0, 1).all() and (ok.device == "cpu").all()
    detections = pd.read_parquet(out / "detections")
    assert len(detections) == 6 and set(detections.detector) == {"activation_clustering", "spectral_signature", "loss"}
    scores = pd.read_parquet(out / "scores")
    assert len(scores) == 2 * 3 * 300
    per_trial = scores.groupby(["trial_id", "detector"]).is_poison.sum()
    assert sorted(set(per_trial)) == [30, 99]


def test_tables_read_with_duckdb_and_polars(sweep_run):
    _, out, _ = sweep_run
    query = f"""
        select d.detector, t.poison_rate, avg(d.auroc) as auroc
        from read_parquet('{out}/detections/*.parquet') d
        join read_parquet('{out}/trials/*.parquet') t using (trial_id)
        group by all order by all"""
    rows = duckdb.sql(query).fetchall()
    assert len(rows) == 6 and all(0 <= auroc <= 1 for *_, auroc in rows)
    frame = pl.read_parquet(f"{out}/scores/*.parquet")
    assert frame.height == 1800
    pandas_auroc = pd.read_parquet(out / "detections").groupby(["detector", "poison_rate"]).auroc.mean()
    for detector, rate, auroc in rows:
        assert auroc == pytest.approx(pandas_auroc[(detector, rate)])


def test_rerun_adds_no_rows_and_skips_completed_trials(sweep_run):
    config, out, _ = sweep_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*.parquet")}
    ok_ids = set(pd.read_parquet(out / "trials").query("status == 'ok'").trial_id)
    again = poisonsweep("run", str(config), "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "2 already done" in again.stdout
    after = {p.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*.parquet")}
    assert before.keys() == after.keys()
    assert all(before[f"{i}.parquet"] == after[f"{i}.parquet"] for i in ok_ids)  # ok trials untouched
    assert len(pd.read_parquet(out / "trials")) == 4
    assert len(pd.read_parquet(out / "scores")) == 1800


def test_show_prints_the_summary_from_the_tables(sweep_run):
    _, out, _ = sweep_run
    shown = poisonsweep("show", str(out))
    assert shown.returncode == 0
    assert "settings differ in poison.rate, train.lr" in shown.stdout and "spectral_signature" in shown.stdout
    assert "every trial: data.name digits, poison.method one_shift" in " ".join(shown.stdout.split())
    assert re.search(r"^\W*0\.33\W+0\.01\b", shown.stdout, re.M)  # a setting's label: its swept values only
    assert "2 failed trial(s)" in shown.stdout and "TrainingDiverged" in shown.stdout


def test_bad_config_fails_before_ray_with_the_documented_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "poison": {"method": "one_shift", "rate": 2}, "sweep": {}}))
    result = poisonsweep("run", str(config), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "poison.rate must be a number in [0, 1]; got 2" in result.stdout
    assert not (tmp_path / "out" / "trials").exists()
