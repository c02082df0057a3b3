"""User text never drives the terminal, nor the Markdown (issue 22, point 3), and the summaries of ``run`` and
``show`` group by every swept key and read at 80 and 120 columns (issue 22 point 6, issue 26 point 1).

Records are synthetic, written with the sink's own writers: no training, no Ray.
"""

import io
import re
import types
import unicodedata

import pytest
import yaml
from rich.cells import cell_len
from rich.text import Text
from typer.testing import CliRunner

from poisonsweep.engine import cli
from poisonsweep.engine.report import markdown_table, write_report
from poisonsweep.engine.record import write_trial
from poisonsweep.engine.text import PrintableConsole, PrintableTable, markdown_text, printable

TITLE, CLEAR, REVERSE = "\x1b]0;TITLE\x07", "\x1b[2J", "\u202e"
HOSTILE = f"{TITLE}{CLEAR}evil{REVERSE}<script>alert(1)</script>|x"
# what a terminal acts on: C0/C1 controls (ESC, BEL, CR ...), format (bidi) and line/paragraph separators
ACTIVE = {"Cc", "Cf", "Zl", "Zp"}
DETECTORS = ["abl_isolation", "activation_clustering", "spectral_signature", "loss"]


def active(text: str) -> list[str]:
    """The characters of ``text`` a terminal would act on, newlines aside (checked by unicodedata, not by
    the code under test)."""
    return [c for c in text if c != "\n" and unicodedata.category(c) in ACTIVE]


def write_record(out: str, *, detectors=DETECTORS, lrs=(0.001, 1e6), rates=(0.1, 0.33), seeds=(0, 1),
                 label: str = "") -> None:
    """A record of ok trials (and, with ``label``, hostile user text in names, errors and warnings)."""
    for n, (lr, rate, seed) in enumerate((lr, rate, seed) for lr in lrs for rate in rates for seed in seeds):
        keys = {"trial_id": f"t{n}", "data_name": "digits", "poison_method": "one_shift", "poison_rate": rate,
                "seed": seed}
        names = detectors + ([label] if label else [])
        detections = [{**keys, "detector": d, "auroc": 0.5 + 0.01 * n, "precision_at_n": 0.4, "auprc": 0.3,
                       "f1": 0.2, "n_flagged": 10, "recall_at_10": 0.25, "seconds": 1.5} for d in names]
        unlearning = [{**keys, "selection": selection, "selection_kind": kind, "identified_fraction": 0.5,
                       "method": method, "clean_test_acc_before": 0.8, "clean_test_acc_after": 0.7,
                       "poison_success_before": 0.4, "poison_success_after": 0.1,
                       "retain_acc_after": 0.3 if method == "ssd" else 0.9, "seconds": 2.0}
                      for selection, kind in (("oracle", "oracle"), ("abl_isolation", "top"))
                      for method in ["finetune", "ssd"] + ([label] if label else [])]
        failed = bool(label) and n == 1
        write_trial(out, keys["trial_id"], {
            "trials": [{**keys, "status": "failed" if failed else "ok", "error": f"ValueError: {label}" if failed else None,
                        "train_lr": lr, "model_name": "mlp", "clean_test_acc": 0.9 if lr < 1 else 0.1,
                        "poison_success": 0.3, "n_poisoned": 30, "train_seconds": 3.0, "code_version": "v",
                        "warnings": f"SomeWarning: {label}" if label and n == 2 else None}],
            "detections": detections, "unlearning": unlearning})


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hostile") / "rec")
    write_record(out, label=HOSTILE)
    return out


def shown(out: str, monkeypatch, width: int = 150) -> str:
    """``show``'s output on a console of ``width`` columns, of the class the CLI prints with."""
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "console", type(cli.console)(width=width, file=buffer))
    cli.show(out)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# the terminal


@pytest.mark.parametrize("text", [TITLE, CLEAR, REVERSE, "a\rb", "tab\there", "\u2066iso\u2069 \u200f \u061c \u200e",
                                  "\x85next line\u2028", "\x9b2J", "nbsp\u00a0", "tag\U000e0041"])
def test_printable_leaves_nothing_a_terminal_acts_on(text):
    assert not active(printable(text))
    assert "\n" not in printable(text + "\n") and printable("a\nb", newlines=True) == "a\nb"


def test_printable_keeps_ordinary_text_as_written():
    for text in ["abl_isolation", "café · 中文 0.912±0.013", "[/oops] $\\nocommand{x}$", "ünïcödé ☃ 🙂"]:
        assert printable(text) == text
    assert printable(TITLE) == "\\x1b]0;TITLE\\x07"  # visible, so the user sees what the label holds


def test_show_prints_no_user_escape(hostile, monkeypatch):
    output = shown(hostile, monkeypatch)
    assert not active(output)
    assert output.count("\\x1b]0;TITLE\\x07") >= 3  # detector and method labels, the error, the warning


def test_run_prints_no_user_escape(hostile, monkeypatch):
    """``run``'s announcement, its notes and its summary (the sweep is faked: no Ray)."""
    from poisonsweep.engine import api

    def fake_run(config, *, echo, announce, **options):
        announce(types.SimpleNamespace(name=HOSTILE, trials=[{}], out=hostile + HOSTILE))
        echo(f"moved {HOSTILE} aside")
        return types.SimpleNamespace(ran=1, skipped=0, failed={}, retried={}, retried_after_error=0, seconds=1.0,
                                     output_error="", not_recorded=0, out=hostile, interrupted=0,
                                     ray_warnings=0, ray_log=None, tracked=0)

    monkeypatch.setattr(api, "run", fake_run)
    result = CliRunner().invoke(cli.app, ["run", "any.yaml"])
    assert result.exit_code == 0, result.output
    assert not active(result.output) and "sweep \\x1b]0;TITLE" in result.output


def test_an_error_quoting_the_config_prints_no_escape(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"name": "x", "data": {"name": f"digits{CLEAR}{REVERSE}"}, "detectors": ["loss"]}))
    result = CliRunner().invoke(cli.app, ["run", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "error:" in result.output
    assert not active(result.output) and "\\x1b[2J" in result.output


def test_a_warning_naming_a_user_s_file_prints_no_escape(tmp_path, monkeypatch):
    out = tmp_path / "rec"
    write_record(str(out), lrs=(0.01,), rates=(0.1,), seeds=(0,), detectors=["loss"])
    (out / "detections" / f"notes{CLEAR}{REVERSE}.txt").write_text("a stray file")
    output = shown(str(out), monkeypatch)
    assert "warning:" in output and "notes\\x1b[2J\\u202e.txt" in output
    assert not active(output)


def test_a_table_cell_and_a_progress_field_are_printable():
    from poisonsweep.engine.progress import field_text

    table = PrintableTable("name")
    table.add_row(HOSTILE)
    buffer = io.StringIO()
    PrintableConsole(width=200, file=buffer).print(table)
    assert not active(buffer.getvalue()) and "evil" in buffer.getvalue()
    field = field_text(f"[red]{HOSTILE}")
    assert Text.from_markup(field).plain == printable(f"[red]{HOSTILE}")  # shown as written, not as markup
    assert not active(Text.from_markup(field).plain)


# ---------------------------------------------------------------------------------------------
# Markdown


def markdown_cells(line: str) -> list[str]:
    """A GFM table row's cells: split at every | not escaped by a backslash (which escapes any character)."""
    cells, current, chars = [], "", iter(line.strip()[1:-1])
    for c in chars:
        if c == "\\":
            current += c + next(chars, "")
        elif c == "|":
            cells.append(current)
            current = ""
        else:
            current += c
    return cells + [current]


def test_markdown_cells_are_inert():
    import pandas as pd

    frame = pd.DataFrame({"label": ["<script>alert(1)</script>", "a|b", "back\\|slash", "x\ny & z"], "n": [1, 2, 3, 4]})
    lines = markdown_table(frame).splitlines()
    assert all(len(markdown_cells(line)) == 2 for line in lines)  # no | in a value splits its cell
    body = "\n".join(lines)
    assert "<" not in body and ">" not in body and "&lt;script&gt;" in body and "y &amp; z" in body
    assert markdown_text("a<b") == "a&lt;b"


def markdown_tables(text: str) -> list[list[str]]:
    """The Markdown tables of ``text``: runs of lines starting with |, the |---| line left out."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current += [] if line.startswith("|---") else [line]
        elif current:
            tables, current = tables + [current], []
    return tables


def test_the_report_s_markdown_carries_no_raw_html_or_escape(tmp_path):
    out = str(tmp_path / "rec")
    write_record(out, lrs=(0.01,), detectors=["loss"], label=HOSTILE)  # two settings: few figures to draw
    report = write_report(out, tmp_path / "report")
    for name in ["report.md", "detections.md", "unlearning.md"]:
        text = (report.directory / name).read_text()
        assert "<script" not in text and not active(text), name
        assert "&lt;script&gt;" in text, name
        for table in markdown_tables(text):  # every row has its header's cells: no | of a label split one
            assert len({len(markdown_cells(line)) for line in table}) == 1, (name, table)


# ---------------------------------------------------------------------------------------------
# grouping: every swept key, seeds only pooled


def trials_rows(output: str) -> list[str]:
    """The rows of the Trials table (between its title and the next table)."""
    block = output.split("Trials (mean±std over seeds)")[1].split("Detectors")[0]
    return [line for line in block.splitlines() if re.search(r"\d\.\d{3}", line)]


def test_a_swept_learning_rate_is_two_rows_not_one_row_of_two_seeds(tmp_path, monkeypatch):
    out = str(tmp_path / "rec")
    write_record(out, lrs=(0.001, 1e6), rates=(0.1,), seeds=(0,), detectors=["loss"])
    output = shown(out, monkeypatch)
    rows = trials_rows(output)
    assert len(rows) == 2, output
    assert any("0.001" in r and "0.900" in r for r in rows) and any("1e+06" in r and "0.100" in r for r in rows)
    assert "settings differ in train.lr" in output  # says which keys tell the rows apart
    assert "every trial: data.name digits, poison.method one_shift, poison.rate 0.1" in output


def test_seeds_alone_are_pooled(tmp_path, monkeypatch):
    out = str(tmp_path / "rec")
    write_record(out, lrs=(0.01,), rates=(0.1,), seeds=(0, 1, 2), detectors=["loss"])
    output = shown(out, monkeypatch)
    rows = trials_rows(output)
    assert len(rows) == 1 and re.search(r"\b3\b", rows[0]), output
    assert "one setting" in output


# ---------------------------------------------------------------------------------------------
# widths


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("wide") / "rec")
    write_record(out)
    return out


@pytest.mark.parametrize("width", [80, 120])
def test_the_summary_reads_whole_at_the_terminal_s_width(wide, monkeypatch, width):
    output = shown(wide, monkeypatch, width)
    lines = output.splitlines()
    assert max(cell_len(line) for line in lines) <= width
    words = set(re.split(r"[\s│┃]+", output))
    assert set(DETECTORS) | {"finetune", "ssd", "oracle", "(top)"} <= words  # names never cut (no 'abl_isolati…')
    assert {"0.1", "0.33", "0.001", "1e+06"} <= words  # every setting label whole
    assert "…" not in output
    for header in ["AUROC", "P@n", "AUPRC", "recall@10%", "F1", "flagged", "clean acc after", "min retain"]:
        assert header in output  # no column shrunk away
    for detector in DETECTORS:  # each detector row shows its setting and its numbers on one line
        assert any(re.split(r"[\s│┃]+", line)[2:3] == [detector] and re.search(r"0\.\d{3}", line) for line in lines), detector
    assert "digits one_shift" not in output  # labels show only what the sweep varies


def test_short_labels_keep_what_tells_values_apart():
    import pandas as pd

    from poisonsweep.engine.summary import short_values

    assert short_values(pd.Series([0.001, 1e6, None])).tolist() == ["0.001", "1e+06", "–"]
    assert short_values(pd.Series([0.0012345671, 0.0012345678])).nunique() == 2  # beyond :g's 6 digits
    params = pd.Series(['{"depth": 1, "hidden": 16}', '{"depth": 1, "hidden": 64}'])
    assert short_values(params).tolist() == ["hidden=16", "hidden=64"]  # only the entry the sweep varies


def test_many_swept_keys_are_numbered_with_a_legend_at_80_columns(tmp_path, monkeypatch):
    out = str(tmp_path / "rec")
    swept = {"train_lr": [0.001, 0.1], "train_momentum": [0.0, 0.9], "train_weight_decay": [0.0, 0.0005],
             "train_batch_size": [32, 128], "train_optimizer": ["sgd", "adam"], "train_epochs": [2, 20]}
    for n in range(2):
        keys = {"trial_id": f"t{n}", "data_name": "digits", "poison_method": "one_shift", "poison_rate": 0.1, "seed": 0}
        write_trial(out, keys["trial_id"], {
            "trials": [{**keys, "status": "ok", "clean_test_acc": 0.5 + 0.1 * n, "code_version": "v",
                        **{column: values[n] for column, values in swept.items()}}],
            "detections": [{**keys, "detector": "activation_clustering", "auroc": 0.7}]})
    output = shown(out, monkeypatch, 80)
    assert max(cell_len(line) for line in output.splitlines()) <= 80
    assert "Settings (the values of the keys this sweep varies)" in output and "#2" in output
    words = set(re.split(r"[\s│┃]+", output))
    assert {"0.001", "0.1", "0.9", "0.0005", "128", "adam", "sgd", "20", "activation_clustering"} <= words
    for key in ["train.lr", "train.momentum", "train.weight_decay", "train.batch_size", "train.optimizer"]:
        assert key in words  # headers whole, not folded
