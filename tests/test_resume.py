"""A record you can trust (issue 14): code versions compared, damaged files named and repaired, one
writer per output directory, and config text that is never read as markup or mathematics. No Ray:
trials are recorded in this process with ``record_trial``."""

import pytest
import yaml
from typer.testing import CliRunner

from poisonsweep.engine import record as sink
from poisonsweep.engine import resume
from poisonsweep.engine.lease import run_guard
from poisonsweep.engine.cli import app
from poisonsweep.engine.config import build_sweep, trial_id
from poisonsweep.engine.worker import record_trial

CONFIG = {"name": "rec", "data": {"name": "digits", "n_train": 60, "n_test": 30},
          "poison": {"method": "one_shift", "rate": 0.1}, "model": {"name": "mlp", "params": {"hidden": 8, "depth": 1}},
          "train": {"epochs": 1}, "detectors": [{"name": "loss", "label": "[/oops] $\\nocommand{x}$"}],
          "sweep": {"seed": [0, 1]}}


def cli(*args):
    result = CliRunner().invoke(app, [*map(str, args)], env={"COLUMNS": "400"})
    return result.exit_code, " ".join(result.output.split())


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two ok trials, one written by an older code version."""
    out = str(tmp_path_factory.mktemp("record") / "out")
    sweep = build_sweep(CONFIG)
    for trial, version in zip(sweep.trials, ["0.1.0+src.old", resume.code_version()]):
        record_trial(trial, out, version=version)
    return out, sweep


def test_code_version_is_the_package_version_and_a_hash_of_the_science_code(tmp_path, monkeypatch):
    version = resume.code_version()
    assert "+src." in version and len(version.rsplit(".", 1)[-1]) == 12
    from poisonsweep import tasks

    copy = tmp_path / "tasks"  # the same files elsewhere (a wheel's site-packages): the same hash
    import shutil

    shutil.copytree(tasks.__path__[0], copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(tasks, "__file__", str(copy / "__init__.py"))
    assert resume.code_version() == version
    (copy / "trial.py").write_text((copy / "trial.py").read_text() + "\n# an uncommitted edit\n")
    assert resume.code_version() != version  # a dirty tree is a different version


def test_stale_trials_are_named_and_rerun_only_when_asked(recorded):
    out, sweep = recorded
    ids, version = [trial_id(t) for t in sweep.trials], resume.code_version()
    assert resume.stale_trials(out, ids, version) == {"0.1.0+src.old": 1}
    assert resume.trials_to_run(out, ids, "failed", version) == []
    assert resume.trials_to_run(out, ids, "stale", version) == ids[:1]
    assert resume.trials_to_run(out, ids, "all", version) == ids


def test_show_and_report_say_the_table_mixes_versions_and_print_labels_as_written(recorded, tmp_path):
    out, _ = recorded
    code, output = cli("show", out)
    assert code == 0, output
    assert "the ok trials mix 2 code versions" in output and "0.1.0+src.old: 1" in output
    assert "[/oops] $\\nocommand{x}$" in output  # shown as text, not taken as rich markup
    code, output = cli("report", out, "--out", tmp_path / "report")
    assert code == 0, output  # matplotlib does not parse the label as mathematics
    assert "mix 2 code versions" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "auroc.png").stat().st_size > 0


def test_a_report_that_fails_half_way_leaves_no_half_written_folder(recorded, tmp_path, monkeypatch):
    import poisonsweep.engine.report as report
    import poisonsweep.engine.report.render as render

    out, _ = recorded
    target = tmp_path / "report"
    report.write_report(out, target)
    before = sorted(p.name for p in target.iterdir())

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(render, "figure_accuracy", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        report.write_report(out, target)
    assert sorted(p.name for p in target.iterdir()) == before  # the earlier report, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no staging folder left behind


def test_error_messages_show_config_text_as_written(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "data": {"name": "[red]digits"}}))
    code, output = cli("run", path, "--out", tmp_path / "out")
    assert code == 2 and "got '[red]digits'" in output


def test_a_damaged_file_is_named_repaired_and_its_trial_rerun(recorded, tmp_path):
    import shutil

    out = str(tmp_path / "copy")
    shutil.copytree(recorded[0], out)
    ids = [trial_id(t) for t in recorded[1].trials]
    scores = tmp_path / "copy" / "scores" / f"{ids[1]}.parquet"
    scores.write_bytes(scores.read_bytes()[:100])  # a truncated copy of an ok trial's other table
    (tmp_path / "copy" / "detections" / "notes.txt").write_text("a stray file")
    with pytest.warns(sink.DamagedFile, match="scores/.*is not readable Parquet.*poisonsweep repair"):
        assert sink.read_table(out, "scores").num_rows == 60  # the other trial's rows
    assert resume.trials_to_run(out, ids, "failed", resume.code_version()) == ids[1:]
    code, output = cli("show", out)
    assert code == 0 and f"warning: {scores} is not readable Parquet" in output and "notes.txt" in output
    code, output = cli("repair", out)
    assert code == 0 and "2 damaged file(s) moved to _quarantine/" in output
    assert (tmp_path / "copy" / "_quarantine" / "scores" / scores.name).exists()
    assert resume.damaged_files(out) == []


def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "out"
    out.mkdir()
    with run_guard(str(out)):  # a first run holds the lock
        code, output = cli("run", path, "--out", out)
    assert code == 2 and "another `poisonsweep run` is writing to" in output and ".run.lock" in output


def test_a_trial_s_warnings_are_recorded_and_shown(tmp_path):
    """LiSSA with lissa_depth 5 has not converged: the warning is in the trial's row and in ``show``."""
    config = {**CONFIG, "sweep": {}, "detectors": [{"name": "influence", "label": "[b]lissa",
                                                    "params": {"solver": "lissa", "lissa_depth": 5}}]}
    out = str(tmp_path / "out")
    row = record_trial(build_sweep(config).trials[0], out, version=resume.code_version())
    assert row["status"] == "ok", row["error"]
    recorded = sink.read_table(out, "trials", ["warnings"]).column("warnings").to_pylist()
    assert len(recorded) == 1 and recorded[0].count("\n") == 0  # raised more than once, recorded once
    assert recorded[0].startswith("LissaNotConverged: LiSSA has not converged: after lissa_depth 5 steps")
    assert "raise lissa_depth to at least" in recorded[0]
    code, output = cli("show", out)
    assert code == 0 and "1 trial(s) warned" in output, output
    assert "1 trial(s): LissaNotConverged: LiSSA has not converged" in output and "raise lissa_depth" in output
    code, output = cli("report", out, "--out", tmp_path / "report")
    assert code == 0 and "1 trial(s) warned (see 'Trials that warned')" in output, output
    assert "LissaNotConverged: LiSSA has not converged" in (tmp_path / "report" / "report.html").read_text()


def test_only_the_project_s_warnings_are_recorded(recwarn):
    import warnings

    from poisonsweep.tasks.influence.solvers import LissaNotConverged
    from poisonsweep.tasks.trial import recorded_warnings

    with recorded_warnings() as found:
        warnings.warn("[red]first line\nsecond line", LissaNotConverged, stacklevel=2)
        warnings.warn("[red]first line\nanother second line", LissaNotConverged, stacklevel=2)
        warnings.warn("someone else's", DeprecationWarning, stacklevel=2)
    assert found == ["LissaNotConverged: [red]first line"]
    assert [str(w.message) for w in recwarn] == ["someone else's"]  # handed on, not swallowed


# ------------------------------------------------------------------------------------------------ issue 22, point 10


def _in_process_sweep(monkeypatch):
    """``api.run`` with the sweep's trials run here, one by one, instead of on Ray (what each Ray trial
    does: ``record_trial``); returns the ids of the trials it was handed."""
    from poisonsweep.engine import sweep as sweep_module

    ran = []

    def run_sweep(sweep, *, to_run, version, **_):
        for trial, tid in zip(sweep.trials, sweep.ids):
            if tid in to_run:
                record_trial(trial, sweep.out, version=version)
                ran.append(tid)
        return sweep_module.SweepOutcome(total=len(sweep.trials), skipped=len(sweep.trials) - len(ran), ran=len(ran))

    monkeypatch.setattr(sweep_module, "run_sweep", run_sweep)
    return ran


def test_a_trial_whose_scores_file_was_lost_runs_again_in_the_same_run(recorded, tmp_path, monkeypatch):
    import shutil

    from poisonsweep.engine import api

    out = str(tmp_path / "copy")
    shutil.copytree(recorded[0], out)
    ids = [trial_id(t) for t in recorded[1].trials]
    scores = tmp_path / "copy" / "scores" / f"{ids[1]}.parquet"
    scores.write_bytes(scores.read_bytes()[:100])  # truncated
    ran, notes = _in_process_sweep(monkeypatch), []
    api.run(CONFIG, out=out, echo=notes.append)
    assert any(f"moved {scores} (not readable Parquet)" in note and "its trial runs again" in note for note in notes)
    assert ran == [ids[1]]
    assert sink.read_table(out, "scores").to_pandas().groupby("trial_id").size().to_dict() == {ids[0]: 60, ids[1]: 60}
    ran.clear()
    api.run(CONFIG, out=out, echo=notes.append)  # and now it is done
    assert ran == []
    rows = sink.read_table(out, "trials").to_pandas().set_index("trial_id")
    assert rows.loc[ids[1], "tables"].tolist() == ["detections", "scores"]  # the tables that got rows


def test_a_trial_is_done_only_while_every_table_it_lists_holds_its_rows(recorded, tmp_path):
    import shutil

    from poisonsweep.engine.record import compact

    out = str(tmp_path / "copy")
    shutil.copytree(recorded[0], out)
    ids, version = [trial_id(t) for t in recorded[1].trials], resume.code_version()
    (tmp_path / "copy" / "detections" / f"{ids[0]}.parquet").unlink()  # lost, not damaged
    assert resume.trials_to_run(out, ids, "failed", version, damaged=[]) == ids[:1]
    shutil.rmtree(out)
    shutil.copytree(recorded[0], out)
    compact(out)  # compacted: the rows are there, in compacted files
    assert resume.trials_to_run(out, ids, "failed", version) == []
    for path in (tmp_path / "copy" / "scores").glob("compacted-*.parquet"):  # a compacted file moved aside
        path.rename(tmp_path / path.name)
    assert resume.trials_to_run(out, ids, "failed", version) == ids


def test_a_record_from_before_the_tables_column_counts_its_ok_trials_as_done(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = str(tmp_path)
    sink.write_trial_table(out, "scores", "old", [])
    (tmp_path / "trials").mkdir()
    pq.write_table(pa.table({"trial_id": ["old"], "status": ["ok"], "code_version": ["0.1.0"]}),
                   tmp_path / "trials" / "old.parquet")
    assert resume.damaged_files(out) == []  # fewer columns than today is not a foreign schema
    assert resume.complete_trials(out) == {"old"}
