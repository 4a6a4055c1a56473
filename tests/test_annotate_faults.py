"""Faults of the annotation job, now that workers write (issue 19): a writer that fails once, an
output that refuses writes, and a driver SIGKILLed mid-run then the same command rerun. After
each: every input key exactly once across the committed shards, no committed file rewritten with
other content, and the summary saying what was retried or what failed. (An actor killed
mid-batch: tests/test_annotate.py; a node removed: tests/test_annotate_cluster.py; the scale
test: tests/test_annotate_scale.py.)"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from annotate_inputs import write_good_shards
from faulty_fs import WRITES, FaultPlan, calls_made, faulty_output
from test_annotate_cluster import alive, descendants, ray_env

from pipeline.annotate import AnnotateConfig, Summary, _Collector, run_annotation
from pipeline.lock import LOCK, OutputLock, OutputLocked
from pipeline.sources import iter_tar_samples
from pipeline.spec import ModelSpec
from pipeline.writer import OutputDir, write_parts
from schemas.results import RESULT_SCHEMA

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def spec(tiny_llava_dir):
    return ModelSpec(str(tiny_llava_dir), "tiny")


def input_keys(paths: list[Path]) -> Counter:
    return Counter(key for p in paths for key, _, _ in iter_tar_samples(str(p)))


def committed_keys(out: Path) -> Counter:
    """Each key's count over the samples files of the committed shards (those with a done
    marker)."""
    keys: Counter = Counter()
    for done in (out / "_done").glob("*.json"):
        table = pq.read_table(out / "samples" / f"{done.stem}.parquet")
        keys.update(table.column("key").to_pylist())
    return keys


def committed_files(out: Path) -> dict[str, str]:
    """sha256 of every file of every committed shard: its two tables and its done marker."""
    digests = {}
    for done in (out / "_done").glob("*.json"):
        for path in (done, out / "annotations" / f"{done.stem}.parquet",
                     out / "samples" / f"{done.stem}.parquet"):  # fmt: skip
            digests[str(path.relative_to(out))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def leftover_parts(out: Path) -> list[Path]:
    return sorted((out / "_parts").rglob("*.parquet")) if (out / "_parts").is_dir() else []


def test_a_writer_that_fails_once_is_retried_and_reported(ray_session, spec, tmp_path):
    paths = write_good_shards(tmp_path / "in", 3, 3)
    config = AnnotateConfig(
        (str(tmp_path / "in"),),
        str(tmp_path / "out"),
        spec,
        batch_size=2,
        fail_first_write=("good-000001",),  # every part of it: its first try raises OSError
    )
    summary = run_annotation(config)
    assert sorted(summary.done) == [p.stem for p in paths] and not summary.failed
    assert summary.retried["part writes"] >= 1  # one per part of good-000001
    assert f"retried: {summary.retried['part writes']} part writes" in summary.line()
    assert committed_keys(tmp_path / "out") == input_keys(paths)
    assert set(input_keys(paths).values()) == {1} and not leftover_parts(tmp_path / "out")


@pytest.mark.parametrize(
    "blocked, reason",
    [("annotations", "commit failed: "), ("_parts", "write failed: ")],
)
def test_an_output_that_refuses_writes_fails_its_shards_and_a_rerun_completes(
    ray_session, spec, tmp_path, blocked, reason
):
    """A file stands where the output's ``blocked`` folder goes, so writing there raises an
    OSError (FileExistsError: as a full disk or a denied permission would, on the commit's
    files or on the parts): every shard fails, reported with the cause, none is committed, no
    other work is lost; once the cause is gone, the same run completes with every key once."""
    paths = write_good_shards(tmp_path / "in", 2, 3)
    out = tmp_path / "out"
    out.mkdir()
    (out / blocked).write_text("in the way")
    config = AnnotateConfig((str(tmp_path / "in"),), str(out), spec, batch_size=2)
    summary = run_annotation(config)
    assert summary.done == [] and sorted(summary.failed) == [p.stem for p in paths]
    assert all(r.startswith(reason) and "Error" in r for r in summary.failed.values())
    assert not (out / "_done").exists() or not list((out / "_done").iterdir())
    (out / blocked).unlink()
    again = run_annotation(config)
    assert sorted(again.done) == [p.stem for p in paths] and not again.failed
    assert committed_keys(out) == input_keys(paths) and not leftover_parts(out)


@pytest.mark.slow  # two runs of the job in processes of their own, each starting a Ray: ~60 s
def test_a_driver_killed_mid_run_then_rerun_commits_every_key_once_and_rewrites_nothing(
    tiny_llava_dir, tmp_path
):
    paths = write_good_shards(tmp_path / "in", 10, 3)
    out = tmp_path / "out"
    command = [
        sys.executable, str(ROOT / "jobs" / "annotate.py"), "--lmm", str(tiny_llava_dir),
        "--sam", "tiny", "--input", str(tmp_path / "in"), "--output", str(out),
        "--batch-size", "1", "--num-cpus", "2", "--preview-images", "0",
    ]  # fmt: skip
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, env=ray_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not list((out / "_done").glob("*.json")) if (out / "_done").is_dir() else True:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    tree = descendants(first.pid)  # the driver, and the Ray it started
    for pid in filter(alive, tree):
        os.kill(pid, signal.SIGKILL)
    first.wait()
    before = committed_files(out)
    done_before = len(list((out / "_done").glob("*.json")))
    assert 1 <= done_before < 10, "killed mid-run, with shards still to do"

    rerun = subprocess.run(
        command, check=False, env=ray_env(), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"shards {10 - done_before} done, {done_before} skipped, 0 failed" in rerun.stdout
    after = committed_files(out)
    assert {path: after[path] for path in before} == before  # nothing committed was rewritten
    assert committed_keys(out) == input_keys(paths) and set(input_keys(paths).values()) == {1}
    assert not leftover_parts(out)  # the rerun cleared the killed run's, its commits their own


def test_a_run_whose_lock_is_taken_over_stops_before_it_commits_more(ray_session, spec, tmp_path):
    """Once the first shard is committed, another run takes the output's lock with ``--force``:
    this run commits no other shard, says why, and leaves the new holder's lock in place."""
    write_good_shards(tmp_path / "in", 3, 2)
    out = tmp_path / "out"
    config = AnnotateConfig((str(tmp_path / "in"),), str(out), spec, batch_size=1,
                            preview_images=0)  # fmt: skip
    other: list[OutputLock] = []

    def take_over(name, done, summary):
        if not other:
            other.append(OutputLock(OutputDir(str(out)), force=True))
            other[0].acquire()

    try:
        with pytest.raises(OutputLocked, match="taken over .* stops before it commits"):
            run_annotation(config, on_shard=take_over)
        assert len(list((out / "_done").glob("*.json"))) == 1
        assert json.loads((out / LOCK).read_text())["token"] == other[0].token
    finally:
        other[0].release()


SHARD = "c-000000"


def result_row(key: str, score: float) -> dict:
    """A ``RESULT_SCHEMA`` row of ``SHARD`` (3 samples): one given phrase grounded on a 2×3
    image."""
    row = dict.fromkeys(RESULT_SCHEMA.names, 0.0)
    row.update(shard=SHARD, key=key, n_samples=3, status="ok", error_kind="", error="",
               height=2, width=3, phrases=["a thing"], spans=[], selector_scores=[],
               counts=["6"], bboxes=[[0.0, 0.0, 3.0, 2.0]], scores=[score], mask_size=[2, 3],
               text="", question="", answer="", evidence_box=[], source="given", proposer="",
               warning="", shard_error="")  # fmt: skip
    return row


# two batches, the second of them a retry that repeats k1 (its first copy, score 0.1, wins)
BATCHES = [[("k0", 0.0), ("k1", 0.1)], [("k1", 0.9), ("k2", 0.2)]]


def commit_through(root: Path, out: OutputDir) -> Summary:
    """``BATCHES`` written as parts under ``root`` (healthy), then accounted for and committed by
    the driver's collector through ``out`` (the same folder, maybe faulty): the commit task (a
    Ray task, retried on OSError), the done marker, the parts' removal."""
    manifests = []
    for batch in BATCHES:
        rows = [result_row(key, score) for key, score in batch]
        table = pa.Table.from_pylist(rows, RESULT_SCHEMA)
        manifests += write_parts(table, str(root), "model-x").to_pylist()
    summary = Summary(out.uri)
    collector = _Collector(out, "model-x", summary, None, start=0.0)
    collector.expect({SHARD: f"in/{SHARD}.tar"})
    for manifest in manifests:
        collector.add(manifest)
    collector.close()
    return summary


def outputs(root: Path) -> tuple:
    """What a commit leaves: both tables, the done marker without times, the parts left."""
    done = json.loads((root / "_done" / f"{SHARD}.json").read_text())
    for name in ("timings", "finished_at", "versions"):
        done.pop(name)
    tables = [pq.read_table(root / f / f"{SHARD}.parquet").to_pylist() for f in ("annotations",
              "samples")]  # fmt: skip
    return *tables, done, leftover_parts(root)


def test_a_commit_that_fails_at_any_step_is_retried_to_the_same_outputs(ray_session, tmp_path):
    """Each call the commit makes to the filesystem (the task's reads and writes, the done
    marker, the parts' removal) fails once in turn: before its effect, and for those that
    write, also after it (done, but the answer lost): the retried commit gives the shard the
    same tables and done marker as a commit without faults, and no parts are left."""
    assert commit_through(tmp_path / "ref", OutputDir(str(tmp_path / "ref"))).done == [SHARD]
    expected = outputs(tmp_path / "ref")
    assert [r["score"] for r in expected[0]] == pytest.approx([0.0, 0.1, 0.2])
    assert expected[2]["duplicate_rows_dropped"] == 1 and not expected[3]
    count = FaultPlan(str(tmp_path / "count"))
    counted = commit_through(tmp_path / "count-out", faulty_output(tmp_path / "count-out", count))
    assert counted.done == [SHARD], counted.failed
    calls = calls_made(count)
    assert calls.count("move") == 3 and calls.count("delete_dir") == 1  # 2 tables, done, parts
    for step, call in enumerate(calls):
        for after in (False, True) if call in WRITES else (False,):
            root = tmp_path / f"step{step}-{after}"
            plan = FaultPlan(str(tmp_path / f"count{step}-{after}"), first=step, after=after)
            summary = commit_through(root, faulty_output(root, plan))
            assert summary.done == [SHARD], (step, after, summary.failed)
            assert outputs(root) == expected, (step, after)
