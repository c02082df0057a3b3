"""The ``poisonsweep`` command line."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from poisonsweep.engine import screen, summary
from poisonsweep.engine.storage import masked
from poisonsweep.engine.text import PrintableConsole
from poisonsweep.tasks.registry import ConfigError
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Sweep label-poisoning experiments: poison -> train -> detect -> unlearn -> Parquet.")
# piped output (logs, CI) gets wide tables instead of rich's 80-column default
# every string it prints is made printable (engine.text): user text never drives the terminal
console = PrintableConsole() if sys.stdout.isatty() else PrintableConsole(width=int(os.environ.get("COLUMNS", 150)))


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
    mlflow: Optional[str] = typer.Option(None, "--mlflow", help="MLflow tracking URI (http://..., file:/path with "
                                         "MLFLOW_ALLOW_FILE_STORE=true, databricks): one run per trial, its config as "
                                         "params and its metrics; needs pip install \"poisonsweep[mlflow]\"."),
):
    """Run a sweep: every trial not yet recorded in the output directory, then print the summary."""
    from poisonsweep.engine import api
    from poisonsweep.engine.progress import SweepProgress

    try:
        outcome = api.run(config, out=out, overrides=set_, address=address, data_root=data_root, rerun=rerun,
                          verbose=verbose, reuse_actors=reuse_actors, mlflow=mlflow,
                          echo=lambda note: console.print(escape(masked(note)), highlight=False),
                          on_progress=SweepProgress(console=console),
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
    if outcome.tracked:
        console.print(escape(f"{outcome.tracked} trial(s) logged to MLflow at {masked(mlflow)}"), highlight=False)
    if outcome.ray_warnings:
        console.print(escape(f"{outcome.ray_warnings} Ray warning(s) kept off the screen: "
                             + (f"{masked(outcome.ray_log)}; " if outcome.ray_log else "") + "--verbose shows them"),
                      highlight=False)
    if outcome.output_error:  # the record may not even be readable now: no summary
        console.print(f"[bold red]error:[/] {escape(masked(outcome.output_error))}; {outcome.not_recorded} trial(s) "
                      "not recorded: they run again with the same command once the output can be written",
                      highlight=False)
        raise typer.Exit(code=1)
    screen.print_summary(outcome.out, console)
    if outcome.interrupted:
        console.print(f"[bold yellow]interrupted:[/] {outcome.interrupted} trial(s) not finished. Run the same "
                      "command again to resume: finished trials are kept and skipped.", highlight=False)
        raise typer.Exit(code=130)


@app.command()
def show(out: str = typer.Argument(..., help="A sweep's output directory (or URI).")):
    """Print a sweep's summary from its Parquet tables alone."""
    from poisonsweep.engine.storage import filesystem

    fs, root = filesystem(out)
    from pyarrow.fs import FileType

    if fs.get_file_info(f"{root}/trials").type != FileType.Directory:
        _fail(f"{out!r} holds no trials table: is it a sweep's output directory?")  # _fail masks it
    with _damage_reported(out):
        screen.print_summary(out, console)


@app.command()
def repair(out: str = typer.Argument(..., help="A sweep's output directory (or URI).")):
    """Move every file of the record that is not readable Parquet of its table's schema to DIR/_quarantine/
    (the next `run` recomputes its trial), and remove the temporaries of killed commands."""
    from poisonsweep.engine.api import repair as repair_record
    from poisonsweep.engine.record.repair import QUARANTINE_DIR
    from poisonsweep.engine.record.write import refuse_links
    from poisonsweep.engine.storage import filesystem

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
    from poisonsweep.engine.record.repair import DamagedFile, damage

    for path, problem in damage(out).items():
        console.print(f"[bold yellow]warning:[/] {escape(str(DamagedFile(path, out, problem)))}", highlight=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamagedFile)
        yield


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


@app.command()
def compare(
    outs: List[str] = typer.Argument(..., help="Two or more sweep output directories (or URIs); the first is the "
                                     "baseline."),
    metric: str = typer.Option("auroc", "--metric", "-m", help="Detection metric: auroc, precision_at_n, auprc, f1, "
                               "recall_at_10, n_flagged."),
):
    """The same settings of several sweeps side by side: mean±std over seeds, and each later sweep's
    difference from the first (± its standard error over seeds)."""
    from poisonsweep.engine.compare import compare as compare_records

    try:
        with _damage_reported_all(outs):
            result = compare_records(outs, metric)
    except ConfigError as error:
        _fail(str(error))
    for label, out in zip(result.labels, result.records):
        console.print(escape(f"{label}: {masked(out)}"), highlight=False)
    for line in result.differences:
        console.print(escape(f"  differ in {line}"), highlight=False)
    _print_comparison(result)


def _print_comparison(result) -> None:
    from poisonsweep.engine.compare import TRIAL_METRICS, fmt_delta, setting_labels, varying_columns
    from poisonsweep.engine.report.tables import METRIC_NAMES

    later = result.labels[1:]
    for title, frame, keys, metrics in (
            ("Trials", result.trials, [], TRIAL_METRICS),
            (f"Detectors: {METRIC_NAMES.get(result.metric, result.metric)}", result.detections, ["detector"],
             [result.metric])):
        for metric in metrics:
            name = METRIC_NAMES.get(metric, metric)
            table = screen.make_table(f"{title if title != 'Trials' else name} (mean±std over seeds; Δ ± standard error)",
                           [f"setting ({' '.join(varying_columns(frame, result.setting))})", *keys, *result.labels,
                            *[f"Δ {b}−{result.labels[0]}" for b in later]],
                           left=1 + len(keys))
            labels = setting_labels(frame, result.setting)
            for label, (_, r) in zip(labels, frame.iterrows()):
                cells = [summary.fmt(r[f"{a}_{metric}_mean"], r[f"{a}_{metric}_std"]) for a in result.labels]
                deltas = [fmt_delta(r[f"delta_{b}_{metric}"], r[f"se_{b}_{metric}"]) for b in later]
                table.add_row(escape(label), *[escape(str(r[k])) for k in keys], *cells, *deltas)
            console.print(table)


@contextlib.contextmanager
def _damage_reported_all(outs: list[str]):
    with contextlib.ExitStack() as stack:
        for out in outs:
            stack.enter_context(_damage_reported(out))
        yield


@app.command()
def export(
    out: str = typer.Argument(..., help="A sweep's output directory (or URI)."),
    format_: str = typer.Option("latex", "--format", "-f", help="latex (booktabs tabular), csv or md."),
    metric: str = typer.Option("auroc", "--metric", "-m", help="Detection metric: auroc, precision_at_n, auprc, f1, "
                               "recall_at_10, n_flagged."),
    to: Optional[Path] = typer.Option(None, "--to", help="Write to this new file (never replaces one); default: "
                                      "print."),
):
    """A detector x setting table of one metric (mean ± std over seeds), ready for a paper."""
    from poisonsweep.engine.export import export as export_table

    try:
        with _damage_reported(out):
            text = export_table(out, format_, metric)
    except ConfigError as error:
        _fail(str(error))
    if to is None:
        sys.stdout.write(text)
        return
    try:
        fd = os.open(to, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as error:
        _fail(f"cannot create {str(to)!r}: {error.strerror or error} (export never replaces a file)")
    with os.fdopen(fd, "w", encoding="utf-8") as stream:
        stream.write(text)
    console.print(escape(f"wrote {to}"), highlight=False)


@app.command("list")
def list_registered(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Also list the entries of this sweep "
                                          "config's plugins (its 'plugins:' key)."),
    plugin: List[str] = typer.Option([], "--plugin", "-p", help="Also list this plugin's entries: an import name "
                                     "or a path to a .py file or package folder. Repeatable."),
):
    """List the datasets, poisons, models, detectors and unlearning methods a config can name; a plugin's
    entries (installed entry points, --config's plugins, --plugin) say which plugin they come from."""
    from poisonsweep.engine.plugins import config_plugins, load_plugins, origin_of

    try:
        load_plugins(list(plugin))
        if config is not None:
            config_plugins(config)
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
        table = screen.make_table(key, ["name", "parameters (default)", "what it is"], left=3)
        for name in registry.names():
            entry = registry.get(name)
            defaults = entry.defaults()
            params = ", ".join(f"{k}={defaults.get(k, '…')!r}" for k in entry.constraints)
            origin = origin_of(entry.module)
            table.add_row(escape(name) + (f"\n[dim](plugin {escape(origin)})[/]" if origin else ""), escape(params),
                          escape(entry.help))
        console.print(table)


@app.command()
def plan(
    config: Path = typer.Argument(..., help="The sweep's YAML file, e.g. configs/quickstart.yaml."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a key, as for run. Repeatable."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output directory or URI, as for run."),
    trials: int = typer.Option(5, "--trials", "-n", help="How many of the first trials to list."),
):
    """Preview a sweep without running it: trial count, grid axes, the first trials, and a warning for each
    --set that removed or narrowed an axis. Checks the config as run does; starts no Ray, loads no data."""
    from poisonsweep.engine import api
    from poisonsweep.engine.plan import compact

    try:
        planned = api.plan(config, set_, out=out, n=trials)
    except ConfigError as error:
        _fail(str(error))
    for line in planned.lines():
        warning = line.startswith("warning: ")
        console.print(("[bold yellow]warning:[/] " + escape(line[len("warning: "):])) if warning else escape(masked(line)),
                      highlight=False)
    if planned.first:
        table = screen.make_table(f"first {len(planned.first)} of {planned.n_trials:,} trials", list(planned.first[0]),
                       left=len(planned.first[0]))
        for row in planned.first:
            table.add_row(*(escape(compact(value)) for value in row.values()))
        console.print(table)


@app.command()
def explain(metric: Optional[str] = typer.Argument(None, help="A column or figure name, e.g. recall_at_10, P@n, "
                                                   "f, identified; leave out for the whole glossary.")):
    """What a metric of the summary and the report means, and how to read it (the report's glossary)."""
    from poisonsweep.engine import api

    try:
        console.print(escape(api.explain(metric)), highlight=False)
    except ConfigError as error:
        _fail(str(error))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
