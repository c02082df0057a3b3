"""Run a sweep's trials with Ray Tune, locally or on a cluster, and record every trial.

Resume is ours, not Tune's: a trial whose ``trials`` row says ``ok`` is skipped, so rerunning
the same command after a crash finishes the rest without duplicating a row.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from engine.config import Sweep, config_columns, key_columns, trial_id
from engine.sink import completed_trials, filesystem, write_trial

TUNE_DIR = "_tune"  # Tune's own experiment state, inside the output directory
ARTIFACT_DIR = "_artifacts"  # work shared between trials (e.g. FLIP's experts)


@dataclass
class SweepOutcome:
    total: int
    skipped: int
    ran: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # trial_id -> error
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
                 attempt_error: str | None = None) -> dict:
    """Run one trial (unless ``attempt_error`` says it already failed) and write all its rows.

    A trial that raises is recorded with status ``failed`` and its error; nothing is re-raised,
    so the sweep goes on. Returns the ``trials`` row.
    """
    from tasks.detect.base import serial_map
    from tasks.trial import run_trial

    tid = trial_id(config)
    started = _now()
    base = {"trial_id": tid, **config_columns(config), "node": socket.gethostname(), "node_ip": _node_ip(),
            "code_version": version, "started_at": started}
    tables: dict[str, list[dict]] = {}
    if attempt_error is None:
        try:
            result = run_trial(config, map_shards=map_shards or serial_map, artifact_dir=artifact_dir)
            tables = result.tables
            row = {**base, **tables["trials"][0], "status": "ok", "error": None}
        except Exception as error:  # recorded, not lost: the summary shows it
            row = {**base, "status": "failed", "error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"}
            tables = {}
    else:
        row = {**base, "status": "failed", "error": attempt_error}
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


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else ""
    except Exception:
        return ""


def _set_threads(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def tune_trainable(config: dict, *, out: str, version: str, resources: dict) -> dict:
    """The Ray Tune function trainable: run and record one trial, report a small summary."""
    _set_threads(resources["cpu"])
    pool = None
    if resources["influence_actors"] > 0:
        from engine.shards import ActorPoolMap

        pool = ActorPoolMap(resources["influence_actors"], resources["actor_cpu"], resources["actor_gpu"])
    try:
        row = record_trial(config["trial"], out, map_shards=pool, version=version,
                           artifact_dir=_artifact_dir(out))
    finally:
        if pool is not None:
            pool.close()
    return {"trial_id": row["trial_id"], "status": row["status"], "clean_test_acc": row.get("clean_test_acc")}


def _artifact_dir(out: str) -> str | None:
    fs, root = filesystem(out)
    return None if "://" in out else f"{root}/{ARTIFACT_DIR}"


def trial_resources(resources: dict):
    """The trial's bundle, plus one bundle per influence actor so actors never oversubscribe."""
    from ray import tune

    main = {"CPU": resources["cpu"], "GPU": resources["gpu"]}
    if resources["influence_actors"] == 0:
        return tune.PlacementGroupFactory([main])
    from engine.shards import actor_bundles

    bundles = actor_bundles(resources["influence_actors"], resources["actor_cpu"], resources["actor_gpu"])
    return tune.PlacementGroupFactory([main] + bundles)


def init_ray(address: str | None, verbose: bool) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    kwargs = dict(include_dashboard=False, log_to_driver=verbose, configure_logging=True,
                  logging_level="INFO" if verbose else "WARNING")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(**kwargs)


def check_cluster_resources(resources: dict) -> None:
    """A GPU asked for where the cluster has none is an error before any trial starts."""
    import ray

    available = ray.cluster_resources()
    wanted_gpu = resources["gpu"] + resources["influence_actors"] * resources["actor_gpu"]
    if wanted_gpu > 0 and available.get("GPU", 0) == 0:
        raise RuntimeError(
            f"resources ask for GPUs (gpu: {resources['gpu']}, actor_gpu: {resources['actor_gpu']}) but the Ray "
            "cluster has none; set resources.gpu and resources.actor_gpu to 0 (e.g. --set resources.gpu=0) "
            "or connect to a cluster with GPUs (--address)")
    wanted_cpu = resources["cpu"] + resources["influence_actors"] * resources["actor_cpu"]
    if wanted_cpu > available.get("CPU", 0):
        raise RuntimeError(f"one trial needs {wanted_cpu} CPUs (trial + influence actors) but the Ray cluster "
                           f"has {available.get('CPU', 0)}; lower resources.cpu / influence_actors")


def _short_name(trial) -> str:
    return f"{trial.trial_id}-{trial_id(trial.config['trial'])}"


def run_sweep(sweep: Sweep, *, address: str | None = None, verbose: bool = False, progress=None) -> SweepOutcome:
    """Run every trial of ``sweep`` not yet recorded as ``ok`` in ``sweep.out``."""
    from ray import tune

    start = time.perf_counter()
    fs, root = filesystem(sweep.out)
    fs.create_dir(root, recursive=True)
    done = completed_trials(sweep.out)
    pending = [t for t in sweep.trials if trial_id(t) not in done]
    outcome = SweepOutcome(total=len(sweep.trials), skipped=len(sweep.trials) - len(pending))
    if not pending:
        return outcome
    init_ray(address, verbose)
    check_cluster_resources(sweep.resources)
    version = code_version()
    out = sweep.out if "://" in sweep.out else root  # workers chdir elsewhere: absolute paths only
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, out=out, version=version, resources=sweep.resources),
        trial_resources(sweep.resources),
    )
    callbacks = [progress] if progress is not None else []
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(pending)},
        tune_config=tune.TuneConfig(max_concurrent_trials=sweep.resources["max_concurrent"],
                                    trial_name_creator=_short_name, trial_dirname_creator=_short_name),
        run_config=tune.RunConfig(
            name=f"{sweep.name}-{dt.datetime.now():%Y%m%d-%H%M%S}", storage_path=f"{out}/{TUNE_DIR}",
            failure_config=tune.FailureConfig(max_failures=sweep.resources["max_failures"]),
            verbose=2 if verbose else 0, callbacks=callbacks,
            progress_reporter=None,
        ),
    )
    results = tuner.fit()
    # a trial whose worker died more often than max_failures never wrote its row: record it now
    for result in results:
        config = result.config["trial"]
        tid = trial_id(config)
        if result.error is not None:
            error = f"{type(result.error).__name__}: {result.error}"
            record_trial(config, out, version=version, attempt_error=error)
            outcome.failed[tid] = error
        elif (result.metrics or {}).get("status") == "failed":
            outcome.failed[tid] = "see the trials table"
    outcome.ran = len(pending)
    outcome.seconds = time.perf_counter() - start
    return outcome
