"""What ``run`` and ``show`` print: the sweep's summary tables, fitted to the terminal's width.

Settings are grouped as ``report`` groups them; a table wider than the terminal is split into parts that
repeat the setting columns (``_print_fitted``), so no column is squeezed and no name is cut.
"""

from __future__ import annotations

from collections import Counter

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from poisonsweep.engine import summary
from poisonsweep.engine.text import PrintableTable, printable


def make_table(title: str, columns: list[str], left: int = 2, compact: bool = False) -> Table:
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
        table = make_table(name, keys + [metrics[i] for i in part], left=len(keys), compact=compact)
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


def print_summary(out: str, shown: Console) -> None:
    """The sweep's tables: trials per setting, detectors, unlearning, failures (mean±std over seeds).

    Rows are settings grouped as ``report`` groups them (every key the sweep varies, ``summary.setting_columns``),
    labelled by the swept keys' values only; a table wider than the terminal is split (``_print_fitted``).
    """
    import pandas as pd

    from poisonsweep.engine.report.tables import detection_table, unlearning_table
    from poisonsweep.engine.resume import version_note
    from poisonsweep.engine.record.read import read_plan

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
