"""The Ray actor pool behind ``map_shards``: same results as the plain map, in order, surviving dead actors."""

from __future__ import annotations

import os
import pathlib
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import pytest
import ray
import torch
from ray import cloudpickle

import poisonsweep.tasks.detect.influence as influence_detector
from poisonsweep.engine.shards import ActorPoolMap, actor_bundles
from poisonsweep.tasks.data import load_dataset
from poisonsweep.tasks.detect.base import DetectionContext, serial_map
from poisonsweep.tasks.models import build_model
from poisonsweep.tasks.train import TrainConfig, train_model

pytestmark = pytest.mark.slow  # every test starts Ray, a subprocess or a server

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-5

# the helper fns below travel by value, so workers need not import this test module
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def ray_local():
    started = not ray.is_initialized()
    if started:
        # the caller's PYTHONPATH first, as tests/test_s3.py does: a checkout imported through it is the one tested
        path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 object_store_memory=150 * 1024 ** 2, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    if started:
        ray.shutdown()


def slow_square(shared, shard):
    """Later shards finish first, so collecting in finishing order would scramble the result."""
    time.sleep(shared["delay"] * (shared["n"] - shard))
    return shard * shard + shared["offset"], os.getpid()


def exit_once(shared, shard):
    """The process dies (os._exit) the first time shard 3 is run."""
    marker = pathlib.Path(shared["marker"])
    if shard == 3 and not marker.exists():
        marker.touch()
        os._exit(1)
    time.sleep(0.05)
    return shard * 10


def kill_own_actor_once(shared, shard):
    """``ray.kill`` of the running actor while other shards are still pending."""
    marker = pathlib.Path(shared["marker"])
    if shard == 5 and not marker.exists():
        marker.touch()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        time.sleep(30)  # the kill lands long before this ends
    time.sleep(0.05)
    return shard * 10


def fail_on_two(shared, shard):
    if shard == 2:
        raise ValueError("shard 2 is bad")
    return shard


def placement_group_of_shard(shared, shard):
    return ray.get_runtime_context().get_placement_group_id()


def test_actor_bundles_match_the_actor_requests():
    assert actor_bundles(2, 1, 0) == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert actor_bundles(1, 0.5, 0.25) == [{"CPU": 0.5, "GPU": 0.25}]
    assert actor_bundles(0, 1, 1) == []


@pytest.fixture(scope="module")
def pool(ray_local):
    """One 2-actor pool shared by the tests below (starting actors is the slow part).

    Half a CPU each, so that the Tune trial below still finds room beside them.
    """
    with ActorPoolMap(2, cpu_per_actor=0.5) as shared_pool:
        yield shared_pool
    assert shared_pool.actors == []


def test_pool_equals_serial_map_in_shard_order(pool):
    shared = {"delay": 0.02, "n": 8, "offset": 7}
    results = pool(slow_square, shared, list(range(8)))
    assert [r[0] for r in results] == [r[0] for r in serial_map(slow_square, {**shared, "delay": 0}, range(8))]
    assert len({pid for _, pid in results}) == 2  # both actors worked
    assert pool(slow_square, shared, []) == []


def test_actor_that_exits_is_replaced_and_its_shard_recomputed(pool, tmp_path):
    before = pool.replacements
    results = pool(exit_once, {"marker": str(tmp_path / "exited")}, list(range(10)))
    assert (tmp_path / "exited").exists() and pool.replacements == before + 1
    assert results == [s * 10 for s in range(10)]


def test_killed_actor_is_replaced_and_its_shard_recomputed(pool, tmp_path):
    before = pool.replacements
    results = pool(kill_own_actor_once, {"marker": str(tmp_path / "killed")}, list(range(12)))
    assert (tmp_path / "killed").exists() and pool.replacements == before + 1
    assert results == [s * 10 for s in range(12)]


def test_an_error_in_fn_reaches_the_caller_and_the_pool_goes_on(pool):
    with pytest.raises(ValueError, match="shard 2 is bad"):
        pool(fail_on_two, None, [0, 1, 2, 3])
    assert pool(fail_on_two, None, [0, 1, 3]) == [0, 1, 3]


def test_pool_inside_a_tune_trial_uses_the_trial_placement_group(ray_local, tmp_path):
    from ray import tune

    def trainable(config):
        with ActorPoolMap(2, cpu_per_actor=0.25) as trial_pool:
            groups = trial_pool(placement_group_of_shard, None, list(range(4)))
        own = ray.get_runtime_context().get_placement_group_id()
        return {"inside": float(all(g == own for g in groups)), "n": len(groups)}

    resources = tune.PlacementGroupFactory([{"CPU": 0.5}] + actor_bundles(2, 0.25, 0))
    tuner = tune.Tuner(tune.with_resources(trainable, resources),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0))
    result = tuner.fit()[0]
    assert result.error is None
    assert result.metrics["inside"] == 1.0 and result.metrics["n"] == 4


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matches the 1-CPU actors, and is faster than 2 threads on a busy machine
    data = load_dataset("digits", n_train=400, n_test=60, seed=0)
    model = build_model("mlp", data.in_shape, 10, {"hidden": 16, "depth": 1}, seed=0)
    train_model(model, data.x_train, data.y_train, TrainConfig(epochs=15, batch_size=64, lr=1e-2), seed=0)
    yield data, model
    torch.set_num_threads(threads)


def _context(trained, map_shards) -> DetectionContext:
    data, model = trained
    return DetectionContext(model=model, x_train=data.x_train, labels=data.y_train.numpy(), num_classes=10,
                            x_test=data.x_test, y_test=data.y_test.numpy(), map_shards=map_shards)


def test_influence_scores_from_two_actors_equal_the_single_process_scores(pool, trained, monkeypatch):
    monkeypatch.setattr(influence_detector, "SHARD_SIZE", 64)  # 7 shards over 400 samples
    for params in INFLUENCE_CASES:
        serial = influence_detector.detect(_context(trained, serial_map), seed=0, **params)
        sharded = influence_detector.detect(_context(trained, pool), seed=0, **params)
        _assert_same_detection(sharded, serial)


INFLUENCE_CASES = [
    {"solver": "exact", "parameters": "last_layer", "test_points": 3, "top_k": 5},
    {"solver": "arnoldi", "parameters": "all", "damping": 0.1, "arnoldi_iters": 30, "arnoldi_rank": 20,
     "test_points": [0, 5]},
]


def _assert_same_detection(sharded, serial):
    assert np.max(np.abs(sharded.scores - serial.scores) / np.abs(serial.scores)) <= RTOL
    assert np.array_equal(sharded.flagged, serial.flagged)
    assert [(r["test_index"], r["train_index"], r["kind"], r["rank"]) for r in sharded.extras["influence"]] == \
        [(r["test_index"], r["train_index"], r["kind"], r["rank"]) for r in serial.extras["influence"]]
    for a, b in zip(sharded.extras["influence"], serial.extras["influence"]):
        assert a["influence"] == pytest.approx(b["influence"], rel=RTOL)
