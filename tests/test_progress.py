"""pipeline/progress.py: a progress line with an ETA on a terminal, nothing elsewhere."""

import io

from pipeline.progress import Progress, track


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_silent_off_a_terminal_and_shows_an_eta_on_one():
    quiet = io.StringIO()
    assert list(track(range(3), 3, "shards", quiet)) == [0, 1, 2]
    assert quiet.getvalue() == ""
    terminal = Terminal()
    assert list(track(range(3), 3, "shards", terminal)) == [0, 1, 2]
    shown = terminal.getvalue()
    assert "shards 3/3 (100%)" in shown and "ETA 0:00" in shown and shown.endswith("\n")
    bar = Progress("images", 10, Terminal())
    bar.start -= 20  # 20 s in, 4 of 10 done: 30 s to go
    bar.done = 4
    assert bar.line().endswith("0:20 elapsed, ETA 0:30")
