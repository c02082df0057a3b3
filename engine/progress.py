"""A live progress bar for a sweep (trials done / running / failed, elapsed, ETA), with each running
trial's stage (training epoch k/n, detector, unlearning) under it, and Ray's own warnings kept out of it.

Stages travel from the trials to the driver through one small actor (:class:`StageBoard`, no CPU):
a trial posts to it without waiting (``poisonsweep.engine.worker.stage_sender``) and the driver asks
for the board at most every ``POLL_SECONDS``, without waiting either. The board exists only while a
terminal shows the bar; otherwise trials are handed no board and post nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from ray.tune import Callback
from poisonsweep.engine.text import printable
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

POLL_SECONDS = 0.5  # how often the driver asks the board (a stage changes every epoch: seconds)
STAGES_SHOWN = 8  # running trials listed under the bar; the rest are counted


class StageBoard:
    """Each running trial's latest stage, by ``trial_id`` (run as a Ray actor by :meth:`SweepProgress.stage_board`)."""

    def __init__(self):
        self._stages: dict[str, str] = {}

    def post(self, key: str, stage: str) -> None:
        self._stages[key] = stage

    def clear(self, key: str) -> None:
        self._stages.pop(key, None)

    def stages(self) -> dict[str, str]:
        return self._stages


class _BarWithStages(Progress):
    """The bar, then one line per running trial's stage (rich's documented ``get_renderables`` hook)."""

    def __init__(self, *columns, stage_lines, **options):
        self._stage_lines = stage_lines  # before Progress's __init__, which renders once
        super().__init__(*columns, **options)

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        lines = self._stage_lines()
        if lines:
            yield Text("\n".join(lines), style="dim", no_wrap=True, overflow="ellipsis")


def field_text(value: str) -> str:
    """Text for a field of the bar (a trial's stage may name a detector's label, the user's text): made
    printable (``engine.text``) and shown as written, not taken as rich markup."""
    return escape(printable(value))


OnProgress = Callable[[int, int, int], None]  # on_progress(done, total, running), as ``poisonsweep.run`` takes it


class TrialCounter(Callback):
    """The engine's Tune callback for progress: counts the trials of this run that are done (failed ones
    included; a pack counts its members) and running, and calls ``on_progress(done, total, running)``
    when the run begins and after each change. ``poisonsweep.run(on_progress=...)`` wraps a plain
    callable in one; the CLI's bar (:class:`SweepProgress`) is one. ``with counter:`` spans the run."""

    _driver_only: tuple[str, ...] = ("on_progress",)  # not pickled (Tune pickles its run config): driver-side

    def __init__(self, total: int = 0, on_progress: OnProgress | None = None):
        self.total = total
        self.on_progress = on_progress
        self.running: dict[str, str] = {}  # Tune trial id -> our trial_id (a pack's first member)
        self.failed = 0
        self.finished = 0
        self._results: dict[str, dict] = {}  # Tune trial id -> its last result

    def begin(self, total: int) -> None:
        """The run is about to start ``total`` trials (what is left of the sweep)."""
        self.total = total
        self.changed()

    def changed(self) -> None:
        """The counts changed: tell ``on_progress`` (the bar redraws instead)."""
        on_progress = self.__dict__.get("on_progress")  # a pickled copy has none
        if on_progress is not None:
            on_progress(self.finished, self.total, len(self.running))

    def stage_board(self):
        """Where trials post their stages (:class:`StageBoard`); None: nobody shows them."""
        return None

    def __enter__(self) -> TrialCounter:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __getstate__(self):
        # Tune pickles its run config; what lives in the driver (the caller's function, the live bar) stays
        return {k: v for k, v in self.__dict__.items() if k not in self._driver_only}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running[trial.trial_id] = trial.config["trial_id"]
        self.changed()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._results[trial.trial_id] = result

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = self._results.pop(trial.trial_id, {})  # nothing kept per finished trial
        self.running.pop(trial.trial_id, None)
        self.finished += result.get("members", 1)  # a pack (resources.pack) holds several trials
        self.failed += len(result.get("failures") or {})
        self.changed()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.pop(trial.trial_id, None)
        self._results.pop(trial.trial_id, None)
        self.finished += len(trial.config["trial_ids"])  # one trial, or every member of a pack
        self.failed += len(trial.config["trial_ids"])
        self.changed()


class SweepProgress(TrialCounter):
    """The CLI's live bar: a :class:`TrialCounter` that redraws a rich progress bar in the driver."""

    _driver_only = ("on_progress", "bar", "task", "_board", "_pending")  # the live bar (locks, the terminal), the board

    def __init__(self, total: int = 0, console: Console | None = None):
        super().__init__(total)
        self._board = None  # the StageBoard actor, once stage_board() made one
        self._asked, self._pending = 0.0, None  # when the board was last asked, and its answer to come
        self._stages: dict[str, str] = {}  # trial_id -> stage, as the board last answered
        self.bar = _BarWithStages(
            TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(),
            TextColumn("running {task.fields[running]}  failed {task.fields[failed]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False, stage_lines=self.stage_lines,
        )
        self.task = self.bar.add_task("sweep", total=total, running=0, failed=0)

    def begin(self, total: int) -> None:
        if "bar" in self.__dict__:  # the clock starts now, not when the bar was made (before the config loaded)
            self.bar.reset(self.task, total=total, running=0, failed=0)
        super().begin(total)

    def changed(self) -> None:
        self._refresh()

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self._stages = {}  # the last frame shows the finished bar alone
        self.bar.stop()

    def stage_board(self):
        """The board trials post their stages to (a Ray actor; Ray must be running), or None where nobody
        would see the stages (output to a file or a pipe: the bar is printed once, at the end)."""
        if not self.bar.console.is_terminal:
            return None
        if self._board is None:
            import ray

            self._board = ray.remote(num_cpus=0)(StageBoard).remote()
        return self._board

    def stage_lines(self) -> list[str]:
        stages = [(tid, self._stages[tid]) for tid in self.running.values() if tid in self._stages]
        lines = [f"  {tid[:12]}  {stage}" for tid, stage in sorted(stages)[:STAGES_SHOWN]]
        if len(stages) > STAGES_SHOWN:
            lines.append(f"  … and {len(stages) - STAGES_SHOWN} more")
        return lines

    def _refresh(self, **fields) -> None:
        """Redraw the counts, and any other ``fields`` of the bar (text is shown as :func:`field_text`)."""
        if "bar" not in self.__dict__:
            return
        self.bar.update(self.task, completed=self.finished, running=len(self.running), failed=self.failed,
                        **{name: field_text(value) if isinstance(value, str) else value
                           for name, value in fields.items()})

    def on_step_end(self, iteration, trials, **info):
        """Tune's loop steps every 0.1 s or so: fetch the board's answer once it is there, ask again at
        most every ``POLL_SECONDS``; never block the loop."""
        if self._board is None:
            return
        import ray

        if self._pending is not None and ray.wait([self._pending], timeout=0)[0]:
            try:
                self._stages = ray.get(self._pending)
            except Exception:  # the board died: the bar goes on without stages
                self._board, self._stages = None, {}
            self._pending = None
        if self._board is not None and self._pending is None and time.monotonic() - self._asked >= POLL_SECONDS:
            self._asked, self._pending = time.monotonic(), self._board.stages.remote()


# ---------------------------------------------------------------------------------------------
# Ray's own warnings, kept out of the live display

RAY_LOG = "ray.log"  # inside the output's _tune folder (Tune's own state): Ray's warnings of the last run
RAY_LOG_LINES = 1000  # kept at most: a warning repeated per trial must not grow the driver


class RayWarnings(logging.Filter):
    """While installed on the handlers of the ``ray`` logger (every Ray logger prints through them),
    keeps Ray's records below ERROR off the screen and collects them, to be written to a file; errors
    (a trial that failed) still show. :class:`RayWarningsKept` installs it."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []
        self.count = 0
        self._last: logging.LogRecord | None = None
        self._format = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if record.levelno >= logging.WARNING and record is not self._last:  # one record, seen by each handler
            self._last = record
            self.count += 1
            if len(self.lines) < RAY_LOG_LINES:
                self.lines.append(self._format.format(record))
        return False


class RayWarningsKept:
    """``with RayWarningsKept(out, tune_dir, enabled=not verbose) as kept:`` Ray's warnings meanwhile go
    to ``<out>/<tune_dir>/ray.log`` (written once, at the end, only when there were any; ``kept.path``
    says where, ``kept.count`` how many). Disabled (``--verbose``), they print as Ray prints them."""

    def __init__(self, out: str, tune_dir: str, enabled: bool = True):
        self.out, self.tune_dir, self.enabled = out, tune_dir, enabled
        self.filter = RayWarnings()
        self.path: str | None = None
        self._handlers: list[logging.Handler] = []

    @property
    def count(self) -> int:
        return self.filter.count

    def __enter__(self):
        if self.enabled:
            self._handlers = list(logging.getLogger("ray").handlers)
            for handler in self._handlers:
                handler.addFilter(self.filter)
        return self

    def __exit__(self, *exc):
        for handler in self._handlers:
            handler.removeFilter(self.filter)
        if self.filter.lines:
            self.path = self._write()

    def _write(self) -> str | None:
        from poisonsweep.engine.storage import filesystem, join_uri, masked, publish

        fs, root = filesystem(self.out)
        text = "\n".join(masked(line) for line in self.filter.lines) + "\n"
        try:
            fs.create_dir(f"{root}/{self.tune_dir}", recursive=True)
            publish(fs, f"{root}/{self.tune_dir}/{RAY_LOG}", lambda path: _write_text(fs, path, text))
        except Exception:  # a log of warnings must never fail a sweep that ran (a full disk, a store gone)
            return None
        return join_uri(self.out, f"{self.tune_dir}/{RAY_LOG}")


def _write_text(fs, path: str, text: str) -> None:
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())
