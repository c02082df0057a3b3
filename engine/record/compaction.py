"""Compacting the record: the per-trial files of complete trials merged into one file per table.

A sweep writes one file per table per trial, ``<out>/<table>/<trial_id>.parquet`` (``poisonsweep.engine.record.write``).
``compact`` merges the files of the trials that are complete (their ``trials`` row exists) into
``<out>/<table>/compacted-<generation>-<tag>.parquet``, sorted by ``trial_id``, then deletes the
files it merged. Both kinds are plain Parquet files in the same directory, so pandas, polars and
DuckDB read a compacted record as they read a per-trial one, and ``poisonsweep.engine.record.read``
never counts a trial twice while both copies exist. Compaction deletes a per-trial file only if it is
unchanged since it was read, so a trial rewritten meanwhile keeps its new file.
One ``compact`` at a time per record: it holds ``<out>/.compact.lock`` (a lease on an object store,
``poisonsweep.engine.lease``), and a second one is refused.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from poisonsweep.engine.lease import run_guard
from poisonsweep.engine.record.read import TableFiles, file_generation, recorded_trials, table_files, trial_id_in
from poisonsweep.engine.record.repair import BESIDE_A_RUN, remove_dead_temporaries
from poisonsweep.engine.record.tables import SCHEMAS, TABLES
from poisonsweep.engine.storage import filesystem, masked, publish

# rows per row group of a compacted file: large enough for fast scans, small enough that a query for
# a few trials (sorted by trial_id, so row-group statistics prune) reads little of the scores table
ROW_GROUP_ROWS = 256 * 1024
# per-trial files read into memory at once while compacting, at most so many and so many bytes on disk
# (bounded memory whatever the sweep's size: benchmarks/RESULTS.md, "Compaction's memory")
FILES_PER_BATCH = 2000
BYTES_PER_BATCH = 16 * 1024 * 1024


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
    generation = max((file_generation(info) for info in files.compacted), default=0) + 1
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
            rows = rows.filter(~trial_id_in(taken))
        taken |= set(pc.unique(rows["trial_id"]).to_pylist())
        kept.append(rows)
    return pa.concat_tables(kept).sort_by("trial_id") if kept else _EMPTY


def compact(out: str) -> list[Compacted]:
    """Compact every table of the record in ``out`` (a directory or URI); safe while a sweep writes.

    Only complete trials are taken: those whose ``trials`` row exists when compaction starts (a
    trial writes that row last). Running it again with nothing new to merge changes nothing. One
    compaction at a time: ``OutputBusy`` when another ``compact`` (or ``repair``) holds the record. The
    temporaries that killed writers left are removed first (``record.repair.remove_dead_temporaries``).
    """
    fs, root = filesystem(out)
    if fs.get_file_info(f"{root}/trials").type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{masked(out)!r} holds no trials table: is it a sweep's output directory?")
    with run_guard(out, command="compact"):
        remove_dead_temporaries(out, held="compact", kinds=BESIDE_A_RUN)
        complete = recorded_trials(out, "trials")
        # the trials table last: until then every trial merged elsewhere still has its per-trial trials row
        return [compact_table(out, table, complete) for table in [t for t in TABLES if t != "trials"] + ["trials"]]
