"""The record's tables and the names of its files: what a results directory holds and how each file is named.

``<out>/<table>/<trial_id>.parquet``: one file per table per trial (``poisonsweep.engine.record.write``);
``<out>/<table>/compacted-<generation>-<tag>.parquet``: the merged files of ``poisonsweep compact``
(``poisonsweep.engine.record.compaction``); ``<out>/sweep.json``: the trials the latest run planned. The
schemas below are the record's format: a results directory written by an older version reads with them
(a file may lack the columns added since, never have other types).
"""

from __future__ import annotations

import re

import pyarrow as pa

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
COMPACTED = re.compile(r"compacted-(\d+)-[0-9a-f]+\.parquet")  # a compacted file's name (record.compaction)
PLAN_FILE = "sweep.json"  # the trials the latest run planned, for the report


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
