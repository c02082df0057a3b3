"""Ctrl-C during a sweep (issue 14): a clean stop, the summary of what finished, and our own resume
hint instead of Ray Tune's ``Tuner.restore`` (we resume by running the same command again)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
import pytest

pytestmark = pytest.mark.slow  # every test starts Ray, a subprocess or a server

CONFIG = {
    "name": "ctrl_c",
    "data": {"name": "digits", "n_train": 300, "n_test": 100},
    "poison": {"method": "one_shift", "rate": 0.1},
    "model": {"name": "mlp", "params": {"hidden": 32, "depth": 1}},
    "train": {"epochs": 15, "batch_size": 32},
    "detectors": ["loss"],
    "sweep": {"seed": list(range(8))},
    "resources": {"cpu": 1, "max_concurrent": 1},
}


def test_ctrl_c_stops_cleanly_prints_the_summary_and_our_resume_hint(tmp_path):
    config = tmp_path / "ctrl_c.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "out"
    env = {**os.environ, "COLUMNS": "200", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    driver = subprocess.Popen([sys.executable, "-m", "poisonsweep.engine.cli", "run", str(config), "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + 240
    while not list((out / "trials").glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.5)  # wait for a first finished trial
    driver.send_signal(signal.SIGINT)
    stdout, stderr = driver.communicate(timeout=240)
    text = stdout + stderr
    assert driver.returncode == 130, text
    assert "interrupted:" in stdout and "Run the same command again to resume" in stdout
    assert "Trials (mean±std over seeds)" in stdout  # the summary of what finished
    assert "Tuner.restore" not in text and "Traceback" not in text
