"""The annotation job's stages one by one, without Ray: inputs, decoding, postprocessing, output."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pytest
import torch
from annotate_inputs import (
    DECODE_EXPECTED,
    MIXED,
    MIXED_EXPECTED,
    image_bytes,
    write_good_shards,
    write_mixed_shard,
    write_tar,
    write_truncated_shard,
)
from PIL import Image

from pipeline.decode import (
    DECODED_SCHEMA,
    MAX_TEXT_CHARS,
    SampleError,
    caption_spans,
    decode_batch,
    decode_image,
    objects_of,
    parse_text,
    phrases_of,
    pixels_of,
    read_samples,
)
from pipeline.formats import decode_rle
from pipeline.grounding import RESULT_SCHEMA, GroundingActor, annotate_logits
from pipeline.sources import RAW_SCHEMA, read_shard, resolve_shards, shard_name
from pipeline.spec import ModelSpec
from pipeline.writer import OutputDir, check_samples, shard_tables
from schemas.annotations import ANNOTATIONS_SCHEMA, SAMPLES_SCHEMA
from toyworld.shards import write_toy_shards

# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------


def test_directories_lists_and_brace_patterns_resolve_to_the_same_shards(tmp_path):
    paths = write_good_shards(tmp_path / "d", 3, 1)
    expected = [str(p) for p in paths]
    assert resolve_shards([str(tmp_path / "d")]) == expected
    assert resolve_shards([str(p) for p in paths]) == expected
    assert resolve_shards([str(tmp_path / "d" / "good-{000000..000002}.tar")]) == expected
    assert resolve_shards(["file://" + str(tmp_path / "d")]) == ["file://" + p for p in expected]
    assert shard_name("s3://bucket/x/train-000007.tar") == "train-000007"


def test_input_errors_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar shards"):
        resolve_shards([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="input not found"):
        resolve_shards([str(tmp_path / "missing-{0..1}.tar")])
    a = write_good_shards(tmp_path / "a", 1, 1)[0]
    b = write_good_shards(tmp_path / "b", 1, 1)[0]
    with pytest.raises(ValueError, match="two shards named 'good-000000'"):
        resolve_shards([str(a), str(b)])


def test_read_shard_gives_one_raw_row_per_sample_with_the_shard_size(tmp_path):
    path = write_mixed_shard(tmp_path / "mixed-000000.tar")
    table = read_shard(pa.table({"uri": [str(path)], "shard": ["mixed-000000"]}))
    assert table.schema.equals(RAW_SCHEMA)
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == list(MIXED)
    assert {r["n_samples"] for r in rows} == {len(MIXED)}
    assert all(r["shard_error"] == "" for r in rows)
    assert rows[0]["image"] == MIXED["good_rgb"][0]["jpg"] and rows[0]["image_ext"] == "jpg"


def test_a_truncated_or_corrupt_tar_becomes_one_shard_error_row(tmp_path):
    truncated = write_truncated_shard(tmp_path / "cut.tar")
    corrupt = write_good_shards(tmp_path, 1, 4)[0]
    with tarfile.open(corrupt) as tar:
        offset = tar.getmembers()[2].offset  # the second sample's first header
    data = bytearray(corrupt.read_bytes())
    data[offset : offset + 64] = b"\xff" * 64  # tarfile alone would just stop there, silently
    corrupt.write_bytes(bytes(data))
    for path in (truncated, corrupt):
        rows = read_shard(pa.table({"uri": [str(path)], "shard": ["s"]})).to_pylist()
        assert len(rows) == 1 and rows[0]["key"] == "" and rows[0]["shard_error"], rows


def test_an_empty_shard_is_one_shard_row_without_error(tmp_path):
    path = write_tar(tmp_path / "empty.tar", {})
    (row,) = read_shard(pa.table({"uri": [str(path)], "shard": ["empty"]})).to_pylist()
    assert (row["key"], row["n_samples"], row["shard_error"]) == ("", 0, "")


# ------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------


def test_every_bad_sample_becomes_an_error_row_of_its_kind(tmp_path):
    path = write_mixed_shard(tmp_path / "mixed-000000.tar")
    raw = read_shard(pa.table({"uri": [str(path)], "shard": ["mixed-000000"]}))
    tables = list(decode_batch(raw, chunk=5))
    assert [t.num_rows for t in tables] == [5, 5, 5, len(MIXED) - 15]
    decoded = pa.concat_tables(tables)
    assert decoded.schema.equals(DECODED_SCHEMA)
    for row in decoded.to_pylist():
        status, kind = DECODE_EXPECTED[row["key"]]
        assert (row["status"], row["error_kind"] or None) == (status, kind), row["error"]
        if status == "ok":
            assert pixels_of(row).shape == (row["height"], row["width"], 3)
    rows = {r["key"]: r for r in decoded.to_pylist()}
    assert rows["good_rgb"]["phrases"] and rows["good_rgb"]["source"] == "given"
    assert (rows["caption_txt"]["source"], rows["caption_txt"]["text"]) == (
        "caption",
        "a red circle",
    )
    assert rows["caption_json"]["text"] == "a red circle" and not rows["caption_json"]["phrases"]
    assert (rows["image_only"]["source"], rows["image_only"]["text"]) == ("generated", "")
    long = rows["caption_long"]
    assert len(long["text"]) == MAX_TEXT_CHARS and long["warning"] == (
        f"caption truncated from 19007 to {MAX_TEXT_CHARS} characters"
    )
    assert "`caption`" in rows["bad_no_caption"]["error"]


def test_16_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    rgb = decode_image(buffer.getvalue())
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_alpha_is_composited_over_white_and_cmyk_and_palette_become_rgb():
    rgba = decode_image(image_bytes("RGBA", size=(10, 8)))
    assert (rgba[:4] == 255).all()  # the transparent top half
    for mode, fmt in (("CMYK", "JPEG"), ("P", "PNG"), ("L", "PNG")):
        rgb = decode_image(image_bytes(mode, size=(10, 8), fmt=fmt))
        assert rgb.shape == (8, 10, 3) and rgb.dtype == np.uint8
    white = io.BytesIO()
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(white, format="JPEG")
    assert decode_image(white.getvalue()).min() >= 250  # no ink is white


def test_text_parsing_errors():
    with pytest.raises(SampleError) as error:
        phrases_of(parse_text(b'{"phrases": ["ok", "  "]}', "json"))
    assert error.value.kind == "no_phrases"
    with pytest.raises(SampleError) as error:
        phrases_of(parse_text(b'{"phrases": "a string"}', "json"))
    assert error.value.kind == "bad_text"
    with pytest.raises(SampleError) as error:
        parse_text(b'{"phrases": ["\xff\xfe"]}', "json")
    assert error.value.kind == "bad_text"
    assert parse_text(b"\xff\xfe", "txt") == {"caption": "\ufffd\ufffd"}  # tests/test_sources.py
    assert phrases_of(parse_text(b'{"phrases": ["a", "b"], "x": 1}', "json")) == ["a", "b"]


def test_objects_of_gives_one_mask_per_expression_as_the_toy_world_writes_them(tmp_path):
    (path,) = write_toy_shards(tmp_path, 1, 1, seed=3)
    sample = next(read_samples([path]))
    height, width = sample["image"].shape[:2]
    phrases, masks = objects_of(sample["meta"], height, width)
    assert phrases == sample["meta"]["phrases"]
    assert masks.shape == (len(phrases), height, width) and masks.dtype == bool
    with pytest.raises(SampleError) as error:
        objects_of(sample["meta"], height + 1, width)
    assert error.value.kind == "bad_objects"


def test_caption_spans_are_read_from_the_objects_and_checked():
    meta = {
        "caption": "a red dot and a cat",
        "objects": [{"spans": [[14, 19]]}, {"spans": [[0, 9]]}, {"spans": [[14, 19], [0, 9]]}],
    }
    spans, owners = [(0, 9), (14, 19)], [[1, 2], [0, 2]]  # sorted; the objects naming each
    assert caption_spans(meta) == ("a red dot and a cat", spans, owners)
    assert caption_spans({"caption": "x", "objects": [{}]}) is None  # no spans: no selector text
    assert caption_spans({"objects": [{"spans": [[0, 1]]}]}) is None  # no caption
    for bad in ([[5, 3]], [[0, 99]], [[0.5, 2]], [[True, 2]], [[1]], "0-3"):
        with pytest.raises(SampleError) as error:
            caption_spans({"caption": "a red dot and a cat", "objects": [{"spans": bad}]})
        assert error.value.kind == "bad_spans"


# ------------------------------------------------------------------------------------------
# Postprocessing and output
# ------------------------------------------------------------------------------------------


def test_logits_become_rle_masks_tight_boxes_and_mean_probability_scores():
    logits = torch.full((2, 1, 6, 9), -10.0)
    logits[0, 0, 1:4, 2:7] = 10.0  # rows 1-3, columns 2-6
    counts, bboxes, scores = annotate_logits(logits)
    mask = decode_rle({"size": [6, 9], "counts": counts[0]})
    assert mask.sum() == 15 and mask[1:4, 2:7].all()
    assert bboxes.dtype == np.float32 and bboxes[0].tolist() == [2.0, 1.0, 5.0, 3.0]
    assert (
        bboxes[1].tolist() == [0.0, 0.0, 0.0, 0.0]
        and not decode_rle({"size": [6, 9], "counts": counts[1]}).any()
    )
    assert scores.dtype == np.float32 and scores[0] == pytest.approx(1.0, abs=1e-4)
    assert scores[1] == 0.0


def _result_row(key, status="ok", n=2):
    return {
        "key": key, "status": status, "error_kind": "" if status == "ok" else "corrupt_image",
        "error": "" if status == "ok" else "broken", "height": 4, "width": 5,
        "phrases": ["a", "b"][:n], "counts": ["04", "04"][:n] if status == "ok" else [],
        "bboxes": [[0.0, 0.0, 1.0, 1.0]] * n, "scores": [0.5] * n, "mask_size": [4, 5],
        "source": "given" if status == "ok" else "", "text": "", "warning": "",
        "spans": [], "selector_scores": [], "proposer": "",
    }  # fmt: skip


def test_shard_tables_follow_the_declared_schemas_and_refuse_missing_keys(tmp_path):
    # k1 failed while decoding: its size is unknown (0), a null in the samples table
    rows = [_result_row("k2"), {**_result_row("k1", "error"), "height": 0, "width": 0}]
    annotations, samples = shard_tables("s", rows, "model-x")
    assert annotations.schema.equals(ANNOTATIONS_SCHEMA, check_metadata=True)
    assert samples.schema.equals(SAMPLES_SCHEMA, check_metadata=True)
    assert samples.to_pylist() == [
        {"key": "k1", "shard": "s", "status": "error", "error_kind": "corrupt_image",
         "error": "corrupt_image: broken", "n_annotations": 0, "height": None, "width": None,
         "source": None, "proposer": None, "text": None, "question": None, "answer": None,
         "evidence_box": None, "warning": None},
        {"key": "k2", "shard": "s", "status": "ok", "error_kind": None, "error": None,
         "n_annotations": 2, "height": 4, "width": 5, "source": "given", "proposer": None,
         "text": None, "question": None, "answer": None, "evidence_box": None, "warning": None},
    ]  # fmt: skip
    assert annotations.column("phrase").to_pylist() == ["a", "b"]
    out = OutputDir(str(tmp_path / "out"))
    with pytest.raises(ValueError, match="the shard has 3 samples"):
        out.write_shard("s", annotations, samples, {"samples": 3}, n_input=3)
    assert not out.is_done("s") and not (tmp_path / "out" / "samples").exists()
    check_samples(samples, 2)
    out.write_shard("s", annotations, samples, {"samples": 2}, n_input=2)
    assert out.is_done("s") and json.loads((tmp_path / "out/_done/s.json").read_text())
    assert not [p for p in (tmp_path / "out").rglob(".*")]  # no temp files left


def test_schemas_have_exactly_the_issue_columns():
    assert ANNOTATIONS_SCHEMA.names == [
        "key", "shard", "phrase", "source", "span", "proposer", "selector_score", "mask", "bbox",
        "score", "width", "height", "model",
    ]  # fmt: skip
    assert SAMPLES_SCHEMA.names == [
        "key", "shard", "status", "error_kind", "error", "n_annotations", "height", "width",
        "source", "proposer", "text", "question", "answer", "evidence_box", "warning",
    ]  # fmt: skip
    assert ANNOTATIONS_SCHEMA.field("mask").type == pa.struct(
        [
            pa.field("size", pa.list_(pa.field("element", pa.int32())), False),
            pa.field("counts", pa.string(), False),
        ]
    )
    assert ANNOTATIONS_SCHEMA.metadata[b"flmm.schema_version"] == b"6"


def test_the_model_stage_grounds_ok_rows_passes_errors_and_isolates_a_failing_sample(
    tmp_path, tiny_llava_dir
):
    path = write_mixed_shard(tmp_path / "mixed-000000.tar")
    raw = read_shard(pa.table({"uri": [str(path)], "shard": ["mixed-000000"]}))
    keys = ("good_rgb", "good_16bit", "bad_corrupt", "caption_txt")
    rows = [r for r in pa.concat_tables(decode_batch(raw)).to_pylist() if r["key"] in keys]
    degenerate = dict(rows[0], key="zero_size", pixels=b"", height=0, width=0)  # status "ok"
    batch = pa.Table.from_pylist([*rows, degenerate], DECODED_SCHEMA)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actor would have under Ray with one CPU
    try:
        spec = ModelSpec(str(tiny_llava_dir), "tiny")
        result = GroundingActor(spec, phrases="selector")(batch)  # caption_txt: no_selector
    finally:
        torch.set_num_threads(threads)
    assert result.schema.equals(RESULT_SCHEMA)
    by_key = {r["key"]: r for r in result.to_pylist()}
    assert by_key["zero_size"]["status"] == "error"
    assert by_key["zero_size"]["error_kind"] == "model_error"
    for key in keys:
        status, kind = MIXED_EXPECTED[key]
        row = by_key[key]
        assert (row["status"], row["error_kind"] or None) == (status, kind)
        n = len(row["phrases"]) if status == "ok" else 0
        assert len(row["counts"]) == len(row["bboxes"]) == len(row["scores"]) == n


def test_model_spec_makes_local_paths_absolute_and_keeps_hub_ids(tiny_llava_dir, monkeypatch):
    monkeypatch.chdir(tiny_llava_dir.parent)
    spec = ModelSpec(tiny_llava_dir.name, "tiny", heads="missing.safetensors")
    assert spec.lmm == str(tiny_llava_dir.resolve())  # actors run in other directories
    assert spec.heads == "missing.safetensors"  # not here: left for the loader's error
    assert ModelSpec("llava-hf/llava-1.5-7b-hf", "tiny").lmm == "llava-hf/llava-1.5-7b-hf"


def test_model_spec_sam_heads_dtype_reaches_the_model_and_names_it(tiny_llava_dir):
    with pytest.raises(ValueError, match="sam_heads_dtype"):
        ModelSpec(str(tiny_llava_dir), "tiny", sam_heads_dtype="int8")
    plain = ModelSpec(str(tiny_llava_dir), "tiny", device="cpu")
    reduced = ModelSpec(str(tiny_llava_dir), "tiny", device="cpu", sam_heads_dtype="bfloat16")
    assert plain.build().autocast_dtype is None
    assert reduced.build().autocast_dtype == torch.bfloat16
    assert reduced.model_id() == plain.model_id() + " @bfloat16"  # outputs say how they were made
