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
    assert f"report folder '{folder}'" in " ".join(output.split()) and "nothing was written" in output


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
