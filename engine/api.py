"""The public Python API, re-exported as ``poisonsweep.run``, ``load``, ``report`` and ``run_trial``.

Everything the CLI does, as functions that take values and return values (the CLI only parses
arguments and prints). Every config problem raises ``ConfigError`` (its message lists each problem
with its key, the bad value and what is allowed) before Ray starts.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Literal, overload

import pyarrow as pa

from poisonsweep.engine.lease import OutputBusy
from poisonsweep.tasks.registry import ConfigError

if TYPE_CHECKING:  # the return types; at run time each module is imported where it is used
    import pandas as pd

    from poisonsweep.engine.config import Sweep
    from poisonsweep.engine.plan import SweepPlan
    from poisonsweep.engine.progress import OnProgress, TrialCounter
    from poisonsweep.engine.report import Report
    from poisonsweep.engine.sweep import SweepOutcome
    from poisonsweep.engine.tracking import MlflowTracker
    from poisonsweep.tasks.trial import TrialResult

__all__ = ["OutputBusy", "explain", "load", "load_config", "plan", "repair", "report", "run", "run_trial"]


def load_config(config: str | Path | dict, overrides: Iterable[str] = (), *, out: str | None = None,
                data_root: str | None = None) -> Sweep:
    """A validated ``poisonsweep.engine.config.Sweep`` from a YAML path or a dict in the same shape, with
    ``overrides`` (``"poison.rate=0.2"``, as ``--set``) applied; its plugins imported first (``plugins:``
    paths relative to the YAML file, or to the working directory for a dict)."""
    from poisonsweep.engine.config import load_sweep, sweep_from_mapping

    if not isinstance(config, dict):
        return load_sweep(config, list(overrides), out=out, data_root=data_root)
    return sweep_from_mapping(config, overrides, data_root=data_root, default_name=str(config.get("name") or "sweep"),
                              out=out)


def run(config: str | Path | dict, *, out: str | None = None, overrides: Iterable[str] = (),
        address: str | None = None, data_root: str | None = None, rerun: str = "failed", verbose: bool = False,
        reuse_actors: bool = True, echo: Callable[[str], None] = print,
        on_progress: OnProgress | TrialCounter | None = None,
        announce: Callable[[Sweep], object] | None = None, mlflow: str | None = None) -> SweepOutcome:
    """Run every trial of the sweep not yet done in its output directory; return its ``SweepOutcome``.

    ``config``: a YAML path or a dict; ``out``: a directory or URI (default: the config's ``out``,
    else ``results/<name>``); ``rerun``: ``failed`` (default), ``stale`` or ``all``; ``echo``
    receives the notes the CLI prints (damaged files moved aside, stale trials); ``on_progress(done,
    total, running)`` is called as the run begins and whenever a trial starts or ends: ``total`` trials
    are to run (what is left of the sweep), ``done`` of them have finished (failed ones included; it
    reaches ``total`` once every trial ran) and ``running`` are running (the CLI hands its bar,
    ``poisonsweep.engine.progress.SweepProgress``, a ``TrialCounter`` itself); ``announce`` is called
    with the checked sweep before anything runs; ``mlflow``: a tracking URI, to log one MLflow run per
    trial run (``poisonsweep.engine.tracking``; off by default).
    The outcome's ``out`` is where the tables are: read them with :func:`load`.
    """
    from poisonsweep.engine.config import check_data
    from poisonsweep.engine.lease import run_guard
    from poisonsweep.engine.resume import RERUN_CHOICES

    if rerun not in RERUN_CHOICES:
        raise ConfigError(f"rerun must be one of {', '.join(RERUN_CHOICES)}; got {rerun!r}")
    sweep = load_config(config, overrides, out=out, data_root=data_root)
    for warning in sweep.warnings:  # as `plan` shows them
        echo(f"warning: {warning}")
    check_data(sweep)
    check_writable(sweep.out)
    tracker = None
    if mlflow:
        from poisonsweep.engine.tracking import MlflowTracker

        tracker = MlflowTracker(mlflow, sweep.out, sweep.name)  # a bad URI fails here, before any trial
    with run_guard(sweep.out, echo):  # a file lock (local directory) or a lease (object store): one run per output
        if announce is not None:
            announce(sweep)
        return _run_locked(sweep, address, verbose, reuse_actors, rerun, echo, on_progress, tracker)


def _run_locked(sweep: Sweep, address: str | None, verbose: bool, reuse_actors: bool, rerun: str,
                echo: Callable[[str], None], on_progress: OnProgress | TrialCounter | None,
                tracker: MlflowTracker | None = None) -> SweepOutcome:
    from poisonsweep.engine.record.repair import quarantine
    from poisonsweep.engine.resume import code_version, stale_trials, trial_versions, trials_to_run
    from poisonsweep.engine.sweep import _recorded_rows, run_sweep

    quarantined = quarantine(sweep.out)
    for damaged, moved, problem in quarantined:
        echo(f"moved {damaged} ({problem}) to {moved}; its trial runs again")
    # the record is read and the code hashed once here, for the notes, the bar and the sweep alike
    ids, version, versions = sweep.ids, code_version(sweep.plugins), trial_versions(sweep.out)
    stale = stale_trials(sweep.out, ids, version, versions)
    if stale:
        listed = ", ".join(f"{v}: {n}" for v, n in stale.most_common())
        verb = "they run again (--rerun " + rerun + ")" if rerun != "failed" else "kept; --rerun stale reruns them"
        echo(f"{sum(stale.values())} ok trial(s) were recorded by other code versions ({listed}; this is {version}): "
             f"{verb}")
    if note := cpu_pack_note(sweep.resources):
        echo(note)
    # the files just moved aside send their trials back (and so does any table a trial lists but lacks)
    to_run = trials_to_run(sweep.out, ids, rerun, version, versions, damaged=[path for path, *_ in quarantined])
    if tracker is not None:
        tracker.earlier = _recorded_rows(sweep.out, to_run)  # rows of earlier runs are not logged as this run's
    from poisonsweep.engine.progress import RayWarningsKept
    from poisonsweep.engine.sweep import TUNE_DIR

    counter = progress_counter(on_progress)
    counter.begin(len(to_run))  # a resumed sweep's progress counts only what is left
    # Ray's warnings go to a file unless --verbose
    with counter, _unwritable_output_named(sweep.out), \
            RayWarningsKept(sweep.out, TUNE_DIR, enabled=not verbose) as kept:
        outcome = run_sweep(sweep, address=address, verbose=verbose, progress=counter,
                            reuse_actors=reuse_actors, rerun=rerun, to_run=to_run, version=version,
                            callbacks=[tracker] if tracker is not None else None)
    outcome.out, outcome.ray_warnings, outcome.ray_log = sweep.out, kept.count, kept.path
    if tracker is not None:
        tracker.log_trials(to_run)  # also those recorded after Tune gave up on them (a worker that kept dying)
        outcome.tracked = len(tracker.logged)
    return outcome


def progress_counter(on_progress: OnProgress | TrialCounter | None) -> TrialCounter:
    """The Tune callback that tells ``on_progress``: a plain callable wrapped in a ``TrialCounter``, and a
    ``TrialCounter`` (the CLI's bar) used as it is."""
    from poisonsweep.engine.progress import TrialCounter

    return on_progress if isinstance(on_progress, TrialCounter) else TrialCounter(on_progress=on_progress)


@contextlib.contextmanager
def _unwritable_output_named(out: str) -> Iterator[None]:
    """An error that escapes the sweep (Ray Tune's own state truncated by a full disk, a record that an
    object store no longer serves) becomes ``OutputError``, one line naming the path and the cause,
    when the output cannot be written now; any other error passes as it is."""
    from poisonsweep.engine.storage import OutputError

    try:
        yield
    except (ConfigError, OutputError):
        raise
    except Exception as error:
        try:
            check_writable(out)
        except ConfigError as unwritable:
            raise OutputError(f"{unwritable}; the trials not recorded run again with the same command once it "
                              "can be written (finished trials are kept)") from error
        raise


def cpu_pack_note(resources: dict) -> str | None:
    """A hint when packs train without a GPU share: there packing costs more than it saves."""
    if resources.get("pack", 1) > 1 and not resources.get("gpu"):
        return (f"resources.pack is {resources['pack']} but the trials get no GPU (resources.gpu 0): on a CPU packed "
                "training is slower per model than solo training (0.59x the trials per hour at pack 8, "
                "benchmarks/RESULTS.md section 14); packing pays on a GPU, so use pack: 1 here")
    return None


PROBE_BYTES = 4096  # what the local write probe writes: one block


def check_writable(out: str) -> None:
    """Create and delete a probe file in ``out`` (a directory or a URI), so that a read-only path or
    missing cloud credentials fail now, not after the first trial. A local probe has a name of its
    own, is created exclusively and never through a link, and the record's own entries in ``out`` must
    not be links (:func:`engine.record.write.refuse_links`): nothing outside ``out`` is written or truncated."""
    from pyarrow import ArrowException

    from poisonsweep.engine.record.write import refuse_links
    from poisonsweep.engine.storage import filesystem, masked, probe_name

    if "://" not in out:
        path = Path(filesystem(out)[1])
        try:
            path.mkdir(parents=True, exist_ok=True)
            refuse_links(path)
            probe = path / probe_name()
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            try:
                os.write(fd, bytes(PROBE_BYTES))  # a full disk still creates an empty file
                os.fsync(fd)
            finally:
                os.close(fd)
                probe.unlink()
        except OSError as error:
            raise ConfigError(f"output directory {str(path)!r} cannot be written: {error.strerror or error}; "
                              "choose another with --out") from None
        return
    try:
        fs, root = filesystem(out)
        fs.create_dir(root, recursive=True)
        probe_uri = f"{root}/{probe_name()}"
        with fs.open_output_stream(probe_uri):
            pass
        fs.delete_file(probe_uri)
    except (OSError, ArrowException, ValueError) as error:
        raise ConfigError(f"output URI {masked(out)!r} cannot be written: {masked(str(error))}; check the URI and "
                          "the credentials (e.g. AWS_PROFILE, an instance profile) or choose another with --out") from None


@overload
def load(out: str, tables: str | Iterable[str] | None = None, *, columns: dict[str, list[str]] | None = None,
         as_pandas: Literal[False] = False) -> dict[str, pa.Table]: ...


@overload
def load(out: str, tables: str | Iterable[str] | None = None, *, columns: dict[str, list[str]] | None = None,
         as_pandas: Literal[True]) -> dict[str, pd.DataFrame]: ...


@overload
def load(out: str, tables: str | Iterable[str] | None = None, *, columns: dict[str, list[str]] | None = None,
         as_pandas: bool) -> dict[str, pa.Table] | dict[str, pd.DataFrame]: ...


def load(out: str, tables: str | Iterable[str] | None = None, *, columns: dict[str, list[str]] | None = None,
         as_pandas: bool = False) -> dict[str, pa.Table] | dict[str, pd.DataFrame]:
    """The record's tables, ``{name: pyarrow.Table}`` (``as_pandas``: DataFrames), each trial's rows
    once whether per-trial or compacted. ``tables``: which, one name or several (default all);
    ``columns``: per table."""
    from poisonsweep.engine.record.read import read_table
    from poisonsweep.engine.record.tables import TABLES

    if isinstance(tables, str):  # load(out, "trials") means that one table, not its letters
        tables = [tables]
    names = list(tables) if tables is not None else list(TABLES)
    unknown = [name for name in names if name not in TABLES]
    if unknown:
        raise ConfigError(f"unknown table(s) {unknown}; the record has {', '.join(TABLES)}")
    loaded = {name: read_table(out, name, (columns or {}).get(name)) for name in names}
    return {name: table.to_pandas() for name, table in loaded.items()} if as_pandas else loaded


def report(out: str, directory: str | Path | None = None) -> Report:
    """Write the report (CSV/Markdown tables, PNG figures, one self-contained HTML page) of the record
    in ``out``; returns ``poisonsweep.engine.report.Report`` (its ``html`` is the page's path)."""
    from poisonsweep.engine.report import write_report
    from poisonsweep.engine.report.folder import check_report_folder

    if directory is not None:  # refused before the report lock: a refused report leaves the record as it was
        check_report_folder(Path(directory), out)
    with _report_guard(out, directory):
        return write_report(out, directory)


@contextlib.contextmanager
def _report_guard(out: str, directory: str | Path | None) -> Iterator[None]:
    """While a report is written into a local record (its default place): the record's report lock
    (``OutputBusy`` if another report holds it), and the temporaries of killed reports removed. A
    read-only record, or a report written elsewhere, takes neither."""
    from poisonsweep.engine.lease import run_guard
    from poisonsweep.engine.record.repair import BESIDE_A_RUN, remove_dead_temporaries

    root = Path(out).resolve() if "://" not in out else None
    inside = root is not None and root.is_dir() and (
        directory is None or root in Path(directory).resolve().parents)
    if root is None or not inside or not os.access(root, os.W_OK):
        yield
        return
    with run_guard(out, command="report"):
        remove_dead_temporaries(out, held="report", kinds=BESIDE_A_RUN)
        yield


def repair(out: str) -> tuple[list[tuple[str, str, str]], int]:
    """Move every file of the record in ``out`` that is not readable Parquet of its table's schema to
    ``<out>/_quarantine/`` (the next ``run`` recomputes its trial) and remove the temporaries killed
    commands left. Returns the moves (from, to, what was wrong) and how many temporaries were removed.
    Holds the record as ``compact`` does (``OutputBusy`` while a ``compact`` runs)."""
    from poisonsweep.engine.lease import run_guard
    from poisonsweep.engine.record.repair import quarantine, remove_dead_temporaries
    from poisonsweep.engine.storage import filesystem

    root = filesystem(out)[1]
    if "://" not in out and not os.path.isdir(root):
        raise ConfigError(f"{out!r} is not a directory: is it a sweep's output directory?")
    with run_guard(out, command="compact"):
        removed = remove_dead_temporaries(out, held="compact")
        return quarantine(out), removed


def run_trial(config: str | Path | dict, *, overrides: Iterable[str] = (), index: int = 0,
              log: Callable[[str], None] = print) -> TrialResult:
    """Run one trial of a sweep config in this process, without Ray; returns its rows
    (``poisonsweep.tasks.trial.TrialResult``: ``tables[name]`` is a list of row dicts).

    ``config`` is a sweep (YAML path or dict; registry defaults are filled in as for ``run``) whose
    ``index``-th trial runs; a config without a ``sweep`` grid has exactly one.
    """
    from poisonsweep.tasks.trial import run_resolved_trial as run_one

    sweep = load_config(config, overrides)
    if not 0 <= index < len(sweep.trials):
        raise ConfigError(f"index {index} is not a trial of this sweep: it has {len(sweep.trials)} (0 to "
                          f"{len(sweep.trials) - 1})")
    return run_one(sweep.trials[index], log=log)


def plan(config: str | Path | dict, overrides: Iterable[str] = (), *, out: str | None = None, n: int = 5
         ) -> SweepPlan:
    """What ``run`` would run, without Ray and without loading data: a
    ``poisonsweep.engine.plan.SweepPlan`` (trial count, grid axes, the first ``n`` trials with their swept
    values, and a warning for each ``--set`` override that removed or narrowed an axis). The config is
    checked as ``run`` checks it; a problem raises ``ConfigError``."""
    from poisonsweep.engine.plan import sweep_plan

    if n < 0:
        raise ConfigError(f"n must be 0 or more trials to show; got {n}")
    return sweep_plan(load_config(config, overrides, out=out), n)


def explain(metric: str | None = None) -> str:
    """What a column or figure of the summary and report means (``poisonsweep explain METRIC``); without
    ``metric``, the whole glossary. An unknown name raises ``ConfigError`` listing the known ones."""
    from poisonsweep.engine.explain import explain as explain_text

    return explain_text(metric)
