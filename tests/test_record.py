"""The record in both forms: per-trial files and compacted ones. Compaction keeps every row exactly
once, for poisonsweep's own reader and for plain pandas; a reader never counts a trial twice, even
halfway through a compaction or after a trial is rerun; the vectorised found-vs-checked curves
equal ``poisonsweep.tasks.metrics.found_vs_checked`` trial by trial."""

import threading

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import poisonsweep.engine.record as record
from poisonsweep.engine import storage
from poisonsweep.engine.cli import app
from poisonsweep.engine.record import TABLES, DamagedFile, compaction, read, write_trial, write_trial_table
from poisonsweep.engine.resume import complete_trials
from poisonsweep.engine.summary import found_vs_checked_curves
from poisonsweep.tasks.metrics import found_vs_checked


def trial_rows(tid: str, status: str = "ok", n_scores: int = 7, acc: float = 0.5) -> dict:
    keys = {"trial_id": tid, "data_name": "digits", "poison_method": "one_shift", "poison_rate": 0.1, "seed": 0}
    return {"trials": [{**keys, "status": status, "error": "ValueError: boom" if status == "failed" else None,
                        "clean_test_acc": acc}],
            "detections": [{**keys, "detector": "loss", "auroc": acc}],
            "scores": [{"trial_id": tid, "detector": "loss", "index": i, "score": float(i), "is_poison": i % 3 == 0}
                       for i in range(n_scores)]}


def files(out, table: str) -> list[str]:
    return sorted(p.name for p in (out / table).glob("*.parquet"))


@pytest.fixture
def out(tmp_path):
    for i in range(6):
        write_trial(str(tmp_path), f"t{i}", trial_rows(f"t{i}", status="failed" if i == 5 else "ok", acc=i / 10))
    # a trial still being written: its detections and scores exist, its trials row not yet
    partial = trial_rows("partial")
    for table in ("detections", "scores"):
        write_trial_table(str(tmp_path), table, "partial", partial[table])
    return tmp_path


def snapshot(out) -> dict:
    return {table: record.read_table(str(out), table).to_pandas().sort_values(["trial_id"] + (
        ["index"] if table == "scores" else []), ignore_index=True) for table in TABLES}


def test_compaction_keeps_every_complete_trials_rows_once_and_leaves_the_rest(out):
    before = snapshot(out)
    results = {r.table: r for r in record.compact(str(out))}
    assert results["trials"].files_merged == 6 and results["scores"].rows == 6 * 7
    for table in TABLES:
        assert len(files(out, table)) == 1 + (table in ("detections", "scores"))  # + the partial trial's file
        after = record.read_table(str(out), table).to_pandas()
        pd.testing.assert_frame_equal(after.sort_values(list(before[table].columns[:1]) + (
            ["index"] if table == "scores" else []), ignore_index=True), before[table])
    assert "partial.parquet" in files(out, "scores")
    # plain pandas reads the compacted directory as before: every row once
    assert len(pd.read_parquet(out / "scores")) == 7 * 7 and len(pd.read_parquet(out / "trials")) == 6
    assert complete_trials(str(out)) == {f"t{i}" for i in range(5)}


def test_a_compacted_file_is_sorted_by_trial_id_and_a_second_compaction_changes_nothing(out):
    record.compact(str(out))
    names = {table: files(out, table) for table in TABLES}
    (compacted,) = [n for n in names["trials"] if n.startswith("compacted-")]
    ids = pq.read_table(out / "trials" / compacted).column("trial_id").to_pylist()
    assert ids == sorted(ids) == [f"t{i}" for i in range(6)]
    again = record.compact(str(out))
    assert all(not r.written and r.removed == 0 for r in again)
    assert {table: files(out, table) for table in TABLES} == names


def test_more_per_trial_files_than_one_scan_reads_are_all_read_once(tmp_path, monkeypatch):
    monkeypatch.setattr(read, "FILES_PER_SCAN", 4)  # 10 files: scans of 4, 4 and 2
    for i in range(10):
        write_trial(str(tmp_path), f"t{i}", trial_rows(f"t{i}", acc=i / 10))
    rows = record.read_table(str(tmp_path), "trials", ["trial_id", "clean_test_acc"]).to_pylist()
    assert sorted((r["trial_id"], r["clean_test_acc"]) for r in rows) == [(f"t{i}", i / 10) for i in range(10)]
    assert len(record.read_table(str(tmp_path), "scores", ["trial_id"])) == 70


def test_halfway_through_a_compaction_a_reader_sees_each_trial_once(out, monkeypatch):
    # the compacted files are in place, the per-trial files not yet deleted (a compaction killed there)
    monkeypatch.setattr(compaction, "_delete_if_unchanged", lambda fs, infos: (0, 0))
    record.compact(str(out))
    assert len(files(out, "trials")) == 7  # 6 per-trial files + the compacted one
    assert sorted(record.read_table(str(out), "trials")["trial_id"].to_pylist()) == [f"t{i}" for i in range(6)]
    assert record.read_table(str(out), "scores").num_rows == 7 * 7
    monkeypatch.undo()
    record.compact(str(out))  # the next compaction finishes the job
    assert len(files(out, "trials")) == 2 and record.read_table(str(out), "trials").num_rows == 6


def test_a_trial_rerun_after_compaction_is_read_from_its_new_rows(out):
    record.compact(str(out))
    write_trial(str(out), "t5", trial_rows("t5", status="ok", n_scores=3, acc=0.9))  # the failed trial, rerun
    for _ in range(2):  # once with the new per-trial files, once after they were compacted too
        trials = record.read_table(str(out), "trials").to_pandas().set_index("trial_id")
        assert len(trials) == 6 and trials.loc["t5", "status"] == "ok" and trials.loc["t5", "clean_test_acc"] == 0.9
        scores = record.read_table(str(out), "scores", trial_ids={"t5"})
        assert scores.num_rows == 3
        record.compact(str(out))
    assert len(files(out, "trials")) == 2  # generations 1 and 2; the newer one holds t5


def test_many_compacted_files_are_merged_into_one(tmp_path):
    for i in range(4):
        write_trial(str(tmp_path), f"t{i}", trial_rows(f"t{i}"))
        record.compact_table(str(tmp_path), "scores", {f"t{i}"}, merge_above=2)
    assert len(files(tmp_path, "scores")) == 2  # 3 files were merged into 1, then 1 more was added
    assert record.read_table(str(tmp_path), "scores").num_rows == 4 * 7


def test_a_file_rewritten_while_it_was_compacted_is_kept(out):
    listed = list(record.table_files(str(out), "trials").per_trial.values())
    write_trial_table(str(out), "trials", "t1", [{"trial_id": "t1", "status": "ok", "clean_test_acc": 0.99}])
    fs, _ = storage.filesystem(str(out))
    assert compaction._delete_if_unchanged(fs, listed) == (5, 1)
    assert files(out, "trials") == ["t1.parquet"]


def test_compaction_while_trials_are_written_loses_and_repeats_nothing(tmp_path):
    out = str(tmp_path)
    write_trial(out, "first", trial_rows("first"))
    stop, written = threading.Event(), ["first"]

    def sweep():
        while not stop.is_set() or len(written) < 5:
            tid = f"w{len(written):04d}"
            write_trial(out, tid, trial_rows(tid))
            written.append(tid)

    writer = threading.Thread(target=sweep)
    writer.start()
    try:
        seen = []
        for _ in range(5):
            record.compact(out)
            ids = record.read_table(out, "trials", ["trial_id"])["trial_id"].to_pylist()
            assert len(ids) == len(set(ids))
            seen.append(len(ids))
    finally:
        stop.set()
        writer.join()
    record.compact(out)
    scores = record.read_table(out, "scores", ["trial_id", "index"]).to_pandas()
    assert sorted(set(scores.trial_id)) == sorted(written) and len(scores) == 7 * len(written)
    assert not scores.duplicated().any()


def test_the_compact_command(out):
    result = CliRunner().invoke(app, ["compact", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "trials: 6 trial files (6 rows) -> compacted-000001-" in result.output
    assert "scores: 6 trial files (42 rows)" in result.output
    result = CliRunner().invoke(app, ["compact", str(out / "nothing")])
    assert result.exit_code == 2 and "holds no trials table" in result.output


def test_found_vs_checked_curves_equal_the_per_trial_function():
    rng = np.random.default_rng(0)
    frames = []
    for trial, n in (("a", 50), ("b", 37), ("c", 10)):
        for detector in ("loss", "knn"):
            scores = rng.integers(0, 5, n).astype(float)  # many ties: broken by index
            poison = rng.random(n) < (0.0 if trial == "c" else 0.3)
            index = rng.permutation(n)
            frames.append(pd.DataFrame({"trial_id": trial, "detector": detector, "index": index,
                                        "score": scores, "is_poison": poison}))
    table = pd.concat(frames).sample(frac=1, random_state=0)  # rows in no particular order
    fractions = np.round(np.linspace(0, 1, 101), 10)
    curves = found_vs_checked_curves(table, fractions)
    for (trial, detector), rows in table.groupby(["trial_id", "detector"]):
        rows = rows.sort_values("index")
        expected = found_vs_checked(rows.score.to_numpy(), rows.is_poison.to_numpy(), fractions)
        got = curves[(curves.trial_id == trial) & (curves.detector == detector)]
        np.testing.assert_array_equal(got.fraction_checked, fractions)
        np.testing.assert_allclose(got.share_found, expected, equal_nan=True)
        assert got.poison_share.iloc[0] == pytest.approx(rows.is_poison.mean())


# ------------------------------------------------------------------------------------------------ issue 22, point 9


def test_a_second_compaction_while_one_runs_is_refused_in_one_line(out):
    from filelock import FileLock

    with FileLock(str(out / ".compact.lock")):  # a first compaction holds the record
        result = CliRunner().invoke(app, ["compact", str(out)], env={"COLUMNS": "300"})
        assert result.exit_code == 2 and "another `poisonsweep compact` or `repair` is working on" in result.output
        assert result.output.count("error:") == 1 and "Traceback" not in result.output  # one message (wrapped)
        assert files(out, "trials") == [f"t{i}.parquet" for i in range(6)]  # nothing compacted meanwhile
        result = CliRunner().invoke(app, ["repair", str(out)])
        assert result.exit_code == 2 and ".compact.lock" in result.output


def test_two_compactions_at_once_leave_each_trial_once(out):
    from poisonsweep.engine.lease import OutputBusy

    start, errors = threading.Barrier(2), []

    def compaction():
        start.wait()
        try:
            record.compact(str(out))
        except OutputBusy:
            pass
        except Exception as error:  # e.g. Errno 2: the other one deleted a file this one listed
            errors.append(error)

    threads = [threading.Thread(target=compaction) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(pd.read_parquet(out / "scores")) == 7 * 7  # a plain glob: 6 trials + the partial one, once
    assert len(pd.read_parquet(out / "trials")) == 6


def test_merging_compacted_files_streams_batches_and_keeps_each_trial_s_newest_rows(tmp_path, monkeypatch):
    out = str(tmp_path)
    for generation in range(3):  # t1 is rerun in every generation: the newest rows win
        for tid in ([f"a{generation}", "t1"] + (["b"] if generation == 0 else [])):
            write_trial(out, tid, trial_rows(tid, n_scores=11, acc=generation / 10))
        record.compact_table(out, "scores", {f"a{generation}", "t1", "b"}, merge_above=99)
    # an older record's compacted file, written before the trials table had its `tables` column
    old = pa.table({"trial_id": ["c"], "status": ["ok"], "clean_test_acc": [0.7]})
    pq.write_table(old, tmp_path / "trials" / "compacted-000000-00000000.parquet")
    fs, _ = storage.filesystem(out)
    monkeypatch.setattr(compaction, "MERGE_BATCH_ROWS", 4)
    files_ = record.table_files(out, "scores")
    batches = list(compaction._merged_batches(fs, files_.compacted, record.SCHEMAS["scores"]))
    assert len(batches) > 3 and max(b.num_rows for b in batches) <= 2 * 4 * len(files_.compacted) + 11
    merged = pa.concat_tables(batches).to_pandas()
    assert merged.trial_id.tolist() == sorted(merged.trial_id)
    assert merged.groupby("trial_id").size().to_dict() == {"a0": 11, "a1": 11, "a2": 11, "b": 11, "t1": 11}
    assert merged[merged.trial_id == "t1"]["index"].tolist() == list(range(11))
    before = record.read_table(out, "scores").to_pandas().sort_values(["trial_id", "index"], ignore_index=True)
    record.compact_table(out, "scores", set(), merge_above=1)
    assert len(files(tmp_path, "scores")) == 1
    after = record.read_table(out, "scores").to_pandas().sort_values(["trial_id", "index"], ignore_index=True)
    pd.testing.assert_frame_equal(after, before)
    record.compact_table(out, "trials", set(), merge_above=0)  # the old file gets the new column, as nulls
    trials = record.read_table(out, "trials").to_pandas().set_index("trial_id")
    assert trials.loc["c", "clean_test_acc"] == 0.7 and trials.loc["c", "tables"] is None


def test_a_foreign_parquet_file_in_a_table_folder_is_named_skipped_and_quarantined(out):
    foreign = out / "trials" / "0000000000000001.parquet"
    pq.write_table(pa.table({"trial_id": pa.array([1, 2], pa.int64()), "status": ["ok", "ok"]}), foreign)
    with pytest.warns(DamagedFile, match="0000000000000001.parquet is not of the table's schema.*trial_id.*int64"):
        trials = record.read_table(str(out), "trials").to_pandas()
    assert sorted(trials.trial_id) == [f"t{i}" for i in range(6)] and (trials.status == "ok").sum() == 5
    result = CliRunner().invoke(app, ["repair", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code == 0 and f"moved {foreign} (not of the table's schema" in result.output
    assert "1 damaged file(s) moved" in result.output
    assert (out / "_quarantine" / "trials" / foreign.name).exists() and not foreign.exists()


def test_a_per_trial_file_holding_another_trial_s_row_is_not_counted_twice(out):
    (out / "trials" / "copy.parquet").write_bytes((out / "trials" / "t1.parquet").read_bytes())
    with pytest.warns(DamagedFile, match="copy.parquet is not trial copy's file"):
        ids = record.read_table(str(out), "trials")["trial_id"].to_pylist()
    assert sorted(ids) == [f"t{i}" for i in range(6)]


def _ours(name: str) -> str:
    return f".{name}.{'ab12' * 8}.tmp"


def test_compact_and_repair_remove_the_temporaries_of_killed_commands_and_nothing_else(out, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "keep").write_text("the user's")
    for command in ("compact", "repair"):
        killed_compact = out / "scores" / _ours("compacted-000007-0123abcd.parquet")
        killed_compact.write_bytes(b"half a file")
        killed_report = out / _ours("report")
        killed_report.mkdir()
        (killed_report / "report.md").write_text("half a report")
        planted = out / f".report.{'cd34' * 8}.tmp"
        planted.symlink_to(outside, target_is_directory=True)  # our name, but a link: never followed nor removed
        users = out / ".report.mine.tmp"
        users.write_text("not ours")
        result = CliRunner().invoke(app, [command, str(out)], env={"COLUMNS": "300"})
        assert result.exit_code == 0, result.output
        assert not killed_compact.exists() and not killed_report.exists()
        assert planted.is_symlink() and (outside / "keep").read_text() == "the user's" and users.exists()
        planted.unlink()
        users.unlink()
    assert "removed 2 temporary file(s)" in result.output


def test_a_trial_run_counts_by_its_row_not_by_the_driver_s_clock(tmp_path):
    import datetime as dt

    from poisonsweep.engine.sweep import _recorded_anew, _recorded_rows

    out = str(tmp_path)
    write_trial(out, "failed", trial_rows("failed", status="failed"))
    before = _recorded_rows(out, ["failed", "new", "untouched"])
    behind = dt.datetime(2001, 1, 1, tzinfo=dt.timezone.utc)  # a worker whose clock is years behind the driver's
    for tid in ("failed", "new"):
        rows = trial_rows(tid)
        rows["trials"][0].update(started_at=behind, finished_at=behind + dt.timedelta(seconds=3))
        write_trial(out, tid, rows)
    assert _recorded_anew(out, before, ["failed", "new", "untouched"]) == 2


def test_one_function_builds_every_trials_row_with_every_column():
    """``trials_row`` gives a failed attempt, a failed trial and a finished one the same columns (the schema's,
    but ``tables``), the error masked, and a pack's lone member its note; a measured column the schema lacks
    is refused."""
    import datetime as dt

    from poisonsweep.engine.config import build_sweep, trial_id
    from poisonsweep.engine.record.row import trials_row
    from poisonsweep.tasks.trial import TrialResult

    config = build_sweep({"data": {"name": "digits", "n_train": 40, "n_test": 20},
                          "poison": {"method": "one_shift", "rate": 0.1}, "model": {"name": "mlp"},
                          "detectors": ["loss"]}).trials[0]
    started = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    run = {"started": started, "finished": started + dt.timedelta(seconds=3), "version": "v", "where": {}}
    finished = TrialResult({"trials": [{"clean_test_acc": 0.9, "pack_size": 1, "pack_note": None}]})
    rows = [trials_row(config, "worker died at s3://key:secret@bucket/out", **run),
            trials_row(config, ValueError("boom"), **run), trials_row(config, finished, pack_note="alone", **run)]
    columns = [name for name in record.SCHEMAS["trials"].names if name != "tables"]
    assert all(list(row) == columns for row in rows)
    assert [row["status"] for row in rows] == ["failed", "failed", "ok"]
    assert rows[0]["error"] == "worker died at s3://key:***@bucket/out" and rows[1]["error"].startswith("ValueError: boom")
    assert rows[2]["clean_test_acc"] == 0.9 and rows[2]["pack_note"] == "alone" and rows[0]["pack_note"] is None
    assert {row["trial_id"] for row in rows} == {trial_id(config)} and rows[2]["total_seconds"] == 3
    with pytest.raises(ValueError, match="clean_accuracy"):
        trials_row(config, TrialResult({"trials": [{"clean_accuracy": 0.9}]}), **run)
