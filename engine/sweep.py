"""Run a sweep's trials with Ray Tune, locally or on a cluster, and record every trial.

Resume is ours, not Tune's: a trial whose ``trials`` row says ``ok`` is skipped, so rerunning
the same command after a crash (even a SIGKILLed driver) finishes the rest without duplicating a
row. Each trial writes one Parquet file per table, named by its ``trial_id`` and renamed into place
(``poisonsweep.engine.record.write``), so a rerun replaces, never appends. A trial whose worker process dies is retried
by Tune up to ``resources.max_failures`` times; a trial that raises is recorded as ``failed``.

Tune gets the plan one trial at a time (:class:`PlanSearcher`), in experiments of at most
``TRIALS_PER_TUNER`` trials, so neither the time to the first trial nor the driver's memory grows
with the size of the sweep (``benchmarks/RESULTS.md``, section 10).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ray.tune import Callback
from ray.tune.stopper import Stopper
from ray.tune.search import Searcher

from poisonsweep.engine.cluster import check_cluster_resources, init_ray, trial_resources
from poisonsweep.engine.resume import code_version, trials_to_run
from poisonsweep.engine.record.repair import remove_dead_temporaries
from poisonsweep.engine.record.row import UNKNOWN_NODE
from poisonsweep.engine.storage import OutputError, filesystem, join_uri
from poisonsweep.engine.worker import record_trial, tune_trainable

if TYPE_CHECKING:
    from poisonsweep.engine.config import Sweep
    from poisonsweep.engine.progress import TrialCounter

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
    retried_after_error: int = 0  # attempts Tune restarted after the engine raised (no worker died)
    unwritten: dict[str, str] = field(default_factory=dict)  # trial_id -> why its rows could not be written
    output_error: str = ""  # the output could not be written (one line: path and cause); the sweep stopped
    not_recorded: int = 0  # trials left to run again because of output_error
    ray_warnings: int = 0  # Ray's own warnings kept off the screen (without --verbose) ...
    ray_log: str | None = None  # ... and the file they were written to
    tracked: int = 0  # trials logged to the experiment tracker (--mlflow)


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

    def save(self, checkpoint_path: str) -> None:
        pass  # nothing to save: resume reads the record (without this Tune warns "save not implemented")

    def restore(self, checkpoint_path: str) -> None:
        pass


class TrialLog(Callback):
    """What the driver keeps per trial, and only when it is news: the attempts Tune restarted
    because a worker process died, and the first line of each recorded failure (the trainable
    reports it; Tune's own per-trial result files are switched off, see ``TUNE_ENV``)."""

    def __init__(self):
        self.retried: dict[str, int] = {}
        self.retried_after_error = 0
        self.failed: dict[str, str] = {}
        self.unwritten: dict[str, str] = {}  # trials whose rows the output refused (full disk, store down)

    def on_trial_recover(self, iteration, trials, trial, **info):
        if not _worker_died(trial):
            self.retried_after_error += 1
            return
        for tid in trial.config["trial_ids"]:  # one, or every member of a pack
            self.retried[tid] = self.retried.get(tid, 0) + 1

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.failed.update(result.get("failures") or {})
        self.unwritten.update(result.get("unwritten") or {})


def _worker_died(trial) -> bool:
    """Whether the error Tune just recorded for ``trial`` is its process dying (``RayActorError``),
    not an exception the trainable raised; unknown counts as died, as Tune assumes."""
    import cloudpickle
    from ray.exceptions import RayActorError, RayTaskError

    try:
        with open(trial.pickled_error_file, "rb") as stream:
            error = cloudpickle.load(stream)
    except Exception:  # no file, or not readable: Tune's default reading
        return True
    if isinstance(error, RayTaskError):
        return isinstance(error.as_instanceof_cause(), RayActorError)
    return isinstance(error, RayActorError) or not isinstance(error, Exception)


class _StopSweep(Stopper):
    """Stops the experiment (its running trials too) on Ctrl-C, or once a trial's rows could not be
    written: the next trials would fail the same way. Tune asks ``stop_all`` at every step."""

    def __init__(self, log: TrialLog, ctrl_c: "CtrlC"):
        self.log, self.ctrl_c = log, ctrl_c

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.ctrl_c.pressed or bool(self.log.unwritten)


class _OneLineErrors(logging.Filter):
    """Without --verbose, an error Ray logs with its traceback ("Trial task failed", a failed sync of
    Tune's state) keeps its message and the error's last line: the trial's row and --verbose have the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            cause = (str(error).strip().splitlines() or [type(error).__name__])[-1]
            record.msg, record.args = f"{record.getMessage()}: {type(error).__name__}: {cause}", ()
            record.exc_info, record.exc_text = None, None
        return True


def _short_name(trial) -> str:
    ids = trial.config["trial_ids"]
    return f"{trial.trial_id}-{ids[0]}" + (f"+{len(ids) - 1}" if len(ids) > 1 else "")


# Tune keeps every trial of an experiment in the driver (tens of kB each, measured in
# benchmarks/RESULTS.md, section 10), so a big sweep runs as consecutive Tune experiments of this
# many trials: the driver's memory stays bounded, at the cost of restarting the trial processes
# once per experiment (seconds, against minutes of trials)
TRIALS_PER_TUNER = int(os.environ.get("POISONSWEEP_TRIALS_PER_TUNER", 2000))

# Tune's per-trial CSV, JSON and TensorBoard logs: the Parquet record holds every result, and
# 10,000 trials would write 30,000 more files
TUNE_ENV = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
# Tune's own SIGINT handler takes a Ctrl-C without telling anyone: one that lands as an experiment
# ends is lost and the sweep goes on to the next. CtrlC owns SIGINT, _StopSweep stops the experiment.
OWN_SIGINT = {"TUNE_DISABLE_SIGINT_HANDLER": "1"}


def _without_missing_metrics_warning(record: logging.LogRecord) -> bool:
    """Drop Tune's end-of-run warning that each trial lacks the result files ``TUNE_ENV`` switched
    off (one line per trial: 10,000 lines for a big sweep); other warnings pass."""
    return not record.getMessage().startswith("Failed to fetch metrics for")


def _recorded_rows(out: str, trial_ids: list[str]) -> dict[str, tuple]:
    """trial_id -> (started_at, finished_at) of the trials rows recorded for ``trial_ids`` now."""
    from poisonsweep.engine.record.read import read_table

    if not trial_ids:
        return {}
    rows = read_table(out, "trials", ["trial_id", "started_at", "finished_at"], trial_ids=trial_ids).to_pylist()
    return {row["trial_id"]: (row["started_at"], row["finished_at"]) for row in rows}


def _recorded_anew(out: str, before: dict[str, tuple], trial_ids: list[str]) -> int:
    """How many of ``trial_ids`` have a trials row they did not have ``before`` the run: what the record
    holds, not what Tune counted (a trial stopped by Ctrl-C may have written its rows). Rows are told
    apart by trial id and the row's own timestamps, never by comparing the driver's clock with a
    worker's (a node whose clock runs behind would count as not run)."""
    now = _recorded_rows(out, trial_ids)
    return sum(1 for tid in trial_ids if tid in now and now[tid] != before.get(tid))


class CtrlC:
    """Ctrl-C anywhere in a sweep stops it: during an experiment (``_StopSweep`` then stops Tune's
    running trials at its next step) or between two, where the next is not started.

    Tune's own SIGINT handler is switched off (``OWN_SIGINT``). Should another handler be installed
    during an experiment anyway (Tune leaves a finished experiment's handler in place when that
    variable is unset), ``listen`` reinstalls this one after each experiment.
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


def _fit(tuner, verbose: bool = False):
    analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    analysis_log.addFilter(_without_missing_metrics_warning)
    restore_hint = _HideRestoreHint()  # Tune's "Tuner.restore(...)" is not how a sweep resumes
    logging.getLogger("ray.tune.tune").addFilter(restore_hint)
    # Ray prints its loggers' records through handlers on the "ray" logger: a filter there sees them all
    handlers, short_errors = [] if verbose else list(logging.getLogger("ray").handlers), _OneLineErrors()
    for handler in handlers:
        handler.addFilter(short_errors)
    tune_sigint = {key: os.environ.get(key) for key in OWN_SIGINT}
    os.environ.update(OWN_SIGINT)
    try:
        return tuner.fit()
    finally:
        for key, value in tune_sigint.items():  # a caller's own Tune runs keep Tune's handler
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        analysis_log.removeFilter(_without_missing_metrics_warning)
        logging.getLogger("ray.tune.tune").removeFilter(restore_hint)
        for handler in handlers:
            handler.removeFilter(short_errors)


class _HideRestoreHint(logging.Filter):
    """Tune ends a Ctrl-C with "Resume experiment with: Tuner.restore(...)"; we resume by rerunning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore" not in record.getMessage()


def plan_units(pending: list[dict], pack: int) -> list[list[dict]]:
    """What each Tune trial runs: one pending trial, or with ``pack`` > 1 a pack of pending trials that
    share data, model and training schedule (``poisonsweep.engine.packs.plan_packs``)."""
    if pack > 1:
        from poisonsweep.engine.packs import plan_packs

        return plan_packs(pending, pack)
    return [[config] for config in pending]


def run_sweep(sweep: Sweep, *, address: str | None = None, verbose: bool = False, progress: TrialCounter | None = None,
              reuse_actors: bool = True, rerun: str = "failed", to_run: list[str] | None = None,
              version: str | None = None, callbacks: list | None = None) -> SweepOutcome:
    """Run every trial of ``sweep`` not yet done in ``sweep.out`` (``poisonsweep.engine.resume.trials_to_run``:
    ``rerun`` is ``failed``, ``stale`` or ``all``). A caller that has already worked out ``to_run`` (the
    trial ids) and the code ``version`` hands them over, so the record is not read again.

    ``reuse_actors`` keeps each trial process alive for the next trial of the same resources, so
    torch and the datasets are imported once per process rather than once per trial
    (``benchmarks/RESULTS.md, section 3``). ``callbacks``: more Tune callbacks (a tracker, ``engine.tracking``).
    """
    import ray
    from ray import tune

    start = time.perf_counter()
    fs, root = filesystem(sweep.out)
    fs.create_dir(root, recursive=True)
    from poisonsweep.engine.record.write import write_plan

    write_plan(sweep)  # <out>/sweep.json: lets `report` say which planned trials are still missing
    remove_dead_temporaries(sweep.out, held="run")  # left by writers killed mid-write; no reader ever saw them
    version = code_version(sweep.plugins) if version is None else version
    ids = sweep.ids
    wanted = set(trials_to_run(sweep.out, ids, rerun, version) if to_run is None else to_run)
    pending = [t for t, tid in zip(sweep.trials, ids) if tid in wanted]
    pending_ids = [tid for tid in ids if tid in wanted]
    outcome = SweepOutcome(total=len(sweep.trials), skipped=len(sweep.trials) - len(pending))
    if not pending:
        return outcome
    before = _recorded_rows(sweep.out, pending_ids)  # a failed or lost trial's earlier row, to tell a new one
    from poisonsweep.engine.plugins import runtime_env_modules

    init_ray(address, verbose, py_modules=runtime_env_modules(sweep.plugins))
    check_cluster_resources(sweep.resources)
    for key, value in TUNE_ENV.items():
        os.environ.setdefault(key, value)
    out = sweep.out if "://" in sweep.out else root  # workers chdir elsewhere: absolute paths only
    units = plan_units(pending, sweep.resources["pack"])
    id_of = {id(config): tid for config, tid in zip(pending, pending_ids)}  # units hold the plan's own dicts
    unit_ids = [[id_of[id(c)] for c in unit] for unit in units]
    plugins = [p.record() for p in sweep.plugins]  # each trial process imports them, from the shipped copy
    plan = [ray.put(units)]  # in the object store once; a list, so with_parameters ships the ref, not the plan
    # a live display's board for the trials' stages (engine.progress), else none: trials then post nothing
    stages = [progress.stage_board() if progress is not None else None]
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, plan=plan, out=out, version=version, resources=sweep.resources,
                             plugins=plugins, stages=stages),
        trial_resources(sweep.resources),
    )
    log = TrialLog()
    callbacks = [log] + ([progress] if progress is not None else []) + list(callbacks or [])
    name = f"{sweep.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"

    def tuner(first: int, chunk: list[list[str]]):
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=PlanSearcher(chunk, first), num_samples=len(chunk),
                                        max_concurrent_trials=sweep.resources["max_concurrent"],
                                        reuse_actors=reuse_actors,
                                        trial_name_creator=_short_name, trial_dirname_creator=_short_name),
            run_config=tune.RunConfig(
                name=name if first == 0 else f"{name}-{first}", storage_path=join_uri(out, TUNE_DIR),
                failure_config=tune.FailureConfig(max_failures=sweep.resources["max_failures"]),
                stop=_StopSweep(log, ctrl_c),
                verbose=2 if verbose else 0, callbacks=callbacks,
                progress_reporter=None,
            ),
        )

    with CtrlC() as ctrl_c:
        for first in range(0, len(unit_ids), TRIALS_PER_TUNER):
            if ctrl_c.pressed or log.unwritten:
                break
            chunk = unit_ids[first:first + TRIALS_PER_TUNER]
            results = _fit(tuner(first, chunk), verbose)  # a finished chunk's trials then leave the driver's memory
            ctrl_c.listen()  # Tune leaves its finished experiment's handler installed
            for result in results:
                if result.error is not None:
                    # its worker died more often than max_failures allows, so it never wrote its row: record it now
                    error = f"{type(result.error).__name__}: {result.error}"
                    for config in units[result.config["index"]]:
                        try:
                            record_trial(config, out, version=version, attempt_error=error, where=UNKNOWN_NODE,
                                         plugins=plugins)
                        except OutputError as unwritable:
                            log.unwritten[id_of[id(config)]] = str(unwritable)
                            continue
                        log.failed[id_of[id(config)]] = error.strip().splitlines()[0]
            if results.num_terminated + results.num_errors < len(chunk):  # Ctrl-C or unwritable: Tune stopped early
                break
    outcome.failed = dict(log.failed)
    outcome.retried, outcome.retried_after_error = dict(log.retried), log.retried_after_error
    outcome.unwritten = dict(log.unwritten)
    outcome.ran = _recorded_anew(sweep.out, before, pending_ids)
    left = len(pending_ids) - outcome.ran
    if outcome.unwritten:  # not an interruption: the output refused the rows, and the sweep stopped there
        outcome.output_error, outcome.not_recorded = next(iter(outcome.unwritten.values())), left
    else:
        outcome.interrupted = left
    outcome.seconds = time.perf_counter() - start
    return outcome
