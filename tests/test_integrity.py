"""Data integrity of the annotation job: results stay with their own sample when keys repeat
across shards, a cut tar is never committed, the output is checked and locked before any model
loads, and keys that could escape the output folder become error rows."""

import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from annotate_inputs import image_bytes, meta, write_good_shards, write_tar
from safetensors.torch import save_file

from flmm.build import build_sam, sam_config
from flmm.heads import save_heads
from pipeline.annotate import AnnotateConfig, Summary, _Collector, run_annotation
from pipeline.decode import decode_batch
from pipeline.grounding import RESULT_SCHEMA
from pipeline.lock import LOCK, OutputLock, OutputLocked
from pipeline.sources import ShardError, iter_tar_samples, read_shard
from pipeline.spec import ModelSpec
from pipeline.writer import OutputDir, write_parts

REPO = Path(__file__).resolve().parents[1]
PHRASES = ["the red circle", "a small blue square", "the green triangle"]


@pytest.fixture(scope="module")
def spec(tiny_llava_dir, tmp_path_factory):
    """The tiny model with its random SAM and heads saved once, so that every actor (and every
    run) holds the same weights and masks can be compared bit for bit."""
    folder = tmp_path_factory.mktemp("fixed_weights")
    torch.manual_seed(0)
    sam = build_sam(sam_config("tiny"))
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, folder / "sam.safetensors")
    with_sam = ModelSpec(str(tiny_llava_dir), "tiny", str(folder / "sam.safetensors"))
    save_heads(with_sam.build().heads, folder / "heads.safetensors")
    return dataclasses.replace(with_sam, heads=str(folder / "heads.safetensors"))


def shared_key_shards(directory: Path) -> None:
    """Two shards with the same keys k0..k2 but different images (sizes) and phrase counts."""
    for s in range(2):
        samples = {
            f"k{i}": {
                "png": image_bytes("RGB", size=(40 + 30 * s + 4 * i, 28 + 17 * s), seed=10 * s + i),
                "json": meta(PHRASES[: 1 + (i + s) % 3]),
            }
            for i in range(3)
        }
        write_tar(directory / f"part{s}-000000.tar", samples)


def annotations_by_key(out: Path, shard: str) -> dict:
    table = pq.read_table(out / "annotations" / f"{shard}.parquet").to_pylist()
    found: dict = {}
    for row in table:
        found.setdefault(row["key"], []).append(
            (row["phrase"], row["mask"]["size"], row["mask"]["counts"], row["bbox"])
        )
    return found


def test_keys_repeated_across_shards_keep_their_own_masks(ray_session, spec, tmp_path):
    both, alone = tmp_path / "both", tmp_path / "alone"
    shared_key_shards(both)
    alone.mkdir()
    (alone / "part1-000000.tar").write_bytes((both / "part1-000000.tar").read_bytes())
    # batch 4 over 2 x 3 rows: one model batch holds rows of both shards with equal keys
    run = run_annotation(AnnotateConfig((str(both),), str(tmp_path / "o1"), spec, batch_size=4))
    assert sorted(run.done) == ["part0-000000", "part1-000000"] and not run.failed
    ref = run_annotation(AnnotateConfig((str(alone),), str(tmp_path / "o2"), spec, batch_size=4))
    assert ref.done == ["part1-000000"]
    got = annotations_by_key(tmp_path / "o1", "part1-000000")
    assert got == annotations_by_key(tmp_path / "o2", "part1-000000")
    for s in range(2):  # every mask has its own image's size and one row per own phrase
        for key, rows in annotations_by_key(tmp_path / "o1", f"part{s}-000000").items():
            i = int(key[1:])
            assert [r[0] for r in rows] == PHRASES[: 1 + (i + s) % 3]
            assert all(r[1] == [28 + 17 * s, 40 + 30 * s + 4 * i] for r in rows)


def result_row(key, height, width, mask_size, n_masks=1) -> dict:
    return {
        "shard": "s", "key": key, "n_samples": 1, "status": "ok", "error_kind": "",
        "error": "", "height": height, "width": width, "phrases": ["a"],
        "counts": ["0"] * n_masks, "bboxes": [[0.0, 0, 0, 0]] * n_masks,
        "scores": [0.0] * n_masks, "mask_size": mask_size, "shard_error": "", "read_s": 0.0,
        "decode_s": 0.0, "model_s": 0.0, "prepare_s": 0.0, "lmm_s": 0.0, "sam_s": 0.0,
        "heads_s": 0.0, "post_s": 0.0, "describe_s": 0.0, "source": "given", "text": "",
        "warning": "", "spans": [], "selector_scores": [], "proposer": "",
    }  # fmt: skip


def add_rows(collector: _Collector, out: OutputDir, *rows: dict) -> None:
    """The rows as one batch through the writer stage (a part under ``_parts/``), its
    manifests to the driver's collector."""
    batch = pa.Table.from_pylist([{"n_samples": 1, **r} for r in rows], RESULT_SCHEMA)
    for manifest in write_parts(batch, out.uri, "m").to_pylist():
        collector.add(manifest)


@pytest.mark.parametrize(
    "row, reason",
    [
        (result_row("k", 247, 176, [220, 168]), "masks of size [220, 168]"),
        (result_row("k", 20, 30, [20, 30], n_masks=2), "1 phrases but 2 masks"),
    ],
)
def test_a_result_that_does_not_fit_its_sample_fails_the_shard_unwritten(
    ray_session, tmp_path, row, reason
):
    out = OutputDir(str(tmp_path / "out"))
    summary = Summary(out.uri)
    collector = _Collector(out, "m", summary, None, time.perf_counter())
    collector.expect({"s": "s.tar"})
    add_rows(collector, out, row)
    collector.close()
    assert summary.failed["s"].startswith("internal_error: ") and reason in summary.failed["s"]
    assert not out.is_done("s") and not (tmp_path / "out" / "annotations").exists()
    assert not (tmp_path / "out" / "_parts").exists()  # nothing of it was written


def test_a_retried_batch_row_is_dropped_and_counted(ray_session, tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    summary = Summary(out.uri)
    collector = _Collector(out, "m", summary, None, time.perf_counter())
    collector.expect({"s": "s.tar"})
    first = {**result_row("a", 4, 4, [4, 4]), "n_samples": 2}
    add_rows(collector, out, first)
    add_rows(collector, out, {**first, "scores": [0.9]})  # the same key again: a retried batch
    add_rows(collector, out, {**result_row("b", 4, 4, [4, 4]), "n_samples": 2})
    collector.close()
    assert summary.done == ["s"] and out.read_done("s")["duplicate_rows_dropped"] == 1
    assert summary.retried["rows of retried batches"] == 1
    scores = pq.read_table(out.path("annotations", "s.parquet"))["score"].to_pylist()
    assert scores == [0.0, 0.0]  # the first row of "a" was kept
    assert not (tmp_path / "out" / "_parts" / "s").exists()  # merged, then removed


def member_ends(path: Path) -> list[int]:
    """Every byte offset at which a member's header starts, and where the last member ends."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    last = members[-1]
    return [m.offset for m in members] + [last.offset_data + -(-last.size // 512) * 512]


def test_a_tar_cut_at_any_member_boundary_or_inside_a_member_is_truncated(tmp_path):
    (path,) = write_good_shards(tmp_path, 1, 3)
    data = path.read_bytes()
    ends = member_ends(path)
    cuts = ends + [ends[-1] + 512] + [e + 100 for e in ends[:-1]] + [e + 700 for e in ends[:-1]]
    for cut in cuts:
        cut_path = tmp_path / "cut.tar"
        cut_path.write_bytes(data[:cut])
        with pytest.raises(ShardError) as caught:
            list(iter_tar_samples(str(cut_path)))
        assert caught.value.kind == "truncated", (cut, caught.value)
        (row,) = read_shard(pa.table({"uri": [str(cut_path)], "shard": ["c"]})).to_pylist()
        assert row["key"] == "" and row["shard_error"].startswith("truncated: "), cut
    assert len(list(iter_tar_samples(str(path)))) == 3  # the whole tar reads


def test_data_after_the_archive_is_corrupt(tmp_path):
    (path,) = write_good_shards(tmp_path, 1, 2)
    path.write_bytes(path.read_bytes() + b"garbage" * 100)
    with pytest.raises(ShardError) as caught:
        list(iter_tar_samples(str(path)))
    assert caught.value.kind == "corrupt"


def test_a_cut_shard_is_never_done_and_a_rerun_after_repair_completes_it(
    ray_session, spec, tmp_path
):
    (full,) = write_good_shards(tmp_path / "full", 1, 4, prefix="rep")
    data = full.read_bytes()
    shards = tmp_path / "in"
    shards.mkdir()
    cut_at = member_ends(full)[4]  # after two whole samples (png + json each)
    (shards / full.name).write_bytes(data[:cut_at])
    config = AnnotateConfig((str(shards),), str(tmp_path / "out"), spec, batch_size=2)
    first = run_annotation(config)
    name = full.name.removesuffix(".tar")
    assert first.failed[name].startswith("truncated: ") and not first.done
    assert not OutputDir(config.output).is_done(name)
    assert not (tmp_path / "out" / "samples" / f"{name}.parquet").exists()
    (shards / full.name).write_bytes(data)  # repaired
    second = run_annotation(config)
    assert second.done == [name] and OutputDir(config.output).read_done(name)["samples"] == 4


def test_keys_repeated_within_a_shard_are_one_sample_with_the_first_file(tmp_path):
    first, second = image_bytes("RGB", seed=1), image_bytes("RGB", size=(30, 20), seed=2)
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("k.png", first), ("k.json", meta()), ("j.png", first),
                           ("j.json", meta()), ("k.png", second)]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = {key: (files, exts) for key, files, exts in iter_tar_samples(str(path))}
    assert list(samples) == ["k", "j"]
    assert samples["k"][0]["png"] == first and samples["k"][1] == ["json", "png", "png"]


def test_bad_keys_become_error_rows_stored_escaped(ray_session, spec, tmp_path):
    good = {"png": image_bytes("RGB"), "json": meta()}
    shard = write_tar(tmp_path / "in" / "keys-000000.tar", {
        "ok_key": good, "dir/evil": good, "../up": good, "ctl\x01": good, "back\\slash": good,
    })  # fmt: skip
    raw = read_shard(pa.table({"uri": [str(shard)], "shard": ["keys-000000"]}))
    decoded = pa.concat_tables(list(decode_batch(raw))).to_pylist()
    kinds = {row["key"]: row["error_kind"] for row in decoded}
    assert kinds == {"ok_key": "", "dir%2Fevil": "bad_key", "%2E%2E%2Fup": "bad_key",
                     "ctl%01": "bad_key", "back%5Cslash": "bad_key"}  # fmt: skip
    config = AnnotateConfig((str(shard),), str(tmp_path / "out"), spec)
    assert run_annotation(config).done == ["keys-000000"]
    samples = pq.read_table(tmp_path / "out" / "samples" / "keys-000000.parquet").to_pylist()
    assert {r["key"]: (r["error"] or "").split(":")[0] for r in samples} == {
        k: v for k, v in kinds.items()
    }
    assert not any("/" in r["key"] or ".." in r["key"] for r in samples)


def test_an_unwritable_output_fails_in_seconds_before_any_model_loads(tmp_path):
    (tmp_path / "shards").mkdir()
    write_good_shards(tmp_path / "shards", 1, 1)
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ["--input", str(tmp_path / "shards"), "--output", str(blocker / "out"),
            "--lmm", "/nonexistent/model"]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "annotate.py"), *args],
                            check=False, capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode != 0 and "not writable" in result.stderr, result.stderr
    assert "/nonexistent/model" not in result.stderr  # no model load was tried
    assert time.perf_counter() - started < 30


def test_a_second_run_on_a_locked_output_is_refused_unless_forced(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    with OutputLock(out):
        with pytest.raises(OutputLocked, match="in use by"):
            OutputLock(out).acquire()
        forced = OutputLock(out, force=True)
        forced.acquire()
        assert json.loads((tmp_path / "out" / LOCK).read_text())["token"] == forced.record["token"]
        forced.release()
    assert not (tmp_path / "out" / LOCK).exists()


def test_the_job_refuses_a_locked_output_before_starting(ray_session, spec, tmp_path):
    write_good_shards(tmp_path / "in", 1, 1)
    config = AnnotateConfig((str(tmp_path / "in"),), str(tmp_path / "out"), spec)
    started = []
    with OutputLock(OutputDir(config.output)), pytest.raises(OutputLocked):
        run_annotation(config, start_ray=lambda: started.append(1))
    assert not started and not (tmp_path / "out" / "_done").exists()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    out = OutputDir(str(tmp_path / "out"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    (tmp_path / "out").mkdir()
    for held in [
        {"host": socket.gethostname(), "pid": int(dead), "heartbeat": "x"},
        {"host": "elsewhere", "pid": 1, "heartbeat": "2020-01-01T00:00:00+00:00"},
    ]:
        (tmp_path / "out" / LOCK).write_text(json.dumps(held))  # fmt: skip
        with OutputLock(out) as lock:
            assert out.fs.get_file_info(lock.path).size > 0
        assert "taking over the lock" in capsys.readouterr().err
    (tmp_path / "out" / LOCK).write_text(
        json.dumps(  # a live holder elsewhere
            {"host": "elsewhere", "pid": 1, "heartbeat": datetime_now()}
        )
    )
    with pytest.raises(OutputLocked):
        OutputLock(out).acquire()


def datetime_now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def test_evaluation_refuses_a_cut_shard_instead_of_scoring_fewer_samples(tmp_path):
    from pipeline.evaluate import Skipped, iter_samples

    (path,) = write_good_shards(tmp_path, 1, 3)
    skipped = Skipped()
    assert list(iter_samples([path], skipped)) == [] and skipped.total() == 3  # no objects
    path.write_bytes(path.read_bytes()[: member_ends(path)[4]])
    with pytest.raises(ShardError, match="end-of-archive"):
        list(iter_samples([path], Skipped()))
