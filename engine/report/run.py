"""What was run: the sweep's resolved config, the code version(s), the machines and the time span,
from the ``trials`` table alone (every row carries its resolved config as ``config_json``)."""

from __future__ import annotations

import json

import pandas as pd

# a swept key lists at most this many of its values on the page
VALUES_SHOWN = 12


def _counted(values: pd.Series) -> str:
    """``a (3 trials), b (1 trial)``, most frequent first; missing values as "unknown"."""
    counts = values.fillna("unknown").astype(str).value_counts()
    return ", ".join(f"{value} ({n} trial{'s' if n != 1 else ''})" for value, n in counts.items())


def _when(stamp) -> str:
    return pd.Timestamp(stamp).strftime("%Y-%m-%d %H:%M:%S UTC") if pd.notna(stamp) else "unknown"


def run_overview(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per fact: sweep name(s), code version(s), machines (node and device), time span."""
    started, finished = trials["started_at"].min(), trials["finished_at"].max()
    span = (finished - started) if pd.notna(started) and pd.notna(finished) else None
    machines = trials["node"].fillna("unknown").astype(str) + " · " + trials["device"].fillna("?").astype(str)
    versions = trials["code_version"].replace("", None)
    facts = [("sweep", _counted(trials["sweep"])), ("code version", _counted(versions)),
             ("machine · device", _counted(machines)),
             ("time", f"{_when(started)} to {_when(finished)}" + (f" ({_duration(span)})" if span is not None else "")),
             ("trials", f"{len(trials)} recorded")]
    return pd.DataFrame(facts, columns=["", "value"])


def _duration(span: pd.Timedelta) -> str:
    seconds = int(span.total_seconds())
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min {rest % 60} s"


def _flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Dotted keys of nested mappings; lists and scalars as compact JSON."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value, sort_keys=True)
    return flat


def resolved_config(trials: pd.DataFrame) -> pd.DataFrame:
    """The resolved trial config (every default filled in), one row per key: its value where all trials
    agree, else the values swept."""
    configs = [_flatten(json.loads(text)) for text in trials["config_json"].dropna().unique()]
    keys = sorted({key for config in configs for key in config})
    rows = []
    for key in keys:
        values = sorted({config.get(key, "(unset)") for config in configs})
        if len(values) == 1:
            rows.append((key, values[0]))
        else:
            more = f" … ({len(values)} values)" if len(values) > VALUES_SHOWN else ""
            rows.append((key, "swept: " + ", ".join(values[:VALUES_SHOWN]) + more))
    return pd.DataFrame(rows, columns=["key", "value"])
