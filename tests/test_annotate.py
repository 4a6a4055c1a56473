"""The annotation job end to end on the session's local Ray: tiny real models (random weights),
real shards with bad samples, real Parquet. The job's contract: every input key exactly
once, error rows of the right kind, annotations matching the phrases, declared schemas, done
markers, skip on rerun, --overwrite, no duplicates after an interruption or a killed actor."""

import dataclasses
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from annotate_inputs import (
    MIXED,
    MIXED_EXPECTED,
    write_good_shards,
    write_mixed_shard,
    write_tar,
    write_truncated_shard,
)
from PIL import Image

from pipeline.annotate import (
    IO_CPUS,
    AnnotateConfig,
    fitted,
    run_annotation,
)
from pipeline.decode import decode_image
from pipeline.formats import IMAGE_EXTENSIONS, decode_rle
from pipeline.sources import iter_tar_samples
from pipeline.spec import ModelSpec
from pipeline.writer import ANNOTATIONS, DONE, OutputDir
from schemas.annotations import ANNOTATIONS_SCHEMA, SAMPLES_SCHEMA, SCHEMA_VERSION


@pytest.fixture(scope="module")
def spec(tiny_llava_dir):
    return ModelSpec(str(tiny_llava_dir), "tiny")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """mixed-000000 (every bad-sample kind + odd image modes), good-00000{0,1}, a truncated tar
    and an empty one."""
    directory = tmp_path_factory.mktemp("shards")
    write_mixed_shard(directory / "mixed-000000.tar")
    write_tar(directory / "empty-000000.tar", {})
    write_good_shards(directory, 2, 2)
    write_truncated_shard(directory / "trunc-000000.tar")
    return directory


@pytest.fixture(scope="module")
def first_run(ray_session, inputs, spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("annotate") / "out"
    # --phrases selector: caption and image-only samples are no_selector rows (no selector)
    config = AnnotateConfig((str(inputs),), str(out), spec, batch_size=3, phrases="selector")
    return config, run_annotation(config)


def input_keys(path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))


def samples_keys(out) -> Counter:
    """How often each key appears across every samples file of ``out``."""
    tables = [pq.read_table(p) for p in sorted((out / "samples").glob("*.parquet"))]
    return Counter(k for t in tables for k in t.column("key").to_pylist())


def decoded_size(key: str) -> tuple[int, int] | tuple[None, None]:
    """``(height, width)`` the samples table must hold for a MIXED key: the image's own for ok
    rows and the model stage's errors, nulls for the decoding stage's."""
    files, status, kind = MIXED[key]
    if status != "ok" and kind != "no_selector":
        return None, None
    image = next(files[e] for e in IMAGE_EXTENSIONS if e in files)
    return decode_image(image).shape[:2]


def test_every_key_exactly_once_with_the_right_status_and_error_kind(first_run, inputs):
    """... and the image's size (schema 4): ``error_kind`` its own column, ``error`` still
    starting with it."""
    config, summary = first_run
    out = OutputDir(config.output)
    assert sorted(summary.done) == ["empty-000000", "good-000000", "good-000001", "mixed-000000"]
    assert list(summary.failed) == ["trunc-000000"] and not out.is_done("trunc-000000")
    assert summary.failed["trunc-000000"].startswith("truncated: ")
    samples = pq.read_table(out.path("samples", "mixed-000000.parquet")).to_pylist()
    assert sorted(r["key"] for r in samples) == sorted(MIXED)
    for row in samples:
        status, kind = MIXED_EXPECTED[row["key"]]
        assert (row["status"], row["error_kind"]) == (status, kind), row
        assert (row["error"] or "").startswith(f"{kind}: " if kind else ""), row
        assert (row["height"], row["width"]) == decoded_size(row["key"]), row
    for shard in summary.done:
        keys = pq.read_table(out.path("samples", f"{shard}.parquet")).column("key").to_pylist()
        assert sorted(keys) == sorted(input_keys(inputs / f"{shard}.tar"))
    n_errors = sum(status == "error" for status, _ in MIXED_EXPECTED.values())
    assert summary.samples == len(MIXED) + 4 and summary.errors == n_errors == 11


def test_annotations_match_the_phrases_and_masks_fit_the_images(first_run, inputs, spec):
    config, summary = first_run
    out = OutputDir(config.output)
    for shard in summary.done:
        annotations = pq.read_table(out.path("annotations", f"{shard}.parquet"))
        samples = pq.read_table(out.path("samples", f"{shard}.parquet")).to_pylist()
        assert annotations.schema.equals(ANNOTATIONS_SCHEMA, check_metadata=True)
        by_key: dict[str, list[dict]] = {}
        for row in annotations.to_pylist():
            by_key.setdefault(row["key"], []).append(row)
        files_by_key = {k: f for k, f, _ in iter_tar_samples(str(inputs / f"{shard}.tar"))}
        for sample in samples:
            rows = by_key.get(sample["key"], [])
            assert len(rows) == sample["n_annotations"]
            if sample["status"] != "ok":
                assert not rows
                continue
            files = files_by_key[sample["key"]]
            image = next(files[e] for e in IMAGE_EXTENSIONS if e in files)
            height, width = decode_image(image).shape[:2]
            assert [r["phrase"] for r in rows] == json.loads(files["json"])["phrases"]
            for r in rows:
                assert (r["width"], r["height"], r["shard"]) == (width, height, shard)
                assert decode_rle(r["mask"]).shape == (height, width)
                x, y, w, h = r["bbox"]
                assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
                assert 0.0 <= r["score"] <= 1.0
                assert r["model"] == spec.model_id() == f"{spec.lmm} + heads:random"


def test_16_bit_greyscale_rgba_cmyk_and_palette_images_are_annotated(first_run):
    config, _ = first_run
    samples = pq.read_table(OutputDir(config.output).path("samples", "mixed-000000.parquet"))
    ok = {r["key"] for r in samples.to_pylist() if r["status"] == "ok"}
    assert ok == {"good_rgb", "good_16bit", "good_grey", "good_rgba", "good_cmyk", "good_palette"}
    image = MIXED["good_grey"][0]["png"]
    assert decode_image(image).shape == (21, 33, 3)


def test_schemas_done_markers_and_preview(first_run):
    config, summary = first_run
    out = OutputDir(config.output)
    for shard in summary.done:
        schema = pq.read_schema(out.path("samples", f"{shard}.parquet"))
        assert schema.equals(SAMPLES_SCHEMA, check_metadata=True)
        done = out.read_done(shard)
        assert done["schema_version"] == SCHEMA_VERSION == 6 and done["duplicate_rows_dropped"] == 0
        assert done["ok"] + done["errors"] == done["samples"]
        assert set(done["versions"]) >= {"torch", "ray", "pyarrow", "flmm-pipeline"}
    kinds = out.read_done("mixed-000000")["errors_by_kind"]
    assert kinds == dict(Counter(k for s, k in MIXED_EXPECTED.values() if s == "error"))
    preview = Image.open(os.path.join(config.output, "preview.png"))
    assert preview.mode == "RGB" and preview.width >= 200
    assert "annotate: shards 4 done, 0 skipped, 1 failed" in summary.line()
    assert out.read_done("empty-000000")["samples"] == 0


def test_one_glob_per_table_reads_the_output_without_ray_and_no_parts_are_left(first_run):
    """What a reader does (schemas/ANNOTATIONS.md): pandas over the folder, every shard whole;
    the workers' part files were merged away; the driver got manifests, not results."""
    import pandas as pd

    config, summary = first_run
    annotations = pd.read_parquet(os.path.join(config.output, "annotations"))
    samples = pd.read_parquet(os.path.join(config.output, "samples"))
    assert len(annotations) == summary.annotations and len(samples) == summary.samples
    per_key = annotations.groupby(["shard", "key"]).size()
    ok = samples[samples.status == "ok"].set_index(["shard", "key"]).n_annotations
    assert per_key.to_dict() == ok[ok > 0].to_dict()
    assert not list(Path(config.output).glob("_parts/**/*.parquet"))
    assert 0 < summary.driver_bytes < summary.result_bytes / 2  # 3.7x to 5x measured here


def test_a_rerun_skips_done_shards_without_touching_them(first_run, inputs):
    config, first = first_run
    done_inputs = tuple(str(inputs / f"{name}.tar") for name in first.done)
    markers = {n: OutputDir(config.output).read_done(n) for n in first.done}
    again = run_annotation(AnnotateConfig(done_inputs, config.output, config.model))
    assert sorted(again.skipped) == sorted(first.done) and not again.done and not again.failed
    assert {n: OutputDir(config.output).read_done(n) for n in first.done} == markers


def test_overwrite_redoes_done_shards(ray_session, inputs, spec, tmp_path):
    shard = str(inputs / "good-000000.tar")
    config = AnnotateConfig((shard,), str(tmp_path / "out"), spec, batch_size=2)
    assert run_annotation(config).done == ["good-000000"]
    output = OutputDir(config.output)
    # Mark the finished outputs so that a rewrite is visible: an old done marker, a broken table.
    stale = {**output.read_done("good-000000"), "finished_at": "2000-01-01T00:00:00+00:00"}
    output.write_bytes(DONE, "good-000000.json", json.dumps(stale).encode())
    output.write_bytes(ANNOTATIONS, "good-000000.parquet", b"not parquet")
    again = run_annotation(AnnotateConfig((shard,), config.output, spec, overwrite=True))
    assert again.done == ["good-000000"] and not again.skipped
    assert output.read_done("good-000000")["finished_at"] > stale["finished_at"]
    assert output.read_table(ANNOTATIONS, "good-000000").num_rows > 0
    assert samples_keys(tmp_path / "out") == Counter(input_keys(shard))


class DriverDied(Exception):
    """Raised from the progress callback: the driver dies right after writing one shard."""


def test_an_interrupted_run_resumes_without_duplicates(ray_session, spec, tmp_path):
    paths = write_good_shards(tmp_path / "in", 3, 2)
    config = AnnotateConfig((str(tmp_path / "in"),), str(tmp_path / "out"), spec, batch_size=1)

    def die(name, done, summary):
        raise DriverDied(name)

    with pytest.raises(DriverDied) as died:
        run_annotation(config, on_shard=die)
    assert len(list((tmp_path / "out" / "_done").glob("*.json"))) == 1
    resumed = run_annotation(config)
    assert resumed.skipped == [died.value.args[0]] and len(resumed.done) == 2
    expected = Counter(k for p in paths for k in input_keys(p))
    assert samples_keys(tmp_path / "out") == expected and set(expected.values()) == {1}


def grounding_actors() -> dict[str, dict]:
    """The GCS actor table's model actors (``ModelStage``) (pid, state, restarts) of this Ray."""
    from ray._private import state

    return {i: a for i, a in state.actors().items() if "ModelStage" in a["ActorClassName"]}


def test_a_killed_actor_is_restarted_and_every_key_still_appears_once(ray_session, spec, tmp_path):
    paths = write_good_shards(tmp_path / "in", 4, 3)
    # one row per block: many model tasks, so that the kill lands mid-run
    config = AnnotateConfig((str(tmp_path / "in"),), str(tmp_path / "out"), spec, batch_size=1,
                            block_rows=1)  # fmt: skip
    killed: dict[str, int] = {}

    def kill_actor_once(name, done, summary):
        if killed:
            return
        alive = {i: a for i, a in grounding_actors().items() if a["State"] == "ALIVE"}
        actor_id, actor = next(iter(alive.items()))
        os.kill(actor["Pid"], signal.SIGKILL)  # as the OOM killer or a lost node would
        killed[actor_id] = len(list((tmp_path / "out" / "_done").glob("*.json")))

    summary = run_annotation(config, on_shard=kill_actor_once)
    (actor_id, done_when_killed) = next(iter(killed.items()))
    assert done_when_killed < 4  # killed mid-run, with shards still to do
    assert grounding_actors()[actor_id]["NumRestarts"] >= 1
    assert len(summary.done) == 4 and not summary.failed
    expected = Counter(k for p in paths for k in input_keys(p))
    assert samples_keys(tmp_path / "out") == expected and set(expected.values()) == {1}
    for name in summary.done:
        assert OutputDir(config.output).read_done(name)["duplicate_rows_dropped"] == 0


def test_image_extensions_match_the_input_format():
    assert IMAGE_EXTENSIONS == ("jpg", "jpeg", "png", "webp")


def test_annotate_reads_and_writes_s3_and_a_rerun_skips_its_done_shards(
    ray_session, s3_bucket, spec, tmp_path
):
    """Shards on an S3 API (moto on loopback, the standard AWS variables), output to it too."""
    import pyarrow.fs as pafs

    local = write_good_shards(tmp_path, 2, 3, prefix="s3good")
    s3, _ = pafs.FileSystem.from_uri(f"s3://{s3_bucket}")
    for path in local:
        pafs.copy_files(str(path), f"{s3_bucket}/in/{path.name}", destination_filesystem=s3)
    config = AnnotateConfig((f"s3://{s3_bucket}/in/",), f"s3://{s3_bucket}/out", spec, batch_size=2)
    summary = run_annotation(config)
    assert sorted(summary.done) == ["s3good-000000", "s3good-000001"] and not summary.failed
    out = OutputDir(config.output)
    for path in local:
        name = path.name.removesuffix(".tar")
        assert out.is_done(name)
        assert out.read_done(name)["input"] == f"s3://{s3_bucket}/in/{path.name}"
        keys = out.read_table("samples", name).column("key").to_pylist()
        assert sorted(keys) == sorted(input_keys(path))
        annotations = out.read_table(ANNOTATIONS, name)
        assert annotations.num_rows > 0 and annotations.schema.equals(ANNOTATIONS_SCHEMA)
    again = run_annotation(config)
    assert again.done == [] and sorted(again.skipped) == ["s3good-000000", "s3good-000001"]


def test_actors_that_would_hold_every_cpu_are_fitted_and_too_many_fail_at_once(
    ray_session, inputs, spec, tmp_path, capsys
):
    """Actors that hold every CPU of the cluster (the session's 4) leave the read tasks waiting
    for ever; the job gives each actor an equal share of what reading and writing leave, and
    refuses at once, before any model loads, when that share is no CPU to speak of."""
    cpus = ray_session.cluster_resources()["CPU"]
    config = AnnotateConfig((str(inputs),), str(tmp_path / "out"), spec, batch_size=3,
                            actors=int(cpus), cpus_per_actor=1.0, phrases="selector")  # fmt: skip
    fitted_config, note = fitted(config, cpus)
    share = (cpus - IO_CPUS) / cpus
    assert fitted_config.cpus_per_actor == pytest.approx(share) and "CPUs per actor" in note
    assert fitted(fitted_config, cpus) == (fitted_config, "")  # what fits is left alone
    assert fitted_config.torch_threads == 1  # each actor's share of the cores: one
    # one actor computes with every core (reading and writing take a few percent of one), unless
    # told otherwise
    one = dataclasses.replace(config, actors=1)
    assert fitted(one, cpus)[0].torch_threads == int(cpus)
    assert fitted(dataclasses.replace(one, torch_threads=3), cpus)[0].torch_threads == 3
    with pytest.raises(ValueError, match="--torch-threads"):
        dataclasses.replace(one, torch_threads=-1)
    summary = run_annotation(config)
    # every shard ends (the truncated one fails, as in every run of these inputs)
    assert set(summary.failed) == {"trunc-000000"} and len(summary.done) == summary.planned - 1
    assert "CPUs per actor" in capsys.readouterr().err
    many = AnnotateConfig((str(inputs),), str(tmp_path / "many"), spec, actors=1000)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="--actors 1000 do not fit"):
        run_annotation(many)
    assert time.perf_counter() - start < 10 and not (tmp_path / "many" / "samples").exists()
    gpu = AnnotateConfig(("x.tar",), str(tmp_path / "gpu"), spec, actors=64, gpus_per_actor=1)
    assert fitted(gpu, cpus) == (gpu, "")  # GPU nodes may still be starting: not judged here
    # a Ray started by the job has all it will have: GPU actors it cannot hold fail at once
    with pytest.raises(ValueError, match="need 64 GPUs and this Ray has 0"):
        fitted(gpu, cpus, cluster_gpus=0.0)
    assert fitted(dataclasses.replace(gpu, actors=2), cpus, cluster_gpus=2.0)[0].actors == 2
    for bad in ({"batch_size": 0}, {"actors": 0}, {"cpus_per_actor": -1.0}):
        with pytest.raises(ValueError, match="must be at least 1|cannot be negative"):
            dataclasses.replace(gpu, **bad)
