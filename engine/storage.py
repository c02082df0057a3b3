"""Where a sweep's output lives: a local directory or any URI pyarrow understands (``s3://``, ``gs://``).

The pyarrow filesystem of an output, URIs joined and named without losing their query string, every
secret masked before it is printed or recorded, a file published only whole, and the one error for an
output that cannot be written. The record (``poisonsweep.engine.record``), the locks
(``poisonsweep.engine.lease``), the artifacts and the run's log all reach the output through here.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Callable, TypeVar

import pyarrow.fs as pafs

from poisonsweep.tasks.files import atomic_write

T = TypeVar("T")


def join_uri(out: str, *parts: str) -> str:
    """``out`` with ``parts`` appended to its path, before a URI's query string: ``s3://b/d?region=x``
    and ``_tune`` give ``s3://b/d/_tune?region=x`` (pyarrow and Ray read the query as options)."""
    base, mark, query = out.partition("?") if "://" in out else (out, "", "")
    return "/".join([base.rstrip("/"), *parts]) + mark + query


def uri_name(uri: str) -> str:
    """The last folder of a URI's path, without its query string."""
    return uri.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


# a URI's password (``s3://key:SECRET@bucket``) and the values of query options that hold secrets
_URI_PASSWORD = re.compile(r"\b([A-Za-z][\w+.-]*://[^:@/?\s]*):[^@\s]*@")
_SECRET_OPTION = re.compile(r"([?&][^=&\s]*(?:secret|token|password|credential)[^=&\s]*=)[^&\s]*", re.IGNORECASE)


def masked(text: str) -> str:
    """``text`` (a URI, or a message that may hold one) fit to print or record: every URI's password and
    secret query values become ``***``. Everything that prints or records an output URI goes through it."""
    return _SECRET_OPTION.sub(r"\1***", _URI_PASSWORD.sub(r"\1:***@", text))


class OutputError(RuntimeError):
    """The output cannot be written (a full disk, an object store that does not answer): one line that
    names the path and the cause; the trials it hit are left to run again."""

    @classmethod
    def of(cls, out: str, error: BaseException) -> "OutputError":
        where = getattr(error, "filename", None) or out
        cause = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [type(error).__name__])[-1]
        return cls(masked(f"cannot write to {where}: {cause}"))


def filesystem(out: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path for a local directory or a URI."""
    if "://" in out:
        return pafs.FileSystem.from_uri(out)
    return pafs.LocalFileSystem(), os.path.abspath(out)


def probe_name() -> str:
    """A name of its own for a write probe (``.write-check.<random>``): never one a planted file could hold."""
    return f".write-check.{uuid.uuid4().hex}"


def publish(fs: pafs.FileSystem, final: str, write: Callable[[str], T]) -> T:
    """Call ``write(path)`` so that ``final`` is seen only whole, and return what it returned.

    On a local disk ``write`` fills a dot-prefixed temporary (skipped by pyarrow, pandas, polars and
    DuckDB globs) that is then renamed onto ``final``; an object store publishes an object only once
    its upload completes, so there ``write`` writes ``final`` itself.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        return atomic_write(final, lambda temporary: write(str(temporary)))
    return write(final)
