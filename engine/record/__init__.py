"""The Parquet record of a sweep: what its results directory holds, and every way it is written and read.

``<out>/<table>/<trial_id>.parquet``, one file per table per trial, written atomically; ``poisonsweep compact``
merges them into ``<out>/<table>/compacted-<generation>-<tag>.parquet``; ``<out>/sweep.json`` lists the
trials the latest run planned. The package's modules, each importing only those before it:

* ``tables``: the tables' schemas and the names of the record's files (the record's format);
* ``row``: one trial's rows, its ``trials`` row built in one place (``trials_row``);
* ``write``: a trial's files, written atomically, and the plan;
* ``repair``: damaged files (named, skipped, moved to ``_quarantine/``) and dead writers' temporaries;
* ``read``: the record read in either form, each trial's rows once (``read_table``);
* ``compaction``: ``compact``, safe while a sweep writes.

Where the output lives (local or an object store) is ``poisonsweep.engine.storage``'s, which commands
hold it is ``poisonsweep.engine.lease``'s, and which trials a rerun runs is ``poisonsweep.engine.resume``'s.
"""

from poisonsweep.engine.record.compaction import Compacted, compact, compact_table
from poisonsweep.engine.record.read import TableFiles, read_plan, read_table, recorded_trials, table_files, trials_with_rows
from poisonsweep.engine.record.repair import (
    QUARANTINE_DIR, DamagedFile, damage, damaged_files, file_problems, quarantine, remove_dead_temporaries,
    remove_temporaries,
)
from poisonsweep.engine.record.row import trial_rows, trials_row
from poisonsweep.engine.record.tables import CONFIG_COLUMNS, KEY_COLUMNS, PLAN_FILE, SCHEMAS, TABLES
from poisonsweep.engine.record.write import write_plan, write_record, write_trial, write_trial_table

__all__ = [
    "CONFIG_COLUMNS", "KEY_COLUMNS", "PLAN_FILE", "QUARANTINE_DIR", "SCHEMAS", "TABLES", "Compacted", "DamagedFile",
    "TableFiles", "compact", "compact_table", "damage", "damaged_files", "file_problems", "quarantine",
    "read_plan", "read_table", "recorded_trials", "remove_dead_temporaries", "remove_temporaries", "table_files",
    "trial_rows", "trials_row", "trials_with_rows", "write_plan", "write_record", "write_trial", "write_trial_table",
]
