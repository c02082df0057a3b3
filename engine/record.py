"""Reading the Parquet record in either of its two forms, and compacting it from one into the other.

A sweep writes one file per table per trial, ``<out>/<table>/<trial_id>.parquet`` (``poisonsweep.engine.sink``).
``compact`` merges the files of the trials that are complete (their ``trials`` row exists) into
``<out>/<table>/compacted-<generation>-<tag>.parquet``, sorted by ``trial_id``, then deletes the
files it merged. Both kinds are plain Parquet files in the same directory, so pandas, polars and
DuckDB read a compacted record as they read a per-trial one.

While ``compact`` runs, both copies of a trial's rows exist for a moment. :func:`read_table` (used
by ``show``, ``report`` and resume) never counts a trial twice: for each ``trial_id`` it takes the
rows of one source only, a per-trial file first (it is the newer: a trial rerun after compaction
writes one), else the newest compacted file that holds the trial. Compaction deletes a per-trial
file only if it is unchanged since it was read, so a trial rewritten meanwhile keeps its new file.
One ``compact`` at a time per record: it holds ``<out>/.compact.lock`` (a lease on an object store,
``poisonsweep.engine.lease``), and a second one is refused.
"""

from __future__ import annotations

import uuid
import warnings
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from poisonsweep.engine.sink import COMPACTED, SCHEMAS, TABLES, DamagedFile, file_problems, filesystem, masked, publish

# rows per row group of a compacted file: large enough for fast scans, small enough that a query for
# a few trials (sorted by trial_id, so row-group statistics prune) reads little of the scores table
ROW_GROUP_ROWS = 256 * 1024
# per-trial files read into memory at once while compacting, at most so many and so many bytes on disk
# (bounded memory whatever the sweep's size: benchmarks/RESULTS.md, "Compaction's memory")
FILES_PER_BATCH = 2000
BYTES_PER_BATCH = 16 * 1024 * 1024
# a reader retries this often when compaction deleted a file between its listing and its read
READ_ATTEMPTS = 3


@dataclass
class TableFiles:
    """The data files of one table: per-trial files by trial id, compacted files newest first."""

    per_trial: dict[str, pafs.FileInfo] = field(default_factory=dict)
    compacted: list[pafs.FileInfo] = field(default_factory=list)


def _generation(info: pafs.FileInfo) -> int:
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
    files.compacted.sort(key=lambda info: (_generation(info), info.base_name), reverse=True)
    return files


def _isin(ids) -> pc.Expression:
    return pc.field("trial_id").isin(pa.array(sorted(ids), pa.string()))


def _among(ids) -> pc.Expression:
    """``trial_id`` in ``ids``, with the range first: a compacted file is sorted by trial_id, so its
    row groups' statistics let the reader skip every group outside the range."""
    field = pc.field("trial_id")
    return (field >= min(ids)) & (field <= max(ids)) & _isin(ids)


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
            condition = ~_isin(taken)
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


# ------------------------------------------------------------------------------------------------ compaction


@dataclass
class Compacted:
    """What ``compact`` did to one table."""

    table: str
    files_merged: int = 0
    rows: int = 0
    written: list[str] = field(default_factory=list)  # the new compacted files' names
    removed: int = 0  # per-trial and older compacted files deleted
    kept: int = 0  # per-trial files rewritten while compacting (left in place; they win)


def _write_batches(fs, path: str, batches, schema: pa.Schema) -> int:
    rows, pending = 0, []  # batches gathered into row groups of ROW_GROUP_ROWS (the last may be smaller)
    with fs.open_output_stream(path) as stream, pq.ParquetWriter(stream, schema, compression="zstd") as writer:
        for batch in batches:
            pending.append(batch)
            rows += batch.num_rows
            if sum(piece.num_rows for piece in pending) >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
                pending = []
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
    return rows


def _write_atomically(fs, final: str, batches, schema: pa.Schema) -> int:
    """Write ``batches`` (Arrow tables) to ``final``, visible only when complete; returns the rows written."""
    return publish(fs, final, lambda path: _write_batches(fs, path, batches, schema))


def _new_name(files: TableFiles) -> str:
    generation = max((_generation(info) for info in files.compacted), default=0) + 1
    return f"compacted-{generation:06d}-{uuid.uuid4().hex[:8]}.parquet"


def _file_batches(infos: list[pafs.FileInfo]):
    """``infos`` cut into consecutive runs of at most ``FILES_PER_BATCH`` files and ``BYTES_PER_BATCH`` bytes."""
    batch, size = [], 0
    for info in infos:
        if batch and (len(batch) == FILES_PER_BATCH or size + info.size > BYTES_PER_BATCH):
            yield batch
            batch, size = [], 0
        batch.append(info)
        size += info.size
    if batch:
        yield batch


def _sorted_batches(fs, table: str, infos: list[pafs.FileInfo]):
    """The per-trial files' rows, sorted by trial_id, a bounded batch of files at a time (:func:`_file_batches`)."""
    infos = sorted(infos, key=lambda info: info.base_name)  # file name = trial id: batches follow in order
    for chosen in _file_batches(infos):
        paths = [info.path for info in chosen]
        batch = ds.dataset(paths, schema=SCHEMAS[table], format="parquet", filesystem=fs).to_table()
        if batch.num_rows:  # no empty row groups (most trials have no unlearning or influence rows)
            yield batch.sort_by("trial_id")


def _delete_if_unchanged(fs, infos: list[pafs.FileInfo]) -> tuple[int, int]:
    """Delete the files not modified since they were listed; returns (deleted, kept)."""
    now = {info.path: info for info in fs.get_file_info([info.path for info in infos])}
    deleted = kept = 0
    for info in infos:
        current = now[info.path]
        if current.type == pafs.FileType.File and (current.mtime, current.size) == (info.mtime, info.size):
            fs.delete_file(info.path)
            deleted += 1
        else:
            kept += 1
    return deleted, kept


def compact_table(out: str, table: str, complete: set[str], merge_above: int = 8) -> Compacted:
    """Merge the per-trial files of ``complete`` trials of ``table`` into one new compacted file.

    When the table would then have more than ``merge_above`` compacted files, they are all merged
    into one (older files are deleted after the merged one is in place).
    """
    fs, root = filesystem(out)
    files = table_files(out, table)
    done = Compacted(table)
    chosen = [info for tid, info in files.per_trial.items() if tid in complete]
    if chosen:
        final = f"{root}/{table}/{_new_name(files)}"
        done.rows = _write_atomically(fs, final, _sorted_batches(fs, table, chosen), SCHEMAS[table])
        done.files_merged, done.written = len(chosen), [final.rsplit("/", 1)[1]]
        done.removed, done.kept = _delete_if_unchanged(fs, chosen)
    files = table_files(out, table)
    if len(files.compacted) > merge_above:
        _merge_compacted(out, table, files, done)
    return done


def _merge_compacted(out: str, table: str, files: TableFiles, done: Compacted) -> None:
    """Rewrite every compacted file of ``table`` as one (each trial's rows from its newest file), streaming."""
    fs, root = filesystem(out)
    final = f"{root}/{table}/{_new_name(files)}"
    _write_atomically(fs, final, _merged_batches(fs, files.compacted, SCHEMAS[table]), SCHEMAS[table])
    done.written.append(final.rsplit("/", 1)[1])
    for info in files.compacted:
        fs.delete_file(info.path)
        done.removed += 1


# rows read from one compacted file at a time while merging: memory stays a few such batches per file,
# whatever the table's size (benchmarks/RESULTS.md, "Compaction's memory")
MERGE_BATCH_ROWS = 64 * 1024


def _merged_batches(fs, compacted: list[pafs.FileInfo], schema: pa.Schema):
    """The rows of ``compacted`` (newest first, each sorted by trial_id) in trial_id order, each trial's from
    the newest file that holds it: a k-way merge of the files' batches.

    A file's buffer holds the rows read from it but not yet given out. Rows of a trial before the
    *frontier* (the smallest last trial id among the buffers of files not read to the end) are complete
    in every buffer, so they are given out; the files whose buffer ends at the frontier read on. Memory:
    a few batches per file plus the rows of the largest trial, whatever the table's size.
    """
    readers = [_conformed(pq.ParquetFile(info.path, filesystem=fs).iter_batches(batch_size=MERGE_BATCH_ROWS), schema)
               for info in compacted]
    buffers = [_read_on(reader, _EMPTY) for reader in readers]  # (rows, read to the end)
    while any(rows.num_rows for rows, _ in buffers):
        open_ends = [_last_id(rows) for rows, ended in buffers if not ended]
        frontier = min(open_ends) if open_ends else None  # None: every file is read to the end
        pieces = []
        for rank, (rows, ended) in enumerate(buffers):
            ready = rows.num_rows if frontier is None else pc.sum(pc.less(rows["trial_id"], frontier)).as_py() or 0
            pieces.append(rows.slice(0, ready))
            rest = rows.slice(ready)
            buffers[rank] = _read_on(readers[rank], rest) if not ended and _last_id(rest) == frontier else (rest, ended)
        merged = _newest_per_trial(pieces)
        if merged.num_rows:
            yield merged


_EMPTY = pa.table({"trial_id": pa.array([], pa.string())})


def _conformed(batches, schema: pa.Schema):
    """``batches`` with ``schema``'s columns: a file written before a column existed gets it as nulls."""
    for batch in batches:
        columns = [batch.column(name) if name in batch.schema.names else pa.nulls(batch.num_rows, schema.field(name).type)
                   for name in schema.names]
        yield pa.RecordBatch.from_arrays(columns, schema=schema)


def _last_id(rows: pa.Table) -> str | None:
    return rows["trial_id"][-1].as_py() if rows.num_rows else None


def _read_on(reader, rows: pa.Table) -> tuple[pa.Table, bool]:
    """``rows`` with ``reader``'s next non-empty batch appended, and whether the reader is done."""
    for batch in reader:
        if batch.num_rows:
            more = pa.Table.from_batches([batch])
            return (pa.concat_tables([rows, more]) if rows.num_rows else more), False
    return rows, True


def _newest_per_trial(pieces: list[pa.Table]) -> pa.Table:
    """The rows of ``pieces`` (newest file first), each trial's from the first piece that holds it, sorted
    by trial_id (stably: a trial's rows keep their order)."""
    taken: set[str] = set()
    kept = []
    for rows in pieces:
        if not rows.num_rows:
            continue
        if taken:
            rows = rows.filter(~_isin(taken))
        taken |= set(pc.unique(rows["trial_id"]).to_pylist())
        kept.append(rows)
    return pa.concat_tables(kept).sort_by("trial_id") if kept else _EMPTY


def compact(out: str) -> list[Compacted]:
    """Compact every table of the record in ``out`` (a directory or URI); safe while a sweep writes.

    Only complete trials are taken: those whose ``trials`` row exists when compaction starts (a
    trial writes that row last). Running it again with nothing new to merge changes nothing. One
    compaction at a time: ``OutputBusy`` when another ``compact`` (or ``repair``) holds the record. The
    temporaries that killed writers left are removed first (``lease.remove_dead_temporaries``).
    """
    from poisonsweep.engine.lease import BESIDE_A_RUN, remove_dead_temporaries, run_guard

    fs, root = filesystem(out)
    if fs.get_file_info(f"{root}/trials").type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{masked(out)!r} holds no trials table: is it a sweep's output directory?")
    with run_guard(out, command="compact"):
        remove_dead_temporaries(out, held="compact", kinds=BESIDE_A_RUN)
        complete = recorded_trials(out, "trials")
        # the trials table last: until then every trial merged elsewhere still has its per-trial trials row
        return [compact_table(out, table, complete) for table in [t for t in TABLES if t != "trials"] + ["trials"]]
