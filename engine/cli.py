"""The ``poisonsweep`` command line."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import List, Optional

import typer
from poisonsweep.engine import summary
from poisonsweep.engine.sink import masked
from poisonsweep.tasks.registry import ConfigError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Sweep label-poisoning experiments: poison -> train -> detect -> unlearn -> Parquet.")
# piped output (logs, CI) gets wide tables instead of rich's 80-column default
console = Console() if sys.stdout.isatty() else Console(width=int(os.environ.get("COLUMNS", 150)))


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(masked(message))}", highlight=False)  # config text is not markup
    raise typer.Exit(code=2)


@app.command()
def run(
    config: Path = typer.Argument(..., help="The sweep's YAML file, e.g. configs/quickstart.yaml."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output directory or URI (s3://..., gs://...); "
                                      "default: the config's 'out', else results/<name>."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a key: --set poison.rate=0.2, "
                                   "--set sweep.seed=[0,1,2]. Repeatable."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address ('auto' inside a cluster); "
                                          "default: start Ray on this machine."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where datasets live (else data.root, "
                                            "else $POISONSWEEP_DATA)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray Tune's status tables and worker logs."),
    reuse_actors: bool = typer.Option(True, "--reuse-actors/--no-reuse-actors", help="Keep each trial process for "
                                      "the next trial (saves its start-up, seconds per trial); --no-reuse-actors "
                                      "starts a fresh process per trial, so a node that starts late still gets "
                                      "trials when trials are shorter than a process start."),
    rerun: str = typer.Option("failed", "--rerun", help="Which recorded trials to run again: 'failed' (default: "
                              "every trial not done ok), 'stale' (also ok trials recorded by another code "
                              "version), 'all'."),
):
    """Run a sweep: every trial not yet recorded in the output directory, then print the summary."""
    from poisonsweep.engine import api
    from poisonsweep.engine.progress import SweepProgress

    try:
        outcome = api.run(config, out=out, overrides=set_, address=address, data_root=data_root, rerun=rerun,
                          verbose=verbose, reuse_actors=reuse_actors,
                          echo=lambda note: console.print(escape(masked(note)), highlight=False),
                          progress=lambda total: SweepProgress(total, console),
                          announce=lambda sweep: console.print(f"sweep [bold]{escape(sweep.name)}[/]: "
                                                               f"{len(sweep.trials)} trials -> {escape(masked(sweep.out))}"))
    except (ConfigError, RuntimeError) as error:
        _fail(str(error))
    retried = sum(outcome.retried.values())
    console.print(f"{outcome.ran} trials run, {outcome.skipped} already done"
                  + (f", {len(outcome.failed)} failed" if outcome.failed else "")
                  + (f", {retried} attempt(s) retried after a worker died" if retried else "")
                  + (f", {outcome.retried_after_error} attempt(s) retried after an error"
                     if outcome.retried_after_error else "")
                  + (f" in {outcome.seconds:.0f}s" if outcome.ran else ""))
    if outcome.output_error:  # the record may not even be readable now: no summary
        console.print(f"[bold red]error:[/] {escape(masked(outcome.output_error))}; {outcome.not_recorded} trial(s) "
                      "not recorded: they run again with the same command once the output can be written",
                      highlight=False)
        raise typer.Exit(code=1)
    print_summary(outcome.out)
    if outcome.interrupted:
        console.print(f"[bold yellow]interrupted:[/] {outcome.interrupted} trial(s) not finished. Run the same "
                      "command again to resume: finished trials are kept and skipped.", highlight=False)
        raise typer.Exit(code=130)


@app.command()
def show(out: str = typer.Argument(..., help="A sweep's output directory (or URI).")):
    """Print a sweep's summary from its Parquet tables alone."""
    from poisonsweep.engine.sink import filesystem

    fs, root = filesystem(out)
    from pyarrow.fs import FileType

    if fs.get_file_info(f"{root}/trials").type != FileType.Directory:
        _fail(f"{out!r} holds no trials table: is it a sweep's output directory?")  # _fail masks it
    with _damage_reported(out):
        print_summary(out)


@app.command()
def repair(out: str = typer.Argument(..., help="A sweep's output directory (or URI).")):
    """Move every file of the record that is not readable Parquet of its table's schema to DIR/_quarantine/
    (the next `run` recomputes its trial), and remove the temporaries of killed commands."""
    from poisonsweep.engine.api import repair as repair_record
    from poisonsweep.engine.resume import QUARANTINE_DIR
    from poisonsweep.engine.sink import filesystem, refuse_links

    try:
        if "://" not in out and os.path.isdir(out):
            refuse_links(filesystem(out)[1])  # a linked _quarantine would move files out of the record
        moved, removed = repair_record(out)
    except ConfigError as error:
        _fail(str(error))
    for damaged, target, problem in moved:
        console.print(escape(f"moved {damaged} ({problem}) to {target}"), highlight=False)
    if removed:
        console.print(f"removed {removed} temporary file(s) of killed commands", highlight=False)
    console.print(escape(f"{len(moved)} damaged file(s) moved to {QUARANTINE_DIR}/" if moved
                         else "every file is readable Parquet of its table's schema; nothing to repair")
                  + (": run the sweep again to recompute their trials" if moved else ""), highlight=False)


@contextlib.contextmanager
def _damage_reported(out: str):
    """Name every damaged file of the record once (readers skip them, each with a warning)."""
    from poisonsweep.engine.resume import damage
    from poisonsweep.engine.sink import DamagedFile

    for path, problem in damage(out).items():
        console.print(f"[bold yellow]warning:[/] {escape(str(DamagedFile(path, out, problem)))}", highlight=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamagedFile)
        yield


def _table(title: str, columns: list[str], left: int = 2) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold", pad_edge=False)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < left else "right", no_wrap=i >= left)
    return table


def _setting(r) -> str:
    return escape(f"{r.data_name} {r.poison_method} {r.poison_rate:g}")


def print_summary(out: str) -> None:
    """The sweep's tables: trials per setting, detectors, unlearning, failures (mean±std over seeds)."""
    trials = summary.load(out, "trials")
    if trials.empty:
        console.print("no trials recorded yet")
        return
    ok = trials[trials["status"] == "ok"]
    from poisonsweep.engine.resume import version_note

    if note := version_note(ok["code_version"]):
        console.print(f"[bold yellow]warning:[/] {escape(note)}", highlight=False)
    table = _table("Trials (mean±std over seeds)",
                   ["setting", "n", "poisoned", "clean acc", "poison success", "train s"], left=1)
    for _, r in summary.trial_summary(trials).iterrows():
        table.add_row(_setting(r), str(r.n), f"{r.n_poisoned_mean:.0f}",
                      summary.fmt(r.clean_test_acc_mean, r.clean_test_acc_std),
                      summary.fmt(r.poison_success_mean, r.poison_success_std), f"{r.train_seconds_mean:.1f}")
    console.print(table)

    detections = summary.load(out, "detections")
    detections = detections[detections["trial_id"].isin(ok["trial_id"])]
    if not detections.empty:
        table = _table("Detectors (mean±std over seeds)",
                       ["setting", "detector", "n", "AUROC", "P@n", "AUPRC", "F1", "flagged", "recall@10%", "s"])
        for _, r in summary.detection_summary(detections).iterrows():
            table.add_row(_setting(r), escape(r.detector), str(r.n),
                          summary.fmt(r.auroc_mean, r.auroc_std),
                          summary.fmt(r.precision_at_n_mean, r.precision_at_n_std),
                          summary.fmt(r.auprc_mean, r.auprc_std), summary.fmt(r.f1_mean, r.f1_std),
                          f"{r.n_flagged_mean:.0f}", summary.fmt(r.recall_at_10_mean, r.recall_at_10_std),
                          f"{r.seconds_mean:.1f}")
        console.print(table)

    unlearning = summary.load(out, "unlearning")
    unlearning = unlearning[unlearning["trial_id"].isin(ok["trial_id"])]
    if not unlearning.empty:
        table = _table("Unlearning (mean±std over seeds; 'min retain' shows a collapse in any seed)",
                       ["setting", "selection", "f", "method", "n", "clean acc after", "success before",
                        "success after", "retain acc", "min retain", "s"])
        for _, r in summary.unlearning_summary(unlearning).iterrows():
            collapsed = r.retain_acc_after_min < summary.COLLAPSE_BELOW
            selection = r.selection if r.selection_kind == "oracle" else f"{r.selection} ({r.selection_kind})"
            table.add_row(_setting(r), escape(selection), f"{r.identified_fraction:.2f}", escape(r.method), str(r.n),
                          summary.fmt(r.clean_test_acc_after_mean, r.clean_test_acc_after_std),
                          summary.fmt(r.poison_success_before_mean, r.poison_success_before_std),
                          summary.fmt(r.poison_success_after_mean, r.poison_success_after_std),
                          summary.fmt(r.retain_acc_after_mean, r.retain_acc_after_std),
                          f"[red]{r.retain_acc_after_min:.3f} collapsed[/]" if collapsed
                          else f"{r.retain_acc_after_min:.3f}", f"{r.seconds_mean:.1f}")
        console.print(table)

    _print_warned(trials)
    failed = summary.failures(trials)
    if not failed.empty:
        console.print(f"[bold red]{len(failed)} failed trial(s)[/] (status 'failed' in the trials table):")
        for _, r in failed.iterrows():
            first_line = (r.error or "unknown error").strip().splitlines()[0]
            console.print(escape(f"  {r.trial_id} {r.poison_method} rate={r.poison_rate:g} seed={r.seed}: {first_line}"),
                          highlight=False)


def _print_warned(trials) -> None:
    """``N trial(s) warned:`` and each warning once, with how many trials raised it."""
    warned = summary.warned(trials)
    if warned.empty:
        return
    counts = Counter(line for text in warned["warnings"] for line in dict.fromkeys(text.splitlines()))
    console.print(f"[bold yellow]{len(warned)} trial(s) warned[/] (column 'warnings' in the trials table):")
    for line, n in counts.most_common():
        console.print(escape(f"  {n} trial(s): {line}"), highlight=False)


@app.command()
def report(
    out: str = typer.Argument(..., help="A sweep's output directory (or URI); it may still be running."),
    report_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the report "
                                              "(default: DIR/report; for a URI, ./<name>-report)."),
):
    """Write summary tables (CSV, Markdown), figures (PNG) and one self-contained report.html."""
    from poisonsweep.engine import api
    from poisonsweep.engine.report import RecordError

    try:
        with _damage_reported(out):
            written = api.report(out, report_dir)  # also removes the temporaries of killed reports
    except (RecordError, ConfigError) as error:
        _fail(str(error))
    for line in written.status.lines():
        console.print(escape(line), highlight=False)
    console.print(escape(f"{len(written.tables)} table files and {len(written.figures)} figures in "
                         f"{written.directory}"), highlight=False)
    console.print(escape(f"open {written.html}"), highlight=False)


@app.command()
def compact(out: str = typer.Argument(..., help="A sweep's output directory (or URI); it may still be running.")):
    """Merge each table's per-trial Parquet files into a few large ones (complete trials only; safe to rerun)."""
    from poisonsweep.engine.record import compact as compact_record

    try:
        results = compact_record(out)
    except (FileNotFoundError, ConfigError) as error:
        _fail(str(error))
    for done in results:
        if done.written:
            kept = f"; {done.kept} rewritten meanwhile, kept" if done.kept else ""
            console.print(f"{done.table}: {done.files_merged} trial files ({done.rows} rows) -> "
                          f"{', '.join(done.written)}; {done.removed} files removed{kept}", highlight=False)
        else:
            console.print(f"{done.table}: nothing new to compact", highlight=False)


@app.command("list")
def list_registered(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Also list the entries of this sweep "
                                          "config's plugins (its 'plugins:' key)."),
    plugin: List[str] = typer.Option([], "--plugin", "-p", help="Also list this plugin's entries: an import name "
                                     "or a path to a .py file or package folder. Repeatable."),
):
    """List the datasets, poisons, models, detectors and unlearning methods a config can name; a plugin's
    entries (installed entry points, --config's plugins, --plugin) say which plugin they come from."""
    from poisonsweep.engine.plugins import load_plugins, origin_of

    try:
        load_plugins(list(plugin))
        if config is not None:
            _config_plugins(config)
    except ConfigError as error:
        _fail(str(error))
    import poisonsweep.tasks.detect  # noqa: F401
    from poisonsweep.tasks.data import DATASETS
    from poisonsweep.tasks.detect.base import DETECTORS
    from poisonsweep.tasks.models import MODELS
    from poisonsweep.tasks.poisons import POISONS

    registries = [("data.name", DATASETS), ("poison.method", POISONS), ("model.name", MODELS),
                  ("detectors", DETECTORS)]
    try:
        from poisonsweep.tasks.unlearn import UNLEARNERS

        registries.append(("unlearn.methods", UNLEARNERS))
    except ImportError:
        pass
    for key, registry in registries:
        table = _table(key, ["name", "parameters (default)", "what it is"], left=3)
        for name in registry.names():
            entry = registry.get(name)
            defaults = entry.defaults()
            params = ", ".join(f"{k}={defaults.get(k, '…')!r}" for k in entry.constraints)
            origin = origin_of(entry.module)
            table.add_row(escape(name) + (f"\n[dim](plugin {escape(origin)})[/]" if origin else ""), escape(params),
                          escape(entry.help))
        console.print(table)


def _config_plugins(config: Path) -> None:
    """Import the plugins a sweep config names (paths relative to it), without checking the rest of it."""
    from poisonsweep.engine.config import ConfigErrors, read_yaml
    from poisonsweep.engine.plugins import load_plugins

    try:
        raw = read_yaml(config.read_text())
    except Exception as error:  # a missing file, bad YAML: the config cannot name plugins
        raise ConfigErrors([f"cannot read it: {error}"], str(config)) from None
    load_plugins((raw or {}).get("plugins") if isinstance(raw, dict) else None, config.parent)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
