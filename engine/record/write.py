"""Writing the record: one file per table per trial, written atomically, and the plan of the latest run.

``<out>/<table>/<trial_id>.parquet`` (``poisonsweep compact`` later merges them,
``poisonsweep.engine.record.compaction``). A rerun of a trial replaces its files, so no row is ever
duplicated; a reader never sees a half-written file (temporary name, then rename). ``out`` may be a local
path or any URI pyarrow understands (``s3://``, ``gs://``), for cluster runs. ``<out>/sweep.json``
(:func:`write_plan`) lists the trials the latest run planned, so a report can tell which are still missing.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import ArrowException

from poisonsweep.engine.record.row import trial_rows
from poisonsweep.engine.record.tables import PLAN_FILE, SCHEMAS, TABLES, temporary_kind
from poisonsweep.engine.storage import OutputError, filesystem, publish


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


def write_record(config: dict, out: str, outcome, **run) -> dict:
    """Write one trial's rows (``poisonsweep.engine.record.row.trial_rows``: ``outcome`` is its
    ``TrialResult``, the exception it raised, or the text of an error). Returns the ``trials`` row;
    ``OutputError`` when the output cannot be written."""
    rows = trial_rows(config, outcome, **run)
    try:
        write_trial(out, rows["trials"][0]["trial_id"], rows)
    except (OSError, ArrowException) as error:  # a full disk, an object store that does not answer
        raise OutputError.of(out, error) from error
    return rows["trials"][0]


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
