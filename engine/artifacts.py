"""Work shared between trials (FLIP's experts) when the record lives in an object store.

A local (or network-mounted) output directory holds the artifacts in ``<out>/_artifacts/``, and
the poison that makes one locks it there (``poisonsweep.tasks.poisons.flip``). An object store has no file locks and
no local paths, so a trial there works in a node-local cache, ``$POISONSWEEP_CACHE`` (default
``~/.cache/poisonsweep``) ``/artifacts/<hash of the URI>/``, and the engine mirrors it:

* before the trial, every ``<out>/_artifacts/<name>`` missing from the cache is downloaded;
* after it, every file the trial added to the cache is uploaded (an upload appears whole or not at all).

Artifact names carry the hash of everything that determines them (``poisonsweep.tasks.poisons.flip.artifacts.artifact_key``),
so a file is never stale and never needs a lock across nodes: two nodes that both miss it compute
the same thing, and the later upload replaces an identical object. Trials on one node share the
cache under the poison's own file lock, so each node computes a missing artifact at most once.
Only trials whose poison takes an ``artifact_dir`` pay for the mirroring (one listing and the
downloads it needs).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow.fs as pafs

from poisonsweep.engine.storage import filesystem
from poisonsweep.tasks.files import atomic_write

ARTIFACT_DIR = "_artifacts"


def cache_dir(out: str) -> Path:
    """The node-local artifact cache of the sweep recorded at URI ``out``."""
    base = Path(os.environ.get("POISONSWEEP_CACHE") or Path.home() / ".cache" / "poisonsweep")
    return base / "artifacts" / hashlib.sha256(out.rstrip("/").encode()).hexdigest()[:16]


def uses_artifacts(config: dict) -> bool:
    """Whether the trial's poison caches shared work."""
    from poisonsweep.tasks.poisons import POISONS

    poison = config["poison"]
    return "artifact_dir" in POISONS.get(poison["method"]).needs_for(poison.get("params") or {})


def _remote_files(fs, directory: str) -> dict[str, pafs.FileInfo]:
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return {}
    return {info.base_name: info for info in fs.get_file_info(pafs.FileSelector(directory))
            if info.type == pafs.FileType.File}


def _local_files(local: Path) -> set[str]:
    # the poison's lock files and half-written temporaries are not artifacts
    return {p.name for p in local.iterdir() if p.is_file() and p.suffix not in (".lock", ".tmp")}


def download(out: str) -> tuple[Path, set[str]]:
    """Fill the node's cache from ``<out>/_artifacts``; returns the cache and the names it held after."""
    fs, root = filesystem(out)
    local = cache_dir(out)
    local.mkdir(parents=True, exist_ok=True)
    present = _local_files(local)
    for name, info in _remote_files(fs, f"{root}/{ARTIFACT_DIR}").items():
        if name in present:
            continue
        # atomic: a concurrent trial sees the whole file or none
        atomic_write(local / name, lambda partial, path=info.path: _fetch(fs, path, partial))
        present.add(name)
    return local, present


def _fetch(fs, path: str, target: Path) -> None:
    with fs.open_input_stream(path) as source, open(target, "wb") as sink:
        while chunk := source.read(1 << 22):
            sink.write(chunk)


def upload(out: str, local: Path, before: set[str]) -> list[str]:
    """Upload the artifacts the trial added to the cache; returns their names."""
    fs, root = filesystem(out)
    added = sorted(_local_files(local) - before)
    if added:
        fs.create_dir(f"{root}/{ARTIFACT_DIR}", recursive=True)
    for name in added:
        with open(local / name, "rb") as source, fs.open_output_stream(f"{root}/{ARTIFACT_DIR}/{name}") as sink:
            while chunk := source.read(1 << 22):
                sink.write(chunk)
    return added
