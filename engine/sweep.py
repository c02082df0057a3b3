"""Run a sweep's trials with Ray Tune, locally or on a cluster, and record every trial.

Resume is ours, not Tune's: a trial whose ``trials`` row says ``ok`` is skipped, so rerunning
the same command after a crash (even a SIGKILLed driver) finishes the rest without duplicating a
row. Each trial writes one Parquet file per table, named by its ``trial_id`` and renamed into place
(``engine.sink``), so a rerun replaces, never appends. A trial whose worker process dies is retried
by Tune up to ``resources.max_failures`` times; a trial that raises is recorded as ``failed``.

Tune gets the plan one trial at a time (:class:`PlanSearcher`), in experiments of at most
``TRIALS_PER_TUNER`` trials, so neither the time to the first trial nor the driver's memory grows
with the size of the sweep (``benchmarks/RESULTS.md``, section 8).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ray.tune import Callback
from ray.tune.search import Searcher

from engine import artifacts
from engine.artifacts import ARTIFACT_DIR  # work shared between trials (e.g. FLIP's experts)
from engine.resume import code_version, trials_to_run
from engine.sink import filesystem, remove_temporaries, write_trial

if TYPE_CHECKING:
    from engine.config import Sweep

# engine.config (and through it torch, scikit-learn, every registry) is imported inside the
# functions that need it: a trial process then starts in 1-2 s and imports the science
# inside its first trial, so Tune does not give up on a slow-starting process and hand its trial to
# a busy one (benchmarks/RESULTS.md, section 3)

TUNE_DIR = "_tune"  # Tune's own experiment state, inside the output directory


@dataclass
class SweepOutcome:
    total: int
    skipped: int
    ran: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # trial_id -> error
    retried: dict[str, int] = field(default_factory=dict)  # trial_id -> attempts lost to a dead worker
    seconds: float = 0.0
    interrupted: int = 0  # trials left unfinished by Ctrl-C
    out: str = ""  # where the record is


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


class PlanSearcher(Searcher):
    """Hands Tune the sweep's trials one unit at a time, as ``{"index": i, "trial_id": ..., "trial_ids": [...]}``.

    Tune then holds a few bytes per trial and creates each trial only when it can start it, so a
    sweep of any size starts at once; a ``tune.grid_search`` over full configs makes Tune expand
    (and deep-copy) the whole grid first, which grows with the square of its size. The configs
    stay in the plan, which each trial process fetches once (:func:`_plan_of`).
    """

    def __init__(self, unit_ids: list[list[str]], first_index: int = 0):
        super().__init__()
        self._unit_ids = unit_ids  # the trial ids of each unit: one trial, or a pack (resources.pack)
        self._first = first_index  # the plan's index of unit_ids[0]
        self._next = 0

    def suggest(self, trial_id: str) -> dict | None:
        if self._next >= len(self._unit_ids):
            return Searcher.FINISHED
        index, self._next = self._next, self._next + 1
        ids = self._unit_ids[index]
        return {"index": self._first + index, "trial_id": ids[0], "trial_ids": ids}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # nothing to learn: the plan is fixed


_PLANS: dict[str, list[dict]] = {}  # per trial process: plan object id -> the configs, fetched once


def _plan_of(holder: list) -> list[dict]:
    """The plan's configs (``holder`` wraps its Ray object ref, so Tune does not fetch it per trial)."""
    import ray

    key = holder[0].hex()
    if key not in _PLANS:
        _PLANS.clear()  # a reused process may move on to another sweep's plan
        _PLANS[key] = ray.get(holder[0])
    return _PLANS[key]


def tune_trainable(config: dict, *, plan: list, out: str, version: str, resources: dict) -> dict:
    """The Ray Tune function trainable: run and record the plan's unit ``config["index"]`` (one trial,
    or a pack of them with ``resources.pack`` > 1), report a small summary."""
    _set_threads(resources["cpu"])
    unit = _plan_of(plan)[config["index"]]
    with shard_pool(resources) as pool, trial_artifacts(out, unit) as artifact_dir:
        if resources["pack"] > 1:
            from engine.packs import record_pack

            rows = record_pack(unit, out, map_shards=pool, version=version, artifact_dir=artifact_dir)
        else:
            rows = [record_trial(unit[0], out, map_shards=pool, version=version, artifact_dir=artifact_dir)]
    failures = {row["trial_id"]: ((row.get("error") or "").strip().splitlines() or ["see the trials table"])[0]
                for row in rows if row["status"] != "ok"}
    return {"trial_id": rows[0]["trial_id"], "members": len(rows), "failures": failures}


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


@contextmanager
def trial_artifacts(out: str, configs: list[dict]):
    """The directory for work shared between trials (FLIP's experts): under a local ``out``, or a
    node-local mirror of ``<out>/_artifacts`` on an object store, uploaded again afterwards."""
    artifact_dir, mirrored = _artifact_dir(out), None
    if artifact_dir is None and any(artifacts.uses_artifacts(c) for c in configs):
        local, mirrored = artifacts.download(out)
        artifact_dir = str(local)
    yield artifact_dir
    if mirrored is not None:
        artifacts.upload(out, Path(artifact_dir), mirrored)


def _artifact_dir(out: str) -> str | None:
    """Shared trial artifacts (FLIP's experts) live beside the tables; an object store's are mirrored
    through a node-local cache instead (``engine.artifacts``): None here."""
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
    # a private local Ray advertises the loopback address; Ray 2.60's core servers still listen on every
    # interface, and its token authentication (on by default for a new local Ray) guards them
    # (README, "Running on a cluster", Security)
    local = {"_node_ip_address": "127.0.0.1"} if address == "local" else {}
    ray.init(address=address, include_dashboard=False, log_to_driver=verbose, configure_logging=True,
             logging_level="INFO" if verbose else "WARNING", runtime_env={"env_vars": dict(WORKER_ENV)}, **local)


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


class TrialLog(Callback):
    """What the driver keeps per trial, and only when it is news: the attempts Tune restarted
    because a worker process died, and the first line of each recorded failure (the trainable
    reports it; Tune's own per-trial result files are switched off, see ``TUNE_ENV``)."""

    def __init__(self):
        self.retried: dict[str, int] = {}
        self.failed: dict[str, str] = {}

    def on_trial_recover(self, iteration, trials, trial, **info):
        for tid in trial.config["trial_ids"]:  # one, or every member of a pack
            self.retried[tid] = self.retried.get(tid, 0) + 1

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.failed.update(result.get("failures") or {})


def _short_name(trial) -> str:
    ids = trial.config["trial_ids"]
    return f"{trial.trial_id}-{ids[0]}" + (f"+{len(ids) - 1}" if len(ids) > 1 else "")


# Tune keeps every trial of an experiment in the driver (tens of kB each, measured in
# benchmarks/RESULTS.md, section 8), so a big sweep runs as consecutive Tune experiments of this
# many trials: the driver's memory stays bounded, at the cost of restarting the trial processes
# once per experiment (seconds, against minutes of trials)
TRIALS_PER_TUNER = int(os.environ.get("POISONSWEEP_TRIALS_PER_TUNER", 2000))

# Tune's per-trial CSV, JSON and TensorBoard logs: the Parquet record holds every result, and
# 10,000 trials would write 30,000 more files
TUNE_ENV = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


def _without_missing_metrics_warning(record: logging.LogRecord) -> bool:
    """Drop Tune's end-of-run warning that each trial lacks the result files ``TUNE_ENV`` switched
    off (one line per trial: 10,000 lines for a big sweep); other warnings pass."""
    return not record.getMessage().startswith("Failed to fetch metrics for")


def _recorded_since(out: str, began: dt.datetime, trial_ids: set[str]) -> int:
    """How many of ``trial_ids`` have a trials row started at or after ``began``: what the record holds,
    not what Tune counted (a trial stopped by Ctrl-C may have written its rows)."""
    import pyarrow.compute as pc

    from engine.record import read_table

    rows = read_table(out, "trials", ["trial_id", "started_at"])
    recent = rows.filter(pc.greater_equal(rows["started_at"], began))["trial_id"].to_pylist()
    return len(trial_ids.intersection(recent))


class CtrlC:
    """Ctrl-C between two Tune experiments stops the sweep there.

    During ``fit`` Tune's own handler takes SIGINT (it stops the experiment cleanly, then hands
    SIGINT back to the handler it found: this one). Tune does not put the old handler back when an
    experiment ends normally, so a Ctrl-C between experiments would reach a finished experiment's
    handler and be lost; ``listen`` reinstalls this one after each experiment.
    """

    def __init__(self):
        self.pressed = False
        self._previous = None

    def _press(self, signum, frame):
        if self.pressed:  # pressed again: stop now, as Python would
            signal.default_int_handler(signum, frame)
        self.pressed = True

    def listen(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            signal.signal(signal.SIGINT, self._press)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
        self.listen()
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _fit(tuner):
    analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    analysis_log.addFilter(_without_missing_metrics_warning)
    restore_hint = _HideRestoreHint()  # Tune's "Tuner.restore(...)" is not how a sweep resumes
    logging.getLogger("ray.tune.tune").addFilter(restore_hint)
    try:
        return tuner.fit()
    finally:
        analysis_log.removeFilter(_without_missing_metrics_warning)
        logging.getLogger("ray.tune.tune").removeFilter(restore_hint)


class _HideRestoreHint(logging.Filter):
    """Tune ends a Ctrl-C with "Resume experiment with: Tuner.restore(...)"; we resume by rerunning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore" not in record.getMessage()


def plan_units(pending: list[dict], pack: int) -> list[list[dict]]:
    """What each Tune trial runs: one pending trial, or with ``pack`` > 1 a pack of pending trials that
    share data, model and training schedule (``engine.packs.plan_packs``)."""
    if pack > 1:
        from engine.packs import plan_packs

        return plan_packs(pending, pack)
    return [[config] for config in pending]


def run_sweep(sweep: Sweep, *, address: str | None = None, verbose: bool = False, progress=None,
              reuse_actors: bool = True, rerun: str = "failed") -> SweepOutcome:
    """Run every trial of ``sweep`` not yet done in ``sweep.out`` (``engine.record.trials_to_run``:
    ``rerun`` is ``failed``, ``stale`` or ``all``).

    ``reuse_actors`` keeps each trial process alive for the next trial of the same resources, so
    torch and the datasets are imported once per process rather than once per trial
    (``benchmarks/RESULTS.md, section 3``).
    """
    import ray
    from ray import tune

    from engine.config import trial_id

    start, began = time.perf_counter(), _now()
    fs, root = filesystem(sweep.out)
    fs.create_dir(root, recursive=True)
    from engine.sink import write_plan

    write_plan(sweep)  # <out>/sweep.json: lets `report` say which planned trials are still missing
    remove_temporaries(sweep.out)  # left by writers killed mid-write; no reader ever saw them
    version = code_version()
    ids = [trial_id(t) for t in sweep.trials]
    wanted = set(trials_to_run(sweep.out, ids, rerun, version))
    pending = [t for t, tid in zip(sweep.trials, ids) if tid in wanted]
    pending_ids = [tid for tid in ids if tid in wanted]
    outcome = SweepOutcome(total=len(sweep.trials), skipped=len(sweep.trials) - len(pending))
    if not pending:
        return outcome
    init_ray(address, verbose)
    check_cluster_resources(sweep.resources)
    for key, value in TUNE_ENV.items():
        os.environ.setdefault(key, value)
    out = sweep.out if "://" in sweep.out else root  # workers chdir elsewhere: absolute paths only
    units = plan_units(pending, sweep.resources["pack"])
    unit_ids = [[trial_id(c) for c in unit] for unit in units]
    plan = [ray.put(units)]  # in the object store once; a list, so with_parameters ships the ref, not the plan
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, plan=plan, out=out, version=version, resources=sweep.resources),
        trial_resources(sweep.resources),
    )
    log = TrialLog()
    callbacks = [log] + ([progress] if progress is not None else [])
    name = f"{sweep.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"

    def tuner(first: int, chunk: list[list[str]]):
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=PlanSearcher(chunk, first), num_samples=len(chunk),
                                        max_concurrent_trials=sweep.resources["max_concurrent"],
                                        reuse_actors=reuse_actors,
                                        trial_name_creator=_short_name, trial_dirname_creator=_short_name),
            run_config=tune.RunConfig(
                name=name if first == 0 else f"{name}-{first}", storage_path=f"{out}/{TUNE_DIR}",
                failure_config=tune.FailureConfig(max_failures=sweep.resources["max_failures"]),
                verbose=2 if verbose else 0, callbacks=callbacks,
                progress_reporter=None,
            ),
        )

    with CtrlC() as ctrl_c:
        for first in range(0, len(unit_ids), TRIALS_PER_TUNER):
            if ctrl_c.pressed:
                break
            chunk = unit_ids[first:first + TRIALS_PER_TUNER]
            results = _fit(tuner(first, chunk))  # a finished chunk's trials then leave the driver's memory
            ctrl_c.listen()  # Tune leaves its finished experiment's handler installed
            for result in results:
                if result.error is not None:
                    # its worker died more often than max_failures allows, so it never wrote its row: record it now
                    error = f"{type(result.error).__name__}: {result.error}"
                    for config in units[result.config["index"]]:
                        record_trial(config, out, version=version, attempt_error=error, where=UNKNOWN_NODE)
                        log.failed[trial_id(config)] = error.strip().splitlines()[0]
            if results.num_terminated + results.num_errors < len(chunk):  # Ctrl-C: Tune stopped early
                break
    outcome.failed = dict(log.failed)
    outcome.retried = dict(log.retried)
    outcome.ran = _recorded_since(sweep.out, began, set(pending_ids))
    outcome.interrupted = len(pending_ids) - outcome.ran
    outcome.seconds = time.perf_counter() - start
    return outcome
