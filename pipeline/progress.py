"""A one-line progress display with an ETA for long jobs, shown only on a terminal.

    bar = Progress("shards", total)
    for ...: bar.update(done)
    bar.close()

Writes ``\\r<label> done/total (pct) elapsed, ETA`` to stderr at most every ``every`` seconds
when stderr is a terminal; elsewhere (tests, logs, ``ray job submit``) it writes nothing, and
the job's own one-line summary is all that is printed.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None, every: float = 0.5):
        self.label, self.total, self.every = label, total, every
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self.shown_at = time.perf_counter()
        self.done = 0

    def line(self, now: float | None = None) -> str:
        """The text shown for the current count."""
        elapsed = (now or time.perf_counter()) - self.start
        eta = "?"
        if self.done and self.total:
            eta = _duration(elapsed / self.done * (self.total - self.done))
        pct = 100 * self.done / self.total if self.total else 100.0
        return (
            f"{self.label} {self.done}/{self.total} ({pct:.0f}%) "
            f"{_duration(elapsed)} elapsed, ETA {eta}"
        )

    def update(self, done: int) -> None:
        self.done = done
        now = time.perf_counter()
        if self.enabled and (now - self.shown_at >= self.every or done >= self.total):
            self.stream.write("\r" + self.line(now) + "\033[K")
            self.stream.flush()
            self.shown_at = now

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def track(items, total: int, label: str, stream: TextIO | None = None):
    """Yield ``items`` (``total`` of them) while a ``Progress`` counts them."""
    bar = Progress(label, total, stream)
    try:
        for i, item in enumerate(items, 1):
            yield item
            bar.update(i)
    finally:
        bar.close()
