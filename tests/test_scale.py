"""Big sweeps: Tune gets one small trial at a time, and Ctrl-C stops a sweep of thousands cleanly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml
from ray.tune.search import Searcher

import pytest

from poisonsweep.engine.sweep import CtrlC, PlanSearcher, TrialLog

pytestmark = pytest.mark.slow  # every test starts Ray, a subprocess or a server

ROOT = Path(__file__).resolve().parents[1]


def test_the_plan_searcher_hands_out_each_trial_once_then_finishes():
    units = [[f"id{i}"] for i in range(4)] + [["id4", "id5"]]  # the last: a pack of two (resources.pack)
    searcher = PlanSearcher(units)
    given = [searcher.suggest(f"tune{i}") for i in range(5)]
    assert given == [{"index": i, "trial_id": ids[0], "trial_ids": ids} for i, ids in enumerate(units)]
    assert searcher.suggest("tune5") == Searcher.FINISHED


def test_the_trial_log_keeps_only_retries_and_failures():
    class Trial:
        def __init__(self, tid):
            self.config = {"index": 0, "trial_id": tid, "trial_ids": [tid]}

    log = TrialLog()
    log.on_trial_result(0, [], Trial("a"), {"trial_id": "a", "members": 1, "failures": {}})
    log.on_trial_result(0, [], Trial("b"), {"trial_id": "b", "members": 1, "failures": {"b": "ValueError: x"}})
    log.on_trial_recover(0, [], Trial("c"))
    assert log.failed == {"b": "ValueError: x"} and log.retried == {"c": 1}


def test_ctrl_c_between_two_tune_experiments_is_not_lost():
    before = signal.getsignal(signal.SIGINT)
    with CtrlC() as ctrl_c:
        signal.signal(signal.SIGINT, lambda *_: None)  # a finished experiment's handler, left installed by Tune
        ctrl_c.listen()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert ctrl_c.pressed
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_stops_a_sweep_of_thousands_cleanly(tmp_path):
    """Run as Tune experiments of 3 trials each (``TRIALS_PER_TUNER``), so Ctrl-C lands in a later one."""
    n = 5000
    config = tmp_path / "big.yaml"
    config.write_text(yaml.safe_dump({
        "name": "big", "data": {"name": "digits", "n_train": 100, "n_test": 50},
        "poison": {"method": "one_shift", "rate": 0.1}, "model": {"name": "mlp", "params": {"hidden": 8, "depth": 1}},
        "train": {"epochs": 1}, "detectors": ["loss"], "sweep": {"seed": list(range(n))},
        "resources": {"max_concurrent": 1}}))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "RAY_USAGE_STATS_ENABLED": "0",
           "POISONSWEEP_TRIALS_PER_TUNER": "3"}
    driver = subprocess.Popen([sys.executable, "-m", "poisonsweep.engine.cli", "run", str(config), "--out", str(out)], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while len(list((out / "trials").glob("*.parquet")) if (out / "trials").is_dir() else []) < 5:
            assert driver.poll() is None and time.time() < deadline, "no trial started"
            time.sleep(0.5)
        driver.send_signal(signal.SIGINT)
        output = driver.communicate(timeout=120)[0]
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, output[-3000:]  # interrupted: the CLI says how to resume
    recorded = len(pd.read_parquet(out / "trials"))
    assert 5 <= recorded < n
    assert len(list((out / "_tune").iterdir())) >= 2  # it went on from the first experiment to the next
    assert f"{recorded} trials run, 0 already done" in " ".join(output.split()), output[-3000:]
