"""What runs inside one Tune trial's process: run a trial (or a pack), write its rows, report back.

A trial that raises is recorded with status ``failed`` and its error, never re-raised, so the sweep
goes on. The plan's configs are fetched once per process from Ray's object store (:func:`_plan_of`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from poisonsweep.engine import artifacts
from poisonsweep.engine.artifacts import ARTIFACT_DIR  # work shared between trials (e.g. FLIP's experts)
from poisonsweep.engine.packs import record_pack
from poisonsweep.engine.record.row import now
from poisonsweep.engine.record.write import write_record
from poisonsweep.engine.storage import OutputError, filesystem

# engine.config (and through it torch, scikit-learn, every registry) is imported inside the
# functions that need it: a trial process then starts in 1-2 s and imports the science
# inside its first trial, so Tune does not give up on a slow-starting process and hand its trial to
# a busy one (benchmarks/RESULTS.md, section 3)


def record_trial(config: dict, out: str, *, map_shards=None, version: str = "", artifact_dir: str | None = None,
                 attempt_error: str | None = None, where: dict | None = None, on_stage=None,
                 plugins: list[dict] = ()) -> dict:
    """Run one trial (unless ``attempt_error`` says it already failed) and write all its rows.

    A trial that raises is recorded with status ``failed`` and its error; nothing is re-raised,
    so the sweep goes on. ``where`` (host, Ray node) defaults to this process's. Returns the
    ``trials`` row. ``on_stage`` (optional) hears the trial's stages (``run_resolved_trial``); ``plugins`` (their
    ``Plugin.record`` dicts) are the sweep's, recorded in the row.
    """
    from poisonsweep.tasks.detect.base import serial_map
    from poisonsweep.tasks.trial import run_resolved_trial

    started = now()
    outcome = attempt_error
    if attempt_error is None:
        stages = {"on_stage": on_stage} if on_stage is not None else {}
        try:
            outcome = run_resolved_trial(config, map_shards=map_shards or serial_map, artifact_dir=artifact_dir, **stages)
        except Exception as error:  # recorded, not lost: the summary shows it
            outcome = error
    return write_record(config, out, outcome, started=started, version=version, where=where, plugins=plugins)


def _set_threads(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))


_PLANS: dict[str, list[dict]] = {}  # per trial process: plan object id -> the configs, fetched once


def _plan_of(holder: list) -> list[dict]:
    """The plan's configs (``holder`` wraps its Ray object ref, so Tune does not fetch it per trial)."""
    import ray

    key = holder[0].hex()
    if key not in _PLANS:
        _PLANS.clear()  # a reused process may move on to another sweep's plan
        _PLANS[key] = ray.get(holder[0])
    return _PLANS[key]


def tune_trainable(config: dict, *, plan: list, out: str, version: str, resources: dict,
                   stages: list | None = None, plugins: list[dict] = ()) -> dict:
    """The Ray Tune function trainable: import the sweep's ``plugins``, then run and record the plan's unit
    ``config["index"]`` (one trial, or a pack of them with ``resources.pack`` > 1), report a small summary.
    ``stages`` wraps the driver's stage board (``poisonsweep.engine.progress.StageBoard``) when a live display
    watches. A plugin that cannot be imported here, or whose source is not the driver's, fails the unit's trials."""
    from poisonsweep.engine.plugins import PluginError, import_in_worker

    _set_threads(resources["cpu"])
    unit = _plan_of(plan)[config["index"]]
    try:
        import_in_worker(plugins)
    except PluginError as error:
        missing = str(error)
    else:
        missing = None
    try:
        if missing is not None:
            rows = [record_trial(c, out, version=version, attempt_error=missing, plugins=plugins) for c in unit]
        else:
            with shard_pool(resources) as pool, trial_artifacts(out, unit) as artifact_dir, \
                    stage_sender(stages, config.get("trial_id", ""), unit) as on_stage:
                if resources["pack"] > 1:
                    if on_stage is not None:
                        on_stage(f"pack of {len(unit)} trials")
                    rows = record_pack(unit, out, map_shards=pool, version=version, artifact_dir=artifact_dir,
                                       plugins=plugins)
                else:
                    rows = [record_trial(unit[0], out, map_shards=pool, version=version, artifact_dir=artifact_dir,
                                         on_stage=on_stage, plugins=plugins)]
    except OutputError as error:  # the output cannot be written: no retry helps, the next run does
        from poisonsweep.engine.config import trial_id

        ids = [trial_id(c) for c in unit]
        return {"trial_id": ids[0], "members": len(ids), "failures": {}, "unwritten": dict.fromkeys(ids, str(error))}
    failures = {row["trial_id"]: ((row.get("error") or "").strip().splitlines() or ["see the trials table"])[0]
                for row in rows if row["status"] != "ok"}
    return {"trial_id": rows[0]["trial_id"], "members": len(rows), "failures": failures}


def _stage_label(unit: list[dict]) -> str:
    """What the display calls a running trial: its poison, rate and seed (a pack: its first member's)."""
    first = unit[0]
    return f"{first['poison']['method']} {first['poison']['rate']:g} seed {first['seed']}"


@contextmanager
def stage_sender(stages: list | None, key: str, unit: list[dict]):
    """An ``on_stage`` that posts each stage, after the unit's ``_stage_label``, to the driver's board (a
    fire-and-forget actor call, no wait), cleared when the trial ends; None when no display watches (then a
    trial costs nothing more)."""
    board = stages[0] if stages else None
    if board is None:
        yield None
        return
    prefix = f"{_stage_label(unit)}: "
    try:
        yield lambda stage: board.post.remote(key, prefix + stage)
    finally:
        board.clear.remote(key)


@contextmanager
def shard_pool(resources: dict):
    """The trial's influence actors (``poisonsweep.engine.shards.ActorPoolMap``), or None when it has none."""
    pool = None
    if resources["actors"] > 0:
        from poisonsweep.engine.shards import ActorPoolMap

        pool = ActorPoolMap(resources["actors"], resources["actor_cpu"], resources["actor_gpu"])
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
    through a node-local cache instead (``poisonsweep.engine.artifacts``): None here."""
    return None if "://" in out else f"{filesystem(out)[1]}/{ARTIFACT_DIR}"


