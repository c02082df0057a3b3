"""Damage and its repair: the files of a table that are not readable Parquet of its schema, moved aside to
``<out>/_quarantine/``, and the temporaries that killed writers left.

A file in a table directory that is not readable Parquet of the table's schema (a truncated copy, a stray
file, another program's Parquet) is never fatal: readers skip it with a :class:`DamagedFile` warning that
names it (``poisonsweep.engine.record.read``), ``poisonsweep repair DIR`` and every ``run`` move it to
``DIR/_quarantine/`` (:func:`quarantine`), and ``run`` recomputes its trial (its rows are then missing).
"""

from __future__ import annotations

import contextlib
import os
import shutil

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from poisonsweep.engine.lease import GUARDED, lock_path
from poisonsweep.engine.record.tables import COMPACTED, SCHEMAS, TABLES, TEMPORARY_KINDS, temporary_kind
from poisonsweep.engine.storage import filesystem, masked

QUARANTINE_DIR = "_quarantine"
# what ``compact`` and ``report`` tidy: they run beside a live sweep, whose writers' temporaries they leave
# to ``run`` and ``repair`` (the run lock alone cannot vouch for workers on other nodes)
BESIDE_A_RUN = ("compact", "report")


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


def damage(out: str) -> dict[str, str]:
    """Every file in a table directory that is not readable Parquet of its table's schema, and why."""
    found = {}
    for table in TABLES:
        found.update(file_problems(out, table)[1])
    return found


def damaged_files(out: str) -> list[str]:
    """Every file in a table directory that is not readable Parquet of its table's schema."""
    return list(damage(out))


def quarantine(out: str) -> list[tuple[str, str, str]]:
    """Move every damaged file to ``<out>/_quarantine/<table>/``; returns (from, to, what was wrong)."""
    fs, root = filesystem(out)
    moved = []
    for path, problem in damage(out).items():
        table, name = path.rsplit("/", 2)[-2:]
        target = f"{root}/{QUARANTINE_DIR}/{table}/{name}"
        fs.create_dir(f"{root}/{QUARANTINE_DIR}/{table}", recursive=True)
        fs.move(path, target)
        moved.append((path, target, problem))
    return moved


def remove_temporaries(out: str, kinds=TEMPORARY_KINDS) -> int:
    """Delete the temporaries that killed writers of ``kinds`` left (local directories only: object
    stores never show an unfinished upload). Only our own temporary names, only in the record's root and
    its table folders, and a link is never followed nor removed. The caller makes sure no live writer
    of those kinds is at work (:func:`remove_dead_temporaries`). Returns how many
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


def remove_dead_temporaries(out: str, held: str | None = None, kinds=GUARDED) -> int:
    """Remove the temporaries that killed commands of ``kinds`` (``run``, ``compact``, ``report``) left in
    the local record ``out``; a command's own are removed only while its lock is free (no live writer
    of them) or ``held`` (by the caller). Returns how many were removed."""
    from filelock import FileLock, Timeout

    if "://" in out or not os.path.isdir(filesystem(out)[1]):
        return 0
    with contextlib.ExitStack() as locks:
        free = []
        for command in kinds:
            if command != held:
                path = lock_path(out, command)
                if os.path.islink(path):  # never open a planted link
                    continue
                try:
                    locks.enter_context(FileLock(path, timeout=0))
                except (Timeout, OSError):  # busy, or a read-only record: leave that command's temporaries
                    continue
            free.append(command)
        return remove_temporaries(out, free)
