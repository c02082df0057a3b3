"""One trial's rows, built in one place: :func:`trials_row` makes every trial's ``trials`` row, whichever
path ran it (a solo trial, a member of a pack, a trial whose plugin could not be imported), and
:func:`trial_rows` keys the rows of the other tables with the trial's id and grouping columns.

A ``trials`` row has four parts: the trial's identity (its id and config columns), what the trial measured
(``poisonsweep.tasks.trial.measured_row``, absent when it failed), its outcome (``status``, ``error``) and
where and when it ran (node, code version, plugins, start, finish). Every column of the table's schema is
in the row, None where the trial has no value; ``tables`` is added when it is written (``write_trial``).
"""

from __future__ import annotations

import datetime as dt
import socket
import sys
import traceback

from poisonsweep.engine.record.tables import SCHEMAS
from poisonsweep.engine.storage import masked

# engine.config (and through it torch and every registry) is imported inside the functions that need it:
# a trial process imports this module at its start (``poisonsweep.engine.worker``)

TRIALS_COLUMNS = [name for name in SCHEMAS["trials"].names if name != "tables"]
UNKNOWN_NODE = {"node": None, "node_ip": None, "ray_node_id": None}


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def this_node() -> dict:
    """Where this process runs: host name, and the Ray node's IP and id when inside Ray.

    Two Ray nodes can share a host (and an IP): only ``ray_node_id`` tells them apart.
    """
    where = {"node": socket.gethostname(), "node_ip": None, "ray_node_id": None}
    ray = sys.modules.get("ray")  # never import Ray just to ask: a notebook run has no Ray
    if ray is not None and ray.is_initialized():
        where["node_ip"] = ray.util.get_node_ip_address()
        where["ray_node_id"] = ray.get_runtime_context().get_node_id()
    return where


def _error_text(outcome) -> str | None:
    """The ``error`` of a trial whose ``outcome`` is the text of an error or the exception it raised, else None."""
    if isinstance(outcome, str):
        return outcome
    if isinstance(outcome, BaseException):
        trace = "".join(traceback.format_exception(outcome))
        return f"{type(outcome).__name__}: {outcome}\n{trace}"
    return None


def trials_row(config: dict, outcome, *, started: dt.datetime, finished: dt.datetime | None = None,
               version: str = "", where: dict | None = None, plugins=(), pack_note: str | None = None) -> dict:
    """The trial's ``trials`` row: ``outcome`` is its ``TrialResult``, the exception it raised, or the text of
    an error. ``where`` (host, Ray node) defaults to this process's; ``pack_note`` says why a trial asked to
    be packed trained alone, when the trial itself does not say. Every column but ``tables``, in order."""
    from poisonsweep.engine.config import config_columns, trial_id
    from poisonsweep.engine.plugins import column

    error = _error_text(outcome)
    measured = outcome.tables["trials"][0] if error is None else {}
    unknown = set(measured) - set(TRIALS_COLUMNS)
    if unknown:
        raise ValueError(f"the trial measured columns not in the trials table: {sorted(unknown)}")
    finished = now() if finished is None else finished
    row = dict.fromkeys(TRIALS_COLUMNS)
    row.update({"trial_id": trial_id(config), **config_columns(config)})
    row.update(measured)
    row.update({"status": "ok" if error is None else "failed",
                "error": None if error is None else masked(error),  # an error may quote the output URI, with its password
                **(where if where is not None else this_node()), "code_version": version, "plugins": column(plugins),
                "started_at": started, "finished_at": finished, "total_seconds": (finished - started).total_seconds()})
    if row["pack_note"] is None and error is None and pack_note is not None:
        row["pack_note"] = pack_note
    return row


def trial_rows(config: dict, outcome, **run) -> dict[str, list[dict]]:
    """Every table's rows of one trial (``outcome`` and ``run`` as for :func:`trials_row`): its ``trials``
    row, and the other tables' rows of its ``TrialResult`` (none when it failed) with its id and keys."""
    from poisonsweep.engine.config import key_columns

    row = trials_row(config, outcome, **run)
    tables = outcome.tables if row["status"] == "ok" else {}
    keys = {"trial_id": row["trial_id"], **key_columns(config)}
    own = {"trial_id": row["trial_id"]}
    return {
        "trials": [row],
        "detections": [{**keys, **r} for r in tables.get("detections", [])],
        "unlearning": [{**keys, **r} for r in tables.get("unlearning", [])],
        "scores": [{**own, **r} for r in tables.get("scores", [])],
        "influence": [{**own, **r} for r in tables.get("influence", [])],
    }
