"""Content fingerprints of the datasets a user points at (``arrays``' file, ``image_folder``'s tree): a trial's
identity holds its dataset's fingerprint, so replacing the file under the same path makes new trials (not
"already done" ones), and a node that reads a different file under that path fails instead of mixing data.

The built-in datasets need none: their names fix their content."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Callable

from poisonsweep.tasks.data.readers import DatasetFileError

# dataset name -> fingerprint(params) (None where the data is absent: the data check reports that)
FINGERPRINTS: dict[str, Callable[[dict], str | None]] = {}
_PIECE = 1 << 20


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes; cached per (path, size, modification time), so a replaced file is read again."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while piece := stream.read(_PIECE):
            digest.update(piece)
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    stat = os.stat(path)
    return _file_digest(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


def tree_digest(root: Path) -> str:
    """sha256 over every file under ``root`` (sorted relative paths and each file's digest)."""
    digest, root = hashlib.sha256(), os.path.realpath(root)  # resolved once: its files' paths then are real
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            digest.update(f"{relative}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


def user_path_fingerprint(params: dict) -> str | None:
    """The first 16 hex digits of the content digest of ``params["path"]`` (a file or a folder); None if absent."""
    path = Path(str(params.get("path", ""))).expanduser()
    if path.is_file():
        return file_digest(path)[:16]
    if path.is_dir():
        return tree_digest(path)[:16]
    return None


def dataset_fingerprint(name: str, params: dict | None) -> str | None:
    """The fingerprint of a dataset's content, for datasets that read a user's path (None for the others)."""
    fingerprint = FINGERPRINTS.get(name)
    return fingerprint(params or {}) if fingerprint else None


def check_fingerprint(name: str, params: dict | None, expected: str | None) -> None:
    """``DatasetFileError`` if the data under ``params``' path is not the content the sweep was checked with."""
    if expected is None:
        return
    found = dataset_fingerprint(name, params)
    if found is not None and found != expected:  # absent (None): the loader says where it looked
        path = (params or {}).get("path")
        raise DatasetFileError(path, f"its content (fingerprint {found}) is not what the sweep was checked with "
                                     f"({expected}); it changed, or this node holds a different copy")
