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
from poisonsweep.engine.text import PrintableConsole, PrintableTable, printable
from poisonsweep.tasks.registry import ConfigError
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

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


def _table(title: str, columns: list[str], left: int = 2, compact: bool = False) -> Table:
    """A table with ``left`` text columns, then numbers; ``compact``: no box, one space between columns."""
    style = dict(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0)) if compact else dict(pad_edge=False)
    table = PrintableTable(title=title, title_justify="left", header_style="bold", **style)
    for i, column in enumerate(columns):
        # text columns fold (never cut) only if even they alone exceed the width; numbers never wrap
        table.add_column(column, justify="left" if i < left else "right", no_wrap=i >= left, overflow="fold")
    return table


def _print_fitted(shown: Console, title: str, keys: list[str], metrics: list[str], rows: list[list[str]]) -> None:
    """One table of ``keys`` + ``metrics`` columns; where it is wider than the terminal, the compact layout,
    split into tables that each repeat the key columns with as many metric columns as fit: no column is
    squeezed and no name cut."""
    def build(part: list[int], name: str, compact: bool, rows: list[list[str]] = rows) -> Table:
        table = _table(name, keys + [metrics[i] for i in part], left=len(keys), compact=compact)
        for row in rows:
            table.add_row(*row[:len(keys)], *[row[len(keys) + i] for i in part])
        return table

    # a table is as wide as one row of each column's widest cell: measure that row, not all of them
    widest = [[max(column, key=_cell_width) for column in zip(*rows)]] if rows else []

    def fits(part: list[int], compact: bool) -> bool:
        table = build(part, title, compact, widest)
        return Measurement.get(shown, shown.options.update_width(10**6), table).maximum <= shown.width  # unsqueezed

    everything = list(range(len(metrics)))
    if fits(everything, compact=False):
        shown.print(build(everything, title, compact=False))
        return
    parts: list[list[int]] = [[]]
    for i in everything:
        if parts[-1] and not fits(parts[-1] + [i], compact=True):
            parts.append([])
        parts[-1].append(i)
    for n, part in enumerate(parts, 1):
        shown.print(build(part, title if len(parts) == 1 else f"{title}, part {n} of {len(parts)}", compact=True))


def _cell_width(cell: str) -> int:
    """The columns a cell takes as shown (made printable; markup, as in ``[red]``, takes none)."""
    text = printable(cell)
    return Text.from_markup(text).cell_len if "[" in text else cell_len(text)


def _setting_labels(shown: Console, everything, swept: list[str], settings) -> tuple[list[str], callable]:
    """The key columns that label a setting in the summary tables, and a function giving each row of a
    summary frame its cells: the swept keys' short values (``summary.short_values`` over ``everything``, so
    a value reads alike in every table), one column per key. Where those columns would take more than
    half the terminal, the settings are numbered instead: a legend of ``settings`` (the summary frame of
    every setting shown) is printed first, and the tables show ``#k``."""
    if not swept:
        return [], lambda frame: [[] for _ in range(len(frame))]
    short = {}
    for column in swept:
        values = everything[column].drop_duplicates()
        short[column] = dict(zip(map(_value_key, values), summary.short_values(values)))

    def cells(frame) -> list[list[str]]:
        return [[short[c][_value_key(v)] for c, v in zip(swept, row)] for row in zip(*[frame[c] for c in swept])]

    headers = [summary.KEY_HEADERS.get(c, summary.config_key(c)) for c in swept]
    rows = list(dict.fromkeys(map(tuple, cells(settings))))
    widths = [max(map(_cell_width, [header, *column])) for header, column in zip(headers, zip(*rows))]
    if sum(widths) + len(widths) - 1 <= shown.width // 2:
        return headers, cells
    number = {row: f"#{k}" for k, row in enumerate(rows, 1)}
    _print_fitted(shown, "Settings (the values of the keys this sweep varies)", ["setting"], headers,
                  [[number[row], *row] for row in rows])
    return ["setting"], lambda frame: [[number[tuple(row)]] for row in cells(frame)]


def _value_key(value):
    """A config value as a dict key: every unset value (None, NaN) alike."""
    return None if value is None or (isinstance(value, float) and value != value) else value


def _print_settings_line(shown: Console, trials, swept: list[str]) -> None:
    """Which keys tell the settings apart (the rows' labels), and the values every trial shares."""
    same = ", ".join(f"{summary.config_key(c)} {summary.short_values(trials[c]).iloc[0]}"
                     for c in summary.SETTING if c not in swept)
    text = (f"settings differ in {', '.join(summary.config_key(c) for c in swept)} (mean±std pools seeds only)"
            if swept else "one setting")
    shown.print(escape(text + (f"; every trial: {same}" if same else "")), highlight=False)


def print_summary(out: str, shown: Console | None = None) -> None:
    """The sweep's tables: trials per setting, detectors, unlearning, failures (mean±std over seeds).

    Rows are settings grouped as ``report`` groups them (every key the sweep varies, ``summary.setting_columns``),
    labelled by the swept keys' values only; a table wider than the terminal is split (``_print_fitted``).
    """
    import pandas as pd

    from poisonsweep.engine.report.tables import detection_table, unlearning_table
    from poisonsweep.engine.resume import version_note
    from poisonsweep.engine.sink import read_plan

    shown = shown or console
    trials = summary.load(out, "trials")
    if trials.empty:
        shown.print("no trials recorded yet")
        return
    ok = trials[trials["status"] == "ok"]
    if note := version_note(ok["code_version"]):
        shown.print(f"[bold yellow]warning:[/] {escape(note)}", highlight=False)
    plan = read_plan(out)
    everything = trials if plan is None else pd.concat([trials, plan], ignore_index=True)
    setting = summary.setting_columns(everything)
    swept = summary.swept_columns(everything, setting)
    _print_settings_line(shown, trials, swept)
    per_setting = summary.trial_summary(trials, setting)
    keys, labels_of = _setting_labels(shown, everything, swept, per_setting)

    if not per_setting.empty:
        rows = [labels + [str(r.n), f"{r.n_poisoned_mean:.0f}", summary.fmt(r.clean_test_acc_mean, r.clean_test_acc_std),
                          summary.fmt(r.poison_success_mean, r.poison_success_std), f"{r.train_seconds_mean:.1f}"]
                for labels, r in zip(labels_of(per_setting), per_setting.itertuples())]
        _print_fitted(shown, "Trials (mean±std over seeds)", keys,
                      ["n", "poisoned", "clean acc", "poison success", "train s"], rows)

    detections = detection_table(trials, summary.load(out, "detections"), setting)
    if not detections.empty:
        rows = [labels + [escape(r.detector), str(r.n), summary.fmt(r.auroc_mean, r.auroc_std),
                          summary.fmt(r.precision_at_n_mean, r.precision_at_n_std),
                          summary.fmt(r.auprc_mean, r.auprc_std), summary.fmt(r.recall_at_10_mean, r.recall_at_10_std),
                          summary.fmt(r.f1_mean, r.f1_std), f"{r.n_flagged_mean:.0f}", f"{r.seconds_mean:.1f}"]
                for labels, r in zip(labels_of(detections), detections.itertuples())]
        _print_fitted(shown, "Detectors (mean±std over seeds)", keys + ["detector", "n"],
                      ["AUROC", "P@n", "AUPRC", "recall@10%", "F1", "flagged", "s"], rows)

    unlearning = unlearning_table(trials, summary.load(out, "unlearning"), setting)
    if not unlearning.empty:
        rows = []
        for labels, r in zip(labels_of(unlearning), unlearning.itertuples()):
            collapsed = r.retain_acc_after_min < summary.COLLAPSE_BELOW
            selection = r.selection if r.selection_kind == "oracle" else f"{r.selection} ({r.selection_kind})"
            rows.append(labels + [escape(selection), f"{r.identified_fraction:.2f}", escape(r.method), str(r.n),
                                  summary.fmt(r.clean_test_acc_after_mean, r.clean_test_acc_after_std),
                                  summary.fmt(r.poison_success_before_mean, r.poison_success_before_std),
                                  summary.fmt(r.poison_success_after_mean, r.poison_success_after_std),
                                  summary.fmt(r.retain_acc_after_mean, r.retain_acc_after_std),
                                  f"[red]{r.retain_acc_after_min:.3f} collapsed[/]" if collapsed
                                  else f"{r.retain_acc_after_min:.3f}", f"{r.seconds_mean:.1f}"])
        _print_fitted(shown, "Unlearning (mean±std over seeds; 'min retain' shows a collapse in any seed)",
                      keys + ["selection", "f", "method", "n"],
                      ["clean acc after", "success before", "success after", "retain acc", "min retain", "s"], rows)

    _print_warned(trials, shown)
    failed = summary.failures(trials)
    if not failed.empty:
        shown.print(f"[bold red]{len(failed)} failed trial(s)[/] (status 'failed' in the trials table):")
        for _, r in failed.iterrows():
            first_line = (r.error or "unknown error").strip().splitlines()[0]
            shown.print(escape(printable(f"  {r.trial_id} {r.poison_method} rate={r.poison_rate:g} seed={r.seed}: "
                                         f"{first_line}")), highlight=False)


def _print_warned(trials, shown: Console) -> None:
    """``N trial(s) warned:`` and each warning once, with how many trials raised it."""
    warned = summary.warned(trials)
    if warned.empty:
        return
    counts = Counter(line for text in warned["warnings"] for line in dict.fromkeys(text.splitlines()))
    shown.print(f"[bold yellow]{len(warned)} trial(s) warned[/] (column 'warnings' in the trials table):")
    for line, n in counts.most_common():
        shown.print(escape(printable(f"  {n} trial(s): {line}")), highlight=False)


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
            table = _table(f"{title if title != 'Trials' else name} (mean±std over seeds; Δ ± standard error)",
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
        table = _table(key, ["name", "parameters (default)", "what it is"], left=3)
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
        table = _table(f"first {len(planned.first)} of {planned.n_trials:,} trials", list(planned.first[0]),
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
