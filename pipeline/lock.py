"""One run per output folder: a lock file ``DIR/_lock.json``, taken before any model is loaded.

The lock holds who runs (user, host, pid, start time, a random token) and a heartbeat that the
holder rewrites every ``HEARTBEAT_S`` seconds. A second run on the same output is refused
(``OutputLocked``) unless it is forced; a lock whose holder is gone is taken over with a warning:
on the same host when its pid no longer exists, elsewhere when its heartbeat is older than
``STALE_S``. On local disks the lock is created exclusively (a hard link); object stores have no
such primitive, so there the lock is written and read back, which leaves a window of a few
milliseconds in which two runs started together could both believe they hold it.
"""

from __future__ import annotations

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

from pipeline.writer import OutputDir

LOCK = "_lock.json"
HEARTBEAT_S = 30.0
STALE_S = 600.0  # a heartbeat this old (on another host) means the holder is gone


class OutputLocked(RuntimeError):
    """Another live run holds the output's lock."""


class OutputLock:
    """``with OutputLock(out): ...`` holds ``out``'s lock for the block; ``force`` takes it from a
    live holder too (with a warning)."""

    def __init__(self, out: OutputDir, force: bool = False, heartbeat_s: float = HEARTBEAT_S):
        self.out, self.force, self.heartbeat_s = out, force, heartbeat_s
        self.path = out.path("", LOCK)
        self.record = {
            "user": _user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _now(),
            "heartbeat": _now(),
            "token": uuid.uuid4().hex,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise ``OutputLocked``; then keep its heartbeat in a thread."""
        held = self.holder()
        if held is not None:
            why = _stale(held)
            if not why and not self.force:
                raise OutputLocked(_refusal(self.out.uri, held))
            how = why or "--force was given"
            print(f"warning: taking over the lock of {_who(held)} on {self.out.uri}: {how}",
                  file=sys.stderr)  # fmt: skip
            self.out.fs.delete_file(self.path)
        self._create()
        now_held = self.holder() or {}
        if now_held.get("token") != self.record["token"]:
            raise OutputLocked(_refusal(self.out.uri, now_held))
        self._thread = threading.Thread(target=self._beat, name="output-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat; remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._ours():
            self.out.fs.delete_file(self.path)

    def holder(self) -> dict | None:
        """The lock's record, or None if there is no lock. An unreadable lock file reads as a
        record of an unknown holder with no heartbeat (stale)."""
        try:
            with self.out.fs.open_input_stream(self.path) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return {"host": "?", "pid": -1, "heartbeat": "1970-01-01T00:00:00+00:00"}

    def _ours(self) -> bool:
        return (self.holder() or {}).get("token") == self.record["token"]

    def _create(self) -> None:
        """On a local disk the whole file appears at once and only if none exists (a hard link
        of a written temp file), so no reader ever sees a half-written lock."""
        data = json.dumps(self.record, indent=1).encode()
        if not isinstance(self.out.fs, pafs.LocalFileSystem):
            self.out.write_bytes("", LOCK, data)
            return
        self.out.fs.create_dir(self.out.root, recursive=True)
        tmp = f"{self.path}.{self.record['token']}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            raise OutputLocked(_refusal(self.out.uri, self.holder() or {})) from None
        finally:
            os.unlink(tmp)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._ours():
                print(f"warning: the lock on {self.out.uri} was taken over", file=sys.stderr)
                return
            self.record["heartbeat"] = _now()
            self.out.write_bytes("", LOCK, json.dumps(self.record, indent=1).encode())


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
