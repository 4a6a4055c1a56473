"""The output's lock (``pipeline.lock``) under races and faults: runs that find one stale lock at
the same moment (exactly one takes it, on a local disk and on S3), and heartbeat writes that fail
for a while (retried; the lock is kept). A lock taken over during a run:
tests/test_annotate_faults.py. Refusal, ``--force`` and stale takeover one run at a time:
tests/test_integrity.py."""

import json
import socket
import subprocess
import sys
import threading
import time

from faulty_fs import FaultPlan, calls_counted, faulty_output

from pipeline.lock import LOCK, OutputLock, OutputLocked
from pipeline.writer import OutputDir


def dead_pid() -> int:
    """The pid of a process that has exited (on this host)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          check=True, capture_output=True, text=True)  # fmt: skip
    return int(done.stdout)


def race(out: OutputDir, runs: int) -> tuple[list[OutputLock], list[str], list[BaseException]]:
    """``runs`` threads, each a run that takes ``out``'s lock, released together by a barrier →
    (the runs that got it, their refusals, anything else they raised). The winners keep it."""
    barrier = threading.Barrier(runs)
    winners, refusals, errors = [], [], []

    def run():
        lock = OutputLock(out, heartbeat_s=60)
        barrier.wait()
        try:
            lock.acquire()
            winners.append(lock)
        except OutputLocked as refused:
            refusals.append(str(refused))
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return winners, refusals, errors


def check_one_winner(out: OutputDir, read, winners, refusals, errors, runs: int, context: str):
    try:
        assert not errors, f"{context}: {errors!r}"
        assert len(winners) == 1 and len(refusals) == runs - 1, f"{context}: {len(winners)} won"
        assert json.loads(read())["token"] == winners[0].record["token"], context
        assert all("in use by" in refusal for refusal in refusals), refusals
    finally:
        for lock in winners:
            lock.release()


def test_runs_racing_for_one_stale_lock_on_a_local_disk_one_wins(tmp_path, capsys):
    """The stale lock of a process that is gone; four runs find it at once, twenty times over."""
    for attempt in range(20):
        root = tmp_path / f"out{attempt}"
        root.mkdir()
        stale = {"host": socket.gethostname(), "pid": dead_pid(), "token": "old"}
        (root / LOCK).write_text(json.dumps({**stale, "heartbeat": "2020-01-01T00:00:00+00:00"}))
        out = OutputDir(str(root))
        winners, refusals, errors = race(out, 4)
        read = (root / LOCK).read_text
        check_one_winner(out, read, winners, refusals, errors, 4, f"attempt {attempt}")
        assert not (root / LOCK).exists()  # the winner's release removed it
    assert "taking over the lock" in capsys.readouterr().err


def test_runs_racing_for_one_stale_lock_on_s3_one_wins(s3_bucket, capsys):
    """A lock whose heartbeat stopped long ago, on another host; on S3 the lock is best effort
    (``pipeline.lock``): runs that write it within ``SETTLE_S`` of each other see one winner."""
    import pyarrow.fs as pafs

    for attempt in range(3):
        out = OutputDir(f"s3://{s3_bucket}/out{attempt}")
        stale = {"host": "elsewhere", "pid": 1, "token": "old",
                 "heartbeat": "2020-01-01T00:00:00+00:00"}  # fmt: skip
        out.write_bytes("", LOCK, json.dumps(stale).encode())
        winners, refusals, errors = race(out, 3)

        def read(out=out):
            with out.fs.open_input_stream(out.path("", LOCK)) as f:
                return f.read()

        check_one_winner(out, read, winners, refusals, errors, 3, f"attempt {attempt}")
        assert out.fs.get_file_info(out.path("", LOCK)).type == pafs.FileType.NotFound
    assert "taking over the lock" in capsys.readouterr().err


def test_heartbeat_writes_that_fail_are_retried_and_the_lock_is_kept(tmp_path, capsys):
    """The second and third writes of the lock (its first two heartbeats) raise OSError, as a
    transient S3 or disk error would: the heartbeat goes on, the lock stays this run's."""
    plan = FaultPlan(str(tmp_path / "count"), first=1, times=2,
                     calls=("open_output_stream",), path_contains=LOCK)  # fmt: skip
    out = faulty_output(tmp_path / "out", plan)
    with OutputLock(out, heartbeat_s=0.05) as lock:
        deadline = time.time() + 20
        while calls_counted(plan) < 6:  # the lock, two failed beats, three more beats
            assert time.time() < deadline, f"the heartbeat stopped after {calls_counted(plan)}"
            time.sleep(0.02)
        held = json.loads((tmp_path / "out" / LOCK).read_text())
        assert held["token"] == lock.record["token"]
    assert "could not renew" in capsys.readouterr().err
    assert not (tmp_path / "out" / LOCK).exists()
