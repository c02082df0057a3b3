"""Run a sweep's trials with Ray Tune, locally or on a cluster, and record every trial.

Resume is ours, not Tune's: a trial whose ``trials`` row says ``ok`` is skipped, so rerunning
the same command after a crash (even a SIGKILLed driver) finishes the rest without duplicating a
row. Each trial writes one Parquet file per table, named by its ``trial_id`` and renamed into place
(``engine.sink``), so a rerun replaces, never appends. A trial whose worker process dies is retried
by Tune up to ``resources.max_failures`` times; a trial that raises is recorded as ``failed``.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from ray.tune import Callback

from engine.sink import completed_trials, filesystem, remove_temporaries, write_trial

if TYPE_CHECKING:
    from engine.config import Sweep

# engine.config (and through it torch, scikit-learn, every registry) is imported inside the
# functions that need it: a trial process then starts in 1-2 s and imports the science
# inside its first trial, so Tune does not give up on a slow-starting process and hand its trial to
# a busy one (benchmarks/RESULTS.md, section 3)

TUNE_DIR = "_tune"  # Tune's own experiment state, inside the output directory
ARTIFACT_DIR = "_artifacts"  # work shared between trials (e.g. FLIP's experts)


@dataclass
class SweepOutcome:
    total: int
    skipped: int
    ran: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # trial_id -> error
    retried: dict[str, int] = field(default_factory=dict)  # trial_id -> attempts lost to a dead worker
    seconds: float = 0.0


def code_version() -> str:
    """The package version, plus the git commit when run from a checkout."""
    try:
        version = metadata.version("poisonsweep")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def record_trial(config: dict, out: str, *, map_shards=None, version: str = "", artifact_dir: str | None = None,
                 attempt_error: str | None = None, where: dict | None = None) -> dict:
    """Run one trial (unless ``attempt_error`` says it already failed) and write all its rows.

    A trial that raises is recorded with status ``failed`` and its error; nothing is re-raised,
    so the sweep goes on. ``where`` (host, Ray node) defaults to this process's. Returns the
    ``trials`` row.
    """
    from tasks.detect.base import serial_map
    from tasks.trial import run_trial

    started = _now()
    outcome = attempt_error
    if attempt_error is None:
        try:
            outcome = run_trial(config, map_shards=map_shards or serial_map, artifact_dir=artifact_dir)
        except Exception as error:  # recorded, not lost: the summary shows it
            outcome = error
    return write_record(config, out, outcome, started=started, version=version, where=where)


def write_record(config: dict, out: str, outcome, *, started: dt.datetime, version: str = "",
                 where: dict | None = None) -> dict:
    """Write one trial's rows: ``outcome`` is its ``TrialResult``, the exception it raised, or the text
    of an error. Returns the ``trials`` row."""
    from engine.config import config_columns, key_columns, trial_id

    tid = trial_id(config)
    base = {"trial_id": tid, **config_columns(config), **(where if where is not None else this_node()),
            "code_version": version, "started_at": started}
    tables: dict[str, list[dict]] = {}
    if isinstance(outcome, str):
        row = {**base, "status": "failed", "error": outcome}
    elif isinstance(outcome, BaseException):
        trace = "".join(traceback.format_exception(outcome))
        row = {**base, "status": "failed", "error": f"{type(outcome).__name__}: {outcome}\n{trace}"}
    else:
        tables = outcome.tables
        row = {**base, **tables["trials"][0], "status": "ok", "error": None}
    row["finished_at"] = _now()
    row["total_seconds"] = (row["finished_at"] - started).total_seconds()
    keys = {"trial_id": tid, **key_columns(config)}
    rows = {
        "trials": [row],
        "detections": [{**keys, **r} for r in tables.get("detections", [])],
        "unlearning": [{**keys, **r} for r in tables.get("unlearning", [])],
        "scores": [{"trial_id": tid, **r} for r in tables.get("scores", [])],
        "influence": [{"trial_id": tid, **r} for r in tables.get("influence", [])],
    }
    write_trial(out, tid, rows)
    return row


def this_node() -> dict:
    """Where this process runs: host name, and the Ray node's IP and id when inside Ray.

    Two Ray nodes can share a host (and an IP): only ``ray_node_id`` tells them apart.
    """
    where = {"node": socket.gethostname(), "node_ip": None, "ray_node_id": None}
    ray = sys.modules.get("ray")  # never import Ray just to ask: a notebook run has no Ray
    if ray is not None and ray.is_initialized():
        where["node_ip"] = ray.util.get_node_ip_address()
        where["ray_node_id"] = ray.get_runtime_context().get_node_id()
    return where


UNKNOWN_NODE = {"node": None, "node_ip": None, "ray_node_id": None}


def _set_threads(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def tune_trainable(config: dict, *, out: str, version: str, resources: dict) -> dict:
    """The Ray Tune function trainable: run and record one trial, report a small summary."""
    _set_threads(resources["cpu"])
    with shard_pool(resources) as pool:
        row = record_trial(config["trial"], out, map_shards=pool, version=version,
                           artifact_dir=_artifact_dir(out))
    error = (row.get("error") or "").strip().splitlines()
    return {"trial_id": row["trial_id"], "status": row["status"], "clean_test_acc": row.get("clean_test_acc"),
            "error": error[0] if error else ""}


@contextmanager
def shard_pool(resources: dict):
    """The trial's influence actors (``engine.shards.ActorPoolMap``), or None when it has none."""
    pool = None
    if resources["influence_actors"] > 0:
        from engine.shards import ActorPoolMap

        pool = ActorPoolMap(resources["influence_actors"], resources["actor_cpu"], resources["actor_gpu"])
    try:
        yield pool
    finally:
        if pool is not None:
            pool.close()


def _artifact_dir(out: str) -> str | None:
    """Shared trial artifacts (FLIP's experts) live beside the tables; object stores get none (no file locks)."""
    return None if "://" in out else f"{filesystem(out)[1]}/{ARTIFACT_DIR}"


def trial_resources(resources: dict):
    """The trial's bundle, plus one bundle per influence actor so actors never oversubscribe."""
    from ray import tune

    main = {"CPU": resources["cpu"], "GPU": resources["gpu"]}
    if resources["influence_actors"] == 0:
        return tune.PlacementGroupFactory([main])
    from engine.shards import actor_bundles

    bundles = actor_bundles(resources["influence_actors"], resources["actor_cpu"], resources["actor_gpu"])
    return tune.PlacementGroupFactory([main] + bundles)


# set in every trial process, on every node (a driver's own environment reaches only a local Ray)
WORKER_ENV = {
    "RAY_CHDIR_TO_TRIAL_DIR": "0",  # keep relative --data-root paths meaning what they meant to the driver
    "PYTHONUNBUFFERED": "1",
}


def init_ray(address: str | None, verbose: bool) -> None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``, set by ``ray job submit``), else start a private
    local Ray. Never ``ray.init()`` bare: it would join whatever cluster ``ray start`` last ran here."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False, log_to_driver=verbose, configure_logging=True,
             logging_level="INFO" if verbose else "WARNING", runtime_env={"env_vars": dict(WORKER_ENV)})


def check_cluster_resources(resources: dict) -> None:
    """A GPU asked for where the cluster has none (and cannot add any) is an error before any trial starts."""
    available = _most_resources()
    wanted_gpu = resources["gpu"] + resources["influence_actors"] * resources["actor_gpu"]
    if wanted_gpu > 0 and available.get("GPU", 0) == 0:
        raise RuntimeError(
            f"resources ask for GPUs (gpu: {resources['gpu']}, actor_gpu: {resources['actor_gpu']}) but the Ray "
            "cluster has none; set resources.gpu and resources.actor_gpu to 0 (e.g. --set resources.gpu=0) "
            "or connect to a cluster with GPUs (--address)")
    for kind, key, actor_key in (("GPU", "gpu", "actor_gpu"), ("CPU", "cpu", "actor_cpu")):
        wanted = resources[key] + resources["influence_actors"] * resources[actor_key]
        if wanted > available.get(kind, 0):
            raise RuntimeError(f"one trial needs {wanted:g} {kind}s (trial + influence actors) but the largest the "
                               f"Ray cluster can offer is {available.get(kind, 0):g}; lower resources.{key} / "
                               f"resources.{actor_key} / resources.influence_actors")


# where `ray up` leaves the autoscaler's config on the head node (the monitor's --autoscaling-config)
AUTOSCALING_CONFIG = "~/ray_bootstrap_config.yaml"


def _most_resources() -> dict:
    """The cluster's resources now, or what its autoscaler may add if that is more: a cluster whose
    GPU workers are scaled to zero (cluster.yaml) still counts as having GPUs."""
    import ray
    from ray._private.state import state  # what Ray Train asks for the same check

    now = ray.cluster_resources()
    try:
        most = state.get_max_resources_from_cluster_config() or {}  # KubeRay / autoscaler v2
    except Exception:  # no autoscaler state in this cluster
        most = {}
    path = Path(AUTOSCALING_CONFIG).expanduser()
    if not most and path.is_file():  # cluster launcher: the driver runs on the head (ray job submit)
        import yaml

        most = autoscaler_capacity(yaml.safe_load(path.read_text()) or {})
    return {key: max(now.get(key, 0), most.get(key, 0)) for key in set(now) | set(most)}


def autoscaler_capacity(config: dict) -> dict:
    """Resources of a cluster-launcher config at full scale: each worker type's ``resources`` times
    its ``max_workers`` (capped by the cluster's ``max_workers``), plus the head's."""
    node_types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    cap = config.get("max_workers")
    total: dict[str, float] = {}
    for name, node_type in node_types.items():
        count = 1 if name == head else node_type.get("max_workers", 0)
        if cap is not None and name != head:
            count = min(count, cap)
        for key, value in (node_type.get("resources") or {}).items():
            total[key] = total.get(key, 0) + value * count
    return total


class RetryLog(Callback):
    """Counts the attempts of each trial that Tune restarted because its worker process died."""

    def __init__(self):
        self.retried: dict[str, int] = {}

    def on_trial_recover(self, iteration, trials, trial, **info):
        from engine.config import trial_id

        from engine.packs import members

        for config in members(trial.config):
            tid = trial_id(config)
            self.retried[tid] = self.retried.get(tid, 0) + 1


def _short_name(trial) -> str:
    from engine.config import trial_id
    from engine.packs import members

    configs = members(trial.config)
    return f"{trial.trial_id}-{trial_id(configs[0])}" + (f"+{len(configs) - 1}" if len(configs) > 1 else "")


def _trainable_and_space(pending: list[dict], resources: dict):
    """One Tune trial per pending trial, or, with ``resources.pack`` > 1, one per pack of them."""
    from ray import tune

    if resources["pack"] > 1:
        from engine.packs import plan_packs, tune_pack_trainable

        return tune_pack_trainable, {"pack": tune.grid_search(plan_packs(pending, resources["pack"]))}
    return tune_trainable, {"trial": tune.grid_search(pending)}


def run_sweep(sweep: Sweep, *, address: str | None = None, verbose: bool = False, progress=None,
              reuse_actors: bool = True) -> SweepOutcome:
    """Run every trial of ``sweep`` not yet recorded as ``ok`` in ``sweep.out``.

    ``reuse_actors`` keeps each trial process alive for the next trial of the same resources, so
    torch and the datasets are imported once per process rather than once per trial
    (``benchmarks/RESULTS.md, section 3``).
    """
    from ray import tune

    from engine.config import trial_id

    start = time.perf_counter()
    fs, root = filesystem(sweep.out)
    fs.create_dir(root, recursive=True)
    from engine.report import write_plan

    write_plan(sweep)  # <out>/sweep.json: lets `report` say which planned trials are still missing
    remove_temporaries(sweep.out)  # left by writers killed mid-write; no reader ever saw them
    done = completed_trials(sweep.out)
    pending = [t for t in sweep.trials if trial_id(t) not in done]
    outcome = SweepOutcome(total=len(sweep.trials), skipped=len(sweep.trials) - len(pending))
    if not pending:
        return outcome
    init_ray(address, verbose)
    check_cluster_resources(sweep.resources)
    version = code_version()
    out = sweep.out if "://" in sweep.out else root  # workers chdir elsewhere: absolute paths only
    function, param_space = _trainable_and_space(pending, sweep.resources)
    trainable = tune.with_resources(
        tune.with_parameters(function, out=out, version=version, resources=sweep.resources),
        trial_resources(sweep.resources),
    )
    retries = RetryLog()
    callbacks = [retries] + ([progress] if progress is not None else [])
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=sweep.resources["max_concurrent"],
                                    reuse_actors=reuse_actors,
                                    trial_name_creator=_short_name, trial_dirname_creator=_short_name),
        run_config=tune.RunConfig(
            name=f"{sweep.name}-{dt.datetime.now():%Y%m%d-%H%M%S}", storage_path=f"{out}/{TUNE_DIR}",
            failure_config=tune.FailureConfig(max_failures=sweep.resources["max_failures"]),
            verbose=2 if verbose else 0, callbacks=callbacks,
            progress_reporter=None,
        ),
    )
    results = tuner.fit()
    from engine.packs import members

    for result in results:
        if result.error is not None:
            # its worker died more often than max_failures allows, so it never wrote its rows: record them now
            error = f"{type(result.error).__name__}: {result.error}"
            for config in members(result.config):
                record_trial(config, out, version=version, attempt_error=error, where=UNKNOWN_NODE)
                outcome.failed[trial_id(config)] = error.strip().splitlines()[0]
        elif (result.metrics or {}).get("status") == "failed":
            outcome.failed[trial_id(result.config["trial"])] = result.metrics.get("error") or "see the trials table"
        else:
            outcome.failed.update((result.metrics or {}).get("failures") or {})  # a pack's failed members
    outcome.retried = dict(retries.retried)
    outcome.ran = len(pending)
    outcome.seconds = time.perf_counter() - start
    return outcome
