"""What a rerun of a sweep does, and why the record can be trusted: which code wrote each row,
which trials are really done, what becomes of damaged files, and one writer per output directory.

* **Code version.** ``code_version()`` is ``<package version>+src.<hash>``: the version from the
  installed package's metadata and a SHA-256 of the science code that computes every number
  (the ``.py`` files of ``tasks/``, as imported). It needs no ``.git``, so a wheel on a cluster node
  reports the same value as the checkout it was built from, and an uncommitted edit (a dirty tree)
  gives a different hash. The driver computes it once and every trial row records it. A sweep with
  plugins appends ``.plugins.<hash>`` of their sources (``poisonsweep.engine.plugins``).
* **Done.** A trial is done when its ``trials`` row says ``ok``, every table its row lists in
  ``tables`` (those it wrote rows to) still holds its rows in readable Parquet, and
  (``rerun="stale"``) its code version is the current one. A row without ``tables`` (a record
  written before the column existed) is done unless one of its per-trial files is damaged.
* **Damage.** A file in a table directory that is not readable Parquet of the table's schema is never
  fatal: readers skip it, ``repair`` and every ``run`` move it to ``DIR/_quarantine/``
  (``poisonsweep.engine.record.repair``), and ``run`` recomputes its trial (its rows are then missing).
* **One writer.** ``run`` holds ``DIR/.run.lock`` (``filelock``) for a local directory and a lease,
  ``<out>/.run.lease``, on an object store (``poisonsweep.engine.lease``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from importlib import metadata
from pathlib import Path, PurePosixPath

from poisonsweep.engine.record.read import read_table, trials_with_rows
from poisonsweep.engine.record.repair import damaged_files
from poisonsweep.engine.record.tables import TABLES

RERUN_CHOICES = ("failed", "stale", "all")


def source_hash() -> str:
    """SHA-256 (12 hex digits) of the science code: every ``.py`` file under ``tasks/``, by relative path."""
    from poisonsweep import tasks

    root = Path(tasks.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def code_version(plugins=()) -> str:
    """``<version>+src.<hash>``: the installed package's version and the hash of the code that ran; with
    plugins (``poisonsweep.engine.plugins.Plugin``), ``.plugins.<hash>`` of their sources after it, so that
    editing a plugin makes its trials stale as editing ``tasks/`` does."""
    try:
        version = metadata.version("poisonsweep")
    except metadata.PackageNotFoundError:
        version = "unknown"
    if not plugins:
        return f"{version}+src.{source_hash()}"
    from poisonsweep.engine.plugins import combined_hash

    return f"{version}+src.{source_hash()}.plugins.{combined_hash(plugins)}"


def trial_versions(out: str) -> dict[str, tuple[str, str | None, list[str] | None]]:
    """trial_id -> (status, code_version, tables) of every readable trials row (``tables``: those it
    wrote rows to; None in a record from before the column)."""
    rows = read_table(out, "trials", ["trial_id", "status", "code_version", "tables"]).to_pylist()
    return {row["trial_id"]: (row["status"], row["code_version"], row["tables"]) for row in rows}


def complete_trials(out: str, versions: dict | None = None, damaged: list[str] | None = None) -> set[str]:
    """Trials whose row says ``ok``, none of whose per-trial files is damaged, and whose rows are in
    every table their row lists (a file lost or quarantined since sends the trial back).

    Every table gets a file per trial (empty tables too) and the ``trials`` row is written last,
    so an ``ok`` row means the trial's other files were written; its ``tables`` say which hold rows.
    Compacted files hold complete trials only (``poisonsweep.engine.record.compaction``).
    ``versions`` and ``damaged``, when the caller already has them, save reading the record again.
    """
    versions = trial_versions(out) if versions is None else versions
    damaged = damaged_files(out) if damaged is None else damaged
    ok = {tid for tid, (status, *_) in versions.items() if status == "ok"}
    ok -= {PurePosixPath(path).stem for path in damaged}
    for table in TABLES:
        listed = {tid for tid in ok if table in (versions[tid][2] or ())}
        if listed:
            ok -= listed - trials_with_rows(out, table, listed, damaged)
    return ok


def stale_trials(out: str, trial_ids: list[str], version: str, versions: dict | None = None) -> Counter:
    """Code version -> number of the planned ``ok`` trials recorded by another code version."""
    versions = trial_versions(out) if versions is None else versions
    return Counter(versions[tid][1] or "unknown" for tid in trial_ids
                   if tid in versions and versions[tid][0] == "ok" and versions[tid][1] != version)


def trials_to_run(out: str, trial_ids: list[str], rerun: str, version: str, versions: dict | None = None,
                  damaged: list[str] | None = None) -> list[str]:
    """The planned trial ids that must run: ``failed`` (the default) runs every trial not done,
    ``stale`` also those done by another code version, ``all`` every trial. ``versions`` and
    ``damaged`` as for :func:`complete_trials`."""
    if rerun not in RERUN_CHOICES:
        raise ValueError(f"rerun must be one of {', '.join(RERUN_CHOICES)}; got {rerun!r}")
    if rerun == "all":
        return list(trial_ids)
    versions = trial_versions(out) if versions is None else versions
    done = complete_trials(out, versions, damaged)
    if rerun == "stale":
        done = {tid for tid in done if versions[tid][1] == version}
    return [tid for tid in trial_ids if tid not in done]


def version_note(versions) -> str | None:
    """A sentence if the ``ok`` rows of a table come from more than one code version, else None."""
    counts = Counter(v if isinstance(v, str) else "unknown" for v in versions)
    if len(counts) < 2:
        return None
    listed = ", ".join(f"{version}: {n}" for version, n in counts.most_common())
    return (f"the ok trials mix {len(counts)} code versions ({listed}); numbers from different code are "
            "averaged together. `poisonsweep run CONFIG --rerun stale` recomputes the older ones.")

