"""Atomic writing of local files and folders: write under a hidden temporary name beside the target,
then rename it onto the target in one step, so a reader never sees a half-written file and a crash
leaves the earlier version as it was. Used by the engine's record and report; imports neither Ray nor
the engine."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def temporary_path(path: str | os.PathLike) -> Path:
    """``.<name>.<random>.tmp`` in the target's folder (the same filesystem, so the rename is atomic).
    The leading dot hides it from pyarrow, pandas, polars and DuckDB globs."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], T],
                 discard_on: type[BaseException] = Exception) -> T:
    """Call ``write(temporary)``, which creates a file or a folder at ``temporary``, then move it onto
    ``path`` and return what ``write`` returned.

    When ``write`` raises a ``discard_on`` exception the temporary is removed; other exceptions (the
    default: ``KeyboardInterrupt``, as for a killed process) leave it, hidden, for whoever tidies up
    (``poisonsweep.engine.record.repair.remove_temporaries``). A folder may take the place of a missing or empty folder
    only: one that holds files is never moved aside or deleted (``OSError``, the temporary removed).
    """
    path = Path(path)
    temporary = temporary_path(path)
    try:
        result = write(temporary)
        os.replace(temporary, path)  # onto a folder only when it is empty: the rename fails otherwise
    except discard_on:
        _remove(temporary)
        raise
    return result


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
