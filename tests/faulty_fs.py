"""A real local filesystem whose calls fail on cue, for fault tests of the output's lock and
commits: ``faulty_output(root, plan)`` is an ``OutputDir`` on ``root`` whose filesystem (pyarrow's
``PyFileSystem`` around a ``LocalFileSystem``) counts the calls that ``plan`` watches and raises
``OSError`` on the chosen ones, before doing the call or after it (the call's effect is there, but
its caller sees an error, as when an object store's answer is lost). The count lives in a small
file next to the plan, so it runs on across processes (a Ray task and its retry, the driver).
"""

from __future__ import annotations

import fcntl
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray.cloudpickle

from pipeline.writer import OutputDir

# Ray's workers cannot import this test module: its handler travels by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# every call the pipeline makes; WRITES: those that change something (an "after" fault leaves
# their effect)
CALLS = ("get_file_info", "get_file_info_selector", "create_dir", "delete_dir",
         "delete_dir_contents", "delete_file", "move", "copy_file", "open_input_stream",
         "open_input_file", "open_output_stream", "open_append_stream")  # fmt: skip
WRITES = ("create_dir", "delete_dir", "delete_dir_contents", "delete_file", "move", "copy_file",
          "open_output_stream", "open_append_stream")  # fmt: skip


@dataclass(frozen=True)
class FaultPlan:
    """Fail the watched calls numbered ``first`` to ``first + times - 1`` (counting from 0;
    ``first`` -1: none, only count). Watched: calls named in ``calls`` on a path containing
    ``path_contains``. ``after``: do the call, then raise."""

    counter: str  # the file that holds the count
    first: int = -1
    times: int = 1
    after: bool = False
    calls: tuple[str, ...] = CALLS
    path_contains: str = ""


class FaultyHandler(pafs.FileSystemHandler):
    def __init__(self, plan: FaultPlan):
        self.plan, self.fs = plan, pafs.LocalFileSystem()

    def __reduce__(self):
        return FaultyHandler, (self.plan,)

    def _call(self, name: str, path: str, do):
        """``do()`` (the local filesystem's ``name`` on ``path``), or a fault instead or after."""
        plan = self.plan
        if name not in plan.calls or plan.path_contains not in path:
            return do()
        n = _count(Path(plan.counter), name)
        if not plan.first <= n < plan.first + plan.times:
            return do()
        if plan.after:
            do()
        when = "after" if plan.after else "before"
        raise OSError(f"injected fault: call {n} ({name} {path}, {when})")

    def get_type_name(self):
        return "faulty-local"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return [self._call("get_file_info", p, lambda p=p: self.fs.get_file_info(p)) for p in paths]

    def get_file_info_selector(self, selector):
        return self._call("get_file_info_selector", selector.base_dir,
                          lambda: self.fs.get_file_info(selector))  # fmt: skip

    def create_dir(self, path, recursive):
        self._call("create_dir", path, lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._call("delete_dir", path, lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._call("delete_dir_contents", path,
                   lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))  # fmt: skip

    def delete_root_dir_contents(self):
        raise OSError("not in these tests")

    def delete_file(self, path):
        self._call("delete_file", path, lambda: self.fs.delete_file(path))

    def move(self, src, dest):
        self._call("move", src, lambda: self.fs.move(src, dest))

    def copy_file(self, src, dest):
        self._call("copy_file", src, lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path):
        return self._call("open_input_stream", path, lambda: self.fs.open_input_stream(path))

    def open_input_file(self, path):
        return self._call("open_input_file", path, lambda: self.fs.open_input_file(path))

    def open_output_stream(self, path, metadata):
        return self._call("open_output_stream", path,
                          lambda: self.fs.open_output_stream(path, metadata=metadata))  # fmt: skip

    def open_append_stream(self, path, metadata):
        return self._call("open_append_stream", path,
                          lambda: self.fs.open_append_stream(path, metadata=metadata))  # fmt: skip


def _count(counter: Path, name: str) -> int:
    """The counter's value, incremented, and ``name`` logged (under a flock: threads and
    processes share them)."""
    with open(counter.with_name(counter.name + ".lock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        with open(counter.with_name(counter.name + ".log"), "a") as log:
            log.write(name + "\n")
        n = int(counter.read_text()) if counter.exists() else 0
        tmp = counter.with_name(f"{counter.name}.tmp")
        tmp.write_text(str(n + 1))
        os.replace(tmp, counter)  # a reader never sees it half written
    return n


def faulty_output(root: Path, plan: FaultPlan) -> OutputDir:
    """An ``OutputDir`` on the local folder ``root`` whose calls fail as ``plan`` says."""
    return OutputDir(str(root), filesystem=pafs.PyFileSystem(FaultyHandler(plan)))


def calls_counted(plan: FaultPlan) -> int:
    path = Path(plan.counter)
    return int(path.read_text()) if path.exists() else 0


def calls_made(plan: FaultPlan) -> list[str]:
    """The names of the watched calls, in order."""
    log = Path(plan.counter + ".log")
    return log.read_text().split() if log.exists() else []
