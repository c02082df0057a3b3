"""``--out s3://...`` for real: an S3-compatible server (moto's, on a free local port) holds the record.

pyarrow's S3 filesystem finds the server through ``AWS_ENDPOINT_URL`` (as any AWS SDK does), so
the same commands work against AWS, MinIO or Ceph with that variable set or unset. A real sweep
(CLI, local Ray) writes there, a rerun resumes, and ``compact``, ``show`` and ``report`` read it;
FLIP-style artifacts are mirrored through a node-local cache.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from poisonsweep.engine import artifacts, lease  # noqa: E402
from poisonsweep.engine.cli import app  # noqa: E402
from poisonsweep.engine.record import compact, read_table, table_files, write_trial  # noqa: E402
from poisonsweep.engine.resume import complete_trials  # noqa: E402
from poisonsweep.engine.storage import filesystem, join_uri  # noqa: E402
from pyarrow.fs import FileSelector  # noqa: E402
from test_record import trial_rows  # noqa: E402

pytestmark = pytest.mark.slow  # every test starts Ray, a subprocess or a server

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "sweeps"
SECRET = "SECRETvalue42"  # moto takes any credentials


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server for this module, and the environment that points clients at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    try:
        yield env
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_the_record_compacts_and_reads_back_from_s3(s3_env, tmp_path, monkeypatch):
    out = f"s3://{BUCKET}/record"
    for i in range(4):
        write_trial(out, f"t{i}", trial_rows(f"t{i}", status="failed" if i == 3 else "ok"))
    assert complete_trials(out) == {"t0", "t1", "t2"}
    compact(out)
    files = table_files(out, "scores")
    assert not files.per_trial and len(files.compacted) == 1
    assert read_table(out, "scores").num_rows == 4 * 7
    assert complete_trials(out) == {"t0", "t1", "t2"}
    shown = CliRunner().invoke(app, ["show", out], env={"COLUMNS": "300"})
    assert shown.exit_code == 0 and "1 failed trial(s)" in shown.output, shown.output
    reported = CliRunner().invoke(app, ["report", out, "--out", str(tmp_path / "report")])
    assert reported.exit_code == 0, reported.output
    assert "4 trials recorded: 3 ok, 1 failed" in reported.output
    assert (tmp_path / "report" / "report.html").is_file()
    # issue 22: the default report folder (./record-report) is refused when it holds the user's files
    monkeypatch.chdir(tmp_path)
    (tmp_path / "record-report").mkdir()
    (tmp_path / "record-report" / "keep").write_text("x")
    refused = CliRunner().invoke(app, ["report", out])
    assert refused.exit_code == 2 and "report folder 'record-report' holds files" in refused.output, refused.output
    assert [p.name for p in (tmp_path / "record-report").iterdir()] == ["keep"]


def test_artifacts_are_shared_through_the_bucket_and_a_node_local_cache(s3_env, tmp_path, monkeypatch):
    out = f"s3://{BUCKET}/flip"
    monkeypatch.setenv("POISONSWEEP_CACHE", str(tmp_path / "node-a"))
    local, before = artifacts.download(out)
    assert before == set()
    (local / "flip-abc.npz").write_bytes(b"experts")
    (local / "flip-abc.lock").write_text("")  # the poison's lock file stays local
    assert artifacts.upload(out, local, before) == ["flip-abc.npz"]
    monkeypatch.setenv("POISONSWEEP_CACHE", str(tmp_path / "node-b"))  # another node
    other, present = artifacts.download(out)
    assert present == {"flip-abc.npz"} and (other / "flip-abc.npz").read_bytes() == b"experts"
    assert artifacts.upload(out, other, present) == []
    assert artifacts.uses_artifacts({"poison": {"method": "flip"}})
    assert not artifacts.uses_artifacts({"poison": {"method": "one_shift"}})


def test_a_sweep_writes_to_s3_resumes_and_is_reported(s3_env, tmp_path):
    """The output URI carries its endpoint, region and credentials (issue 22): the CLI is given no
    AWS_* variables, every command works, and the secret is printed and recorded nowhere."""
    config = tmp_path / "s3.yaml"
    config.write_text(yaml.safe_dump({
        "name": "s3", "data": {"name": "digits", "n_train": 100, "n_test": 50},
        "poison": {"method": "one_shift", "rate": 0.1}, "model": {"name": "mlp", "params": {"hidden": 8, "depth": 1}},
        "train": {"epochs": 1}, "detectors": ["loss"], "sweep": {"seed": [0, 1]}, "resources": {"max_failures": 0}}))
    endpoint = s3_env["AWS_ENDPOINT_URL"].removeprefix("http://")
    path = f"{BUCKET}/sweeps/s3?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    out = f"s3://AKIDKEY:{SECRET}@{path}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, "AWS_EC2_METADATA_DISABLED": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])),
           "COLUMNS": "200", "RAY_USAGE_STATS_ENABLED": "0"}

    def cli(*args):
        result = subprocess.run([sys.executable, "-m", "poisonsweep.engine.cli", *args], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert SECRET not in result.stdout + result.stderr
        return result.stdout

    ran = cli("run", str(config), "--out", out)
    assert "2 trials run, 0 already done" in ran and f"-> s3://AKIDKEY:***@{path}" in ran, ran
    assert not _exists(join_uri(out, lease.LEASE_FILE))  # the run's lease is gone with it
    assert len(table_files(out, "trials").per_trial) == 2
    assert "trials: 2 trial files" in cli("compact", out)
    assert "0 trials run, 2 already done" in cli("run", str(config), "--out", out)  # resume reads the compacted record
    shown = cli("show", out)
    assert "one setting; every trial: data.name digits, poison.method one_shift, poison.rate 0.1" in " ".join(
        shown.split()), shown
    reported = cli("report", out, "--out", str(tmp_path / "report"))
    assert "2 trials recorded: 2 ok, 0 failed; 2 planned, 0 not yet recorded" in reported, reported
    trials = read_table(out, "trials", ["trial_id", "status", "seed"]).to_pandas()
    assert sorted(trials.seed) == [0, 1] and set(trials.status) == {"ok"}
    fs, root = filesystem(out)  # the secret is in none of our files (Ray Tune's own state under _tune aside)
    ours = [info.path for info in fs.get_file_info(FileSelector(root, recursive=True))
            if info.type.name == "File" and "/_tune/" not in info.path]
    assert ours and not [p for p in ours if SECRET.encode() in fs.open_input_stream(p).read()]
    assert not [p for p in (tmp_path / "report").iterdir() if SECRET.encode() in p.read_bytes()]


def _exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type.name == "File"


def _lease_config(tmp_path) -> Path:
    config = tmp_path / "lease.yaml"
    config.write_text(yaml.safe_dump({"name": "lease", "data": {"name": "digits", "n_train": 100, "n_test": 50},
                                      "poison": {"method": "one_shift", "rate": 0.1}, "detectors": ["loss"]}))
    return config


def test_a_fresh_lease_refuses_a_second_run_before_ray_starts(s3_env, tmp_path, monkeypatch):
    out = f"s3://{BUCKET}/lease/fresh"
    monkeypatch.setattr("poisonsweep.engine.sweep.run_sweep", lambda *a, **k: pytest.fail("Ray must not start"))
    with lease.Lease(out) as first:  # a first run holds the lease
        assert lease.Lease(out).read()["token"] == first.token
        result = CliRunner().invoke(app, ["run", str(_lease_config(tmp_path)), "--out", out], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "another `poisonsweep run` is writing to" in message and f"pid {os.getpid()}" in message
    assert f"aws s3 rm {out}/.run.lease" in message
    assert not _exists(f"{out}/{lease.LEASE_FILE}")  # the first run's lease is deleted at its end


def test_an_expired_lease_is_taken_over_and_deleted_at_the_end_even_on_error(s3_env):
    out = f"s3://{BUCKET}/lease/expired"
    now = [1_000_000.0]
    dead = lease.Lease(out, heartbeat=10, clock=lambda: now[0])
    dead.__enter__()
    dead._stop.set()  # the run died: no more heartbeats, the lease stays behind
    now[0] += 29
    with pytest.raises(lease.OutputBusy, match="heartbeat 29 s ago"):
        lease.Lease(out, heartbeat=10, clock=lambda: now[0]).check()
    now[0] += 2  # 31 s > 3 heartbeats: expired
    notes = []
    with pytest.raises(KeyboardInterrupt):
        with lease.Lease(out, heartbeat=10, clock=lambda: now[0], echo=notes.append) as second:
            assert second.read()["token"] == second.token != dead.token
            raise KeyboardInterrupt
    assert notes and "took over the expired lease" in notes[0] and "last heartbeat 31 s ago" in notes[0]
    assert not _exists(f"{out}/{lease.LEASE_FILE}")


def test_the_heartbeat_refreshes_the_lease(s3_env):
    import time

    out = f"s3://{BUCKET}/lease/beat"
    with lease.Lease(out, heartbeat=0.2) as held:
        first = held.read()["heartbeat"]
        time.sleep(0.7)
        assert held.read()["heartbeat"] > first
