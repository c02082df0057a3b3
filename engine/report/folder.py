"""The report's folder: ``report`` writes only into a folder it created or one that holds an earlier
report of ours, and there replaces or removes only the files that report wrote.

A report claims its folder with the marker file ``.poisonsweep-report`` (JSON: the names of the files
it wrote), written before anything else. Any other folder that is not empty, the record itself and
the record's own folders (its tables, ``_tune``...) are refused before anything is written. The new
report is built in a hidden staging folder inside the target, then its files are renamed into place
one by one: an earlier report stays whole until the new one is complete, and a file the user added
to the folder is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from poisonsweep.engine.report.status import RecordError
from poisonsweep.engine.record.tables import TABLES
from poisonsweep.engine.storage import filesystem

T = TypeVar("T")

MARKER = ".poisonsweep-report"
_STAGING = ".staging."  # + a random hex + ".tmp": a report being built (or one killed mid-way)


class ReportFolderError(RecordError):
    """The report's folder is not one ``report`` may write into; nothing was written."""


def _refuse(folder: Path, why: str) -> None:
    raise ReportFolderError(f"report folder {str(folder)!r} {why}; nothing was written: choose a new or empty "
                            "folder with --out")


def check_report_folder(folder: Path, out: str) -> None:
    """Raise ``ReportFolderError`` unless ``folder`` is missing, empty, or holds a report of ours, and lies
    outside the record ``out``'s own files."""
    if folder.is_symlink():
        _refuse(folder, "is a link")
    if folder.exists() and not folder.is_dir():
        _refuse(folder, "is not a folder")
    _refuse_record_folders(folder, out)
    if folder.is_dir() and not _is_ours(folder) and any(folder.iterdir()):
        _refuse(folder, f"holds files that are not a poisonsweep report (it has no {MARKER} file)")


def _refuse_record_folders(folder: Path, out: str) -> None:
    if "://" in out:
        return
    record, target = Path(filesystem(out)[1]).resolve(), folder.resolve()
    if target == record or target in record.parents:
        _refuse(folder, f"would hold the record {str(record)!r}")
    if record in target.parents:
        top = target.relative_to(record).parts[0]
        if top in TABLES or top.startswith(("_", ".")):
            _refuse(folder, f"lies inside the record's own folder {str(record / top)!r}")


def _is_ours(folder: Path) -> bool:
    marker = folder / MARKER
    return marker.is_file() and not marker.is_symlink()


def _files_of_earlier_report(folder: Path) -> list[str]:
    """The names the earlier report listed in its marker, only plain names inside ``folder``."""
    try:
        names = json.loads((folder / MARKER).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [name for name in names if isinstance(name, str) and _plain_name(name)]


def _plain_name(name: str) -> bool:
    return name == Path(name).name and not name.startswith(".") and "\\" not in name


def _write_marker(folder: Path, names: list[str]) -> None:
    temporary = folder / f".{MARKER}.{uuid.uuid4().hex}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w") as stream:
        json.dump({"written_by": "poisonsweep report", "files": sorted(names)}, stream)
    os.replace(temporary, folder / MARKER)  # replaces a link itself, never what it points to


def write_report_folder(folder: Path, out: str, build: Callable[[Path], T]) -> T:
    """Check ``folder`` (:func:`check_report_folder`), call ``build(staging)`` to write the report's files
    into a fresh staging folder, then move them into ``folder`` and remove the files of the earlier
    report that the new one no longer writes. Returns what ``build`` returned.

    When ``build`` raises, nothing of the new report is left and the earlier report is as it was.
    """
    check_report_folder(folder, out)
    folder.mkdir(parents=True, exist_ok=True)
    earlier = _files_of_earlier_report(folder) if _is_ours(folder) else []
    if not _is_ours(folder):
        _write_marker(folder, [])  # claim the (new or empty) folder before anything else is written
    for left in folder.glob(f"{_STAGING}*.tmp"):  # a report killed mid-way (only ever ours: the folder is)
        if left.is_dir() and not left.is_symlink():
            shutil.rmtree(left, ignore_errors=True)
    staging = folder / f"{_STAGING}{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    try:
        result = build(staging)
        names = sorted(path.name for path in staging.iterdir())
        _write_marker(folder, sorted(set(earlier) | set(names)))  # a crash while moving still knows every file
        for name in names:
            os.replace(staging / name, folder / name)
        for name in set(earlier) - set(names):
            path = folder / name
            if path.is_file() or path.is_symlink():  # unlink removes a link itself, never its target
                path.unlink()
        _write_marker(folder, names)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
