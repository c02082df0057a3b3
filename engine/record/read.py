"""Reading the record in either of its two forms: per-trial files and compacted ones.

A sweep writes one file per table per trial, ``<out>/<table>/<trial_id>.parquet``
(``poisonsweep.engine.record.write``); ``compact`` merges them into
``<out>/<table>/compacted-<generation>-<tag>.parquet`` (``poisonsweep.engine.record.compaction``). While
``compact`` runs, both copies of a trial's rows exist for a moment. :func:`read_table` (used by ``show``,
``report``, ``load`` and resume) never counts a trial twice: for each ``trial_id`` it takes the rows of one
source only, a per-trial file first (it is the newer: a trial rerun after compaction writes one), else the
newest compacted file that holds the trial. A damaged file is skipped with a warning that names it
(``poisonsweep.engine.record.repair``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from poisonsweep.engine.record.repair import DamagedFile, file_problems
from poisonsweep.engine.record.tables import COMPACTED, CONFIG_COLUMNS, PLAN_FILE, SCHEMAS
from poisonsweep.engine.storage import filesystem

# a reader retries this often when compaction deleted a file between its listing and its read
READ_ATTEMPTS = 3


@dataclass
class TableFiles:
    """The data files of one table: per-trial files by trial id, compacted files newest first."""

    per_trial: dict[str, pafs.FileInfo] = field(default_factory=dict)
    compacted: list[pafs.FileInfo] = field(default_factory=list)


def file_generation(info: pafs.FileInfo) -> int:
    return int(COMPACTED.fullmatch(info.base_name).group(1))


def table_files(out: str, table: str) -> TableFiles:
    """List ``<out>/<table>/`` (hidden files, e.g. writers' temporaries, are not data)."""
    fs, root = filesystem(out)
    directory = f"{root}/{table}"
    files = TableFiles()
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return files
    for info in fs.get_file_info(pafs.FileSelector(directory)):
        name = info.base_name
        if info.type != pafs.FileType.File or name.startswith((".", "_")) or not name.endswith(".parquet"):
            continue
        if COMPACTED.fullmatch(name):
            files.compacted.append(info)
        else:
            files.per_trial[name[: -len(".parquet")]] = info
    files.compacted.sort(key=lambda info: (file_generation(info), info.base_name), reverse=True)
    return files


def trial_id_in(ids) -> pc.Expression:
    return pc.field("trial_id").isin(pa.array(sorted(ids), pa.string()))


def _among(ids) -> pc.Expression:
    """``trial_id`` in ``ids``, with the range first: a compacted file is sorted by trial_id, so its
    row groups' statistics let the reader skip every group outside the range."""
    field = pc.field("trial_id")
    return (field >= min(ids)) & (field <= max(ids)) & trial_id_in(ids)


# per-trial files read by one dataset scan: a scan keeps every file's Parquet metadata until it ends
# (about 130 kB per trials file), so reading 10,000 files at once raised the driver's resident memory
# by 1.25 GB; 100 at a time: by 65 MB, 20 % slower (benchmarks/RESULTS.md, section 10)
FILES_PER_SCAN = 100


class ForeignRows(ValueError):
    """A per-trial file holds rows of trials other than the one it is named after (a foreign file)."""


def _read_per_trial(fs, table: str, chunk: dict[str, str], columns: list[str]) -> pa.Table:
    """The rows of per-trial files (trial id -> path); ``ForeignRows`` when a trials file holds another
    trial's row (checked on the trials table only, one row per file: that is what counts trials)."""
    checked = table == "trials"
    read = columns if not checked or "trial_id" in columns else [*columns, "trial_id"]
    piece = ds.dataset(list(chunk.values()), schema=SCHEMAS[table], format="parquet", filesystem=fs).to_table(
        columns=read)
    if checked:
        ids = set(pc.unique(piece.column("trial_id")).to_pylist())
        if len(ids) != piece.num_rows or not ids <= chunk.keys():  # one row per trial, under its own name
            raise ForeignRows(f"a file of table {table!r} holds rows of another trial")
    return piece.select(columns)


def _read_files(fs, table: str, files: TableFiles, columns: list[str], trial_ids: set[str] | None) -> pa.Table:
    schema = SCHEMAS[table]
    pieces = []
    per_trial = [(tid, info.path) for tid, info in files.per_trial.items() if trial_ids is None or tid in trial_ids]
    for start in range(0, len(per_trial), FILES_PER_SCAN):
        pieces.append(_read_per_trial(fs, table, dict(per_trial[start:start + FILES_PER_SCAN]), columns))
    taken = set(files.per_trial)  # trials whose rows came from a per-trial file (or that were filtered out)
    for info in files.compacted:
        condition = None
        if taken:
            condition = ~trial_id_in(taken)
        if trial_ids is not None:
            if not trial_ids:
                continue
            condition = _among(trial_ids) if condition is None else _among(trial_ids) & condition
        part = ds.dataset(info.path, schema=schema, format="parquet", filesystem=fs)
        piece = part.to_table(columns=columns if "trial_id" in columns else [*columns, "trial_id"], filter=condition)
        if info is not files.compacted[-1]:  # an older compacted file must not add these trials again
            taken |= set(pc.unique(piece.column("trial_id")).to_pylist())
        pieces.append(piece.select(columns))
    if not pieces:
        return schema.empty_table().select(columns)
    return pa.concat_tables(pieces)


def read_table(out: str, table: str, columns: list[str] | None = None, trial_ids=None) -> pa.Table:
    """All trials' rows of one table, each trial's once, whichever form the record is in.

    ``columns``: only these are read (default all); ``trial_ids``: only these trials' rows. An
    empty table with the schema when nothing was written yet. A file that is not readable Parquet
    is skipped with a ``DamagedFile`` warning that names it and the command that repairs it.
    """
    fs, _ = filesystem(out)
    columns = list(columns) if columns is not None else SCHEMAS[table].names
    wanted = set(trial_ids) if trial_ids is not None else None
    damaged: set[str] = set()
    for attempt in range(READ_ATTEMPTS):
        files = _without(table_files(out, table), damaged)
        try:
            return _read_files(fs, table, files, columns, wanted)
        except FileNotFoundError:  # compaction deleted a listed file meanwhile: list again
            if attempt == READ_ATTEMPTS - 1:
                raise
        except (OSError, ValueError, pa.ArrowException):  # damage found only on reading: name it, skip it
            found = {path: problem for path, problem in file_problems(out, table)[1].items() if path not in damaged}
            if not found:
                raise
            for path, problem in found.items():
                warnings.warn(DamagedFile(path, out, problem), stacklevel=2)
            damaged |= set(found)
    raise AssertionError("unreachable")


def _without(files: TableFiles, paths: set[str]) -> TableFiles:
    if not paths:
        return files
    return TableFiles({tid: info for tid, info in files.per_trial.items() if info.path not in paths},
                      [info for info in files.compacted if info.path not in paths])


def trials_with_rows(out: str, table: str, candidates: set[str], damaged=()) -> set[str]:
    """Which of ``candidates`` have rows in ``table``: a per-trial file that is not ``damaged`` (paths),
    or rows in a compacted file (its trial_id column read in batches, only for the trials without a
    per-trial file)."""
    fs, _ = filesystem(out)
    files = table_files(out, table)
    damaged = set(damaged)
    present = {tid for tid, info in files.per_trial.items() if tid in candidates and info.path not in damaged}
    rest = candidates - set(files.per_trial)
    for info in files.compacted:
        if not rest or info.path in damaged:
            continue
        scan = ds.dataset(info.path, format="parquet", filesystem=fs).scanner(columns=["trial_id"], filter=_among(rest))
        for batch in scan.to_batches():
            found = set(pc.unique(batch.column(0)).to_pylist())
            present |= found
            rest -= found
    return present


def recorded_trials(out: str, table: str = "trials") -> set[str]:
    """The ids of the trials with rows in ``table``."""
    return set(pc.unique(read_table(out, table, ["trial_id"]).column(0)).to_pylist())


def read_plan(out: str) -> pd.DataFrame | None:
    """The planned trials (one row each, config columns) or None when no plan was written."""
    fs, root = filesystem(out)
    path = f"{root}/{PLAN_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        plan = json.loads(stream.read().decode())
    return pd.DataFrame(plan["trials"], columns=["trial_id"] + [c for c, _ in CONFIG_COLUMNS if c != "config_json"])
