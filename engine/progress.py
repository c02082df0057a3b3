"""A live progress bar for a sweep (trials done / running / failed, elapsed, ETA)."""

from __future__ import annotations

from ray.tune import Callback
from poisonsweep.engine.text import printable
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def field_text(value: str) -> str:
    """Text for a field of the bar (a trial's stage may name a detector's label, the user's text): made
    printable (``engine.text``) and shown as written, not taken as rich markup."""
    return escape(printable(value))


class SweepProgress(Callback):
    """Ray Tune callback driving a rich progress bar in the driver process."""

    def __init__(self, total: int, console: Console | None = None):
        self.total = total
        self.running: set[str] = set()
        self.failed = 0
        self.finished = 0
        self._results: dict[str, dict] = {}  # Tune trial id -> its last result
        self.bar = Progress(
            TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(),
            TextColumn("running {task.fields[running]}  failed {task.fields[failed]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.task = self.bar.add_task("sweep", total=total, running=0, failed=0)

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def __getstate__(self):
        # Tune pickles its run config; the live bar (locks, the terminal) stays in the driver
        return {k: v for k, v in self.__dict__.items() if k not in ("bar", "task")}

    def _refresh(self, **fields) -> None:
        """Redraw the counts, and any other ``fields`` of the bar (text is shown as :func:`field_text`)."""
        if "bar" not in self.__dict__:
            return
        self.bar.update(self.task, completed=self.finished, running=len(self.running), failed=self.failed,
                        **{name: field_text(value) if isinstance(value, str) else value
                           for name, value in fields.items()})

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._refresh()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._results[trial.trial_id] = result

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = self._results.pop(trial.trial_id, {})  # nothing kept per finished trial
        self.running.discard(trial.trial_id)
        self.finished += result.get("members", 1)  # a pack (resources.pack) holds several trials
        self.failed += len(result.get("failures") or {})
        self._refresh()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self._results.pop(trial.trial_id, None)
        self.finished += len(trial.config["trial_ids"])  # one trial, or every member of a pack
        self.failed += len(trial.config["trial_ids"])
        self._refresh()
