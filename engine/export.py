"""A detector x setting table of one metric, ready for a paper (``poisonsweep export DIR --format latex|csv|md``).

Rows are detectors, columns the sweep's settings (grouped as the report groups them, named by the swept
values only); a cell is the mean ± std over seeds. LaTeX uses booktabs rules and escapes every name;
the best mean of each column is bold where higher is better. CSV keeps numbers (mean, std and n columns
per setting), for a spreadsheet or a plotting script.
"""

from __future__ import annotations

import io
import math

import pandas as pd

from poisonsweep.engine import summary
from poisonsweep.engine.compare import METRICS, setting_labels, varying_columns
from poisonsweep.engine.report.tables import METRIC_NAMES, detection_table
from poisonsweep.tasks.registry import ConfigError

FORMATS = ("latex", "csv", "md")
HIGHER_IS_BETTER = {"auroc", "precision_at_n", "auprc", "f1", "recall_at_10"}
# LaTeX's special characters in text mode, each as the command that prints it
_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def latex_escape(text: str) -> str:
    """``text`` as LaTeX prints it literally (one pass, so an escape is never escaped again)."""
    return "".join(_LATEX.get(char, char) for char in str(text))


def detector_pivot(out: str, metric: str = "auroc") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Mean, std and n over seeds of ``metric``: detectors as rows, setting labels as columns, in the
    record's setting order; the columns' name (``columns.name``) says which keys the labels show."""
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    trials = summary.load(out, "trials")
    ok = trials[trials["status"] == "ok"] if not trials.empty else trials
    if ok.empty:
        raise ConfigError(f"{out!r} holds no ok trials: is it a sweep's output directory?")
    setting = summary.setting_columns(ok)
    table = detection_table(ok, summary.load(out, "detections"), setting)
    if table.empty:
        raise ConfigError(f"{out!r} holds no detections of ok trials")
    settings = table[setting].drop_duplicates().reset_index(drop=True)
    names = dict(zip(map(tuple, settings.astype(str).values), setting_labels(settings, setting)))
    table["column"] = [names[key] for key in map(tuple, table[setting].astype(str).values)]
    columns = list(dict.fromkeys(names.values()))
    detectors = list(dict.fromkeys(table["detector"]))

    def pivot(value: str) -> pd.DataFrame:
        frame = table.pivot_table(index="detector", columns="column", values=value, aggfunc="first", dropna=False)
        frame = frame.reindex(index=detectors, columns=columns)
        frame.columns.name = " ".join(varying_columns(settings, setting))
        return frame

    return pivot(f"{metric}_mean"), pivot(f"{metric}_std"), pivot("n")


def _cell(mean: float, std: float, count: bool) -> str:
    return summary.fmt(mean, std, digits=0 if count else 3, sep=" ± ")


def _best(means: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Where each column's best mean is (all False for a metric without a better direction)."""
    if metric not in HIGHER_IS_BETTER:
        return means.notna() & False
    return means.eq(means.max(axis=0), axis=1) & means.notna()


def to_latex(means: pd.DataFrame, stds: pd.DataFrame, metric: str, caption: str) -> str:
    count = metric in {"n_flagged"}
    best = _best(means, metric)
    lines = [f"% {caption}", r"% needs \usepackage{booktabs}",
             r"\begin{tabular}{l" + "r" * len(means.columns) + "}", r"\toprule",
             " & ".join(["Detector"] + [latex_escape(c) for c in means.columns]) + r" \\", r"\midrule"]
    for detector in means.index:
        cells = []
        for column in means.columns:
            mean, std = means.at[detector, column], stds.at[detector, column]
            text = "--" if pd.isna(mean) else "$" + _cell(mean, std, count).replace("±", r"\pm") + "$"
            cells.append(rf"$\mathbf{{{text[1:-1]}}}$" if best.at[detector, column] else text)
        lines.append(" & ".join([latex_escape(detector)] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_markdown(means: pd.DataFrame, stds: pd.DataFrame, metric: str, caption: str) -> str:
    count = metric in {"n_flagged"}
    best = _best(means, metric)

    def cell(text: str) -> str:
        return str(text).replace("|", r"\|").replace("\n", " ")

    lines = [f"{caption}", "", "| " + " | ".join(["detector"] + [cell(c) for c in means.columns]) + " |",
             "|" + "---|" + "---:|" * len(means.columns)]
    for detector in means.index:
        cells = [_cell(means.at[detector, c], stds.at[detector, c], count) for c in means.columns]
        cells = [f"**{text}**" if best.at[detector, c] else text for text, c in zip(cells, means.columns)]
        lines.append("| " + " | ".join([cell(detector)] + cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(means: pd.DataFrame, stds: pd.DataFrame, counts: pd.DataFrame) -> str:
    frame = pd.DataFrame(index=means.index)
    for column in means.columns:
        frame[f"{column} mean"] = means[column]
        frame[f"{column} std"] = stds[column]
        frame[f"{column} n"] = counts[column].astype("Int64")
    buffer = io.StringIO()
    frame.rename_axis("detector").to_csv(buffer)
    return buffer.getvalue()


def export(out: str, format: str = "latex", metric: str = "auroc") -> str:
    """The detector x setting table of ``metric`` from the record in ``out``, as ``format`` text."""
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    means, stds, counts = detector_pivot(out, metric)
    seeds = sorted({int(n) for n in counts.to_numpy().ravel() if not (isinstance(n, float) and math.isnan(n))})
    caption = (f"{METRIC_NAMES.get(metric, metric)} per detector and {means.columns.name}: mean ± std over seeds "
               f"({', '.join(map(str, seeds))} seed{'s' if seeds != [1] else ''} per cell)")
    if format == "csv":
        return to_csv(means, stds, counts)
    if format == "md":
        return to_markdown(means, stds, metric, caption)
    return to_latex(means, stds, metric, caption)
