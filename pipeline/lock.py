"""One run per output folder: a lock file ``DIR/_lock.json``, taken before any model is loaded.

The lock holds who runs (user, host, pid, start time, a random token) and a heartbeat that the
holder rewrites every ``HEARTBEAT_S`` seconds. A second run on the same output is refused
(``OutputLocked``) unless it is forced; a lock whose holder is gone is taken over with a warning:
on the same host when its pid no longer exists, elsewhere when its heartbeat is older than
``STALE_S``. A run that loses its lock (another run took it with ``--force``, or its heartbeat
could not be written for ``STALE_S / 2``) is told by ``OutputLock.check`` (``LockLost``), which
the job calls before each commit: it stops before it commits anything more. A heartbeat that
fails (a transient disk or object-store error) is retried at the next beat.

**Exclusive on local disks.** Every read-decide-write of the lock (taking it, taking over a
stale one, each heartbeat, removing it) runs under an exclusive ``flock`` of ``DIR/_lock.guard``
(a file that stays), and the record is replaced whole (a temp file, then a rename): of runs that
find a stale lock at once, one takes it and the others then find it alive.

**Best effort on object stores.** pyarrow has no compare-and-swap (no conditional write), so there
the record is written, read back at once and again ``SETTLE_S`` later; a run holds the lock only
if its own token is still there both times. Of runs that write the lock within ``SETTLE_S`` of each
other, only the last writer holds it; a writer delayed past that (an unusually slow request) could
go unseen, and is then found at its next heartbeat or commit (``LockLost``).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

import pyarrow.fs as pafs

from pipeline.writer import OutputDir, timed_commit

LOCK = "_lock.json"
GUARD = "_lock.guard"  # local disks: flock'ed around each read-decide-write of LOCK
HEARTBEAT_S = 30.0
STALE_S = 600.0  # a heartbeat this old (on another host) means the holder is gone
SETTLE_S = 1.0  # object stores: a new lock must still be ours this much later


class OutputLocked(RuntimeError):
    """Another live run holds the output's lock."""


class LockLost(OutputLocked):
    """This run held the output's lock and no longer does: it must commit nothing more."""


class OutputLock:
    """``with OutputLock(out): ...`` holds ``out``'s lock for the block; ``force`` takes it from a
    live holder too (with a warning). ``check()`` before each commit raises ``LockLost`` once the
    lock is no longer this run's."""

    def __init__(self, out: OutputDir, force: bool = False, heartbeat_s: float = HEARTBEAT_S):
        self.out, self.force, self.heartbeat_s = out, force, heartbeat_s
        self.path = out.path("", LOCK)
        self.local = isinstance(out.fs, pafs.LocalFileSystem)
        self.record = {
            "user": _user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _now(),
            "heartbeat": _now(),
            "token": uuid.uuid4().hex,
        }
        self.lost = ""  # why this run lost the lock ("" while it holds it)
        self._renewed = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self.record["token"]

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise ``OutputLocked``; then keep its heartbeat in a thread."""
        with self._guard():
            held = self.holder()
            if held is not None:
                self._take_over(held)
            self._write()
        if not self.local:
            self._settle()
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="output-lock", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise ``LockLost`` unless this run still holds the lock (one read of it; if that read
        fails, the heartbeat's last word stands)."""
        if not self.lost:
            try:
                self._still_ours()
            except LockLost as lost:
                self.lost = str(lost)
            except OSError:
                pass
        if self.lost:
            raise LockLost(self.lost)

    def release(self) -> None:
        """Stop the heartbeat; remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            with self._guard():
                if self._ours():
                    self.out.fs.delete_file(self.path)
        except OSError as error:
            print(f"warning: the lock {self.path} was not removed ({error}); it will go stale",
                  file=sys.stderr)  # fmt: skip

    def holder(self) -> dict | None:
        """The lock's record, or None if there is no lock (``read_holder``)."""
        return read_holder(self.out)

    def _ours(self) -> bool:
        return (self.holder() or {}).get("token") == self.token

    def _still_ours(self) -> None:
        check_token(self.out, self.token)

    def _take_over(self, held: dict) -> None:
        """Refuse (``OutputLocked``) unless ``held``'s run is gone or ``force`` was given."""
        why = _stale(held)
        if not why and not self.force:
            raise OutputLocked(_refusal(self.out.uri, held))
        how = why or "--force was given"
        print(f"warning: taking over the lock of {_who(held)} on {self.out.uri}: {how}",
              file=sys.stderr)  # fmt: skip

    def _write(self) -> None:
        """The record, replacing the lock file whole (a temp name, then a move)."""
        self.out.write_bytes("", LOCK, json.dumps(self.record, indent=1).encode())

    def _settle(self) -> None:
        """Object stores: ours only if our token is read back now and ``SETTLE_S`` later."""
        for wait in (0.0, SETTLE_S):
            time.sleep(wait)
            held = self.holder()
            if (held or {}).get("token") != self.token:
                raise OutputLocked(_refusal(self.out.uri, held or {}))

    @contextlib.contextmanager
    def _guard(self):
        """Local disks: an exclusive ``flock`` of ``DIR/_lock.guard`` for the block (released
        when its file is closed, and by the system if the process dies). Object stores:
        nothing (see the module docstring)."""
        if not self.local:
            yield
            return
        self.out.fs.create_dir(self.out.root, recursive=True)
        fd = os.open(self.out.path("", GUARD), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _beat(self) -> None:
        """Renew the heartbeat every ``heartbeat_s`` until released or lost."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._renew()
            except LockLost as lost:
                self.lost = str(lost)
            except OSError as error:
                self._renewal_failed(error)
            if self.lost:
                print(f"warning: {self.lost}", file=sys.stderr)
                return

    def _renew(self) -> None:
        """One heartbeat: if the lock is still ours, rewrite it with the time (read, compare and
        write under the guard; on object stores read back too)."""
        with self._guard():
            self._still_ours()
            self.record["heartbeat"] = _now()
            self._write()
        if not self.local:
            self._still_ours()
        self._renewed = time.monotonic()

    def _renewal_failed(self, error: OSError) -> None:
        """A heartbeat that could not be written is retried at the next beat; after
        ``STALE_S / 2`` without one, another run may soon take the lock: this run has lost it."""
        age = time.monotonic() - self._renewed
        print(f"warning: could not renew the lock on {self.out.uri} ({type(error).__name__}: "
              f"{error}); retrying in {self.heartbeat_s:g} s", file=sys.stderr)  # fmt: skip
        if age > STALE_S / 2:
            self.lost = (
                f"the lock on {self.out.uri} could not be renewed for {age:.0f} s (last error: "
                f"{error}); another run may take it over, so this run stops"
            )


def read_holder(out: OutputDir) -> dict | None:
    """``out``'s lock record, or None if there is no lock. An unreadable lock file reads as a
    record of an unknown holder with no heartbeat (stale)."""
    try:
        with out.fs.open_input_stream(out.path("", LOCK)) as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return {"host": "?", "pid": -1, "heartbeat": "1970-01-01T00:00:00+00:00"}


def check_token(out: OutputDir, token: str) -> None:
    """``LockLost`` (saying who holds it now) unless ``out``'s lock holds ``token``: the run's
    checks, and its commit tasks' on the workers."""
    held = read_holder(out)
    if (held or {}).get("token") != token:
        raise LockLost(_lost(out.uri, held))


def guarded_commit(
    out: OutputDir, shard: str, parts: list[str], n_input: int, token: str | None
) -> tuple[dict, float]:
    """A shard's commit task, on a worker: ``LockLost`` if the output's lock no longer holds
    ``token`` (None: not checked), else its parts merged into its tables
    (``writer.timed_commit``; the parts stay, so a retry after any failure writes the same
    tables). It lives here, not in ``pipeline.annotate``, so that a commit worker imports
    pyarrow and not the model stack (~4 s a worker, more on a loaded machine)."""
    if token is not None:
        check_token(out, token)
    return timed_commit(out, shard, parts, n_input)


def check_writable(out: OutputDir) -> None:
    """Write and remove a probe file through ``out``'s filesystem; raises OSError if it cannot
    (before any work is done, rather than after all of it)."""
    name = f".probe-{uuid.uuid4().hex[:8]}"
    try:
        out.write_bytes("", name, b"probe")
        out.fs.delete_file(out.path("", name))
    except OSError as error:
        raise OSError(f"output {out.uri} is not writable: {error}") from None


def _stale(held: dict) -> str:
    """Why ``held`` belongs to a run that is gone ("" if it may be alive)."""
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return f"its process {held['pid']} is gone"
        except PermissionError:
            pass  # alive, another user's
        return ""
    try:
        beat = datetime.fromisoformat(held["heartbeat"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return "its lock file is unreadable"
    age = time.time() - beat
    return f"no heartbeat for {age:.0f} s" if age > STALE_S else ""


def _lost(uri: str, held: dict | None) -> str:
    now = f"it is held by {_who(held)}" if held else "it was removed"
    return (
        f"this run's lock on output {uri} was taken over ({now}, e.g. by a run with --force): "
        "this run stops before it commits anything more"
    )


def _refusal(uri: str, held: dict) -> str:
    return (
        f"output {uri} is in use by {_who(held)} (lock {LOCK}); wait for that run, or pass "
        "--force if it is gone"
    )


def _who(held: dict) -> str:
    return (
        f"{held.get('user', '?')}@{held.get('host', '?')} pid {held.get('pid', '?')} since "
        f"{held.get('started', '?')}"
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
