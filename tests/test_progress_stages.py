"""Progress inside trials (issue 26, point 4): each running trial's stage under the live bar, carried by
a plain ``on_stage`` callback in ``tasks/`` and a stage board actor in ``engine/``; Ray's own warnings
kept off the screen (written to ``<out>/_tune/ray.log``) unless --verbose."""

import pytest
import importlib.util
import io
import logging
import os
import pty
import re
import select
import subprocess
import sys
import threading
from types import SimpleNamespace

import yaml
from rich.console import Console

from poisonsweep.engine.progress import RAY_LOG, SweepProgress, RayWarningsKept
from poisonsweep.tasks.trial import run_resolved_trial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {
    "name": "stages",
    "data": {"name": "digits", "n_train": 200, "n_test": 60},
    "poison": {"method": "one_shift", "rate": 0.1},
    "model": {"name": "mlp", "params": {"hidden": 16, "depth": 1}},
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.01, "optimizer": "sgd"},
    "detectors": ["loss", "spectral_signature"],
    "unlearn": {"methods": ["finetune"], "selections": [{"kind": "oracle", "fractions": [1.0]}]},
    "resources": {"cpu": 1, "max_failures": 0},
}
RAY_NOISE = ("Token authentication is enabled", "RAY_AUTH_MODE", "save not implemented")


def test_run_trial_tells_each_stage_in_order():
    from poisonsweep.engine.config import sweep_from_mapping

    config = sweep_from_mapping(CONFIG, [], default_name="stages").trials[0]
    stages = []
    run_resolved_trial(config, on_stage=stages.append)
    assert stages == ["loading and poisoning the data", "training epoch 1/3", "training epoch 2/3",
                      "training epoch 3/3", "evaluating", "detector loss (1/2)", "detector spectral_signature (2/2)",
                      "unlearning"]


def test_the_bar_lists_running_trials_with_their_stage_and_forgets_finished_ones():
    screen = io.StringIO()
    progress = SweepProgress(2, Console(file=screen, force_terminal=True, width=100))
    trial = SimpleNamespace(trial_id="t1", config={"trial_id": "abcdef1234567890", "trial_ids": ["abcdef1234567890"]})
    progress.on_trial_start(0, [], trial)
    progress._stages = {"abcdef1234567890": "training epoch 3/20", "gone": "never shown"}
    assert progress.stage_lines() == ["  abcdef123456  training epoch 3/20"]
    with progress:
        progress.bar.refresh()
    assert "training epoch 3/20" in screen.getvalue()
    progress.on_trial_complete(0, [], trial)
    assert progress.stage_lines() == []
    assert SweepProgress(1, Console(file=io.StringIO())).stage_board() is None  # no terminal: no board, no posts


def test_ray_warnings_go_to_the_output_and_errors_still_show(tmp_path):
    import ray  # noqa: F401  (sets up the "ray" logger's handlers)

    screen = io.StringIO()
    from ray._private.log import PlainRayHandler

    handlers = [h for h in logging.getLogger("ray").handlers if isinstance(h, PlainRayHandler)]
    streams = [handler.setStream(screen) for handler in handlers]  # where Ray prints: the screen
    try:
        with RayWarningsKept(str(tmp_path), "_tune") as kept:
            logging.getLogger("ray.tune.search.searcher").warning("save not implemented for Searcher. Skipping save.")
            logging.getLogger("ray.tune").error("Trial task failed")
    finally:
        for handler, stream in zip(handlers, streams):
            handler.setStream(stream)
    printed = screen.getvalue()
    assert "save not implemented" not in printed and "Trial task failed" in printed
    assert kept.count == 1 and kept.path == f"{tmp_path}/_tune/{RAY_LOG}"
    assert "save not implemented for Searcher" in (tmp_path / "_tune" / RAY_LOG).read_text()
    with RayWarningsKept(str(tmp_path / "quiet"), "_tune") as kept:
        pass
    assert kept.path is None and not (tmp_path / "quiet").exists()  # nothing to say: no file


def _run_in_a_terminal(args: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as stdout and stderr (so the live bar draws), return its screen."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "LINES": "40", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           "MLFLOW_ALLOW_FILE_STORE": "true"}
    env.pop("RAY_AUTH_MODE", None)  # Ray's default, which warns
    process = subprocess.Popen([sys.executable, "-m", "poisonsweep.engine.cli", *args], stdin=subprocess.DEVNULL,
                               stdout=follower, stderr=follower, env=env, cwd=ROOT)
    os.close(follower)
    chunks: list[bytes] = []

    def read():
        while True:
            ready, _, _ = select.select([leader], [], [], 1)
            if ready:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # the child closed the terminal
                    return
                if not data:
                    return
                chunks.append(data)
            elif process.poll() is not None:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = process.wait(timeout=timeout)
    reader.join(timeout=10)
    os.close(leader)
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))


@pytest.mark.slow  # starts Ray or a subprocess
def test_a_sweep_in_a_terminal_shows_trial_stages_and_not_rays_warnings(tmp_path, monkeypatch):
    """The one Ray sweep of this file; where the MLflow client is installed it also checks ``--mlflow``
    end to end (tests/test_mlflow.py checks the runs' contents without Ray)."""
    config = {**CONFIG, "train": {**CONFIG["train"], "epochs": 40}}
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(config))
    store = f"file:{tmp_path / 'mlruns'}"
    tracked = importlib.util.find_spec("mlflow") is not None
    code, screen = _run_in_a_terminal(["run", str(path), "--out", str(tmp_path / "out")]
                                      + (["--mlflow", store] if tracked else []))
    assert code == 0, screen[-3000:]
    stage = r"[0-9a-f]{12}  one_shift 0.1 seed 0: (training epoch \d+/40|evaluating|detector \w+|unlearning)"
    assert re.search(stage, screen), screen[-3000:]
    assert not [noise for noise in RAY_NOISE if noise in screen], screen[-3000:]
    assert "1 trials run" in screen
    # Ray 2.60 warns about token authentication on every new local Ray: into the log, named on the screen
    assert ("Ray warning(s) kept off the screen" in screen) == (tmp_path / "out" / "_tune" / RAY_LOG).is_file()
    if tracked:
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        assert "1 trial(s) logged to MLflow" in screen
        client = MlflowClient(tracking_uri=store)
        runs = client.search_runs([client.get_experiment_by_name("stages").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "loss.auroc" in runs[0].data.metrics
