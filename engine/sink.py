"""The Parquet record: one directory per table, one file per trial, written atomically.

``<out>/<table>/<trial_id>.parquet`` (``poisonsweep compact`` later merges them, ``poisonsweep.engine.record``).
A rerun of a trial replaces its files, so no row is ever
duplicated; a reader never sees a half-written file (temporary name, then rename). ``out`` may
be a local path or any URI pyarrow understands (``s3://``, ``gs://``), for cluster runs.
``<out>/sweep.json`` (:func:`write_plan`) lists the trials the latest run planned, so a report can
tell which are still missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from typing import Callable, TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from poisonsweep.tasks.files import atomic_write

T = TypeVar("T")

_STR, _F64, _I64, _BOOL = pa.string(), pa.float64(), pa.int64(), pa.bool_()

CONFIG_COLUMNS = [
    ("sweep", _STR), ("config_json", _STR), ("seed", _I64), ("data_name", _STR), ("data_n_train", _I64),
    ("data_n_test", _I64), ("data_seed", _I64), ("poison_method", _STR), ("poison_rate", _F64),
    ("poison_params", _STR), ("model_name", _STR), ("model_params", _STR), ("train_epochs", _I64),
    ("train_batch_size", _I64), ("train_lr", _F64), ("train_optimizer", _STR), ("train_momentum", _F64),
    ("train_weight_decay", _F64), ("detectors", _STR), ("unlearn", _STR),
]

# the columns shared by every table, for grouping without a join
KEY_COLUMNS = [("trial_id", _STR), ("data_name", _STR), ("poison_method", _STR), ("poison_rate", _F64),
               ("seed", _I64)]

SCHEMAS: dict[str, pa.Schema] = {
    "trials": pa.schema([("trial_id", _STR)] + CONFIG_COLUMNS + [
        ("status", _STR), ("error", _STR), ("n_train", _I64), ("n_test", _I64), ("num_classes", _I64),
        ("n_poisoned", _I64), ("clean_test_acc", _F64), ("poison_success", _F64), ("train_loss", _F64),
        ("train_acc", _F64), ("poison_info", _STR), ("load_seconds", _F64), ("poison_seconds", _F64),
        ("train_seconds", _F64), ("eval_seconds", _F64), ("detect_seconds", _F64), ("unlearn_seconds", _F64),
        ("total_seconds", _F64), ("node", _STR), ("node_ip", _STR), ("ray_node_id", _STR), ("device", _STR),
        ("pack_size", _I64), ("pack_note", _STR),  # resources.pack: models trained together, why alone
        ("code_version", _STR), ("warnings", _STR),  # the trial's TrialWarnings, one first line each
        ("plugins", _STR),  # JSON list of the plugins the trial ran with (module, origin, path, sha256); null before
        ("tables", pa.list_(_STR)),  # the other tables holding rows of this trial: resume checks they are there
        ("started_at", pa.timestamp("us", tz="UTC")), ("finished_at", pa.timestamp("us", tz="UTC")),
    ]),
    "detections": pa.schema(KEY_COLUMNS + [
        ("detector", _STR), ("method", _STR), ("params", _STR), ("auroc", _F64), ("auprc", _F64),
        ("precision_at_n", _F64), ("precision", _F64), ("recall", _F64), ("f1", _F64), ("n_flagged", _I64),
        ("recall_at_5", _F64), ("recall_at_10", _F64), ("recall_at_20", _F64), ("seconds", _F64),
    ]),
    "scores": pa.schema([
        ("trial_id", _STR), ("detector", _STR), ("index", _I64), ("label_given", _I64), ("label_true", _I64),
        ("is_poison", _BOOL), ("score", _F64), ("flagged", _BOOL),
    ]),
    "unlearning": pa.schema(KEY_COLUMNS + [
        ("selection", _STR), ("selection_kind", _STR), ("identified_fraction", _F64), ("top_fraction", _F64),
        ("method", _STR),
        ("params", _STR), ("n_forget", _I64), ("forget_poison_share", _F64), ("poisons_in_forget", _F64),
        ("clean_test_acc_before", _F64), ("clean_test_acc_after", _F64), ("poison_success_before", _F64),
        ("poison_success_after", _F64), ("retain_acc_before", _F64), ("retain_acc_after", _F64),
        ("forget_acc_before", _F64), ("forget_acc_after", _F64), ("forget_true_acc_before", _F64),
        ("forget_true_acc_after", _F64), ("success_predictions_before", pa.list_(_I64)),
        ("success_predictions_after", pa.list_(_I64)),
        ("guard_max_retain_drop", _F64), ("guard_refused", _BOOL), ("refused_retain_acc", _F64),
        ("refused_clean_test_acc", _F64), ("refused_poison_success", _F64),
        ("seconds", _F64),
    ]),
    "influence": pa.schema([
        ("trial_id", _STR), ("detector", _STR), ("test_index", _I64), ("train_index", _I64),
        ("influence", _F64), ("rank", _I64), ("kind", _STR),
    ]),
}
TABLES = list(SCHEMAS)
COMPACTED = re.compile(r"compacted-(\d+)-[0-9a-f]+\.parquet")  # a compacted file's name (engine.record)
PLAN_FILE = "sweep.json"  # the trials the latest run planned, for the report


def join_uri(out: str, *parts: str) -> str:
    """``out`` with ``parts`` appended to its path, before a URI's query string: ``s3://b/d?region=x``
    and ``_tune`` give ``s3://b/d/_tune?region=x`` (pyarrow and Ray read the query as options)."""
    base, mark, query = out.partition("?") if "://" in out else (out, "", "")
    return "/".join([base.rstrip("/"), *parts]) + mark + query


def uri_name(uri: str) -> str:
    """The last folder of a URI's path, without its query string."""
    return uri.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


# a URI's password (``s3://key:SECRET@bucket``) and the values of query options that hold secrets
_URI_PASSWORD = re.compile(r"\b([A-Za-z][\w+.-]*://[^:@/?\s]*):[^@\s]*@")
_SECRET_OPTION = re.compile(r"([?&][^=&\s]*(?:secret|token|password|credential)[^=&\s]*=)[^&\s]*", re.IGNORECASE)


def masked(text: str) -> str:
    """``text`` (a URI, or a message that may hold one) fit to print or record: every URI's password and
    secret query values become ``***``. Everything that prints or records an output URI goes through it."""
    return _SECRET_OPTION.sub(r"\1***", _URI_PASSWORD.sub(r"\1:***@", text))


class OutputError(RuntimeError):
    """The output cannot be written (a full disk, an object store that does not answer): one line that
    names the path and the cause; the trials it hit are left to run again."""

    @classmethod
    def of(cls, out: str, error: BaseException) -> "OutputError":
        where = getattr(error, "filename", None) or out
        cause = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [type(error).__name__])[-1]
        return cls(masked(f"cannot write to {where}: {cause}"))


def filesystem(out: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path for a local directory or a URI."""
    if "://" in out:
        return pafs.FileSystem.from_uri(out)
    return pafs.LocalFileSystem(), os.path.abspath(out)


def probe_name() -> str:
    """A name of its own for a write probe (``.write-check.<random>``): never one a planted file could hold."""
    return f".write-check.{uuid.uuid4().hex}"


def refuse_links(root: str | os.PathLike) -> None:
    """Raise ``ConfigError`` if an entry of the local record ``root`` that a command writes or reads (a
    table, ``sweep.json``, a ``_`` folder, a ``.`` file such as ``.run.lock``) is a link: writing through
    it would create, truncate or delete a file outside the output."""
    from poisonsweep.tasks.registry import ConfigError

    for entry in os.scandir(root):
        # a temporary's name is never written through (each is created new and removed unfollowed): not refused
        temporary = temporary_kind(entry.name, False) is not None
        ours = not temporary and (entry.name in TABLES or entry.name == PLAN_FILE or entry.name.startswith(("_", ".")))
        if ours and entry.is_symlink():
            raise ConfigError(f"{entry.path} is a link ({os.readlink(entry.path)}); poisonsweep never writes "
                              "through a link out of its output: remove the link or choose another --out")


def to_table(table: str, rows: list[dict]) -> pa.Table:
    """Rows -> a typed Arrow table; unknown keys are an error (a typo would otherwise vanish)."""
    schema = SCHEMAS[table]
    unknown = {k for row in rows for k in row} - set(schema.names)
    if unknown:
        raise ValueError(f"rows for table {table!r} have columns not in its schema: {sorted(unknown)}")
    return pa.Table.from_pylist(rows, schema=schema)


def write_trial_table(out: str, table: str, trial_id: str, rows: list[dict]) -> None:
    """Write (or replace) one trial's rows of one table, atomically."""
    fs, root = filesystem(out)
    fs.create_dir(f"{root}/{table}", recursive=True)
    publish(fs, f"{root}/{table}/{trial_id}.parquet",
            lambda path: pq.write_table(to_table(table, rows), path, filesystem=fs))


def publish(fs: pafs.FileSystem, final: str, write: Callable[[str], T]) -> T:
    """Call ``write(path)`` so that ``final`` is seen only whole, and return what it returned.

    On a local disk ``write`` fills a dot-prefixed temporary (skipped by pyarrow, pandas, polars and
    DuckDB globs) that is then renamed onto ``final``; an object store publishes an object only once
    its upload completes, so there ``write`` writes ``final`` itself.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        return atomic_write(final, lambda temporary: write(str(temporary)))
    return write(final)


# the hidden names ``tasks.files.atomic_write`` gives its temporaries (and a replaced folder, moved aside)
TEMPORARY = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{32}\.(tmp|old)")
# who writes which temporaries: a run (trials' files, sweep.json), compact (compacted files), report
TEMPORARY_KINDS = ("run", "compact", "report")


def temporary_kind(name: str, in_table: bool) -> str | None:
    """Which command writes a file or folder of this name (``in_table``: in a table's folder, else in the
    record's root), or None when it is not one of our temporaries."""
    match = TEMPORARY.fullmatch(name)
    if match is None:
        return None
    if in_table:
        return "compact" if COMPACTED.fullmatch(match["name"]) else "run"
    return {PLAN_FILE: "run", "report": "report"}.get(match["name"])


def remove_temporaries(out: str, kinds=TEMPORARY_KINDS) -> int:
    """Delete the temporaries that killed writers of ``kinds`` left (local directories only: object
    stores never show an unfinished upload). Only our own temporary names, only in the record's root and
    its table folders, and a link is never followed nor removed. The caller makes sure no live writer
    of those kinds is at work (``poisonsweep.engine.lease.remove_dead_temporaries``). Returns how many
    were removed."""
    fs, root = filesystem(out)
    if not isinstance(fs, pafs.LocalFileSystem):
        return 0
    removed = 0
    for directory, in_table in [(root, False)] + [(f"{root}/{table}", True) for table in TABLES]:
        if os.path.islink(directory) or not os.path.isdir(directory):
            continue
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_symlink() or temporary_kind(entry.name, in_table) not in kinds:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed += 1
    return removed


def write_trial(out: str, trial_id: str, tables: dict[str, list[dict]]) -> None:
    """Write every table of a trial; ``trials`` last, so a trial counts as done only when all its rows exist.

    The ``trials`` row's ``tables`` lists the other tables that received rows, so that resume can tell a
    trial whose file of one of them was lost later (``poisonsweep.engine.resume.complete_trials``).
    """
    for table in TABLES:
        if table != "trials":
            write_trial_table(out, table, trial_id, tables.get(table, []))
    written = [table for table in TABLES if table != "trials" and tables.get(table)]
    write_trial_table(out, "trials", trial_id, [{**row, "tables": written} for row in tables["trials"]])


def read_table(out: str, table: str, columns: list[str] | None = None) -> pa.Table:
    """All trials' rows of one table, each trial's once, per-trial or compacted (``poisonsweep.engine.record``);
    an empty table with the schema if none were written yet."""
    from poisonsweep.engine.record import read_table as read_record  # engine.record builds on this module

    return read_record(out, table, columns)


class DamagedFile(UserWarning):
    """A file in a table directory that is not readable Parquet of the table's schema: skipped, named,
    and how to fix it."""

    def __init__(self, path: str, out: str, problem: str = "not readable Parquet"):
        self.path = path
        super().__init__(f"{path} is {problem} and is skipped; `poisonsweep repair {masked(out)}` moves it "
                         "aside, and the next `run` of the sweep recomputes its trial")


UNREADABLE = "not readable Parquet"


def schema_problem(metadata: pq.FileMetaData, table: str, trial_id: str | None) -> str | None:
    """Why a readable Parquet file is not one of ``table``'s, or None when it is.

    Its columns must be the table's, with the table's types (a file may lack columns: older records had
    fewer); a per-trial file (``trial_id``: its name) must hold that trial's rows only, as its
    row groups' statistics tell without reading the rows.
    """
    expected = SCHEMAS[table]
    found = metadata.schema.to_arrow_schema()
    if "trial_id" not in found.names:
        return "not of the table's schema (no trial_id column)"
    for column in found:
        index = expected.get_field_index(column.name)
        if index < 0:
            return f"not of the table's schema (column {column.name!r} is not one of its)"
        if column.type != expected.field(index).type:
            return (f"not of the table's schema (column {column.name!r} is {column.type}, "
                    f"not {expected.field(index).type})")
    if trial_id is None:
        return None
    position = found.get_field_index("trial_id")
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(position).statistics
        if stats is not None and stats.has_min_max and {stats.min, stats.max} != {trial_id}:
            return f"not trial {trial_id}'s file (it holds rows of trial {stats.min!r})"
    return None


def file_problems(out: str, table: str) -> tuple[list[str], dict[str, str]]:
    """The table's files that are readable Parquet of its schema, and every other one with what is wrong
    with it (a truncated copy, a stray file, another table's or program's Parquet). Hidden names (``.``,
    ``_``: temporaries) are neither, as for every Parquet reader."""
    fs, root = filesystem(out)
    directory = f"{root}/{table}"
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return [], {}
    good, damaged = [], {}
    for info in fs.get_file_info(pafs.FileSelector(directory)):
        name = info.base_name
        if name.startswith((".", "_")):
            continue
        try:
            metadata = pq.read_metadata(info.path, filesystem=fs)
        except (OSError, ValueError, pa.ArrowException):  # pyarrow's error for "not Parquet" varies by damage
            damaged[info.path] = UNREADABLE
            continue
        per_trial = name.endswith(".parquet") and not COMPACTED.fullmatch(name)
        problem = schema_problem(metadata, table, name[: -len(".parquet")] if per_trial else None)
        if problem is None:
            good.append(info.path)
        else:
            damaged[info.path] = problem
    return sorted(good), dict(sorted(damaged.items()))


def readable_files(out: str, table: str) -> tuple[list[str], list[str]]:
    """The table's files that are readable Parquet of its schema, and the others (:func:`file_problems`)."""
    good, damaged = file_problems(out, table)
    return good, list(damaged)


# ---------------------------------------------------------------------------------------------
# the plan: which trials the latest run meant to record


def write_plan(sweep) -> None:
    """Write ``<out>/sweep.json``: every trial the sweep plans, so a report can tell what is missing.

    Call it when a run starts; the latest run's plan replaces an earlier one.
    """
    from poisonsweep.engine.config import config_columns

    trials = []
    for config, tid in zip(sweep.trials, sweep.ids):
        columns = config_columns(config, with_json=False)
        trials.append({"trial_id": tid, **columns})
    # one trial per line: json.dumps with indent= takes Python's slow encoder (0.25 s for 10,000 trials)
    lines = ",\n".join(json.dumps(trial) for trial in trials)
    text = f'{{"name": {json.dumps(sweep.name)}, "trials": [\n{lines}\n]}}\n'
    fs, root = filesystem(sweep.out)
    fs.create_dir(root, recursive=True)

    def write(path: str) -> None:
        with fs.open_output_stream(path) as stream:
            stream.write(text.encode())

    publish(fs, f"{root}/{PLAN_FILE}", write)


def read_plan(out: str) -> pd.DataFrame | None:
    """The planned trials (one row each, config columns) or None when no plan was written."""
    fs, root = filesystem(out)
    path = f"{root}/{PLAN_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        plan = json.loads(stream.read().decode())
    return pd.DataFrame(plan["trials"], columns=["trial_id"] + [c for c, _ in CONFIG_COLUMNS if c != "config_json"])
