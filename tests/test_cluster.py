"""Sweeps on a real Ray cluster: two ``ray start`` nodes on this machine, the CLI connected with
``--address``, as ``ray job submit ... -- poisonsweep run ... --address auto`` does on a cloud cluster.

Faults are real, not mocked: a trial's worker process is SIGKILLed from outside (found by its Ray
process title, ``ray::ImplicitFunc.train``, among this cluster's processes) and must be retried;
the driver is SIGKILLed mid-sweep and the same command, run again, must finish the rest with every
trial exactly once in every table. ``cluster.yaml`` passes Ray's own cluster-config validation.

The cluster is private to this module: its own temp dir (so ``ray.init()`` elsewhere on this
machine never finds it), its own auth token, and at the end only its own processes are ended.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow  # every test starts Ray, a subprocess or a server

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
TABLES = ["trials", "detections", "scores", "unlearning", "influence"]

# ~1 s of training per trial: long enough to be killed mid-trial, short enough for CI
TRIAL = {
    "data": {"name": "digits", "n_train": 1000, "n_test": 200},
    "poison": {"method": "one_shift", "rate": 0.1},
    "model": {"name": "mlp", "params": {"hidden": 64, "depth": 1}},
    "train": {"epochs": 20, "batch_size": 32, "lr": 0.01, "optimizer": "sgd"},
    "detectors": ["loss"],
    "resources": {"cpu": 1, "max_failures": 1},
}


def sessions_processes(session_ids: set[int]) -> dict[int, str]:
    """pid -> command line of every process whose session is one of ``session_ids``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            session = int(stat[stat.rindex(")") + 2:].split()[3])  # fields after "(comm)": state ppid pgrp session
            if session in session_ids:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, ValueError):
            continue  # the process ended while we looked
    return found


class LocalRayCluster:
    """Ray nodes started with ``ray start --block`` in new sessions, stopped by those sessions' ids."""

    def __init__(self):
        # short path: Ray's unix sockets live under it (108-byte limit)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="psray", dir="/tmp"))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "COLUMNS": "160"}
        self.nodes: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_node(self, num_cpus: int, head: bool) -> None:
        args = [RAY, "start", "--block", f"--temp-dir={self.temp_dir}", "--node-ip-address=127.0.0.1",
                f"--num-cpus={num_cpus}", "--num-gpus=0", "--object-store-memory=80000000", "--disable-usage-stats"]
        if head:
            args += ["--head", f"--port={self.port}", "--include-dashboard=false"]
        else:
            args += [f"--address={self.address}"]
        log = open(self.temp_dir / f"node{len(self.nodes)}.log", "w")
        self.nodes.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def wait_started(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        for i, node in enumerate(self.nodes):
            log = self.temp_dir / f"node{i}.log"
            while "Ray runtime started" not in log.read_text():
                if node.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)

    def processes(self) -> dict[int, str]:
        return sessions_processes({node.pid for node in self.nodes})

    def node_ids(self) -> set[str]:
        """Every raylet's node id, as the raylets logged it (independent of the engine)."""
        logs = self.temp_dir.glob("session_*/logs/raylet*.out")
        return {m for log in logs for m in re.findall(r"Setting node ID node_id=([0-9a-f]+)", log.read_text())}

    def stop(self) -> None:
        for node in reversed(self.nodes):  # `ray start --block` ends its node's processes on SIGTERM
            if node.poll() is None:
                node.terminate()
        for node in self.nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:  # workers the nodes did not take down: only this cluster's sessions
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    cluster = LocalRayCluster()
    try:
        cluster.start_node(num_cpus=1, head=True)
        cluster.start_node(num_cpus=1, head=False)  # joins once the head's GCS answers
        cluster.wait_started()
        yield cluster
    finally:
        cluster.stop()
    assert not cluster.processes(), "processes of the test cluster outlived it"


def write_config(folder: Path, name: str, seeds: list[int], **changes) -> Path:
    config = {**TRIAL, "name": name, "sweep": {"seed": seeds}, **changes}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def poisonsweep_command(*args) -> list[str]:
    return [sys.executable, "-m", "poisonsweep.engine.cli", *args]


def run_cli(cluster, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(poisonsweep_command(*args), capture_output=True, text=True, timeout=timeout,
                          env=cluster.env, cwd=REPO)


def assert_each_trial_once_in_every_table(out: Path, n_trials: int, scores_per_trial: int,
                                          failed: int = 0) -> pd.DataFrame:
    """Every table readable file by file; one trials row per trial; each ok trial's rows exactly once."""
    for table in TABLES:
        for path in (out / table).glob("*"):
            assert not path.name.startswith("."), f"temporary file left behind: {path}"
            pq.read_table(path)  # a partial file would raise here
    trials = pd.read_parquet(out / "trials")
    assert len(trials) == n_trials and trials.trial_id.is_unique
    ok = trials[trials.status == "ok"]
    assert len(ok) == n_trials - failed, trials.error.dropna().tolist()
    detections = pd.read_parquet(out / "detections")
    assert sorted(detections.trial_id) == sorted(ok.trial_id)  # one detector: one row per ok trial
    scores = pd.read_parquet(out / "scores")
    assert set(scores.trial_id) == set(ok.trial_id) and (scores.groupby("trial_id").size() == scores_per_trial).all()
    assert not scores.duplicated(["trial_id", "detector", "index"]).any()
    return trials


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    from poisonsweep.engine.cluster import autoscaler_capacity

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)  # raises on a schema violation
    assert config["head_node_type"] == "head" and config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] >= 1  # autoscales GPU workers from zero
    assert any("pip install" in c and "poisonsweep" in c for c in config["setup_commands"])
    assert "/home/ray/poisonsweep" in config["file_mounts"]
    # the engine's GPU check sees the GPUs the autoscaler can add: 8 workers x (4 CPU, 1 GPU)
    assert autoscaler_capacity(config) == {"CPU": 32, "GPU": 8}
    broken = {**raw, "available_node_types": {**raw["available_node_types"],
                                              "gpu_worker": {**raw["available_node_types"]["gpu_worker"],
                                                             "min_wrokers": 1}}}
    with pytest.raises(Exception, match="min_wrokers"):
        validate_config(prepare_config(broken))


def test_sweep_through_the_cli_runs_trials_on_both_nodes(cluster, tmp_path):
    config = write_config(tmp_path, "two_nodes", [0, 1], train={**TRIAL["train"], "epochs": 5})
    out = tmp_path / "out"
    # each node has 1 CPU and each trial takes 1, so the two trials' placement groups land on
    # different nodes; a fresh process per trial keeps each trial on its own group's node (with
    # reused processes, the node whose worker starts first would take both short trials)
    result = run_cli(cluster, "run", str(config), "--out", str(out), "--address", cluster.address,
                     "--no-reuse-actors")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 trials run" in result.stdout
    trials = assert_each_trial_once_in_every_table(out, 2, 1000)
    node_ids = cluster.node_ids()
    assert len(node_ids) == 2
    assert set(trials.ray_node_id) == node_ids  # both nodes ran trials, and nothing else did
    assert trials.node.nunique() == 1 and trials.node_ip.nunique() == 1  # one host, yet two Ray nodes


def find_trial_worker(cluster, timeout: float = 240) -> int:
    """The pid of a worker process while it runs a trial (``ray::ImplicitFunc.train``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, command in cluster.processes().items():
            if command.startswith("ray::ImplicitFunc.train"):
                return pid
        time.sleep(0.05)
    raise AssertionError("no trial worker appeared")


@pytest.mark.parametrize("max_failures", [1, 0])
def test_a_killed_trial_worker_is_retried_up_to_max_failures_and_the_sweep_completes(cluster, tmp_path, max_failures):
    config = write_config(tmp_path, "killed_worker", [0, 1], resources={"cpu": 1, "max_failures": max_failures})
    out = tmp_path / "out"
    driver = subprocess.Popen(poisonsweep_command("run", str(config), "--out", str(out), "--address", cluster.address),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cluster.env, cwd=REPO,
                              start_new_session=True)
    try:
        victim = find_trial_worker(cluster)
        os.kill(victim, signal.SIGKILL)
        output, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, output
    assert "Traceback" not in output, output  # issue 22: without --verbose, no Ray traceback (one line per error)
    counts = output[output.index("2 trials run"):].splitlines()[0]
    # Tune's own record of the lost attempt: the worker died (the trial did not raise)
    errors = list((out / "_tune").glob("*/*/error.txt"))
    assert len(errors) == 1 and "Failure # 1" in errors[0].read_text()
    assert re.search(r"ActorDiedError|RayActorError|died", errors[0].read_text())
    if max_failures == 1:  # retried once, then it completed
        assert "1 attempt(s) retried after a worker died" in counts and "failed" not in counts, output
        assert_each_trial_once_in_every_table(out, 2, 1000)
    else:  # no retry allowed: recorded as failed, with why, and the other trial still ran
        assert "1 failed" in counts and "retried" not in counts, output
        trials = assert_each_trial_once_in_every_table(out, 2, 1000, failed=1)
        lost = trials[trials.status == "failed"].iloc[0]
        assert re.search(r"ActorDiedError|RayActorError", lost.error) and pd.isna(lost.ray_node_id)
        listed = output.split("1 failed trial(s)")[1]  # the summary says why
        assert re.search(r"ActorDiedError|RayActorError", listed), output


def test_sigkilled_driver_then_the_same_command_finishes_every_trial_exactly_once(cluster, tmp_path):
    config = write_config(tmp_path, "resume", [0, 1, 2, 3])
    out = tmp_path / "out"
    command = poisonsweep_command("run", str(config), "--out", str(out), "--address", cluster.address)
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cluster.env,
                              cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while not list((out / "trials").glob("*.parquet")):
            assert driver.poll() is None and time.monotonic() < deadline, "the driver ended before any trial did"
            time.sleep(0.05)
    finally:
        os.kill(driver.pid, signal.SIGKILL)  # the driver only, as `kill -9` of a job would
        driver.wait()
    # the killed driver's trial workers die with it (Ray ends the actors a dead driver owned)
    deadline = time.monotonic() + 60
    while any(c.startswith("ray::ImplicitFunc") for c in cluster.processes().values()):
        assert time.monotonic() < deadline, "trial workers outlived their driver"
        time.sleep(0.2)
    done_before = {p.stem for p in (out / "trials").glob("*.parquet")}
    assert 1 <= len(done_before) < 4
    untouched = {stem: (out / "trials" / f"{stem}.parquet").stat().st_mtime_ns for stem in done_before}

    again = run_cli(cluster, *command[3:])
    assert again.returncode == 0, again.stdout + again.stderr
    done_first = len(done_before)
    assert f"{4 - done_first} trials run, {done_first} already done" in again.stdout
    trials = assert_each_trial_once_in_every_table(out, 4, 1000)
    assert done_before < set(trials.trial_id)
    # the trials finished before the kill were not run again
    assert all((out / "trials" / f"{s}.parquet").stat().st_mtime_ns == t for s, t in untouched.items())


def test_a_gpu_asked_of_a_cluster_without_gpus_is_a_clear_error(cluster, tmp_path):
    config = write_config(tmp_path, "gpu", [0], resources={"cpu": 1, "gpu": 0.25})
    out = tmp_path / "out"
    result = run_cli(cluster, "run", str(config), "--out", str(out), "--address", cluster.address)
    assert result.returncode == 2, result.stdout + result.stderr
    message = " ".join(result.stdout.split())
    assert "resources ask for GPUs (gpu: 0.25, actor_gpu: 0) but the Ray cluster has none" in message
    assert "--set resources.gpu=0" in message
    assert not (out / "trials").exists()


# a plugin detector that refuses to run from the driver's copy of its file: a trial must import the copy
# Ray shipped with the job (runtime_env py_modules), as a node without the file would
DRIVER_ONLY_PLUGIN = '''
from pathlib import Path

import numpy as np
from poisonsweep import DETECTORS, Detection, flag_top

DRIVER_COPY = Path({folder!r})


@DETECTORS.register("shipped_loss")
def shipped_loss(context, *, seed):
    """The training loss, computed only from a shipped copy of this file."""
    if Path(__file__).resolve().parent == DRIVER_COPY:
        raise RuntimeError(f"imported from the driver's copy {{__file__}}, not the one shipped with the job")
    scores = np.asarray(context.losses, dtype=float)
    return Detection(scores=scores, flagged=flag_top(scores, 0.1))
'''


def test_a_plugin_only_on_the_driver_runs_its_trials_on_both_nodes(cluster, tmp_path):
    folder = tmp_path / "driver_only"
    folder.mkdir()
    (folder / "driver_plugin.py").write_text(DRIVER_ONLY_PLUGIN.format(folder=str(folder.resolve())))
    config = write_config(folder, "plugin_two_nodes", [0, 1], train={**TRIAL["train"], "epochs": 5},
                          plugins=["driver_plugin.py"], detectors=["shipped_loss"])
    out = tmp_path / "out"
    result = run_cli(cluster, "run", str(config), "--out", str(out), "--address", cluster.address,
                     "--no-reuse-actors")  # one fresh process per trial: the two trials land on the two nodes
    assert result.returncode == 0, result.stdout + result.stderr
    trials = assert_each_trial_once_in_every_table(out, 2, 1000)
    assert set(trials.ray_node_id) == cluster.node_ids()
    assert set(pd.read_parquet(out / "detections").detector) == {"shipped_loss"}
    assert trials.plugins.str.contains('"module": "driver_plugin"').all()
