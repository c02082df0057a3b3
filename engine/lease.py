"""One ``run`` per output, and one ``compact`` (or ``repair``) per record: a file lock for a local
directory, a lease for an object store.

Each command has its own: ``run`` holds ``.run.lock`` / ``.run.lease``, ``compact`` and ``repair``
hold ``.compact.lock`` / ``.compact.lease``, ``report`` holds ``.report.lock`` while it writes into a
local record; ``poisonsweep.engine.record.repair.remove_dead_temporaries`` removes only the
temporaries of commands whose lock is free (their writers are dead). Below, for ``run``:

A local directory gets ``DIR/.run.lock`` (``filelock``: the operating system releases it when the
process dies). An object store (``s3://``, ``gs://``) has no locks and pyarrow offers no atomic
compare-and-swap, so ``run`` keeps a *lease* there instead: ``<out>/.run.lease``, a small JSON
object (host, pid, a random token, when the run started, its latest heartbeat) that a daemon thread
rewrites every ``heartbeat`` seconds. A second ``run`` that finds a lease whose heartbeat is younger
than ``expiry`` (3 heartbeats) stops before Ray starts, naming the holder; an older lease belongs to
a run that died and is taken over. The lease is deleted when the run ends, by error or Ctrl-C too.

This is a check, not a lock: two runs that start within the same moment can both read "no lease"
and both write one (the later write wins, and the earlier run's heartbeat then sees another token and
says so). Either way no row is duplicated, since every trial's file is replaced, not appended to.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from datetime import datetime, timezone

from pyarrow import ArrowException

from poisonsweep.engine.storage import filesystem, join_uri, masked
from poisonsweep.tasks.registry import ConfigError

LOCK_FILE = ".run.lock"
LEASE_FILE = ".run.lease"
READ_ATTEMPTS = 5  # a lease read while its holder rewrites it can come back torn (see Lease.read)
GUARDED = ("run", "compact", "report")  # the commands with a lock (lease) of their own: .<command>.lock
HEARTBEAT_SECONDS = 30.0
EXPIRY_HEARTBEATS = 3


class OutputBusy(ConfigError):
    """Another ``run`` (``compact``, ...) holds the output's lock or a fresh lease on it."""


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def delete_command(uri: str) -> str:
    """The shell command that deletes the object ``uri``."""
    scheme = uri.split("://", 1)[0]
    tool = {"s3": "aws s3 rm", "gs": "gcloud storage rm"}.get(scheme)
    return f"{tool} {uri}" if tool else f"delete the object {uri}"


class Lease:
    """A context manager holding ``<out>/.run.lease`` on an object store (see the module docstring).

    ``clock`` (seconds since the epoch) is injectable for tests; ``echo`` receives the note printed
    when an expired lease is taken over or the lease is lost to another run.
    """

    def __init__(self, out: str, *, heartbeat: float = HEARTBEAT_SECONDS, expiry: float | None = None,
                 clock=time.time, echo=print, command: str = "run"):
        self.fs, root = filesystem(out)
        self.command = command
        name = LEASE_FILE if command == "run" else f".{command}.lease"
        self.out, self.uri = masked(out), masked(join_uri(out, name))  # for messages: no secret shows
        self.path = f"{root}/{name}"
        self.heartbeat = heartbeat
        self.expiry = EXPIRY_HEARTBEATS * heartbeat if expiry is None else expiry
        self.clock, self.echo = clock, echo
        self.token = secrets.token_hex(16)
        self.started = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict | None:
        """The lease on the store now, or None (no lease, or one that stays unreadable).

        An object store reads a file as its size, then its bytes: a heartbeat that rewrites the lease in
        between gives a torn read that is not JSON. Taken for "no lease", that would let a second run start
        on an output whose lease is fresh, so an unreadable lease is read again, ``READ_ATTEMPTS`` times.
        """
        for attempt in range(READ_ATTEMPTS):
            try:
                with self.fs.open_input_stream(self.path) as stream:
                    lease = json.loads(stream.read())
                return lease if isinstance(lease, dict) else None
            except FileNotFoundError:
                return None
            except ValueError:
                time.sleep(0.05 * (attempt + 1))
            except OSError as error:
                if "not found" in str(error).lower() or "does not exist" in str(error).lower():
                    return None
                raise
        return None

    def _write(self) -> None:
        body = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "started": _iso(self.started), "heartbeat": self.clock(), "heartbeat_at": _iso(self.clock())}
        with self.fs.open_output_stream(self.path) as stream:
            stream.write(json.dumps(body).encode())

    def check(self) -> None:
        """Raise ``OutputBusy`` if another run's lease is fresh; say so if an expired one is taken over."""
        held = self.read()
        if held is None or held.get("token") == self.token:
            return
        age = self.clock() - float(held.get("heartbeat", 0) or 0)
        holder = f"pid {held.get('pid')} on {held.get('host')}, started {held.get('started')}"
        if age < self.expiry:
            raise OutputBusy(
                f"{_another(self.command)} {self.out} (its lease {self.uri}: "
                f"{holder}, heartbeat {max(age, 0):.0f} s ago); wait for it to finish, or if that run is dead, "
                f"wait {self.expiry:.0f} s for the lease to expire or delete it: {delete_command(self.uri)}")
        self.echo(f"took over the expired lease {self.uri} ({holder}, last heartbeat {age:.0f} s ago)")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                held = self.read()
                if held is not None and held.get("token") != self.token:
                    self.echo(f"warning: another run took over {self.uri} ({held.get('host')}, pid {held.get('pid')}); "
                              "two runs now write the same trials (no row is duplicated)")
                    return
                self._write()
            except (OSError, ArrowException):  # the store does not answer: the run itself will say so
                continue

    def __enter__(self) -> "Lease":
        self.check()
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        self._write()
        self._thread = threading.Thread(target=self._beat, name="poisonsweep-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            held = self.read()
            if held is not None and held.get("token") == self.token:
                self.fs.delete_file(self.path)
        except (OSError, ArrowException) as error:  # an outage must not hide the run's own error under a traceback
            cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
            self.echo(masked(f"could not delete the lease {self.uri} ({cause}); it expires {self.expiry:.0f} s after "
                             f"its last heartbeat, or delete it: {delete_command(self.uri)}"))


def _another(command: str) -> str:
    return {"run": "another `poisonsweep run` is writing to",
            "compact": "another `poisonsweep compact` or `repair` is working on",
            "report": "another `poisonsweep report` is writing into"}[command]


def run_guard(out: str, echo=print, command: str = "run"):
    """The guard ``run`` (or ``command``) holds while it writes to ``out``: a :class:`Lease` for an object
    store, a ``filelock`` for a local directory; either raises ``OutputBusy`` on entry if another holds it."""
    if "://" in out:
        return Lease(out, echo=echo, command=command)
    return _local_lock(out, lock_path(out, command), command)


def lock_path(out: str, command: str) -> str:
    return f"{filesystem(out)[1]}/{LOCK_FILE if command == 'run' else f'.{command}.lock'}"


@contextlib.contextmanager
def _local_lock(out: str, path: str, command: str = "run"):
    from filelock import FileLock, Timeout

    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:  # only the acquisition: a Timeout raised by the run itself is not "busy"
        hint = "or choose another --out" if command == "run" else "then try again"
        raise OutputBusy(f"{_another(command)} {out} (it holds {path}); wait for it to finish, {hint}") from None
    except OSError as error:  # e.g. a planted link (filelock opens with O_NOFOLLOW: Errno 40)
        raise ConfigError(f"cannot take the lock {path}: {error.strerror or error}"
                          + (" (it is a link: remove it)" if os.path.islink(path) else "")
                          + "; choose another --out") from None
    try:
        yield lock
    finally:
        lock.release()
