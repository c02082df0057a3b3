"""``poisonsweep report``: tables (CSV, Markdown), figures (PNG) and one HTML page from a sweep's record.

Everything is read from the Parquet tables alone, so a report can be made while the sweep still
runs: only trials whose ``trials`` row exists are counted (a trial writes that row last), and the
report says how many trials are recorded, ok and failed, which planned ones are still missing
(when the run left ``<out>/sweep.json``, see :func:`engine.record.write.write_plan`) and which settings have
fewer seeds than others.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs

from poisonsweep.engine import summary
from poisonsweep.engine.explain import ATTACK_MARGIN, GLOSSARY, attack_not_taken
from poisonsweep.engine.report.galleries import MAX_SETTINGS, sample_figures, unlearning_example_figures
from poisonsweep.engine.report.figures import (against, figure_accuracy, figure_auroc, figure_found_vs_checked,
                                               figure_unlearning, swept_keys)
from poisonsweep.engine.report.folder import write_report_folder
from poisonsweep.engine.report.run import resolved_config, run_overview
from poisonsweep.engine.report.status import RecordError, RecordStatus, _setting_columns, record_status
from poisonsweep.engine.report.tables import (
    INFLUENCE_SHOWN, TOP_HARMFUL, _display_influence, _display_setting, _display_stats, _display_unlearning,
    _setting_stem, _setting_title, _slug, detection_table, found_vs_checked_table, influence_table, markdown_table,
    unlearning_table,
)
from poisonsweep.engine.record.read import read_plan
from poisonsweep.engine.record.tables import PLAN_FILE
from poisonsweep.engine.storage import filesystem, masked, uri_name
from poisonsweep.engine.text import markdown_text

# ---------------------------------------------------------------------------------------------
# the report


@dataclass
class Report:
    """What ``write_report`` wrote."""

    directory: Path
    html: Path
    markdown: Path
    tables: list[Path]
    figures: list[Path]
    status: RecordStatus


def _write_table(frame: pd.DataFrame, directory: Path, name: str, shown: pd.DataFrame, written: list[Path]) -> str:
    frame.to_csv(directory / f"{name}.csv", index=False)
    text = markdown_table(shown)
    (directory / f"{name}.md").write_text(text + "\n")
    written += [directory / f"{name}.csv", directory / f"{name}.md"]
    return text


def _check_record(out: str, plan: pd.DataFrame | None) -> None:
    fs, root = filesystem(out)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise RecordError(f"{masked(out)!r} does not exist")
    if plan is None and fs.get_file_info(f"{root}/trials").type != pafs.FileType.Directory:
        raise RecordError(f"{masked(out)!r} holds no trials table and no {PLAN_FILE}: is it a sweep's output directory?")


def default_report_dir(out: str) -> Path:
    """``<out>/report`` for a local sweep; ``./<name>-report`` for a URI."""
    if "://" in out:
        return Path(f"{uri_name(out)}-report")
    return Path(out) / "report"


def write_report(out: str, directory: str | Path | None = None) -> Report:
    """Write the tables, figures, ``report.md`` and ``report.html`` of the sweep recorded in ``out``.

    ``directory`` must be new, empty or hold an earlier report of ours, outside the record's own folders
    (:mod:`engine.report.folder`; else ``ReportFolderError``, before anything is written). The report is
    built in a hidden folder inside it and its files moved into place at the end, so a crash never leaves
    a half-written file (an earlier report stays as it was). Config text is shown as written: every ``$``
    of user text in a figure is escaped (:func:`engine.report.figures.literal`), while matplotlib's own
    tick labels (``10^{-1}`` on a log axis) are drawn as it means them.

    Parameters
    ----------
    out : str
        The sweep's output directory or URI.
    directory : str or Path, optional
        Where to write; default :func:`default_report_dir`.

    Returns
    -------
    Report
        The paths written and the record's status.
    """
    plan = read_plan(out)
    _check_record(out, plan)
    final = Path(directory) if directory is not None else default_report_dir(out)

    report = write_report_folder(final, out, lambda staging: _write_report(out, plan, staging))
    moved = lambda path: final / path.relative_to(report.directory)  # noqa: E731
    return Report(final, moved(report.html), moved(report.markdown), [moved(p) for p in report.tables],
                  [moved(p) for p in report.figures], report.status)


def _write_report(out: str, plan: pd.DataFrame | None, directory: Path) -> Report:
    directory.mkdir(parents=True, exist_ok=True)
    trials = summary.load(out, "trials")
    if "plugins" in trials:  # a plugin poison's images are rebuilt by its own code, where its file is here
        from poisonsweep.engine.plugins import load_recorded

        load_recorded(trials["plugins"].dropna().unique())
    detection_rows, unlearning_rows = summary.load(out, "detections"), summary.load(out, "unlearning")
    setting = _setting_columns(trials, plan)
    status = record_status(trials, plan, set(detection_rows["trial_id"]) | set(unlearning_rows["trial_id"]), setting)
    ok = trials[trials["status"] == "ok"]
    # what the summary figures plot against: the setting columns the plan (or the record) varies
    swept = swept_keys(pd.concat([trials] + ([plan] if plan is not None else []), ignore_index=True), setting)
    tables: list[Path] = []
    figures: list[Path] = []
    sections: list[tuple[str, str, object]] = []  # (heading, kind, payload): kind "md" table text or "png" path

    def table(name: str, heading: str, frame: pd.DataFrame, shown: pd.DataFrame, note: str = "") -> None:
        text = _write_table(frame, directory, name, shown, tables)
        sections.append((heading, "table", (note, shown, text)))

    def figure(heading: str, path: Path) -> None:
        figures.append(path)
        sections.append((heading, "png", path))

    if not ok.empty:
        per_setting = summary.trial_summary(ok, setting)
        table("trials", "Trials per setting", per_setting,
              _display_stats(per_setting, setting, [], ["clean_test_acc", "poison_success", "n_poisoned"]))
        detections = detection_table(trials, detection_rows, setting)
        if not detections.empty:
            table("detections", "Detectors", detections,
                  _display_stats(detections, setting, ["detector"], summary.DETECTION_METRICS
                                 + ["clean_test_acc", "poison_success"]),
                  "Mean ± std over seeds; n = seeds. Clean accuracy and poison success are the setting's.")
            figure(f"Detection AUROC {against(detections, swept)}",
                   figure_auroc(detections, setting, swept, directory / "auroc.png"))
        figure(f"Clean accuracy and poison success {against(per_setting, swept)}",
               figure_accuracy(per_setting, setting, swept, directory / "accuracy.png"))
        _sample_sections(out, trials, setting, directory, table, figure)
        curves = found_vs_checked_table(out, trials, setting)
        if not curves.empty:
            curves.to_csv(directory / "found_vs_checked.csv", index=False)
            tables.append(directory / "found_vs_checked.csv")
            defined = curves[curves["n"] > 0]  # a setting without poisons has nothing to find
            for (data, poison), part in defined.groupby(["data_name", "poison_method"]):
                path = directory / f"found_vs_checked_{_slug(data)}_{_slug(poison)}.png"
                figure(f"Poisons found vs data checked: {data} · {poison}",
                       figure_found_vs_checked(part, setting, f"{data} · {poison}", path))
        unlearning = unlearning_table(trials, unlearning_rows, setting)
        if not unlearning.empty:
            table("unlearning", "Unlearning", unlearning, _display_unlearning(unlearning, setting),
                  "Mean ± std over seeds; 'min retain acc' is the worst seed, so a collapse stays visible."
                  + _not_taken_note(ok, unlearning, setting))
            for key, part in unlearning.groupby(setting, dropna=False):
                title = _setting_title(key, setting)
                name = "unlearning_" + _setting_stem(key)
                figure(f"Unlearning: {title}", figure_unlearning(part, title, directory / f"{name}.png"))
            for heading, path in unlearning_example_figures(out, trials, unlearning_rows, setting, directory):
                figure(heading, path)
        influence = influence_table(out, trials, summary.load(out, "influence"), setting)
        if not influence.empty:
            shown = _display_influence(influence, setting)
            note = (f"The {TOP_HARMFUL} training samples whose removal would lower the test point's loss most "
                    "(influence functions); * marks a poison.")
            if len(shown) > INFLUENCE_SHOWN:
                note += f" The first {INFLUENCE_SHOWN} of {len(shown)} test points; all are in influence_top_harmful.csv."
            table("influence_top_harmful", "Most harmful training samples per test point", influence,
                  shown.head(INFLUENCE_SHOWN), note)
    header = _run_tables(trials)
    markdown = directory / "report.md"
    markdown.write_text(_markdown(out, status, setting, sections, header))
    page = directory / "report.html"
    page.write_text(_html(out, status, setting, sections, header))
    return Report(directory, page, markdown, tables, figures, status)


def _not_taken_note(ok: pd.DataFrame, unlearning: pd.DataFrame, setting: list[str]) -> str:
    """A sentence naming the unlearned settings whose attack did not take (:func:`engine.explain.attack_not_taken`)."""
    unlearned = set(map(str, unlearning[setting].drop_duplicates().itertuples(index=False, name=None)))
    named = []
    for key, group in ok.groupby(setting, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        success, classes = group["poison_success"].mean(), group["num_classes"].max()
        if str(key) in unlearned and attack_not_taken(success, classes):
            named.append(f"{_setting_title(key, setting)} (poison success {success:.3f}, chance 1/{classes:.0f})")
    if not named:
        return ""
    return (f" Attack did not take (poison success at most 1/K + {ATTACK_MARGIN:g}, see the glossary) in: "
            + "; ".join(named) + ". Their unlearning rows are not meaningful: there was no attack to repair.")


def _run_tables(trials: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """What was run (sweep, code, machines, time) and the resolved config, for the top of the page."""
    if trials.empty:
        return []
    return [("What was run", run_overview(trials)), ("Sweep config (as resolved)", resolved_config(trials))]


def _sample_sections(out: str, trials: pd.DataFrame, setting: list[str], directory: Path, table, figure) -> None:
    """Score histograms and image galleries of one trial per setting (engine.report.galleries)."""
    shown, figures = sample_figures(out, trials, setting, directory)
    if shown.empty:
        return
    note = ("Histograms and galleries show one trial per setting, the ok trial with the lowest seed (not "
            f"pooled over seeds), for the first {MAX_SETTINGS} settings. Images are rebuilt from the trial's "
            "recorded config and checked against its recorded labels.")
    table("samples_shown", "Samples shown: trials and image check", shown,
          pd.concat([_display_setting(shown, setting), shown[["seed", "trial_id", "images", "check"]]], axis=1), note)
    for heading, path in figures:
        figure(heading, path)


def _status_tables(status: RecordStatus, setting: list[str]) -> list[tuple[str, pd.DataFrame]]:
    shown = []
    if not status.uneven.empty:
        shown.append(("Seeds per setting (settings short of seeds)",
                      pd.concat([_display_setting(status.uneven, setting),
                                 status.uneven[["ok_seeds", "expected", "missing_seeds"]]], axis=1)))
    if not status.missing.empty:
        missing = pd.concat([_display_setting(status.missing, setting), status.missing[["seed"]]], axis=1)
        shown.append(("Planned trials not yet recorded", missing))
    if not status.failures.empty:
        failed = status.failures.assign(error=status.failures["error"].fillna("unknown error").map(
            lambda e: e.strip().splitlines()[0] if e.strip() else "unknown error"))
        shown.append(("Failed trials", failed))
    if not status.warned.empty:
        shown.append(("Trials that warned", status.warned))
    return shown


def _markdown(out: str, status: RecordStatus, setting: list[str], sections, header=()) -> str:
    md = markdown_text  # headings, notes and lines quote labels and paths: inert text
    parts = [f"# Sweep report: {md(masked(out))}", "", *[f"- {md(line)}" for line in status.lines()], ""]
    for heading, frame in [*header, *_status_tables(status, setting)]:
        parts += [f"## {md(heading)}", "", markdown_table(frame), ""]
    if not sections:
        parts += ["No trial has finished ok yet: no tables or figures.", ""]
    for heading, kind, payload in sections:
        parts += [f"## {md(heading)}", ""]
        if kind == "png":
            parts += [f"![{md(heading).replace('[', '(').replace(']', ')')}]({payload.name})", ""]
        else:
            note, _, text = payload
            parts += ([md(note), ""] if note else []) + [text, ""]
    parts += ["## Glossary", "", GLOSSARY_NOTE, ""] + [f"- **{title}**: {text}" for title, text in GLOSSARY.values()]
    return "\n".join(parts) + "\n"


GLOSSARY_NOTE = "What the columns mean (also `poisonsweep explain METRIC`)."


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f2f2f2;text-align:left}td{font-variant-numeric:tabular-nums}img{max-width:100%}
.note{color:#555}"""


def _html(out: str, status: RecordStatus, setting: list[str], sections, header=()) -> str:
    e = html.escape
    body = [f"<h1>Sweep report: {e(masked(out))}</h1>", "<ul>" + "".join(f"<li>{e(line)}</li>" for line in status.lines())
            + "</ul>"]
    for heading, frame in [*header, *_status_tables(status, setting)]:
        body += [f"<h2>{e(heading)}</h2>", frame.to_html(index=False, escape=True, border=0)]
    if not sections:
        body.append("<p>No trial has finished ok yet: no tables or figures.</p>")
    for heading, kind, payload in sections:
        body.append(f"<h2>{e(heading)}</h2>")
        if kind == "png":
            encoded = base64.b64encode(payload.read_bytes()).decode()
            body.append(f'<img alt="{e(heading)}" src="data:image/png;base64,{encoded}">')
        else:
            note, shown, _ = payload
            if note:
                body.append(f'<p class="note">{e(note)}</p>')
            body.append(shown.to_html(index=False, escape=True, border=0))
    body += ["<h2 id='glossary'>Glossary</h2>", f"<p class='note'>{e(GLOSSARY_NOTE)}</p>", "<dl>"]
    body += [f"<dt><b>{e(title)}</b></dt><dd>{e(text)}</dd>" for title, text in GLOSSARY.values()]
    body.append("</dl>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Sweep report: {e(masked(out))}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
