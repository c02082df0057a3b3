"""What we promise (issue 22): nothing a user owns is deleted, nothing outside the output is created,
truncated or followed into, faults end in one line naming the path and the cause. No Ray: trials are
recorded in this process with ``record_trial``."""

import errno
import json
import os

import pytest
from typer.testing import CliRunner

from poisonsweep.engine.cli import app
from poisonsweep.engine.config import build_sweep
from poisonsweep.engine.report.folder import MARKER
from poisonsweep.engine.worker import record_trial

CONFIG = {"name": "safe", "data": {"name": "digits", "n_train": 60, "n_test": 30},
          "poison": {"method": "one_shift", "rate": 0.1}, "model": {"name": "mlp", "params": {"hidden": 8, "depth": 1}},
          "train": {"epochs": 1}, "detectors": ["loss"]}


def cli(*args):
    result = CliRunner().invoke(app, [*map(str, args)], env={"COLUMNS": "400"})
    return result.exit_code, result.output


def tree(folder) -> dict[str, bytes | None]:
    """Every path under ``folder`` (links not followed) and each file's bytes: what must not change."""
    found = {}
    for path in sorted(folder.rglob("*")):
        found[str(path.relative_to(folder))] = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    return found


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("record") / "rec"
    record_trial(build_sweep(CONFIG).trials[0], str(out))
    return out


# ------------------------------------------------------------------- point 1: report --out never deletes


def _one_line_refusal(code: int, output: str, folder) -> None:
    assert code == 2, output
    assert output.startswith("error: ") and output.count("error:") == 1 and "Traceback" not in output, output
    message = " ".join(output.split())
    assert f"report folder '{folder}'" in message and "nothing was written" in message


def test_report_refuses_a_folder_that_holds_the_users_files(record, tmp_path):
    target = tmp_path / "d"
    (target / "sub").mkdir(parents=True)
    (target / "keep").write_text("x")
    before = tree(tmp_path)
    code, output = cli("report", record, "--out", target)
    _one_line_refusal(code, output, target)
    assert "has no .poisonsweep-report file" in " ".join(output.split())
    assert tree(tmp_path) == before  # nothing moved aside, deleted or added, beside the folder either


@pytest.mark.parametrize("inside", ["", "trials", "scores/x", "_tune/y"])
def test_report_never_writes_into_the_record_or_its_tables(record, inside):
    target = record / inside if inside else record
    before = tree(record)
    code, output = cli("report", record, "--out", target)
    _one_line_refusal(code, output, target)
    assert tree(record) == before


def test_report_refuses_a_link_and_a_file(record, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "a-file").write_text("mine")
    for target, why in [(tmp_path / "link", "is a link"), (tmp_path / "a-file", "is not a folder")]:
        code, output = cli("report", record, "--out", target)
        _one_line_refusal(code, output, target)
        assert why in output
    assert (tmp_path / "a-file").read_text() == "mine" and not any((tmp_path / "elsewhere").iterdir())


@pytest.mark.slow  # a second or more of training
def test_a_report_replaces_only_the_files_its_earlier_report_wrote(record, tmp_path):
    target = tmp_path / "r"
    code, output = cli("report", record, "--out", target)
    assert code == 0, output
    listed = json.loads((target / MARKER).read_text())["files"]
    assert "report.html" in listed and sorted(listed) == sorted(p.name for p in target.iterdir() if p.name != MARKER)
    (target / "notes.txt").write_text("the user's")  # added by the user: kept
    (target / "old_figure.png").write_text("an earlier report's")  # listed in the marker, no longer written: removed
    (tmp_path / "victim").write_text("outside")  # a hostile marker cannot reach out of the folder
    (target / MARKER).write_text(json.dumps({"files": listed + ["old_figure.png", "../victim", "/etc/hostname"]}))
    code, output = cli("report", record, "--out", target)
    assert code == 0, output
    assert (target / "notes.txt").read_text() == "the user's" and not (target / "old_figure.png").exists()
    assert (tmp_path / "victim").read_text() == "outside"
    assert sorted(json.loads((target / MARKER).read_text())["files"]) == sorted(listed)
    assert not [p for p in target.iterdir() if p.name.startswith(".staging.")]


@pytest.mark.slow  # a second or more of training
def test_a_killed_reports_staging_folder_is_removed_by_the_next_report(record, tmp_path):
    target = tmp_path / "r"
    assert cli("report", record, "--out", target)[0] == 0
    left = target / ".staging.0123abcd.tmp"
    left.mkdir()
    (left / "report.html").write_text("half")
    assert cli("report", record, "--out", target)[0] == 0
    assert not left.exists()


# ------------------------------------------------------------ point 2: nothing written through a planted link


def _config(folder):
    import yaml

    path = folder / "safe.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.mark.parametrize("planted", [".write-check", ".run.lock", "trials", "sweep.json", "_tune"])
def test_run_refuses_a_planted_link_in_its_output_and_leaves_the_target_intact(tmp_path, monkeypatch, planted):
    import poisonsweep.engine.sweep as sweep

    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: pytest.fail("Ray must not start"))
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "rec"
    out.mkdir()
    (out / planted).symlink_to(victim)
    code, output = cli("run", _config(tmp_path), "--out", out)
    assert code == 2, output
    message = " ".join(output.split())
    assert f"{out / planted} is a link" in message and "Traceback" not in output and "Errno" not in output
    assert victim.read_text() == "precious"


def test_the_run_lock_refuses_a_link_in_one_line(tmp_path):
    from poisonsweep.engine.lease import run_guard
    from poisonsweep.tasks.registry import ConfigError

    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / ".run.lock").symlink_to(victim)
    with pytest.raises(ConfigError, match=r"cannot take the lock .*\.run\.lock: .*it is a link"):
        with run_guard(str(tmp_path)):
            pass
    assert victim.read_text() == "precious"


def test_the_write_probe_has_a_name_of_its_own_and_leaves_nothing(tmp_path):
    from poisonsweep.engine.api import check_writable

    (tmp_path / ".write-check").write_text("the user's")  # a plain file of that name is neither truncated nor removed
    check_writable(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".write-check"]
    assert (tmp_path / ".write-check").read_text() == "the user's"


# ------------------------------------------------------- point 7: a full disk or a store outage is one line

NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/full/rec/scores/.x.parquet.tmp")


def test_a_trial_whose_rows_cannot_be_written_is_left_to_rerun_not_retried(tmp_path, monkeypatch):
    """The trial process reports the unwritable output instead of raising (Tune would retry it as if its
    worker had died) and names the path and the cause."""
    import poisonsweep.engine.record.write as record_write
    import poisonsweep.engine.worker as worker

    trial = build_sweep(CONFIG).trials[0]
    monkeypatch.setattr(record_write, "write_trial", _disk_full)
    monkeypatch.setattr(worker, "_plan_of", lambda plan: [[trial]])
    resources = {"cpu": 1, "pack": 1, "actors": 0}
    result = worker.tune_trainable({"index": 0}, plan=None, out=str(tmp_path), version="", resources=resources)
    assert result["failures"] == {}
    assert list(result["unwritten"].values()) == [
        "cannot write to /full/rec/scores/.x.parquet.tmp: No space left on device"]


def test_an_error_escaping_the_sweep_on_a_full_disk_is_one_line_naming_the_path(tmp_path, monkeypatch):
    import pickle

    import poisonsweep.engine.api as api
    import poisonsweep.engine.sweep as sweep

    def truncated_state(*args, **kwargs):
        monkeypatch.setattr(api.os, "fsync", lambda fd: _disk_full())  # the disk is full from now on
        raise pickle.UnpicklingError("pickle data was truncated")  # what Ray Tune said of its own state

    monkeypatch.setattr(sweep, "run_sweep", truncated_state)
    out = tmp_path / "rec"
    code, output = cli("run", _config(tmp_path), "--out", out)
    assert code == 2 and output.count("error: ") == 1 and "Traceback" not in output, output
    message = " ".join(output.split())
    assert f"error: output directory '{out}' cannot be written: No space left on device" in message
    assert "run again with the same command" in message and "Unpickling" not in message


def test_the_summary_says_the_output_refused_the_rows_not_that_a_worker_died(tmp_path, monkeypatch):
    import poisonsweep.engine.api as api
    from poisonsweep.engine.sweep import SweepOutcome

    outcome = SweepOutcome(total=3, skipped=0, ran=1, retried_after_error=0, out=str(tmp_path),
                           unwritten={"t1": "cannot write to s3://b/rec/scores/t1.parquet: Couldn't connect to server"},
                           output_error="cannot write to s3://b/rec/scores/t1.parquet: Couldn't connect to server",
                           not_recorded=2)
    monkeypatch.setattr(api, "run", lambda *a, **k: outcome)
    code, output = cli("run", _config(tmp_path), "--out", tmp_path / "rec")
    message = " ".join(output.split())
    assert code == 1 and "Traceback" not in output, output
    assert "worker died" not in message and "interrupted" not in message
    assert ("error: cannot write to s3://b/rec/scores/t1.parquet: Couldn't connect to server; 2 trial(s) not "
            "recorded: they run again") in message


def test_a_retry_counts_as_a_dead_worker_only_when_its_process_died(tmp_path):
    from types import SimpleNamespace

    import cloudpickle
    from ray.exceptions import RayActorError, RayTaskError

    from poisonsweep.engine.sweep import _worker_died

    def trial_with(error):
        path = tmp_path / "error.pkl"
        path.write_bytes(cloudpickle.dumps(error))
        return SimpleNamespace(pickled_error_file=str(path))

    raised = RayTaskError("tune_trainable", "Traceback ...", OSError("No space left on device"))
    assert not _worker_died(trial_with(raised))
    assert _worker_died(trial_with(RayActorError()))


def test_without_verbose_a_trial_error_is_logged_in_one_line():
    import logging
    import sys

    from poisonsweep.engine.sweep import _OneLineErrors

    try:
        raise RuntimeError("Traceback (most recent call last):\n  File ...\nActorDiedError: the worker died")
    except RuntimeError:
        record = logging.LogRecord("ray.tune", logging.ERROR, __file__, 1, "Trial task failed for trial %s", ("t1",),
                                   sys.exc_info())
    assert _OneLineErrors().filter(record) and record.exc_info is None
    assert logging.Formatter().format(record) == ("Trial task failed for trial t1: RuntimeError: ActorDiedError: "
                                                  "the worker died")


def test_a_lease_read_while_its_holder_rewrites_it_is_read_again_not_taken_for_no_lease(tmp_path):
    import io
    import json

    from poisonsweep.engine import lease

    held = lease.Lease(str(tmp_path), heartbeat=10, clock=lambda: 100.0)
    body = json.dumps({"token": "other", "heartbeat": 100.0, "host": "h", "pid": 1}).encode()
    reads = [body[:20], body]  # an object store's size-then-bytes read racing a heartbeat: torn, then whole

    class RacingStore:
        def open_input_stream(self, path):
            return io.BytesIO(reads.pop(0))

    held.fs = RacingStore()
    assert held.read()["token"] == "other"
    with pytest.raises(lease.OutputBusy):  # a fresh lease of another run still refuses this one
        reads[:] = [body[:20], body]
        held.check()
