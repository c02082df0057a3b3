"""The typed public API (issue 27, point 4): ``run(on_progress=f)`` calls a plain ``f(done, total, running)``
through the engine's own Tune callback (the counter the CLI's bar is built on), and the package ships its
``py.typed`` marker so that type checkers read the annotations."""

from __future__ import annotations
import pytest

import io
import tomllib
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

import poisonsweep
from poisonsweep.engine.api import progress_counter
from poisonsweep.engine.progress import SweepProgress, TrialCounter

ROOT = Path(__file__).resolve().parents[1]
TINY = {"name": "progress", "data": {"name": "digits", "n_train": 200, "n_test": 100},
        "poison": {"method": "one_shift", "rate": 0.1}, "model": {"name": "mlp", "params": {"hidden": 16, "depth": 1}},
        "train": {"epochs": 1}, "detectors": ["loss"], "sweep": {"seed": [0, 1]}}


def _trial(tune_id: str, *members: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tune_id, config={"trial_id": members[0], "trial_ids": list(members)})


def test_the_counter_tells_done_total_and_running_and_counts_a_pack_s_members():
    calls: list[tuple[int, int, int]] = []
    counter = progress_counter(lambda done, total, running: calls.append((done, total, running)))
    counter.begin(4)
    solo, pack, lost = _trial("t1", "a"), _trial("t2", "b", "c"), _trial("t3", "d")
    counter.on_trial_start(0, [], solo)
    counter.on_trial_start(0, [], pack)
    counter.on_trial_result(0, [], pack, {"members": 2, "failures": {"c": "ValueError"}})
    counter.on_trial_complete(0, [], pack)
    counter.on_trial_complete(0, [], solo)
    counter.on_trial_start(0, [], lost)
    counter.on_trial_error(0, [], lost)
    assert calls == [(0, 4, 0), (0, 4, 1), (0, 4, 2), (2, 4, 1), (3, 4, 0), (3, 4, 1), (4, 4, 0)]
    assert counter.failed == 2


def test_the_cli_bar_is_a_counter_handed_over_as_it_is_and_counts_from_begin():
    bar = SweepProgress(console=Console(file=io.StringIO()))
    assert isinstance(bar, TrialCounter) and progress_counter(bar) is bar
    assert type(progress_counter(None)) is TrialCounter  # no callable: the run is counted, nobody told
    bar.begin(3)
    bar.on_trial_start(0, [], _trial("t1", "a"))
    bar.on_trial_complete(0, [], _trial("t1", "a"))
    task = bar.bar.tasks[0]
    assert (task.total, task.completed, task.fields["running"]) == (3, 1, 0)


def test_a_pickled_counter_leaves_the_caller_s_function_behind():
    import pickle

    calls = []
    counter = TrialCounter(2, on_progress=lambda *counts: calls.append(counts))  # a lambda does not pickle
    copy = pickle.loads(pickle.dumps(counter))
    copy.on_trial_start(0, [], _trial("t1", "a"))
    assert copy.running == {"t1": "a"} and calls == []


@pytest.mark.slow  # starts Ray or a subprocess
def test_run_calls_on_progress_up_to_every_trial_done(tmp_path):
    calls: list[tuple[int, int, int]] = []
    try:
        outcome = poisonsweep.run(TINY, out=str(tmp_path / "out"), echo=lambda _: None,
                                  on_progress=lambda done, total, running: calls.append((done, total, running)))
    finally:
        import ray

        ray.shutdown()  # run() started Ray in this process; later tests start their own
    assert outcome.ran == 2 and calls[0] == (0, 2, 0)
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and done[-1] == 2 and {total for _, total, _ in calls} == {2}
    assert all(0 <= running <= 2 for _, _, running in calls) and any(running for _, _, running in calls)


def test_the_package_ships_its_py_typed_marker():
    assert (ROOT / "py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["poisonsweep"]
