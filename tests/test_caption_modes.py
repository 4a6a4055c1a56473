"""Caption and image-only samples through the model stage and the writer, with tiny real models
and a keyword selector saved in the heads file: spans picked from one prefill, descriptions
generated for image-only samples, where each phrase came from written to the outputs."""

import pyarrow as pa
import pytest
import torch
from annotate_inputs import decoded_by_key, write_mixed_shard
from grounding_helpers import every_token_selector_spec

from flmm.selector import Span, char_span
from pipeline.decode import DECODED_SCHEMA
from pipeline.grounding import RESULT_SCHEMA, GroundingActor
from pipeline.writer import shard_tables
from schemas.annotations import ANNOTATIONS_SCHEMA, SAMPLES_SCHEMA


@pytest.fixture(scope="module")
def spec(tiny_llava_dir, tmp_path_factory):
    """Tiny LLaVA + tiny SAM + random heads, and a selector that tags every token B."""
    return every_token_selector_spec(tiny_llava_dir, tmp_path_factory.mktemp("caption_models"))


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    return decoded_by_key(write_mixed_shard(tmp_path_factory.mktemp("mixed") / "mixed-000000.tar"))


def run_actor(actor, rows):
    return {r["key"]: r for r in actor(pa.Table.from_pylist(rows, DECODED_SCHEMA)).to_pylist()}


def test_captions_are_grounded_span_by_span_from_the_one_prefill(spec, decoded, one_thread):
    actor = GroundingActor(spec, caption_layout="in-place")
    language_model = actor.model.lmm.model.model.language_model
    calls = []
    hook = language_model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        rows = [decoded[k] for k in ("good_rgb", "caption_txt", "caption_long")]
        results = run_actor(actor, rows)
    finally:
        hook.remove()
    assert len(calls) == 1  # given phrases and two captions: one prefill for the batch
    given, caption, long = results["good_rgb"], results["caption_txt"], results["caption_long"]
    assert given["source"] == "given" and given["spans"] == [] and len(given["counts"]) == 2
    for row in (caption, long):
        assert row["status"] == "ok" and row["source"] == "caption"
        text = row["text"]
        offsets = actor.model.lmm.prepare_text(torch.zeros(8, 8, 3, dtype=torch.uint8), text)[1]
        # every token tagged B: one span per token, a repeated one grounded once (its first)
        spans = [char_span(offsets, Span(t, t + 1, 1.0), text) for t in range(len(offsets))]
        first = {}
        for span in spans:
            first.setdefault(text[span[0] : span[1]], list(span))
        assert row["spans"] == list(first.values())
        assert row["phrases"] == [text[a:b] for a, b in row["spans"]]
        assert len(row["counts"]) == len(row["bboxes"]) == len(row["phrases"])
        assert all(0.9 < s <= 1 for s in row["selector_scores"])
        assert row["mask_size"] == [row["height"], row["width"]]
    assert caption["text"] == "a red circle" and caption["phrases"][:2] == ["a", "red"]
    assert len(long["text"]) == 1000 and long["warning"].startswith("caption truncated")
    assert long["phrases"][:3] == ["the", "red", "circle"] and len(long["phrases"]) < 12


def test_listed_layout_grounds_the_selected_phrases_as_given_phrases(spec, decoded, one_thread):
    """``--caption-layout listed`` (the default): the caption's spans are picked from its prefill,
    then grounded in a second prefill exactly as the same phrases given in ``phrases`` are; the
    in-place layout grounds them differently (a check that the two layouts are not the same)."""
    actor = GroundingActor(spec)
    (listed,) = run_actor(actor, [decoded["caption_txt"]]).values()
    assert listed["phrases"] == ["a", "red", "circle"] and listed["spans"] == [
        [0, 1],
        [2, 5],
        [6, 12],
    ]
    as_given = dict(decoded["good_rgb"], key="as_given", phrases=listed["phrases"])
    as_given.update(pixels=decoded["caption_txt"]["pixels"])
    as_given.update(height=decoded["caption_txt"]["height"], width=decoded["caption_txt"]["width"])
    (given,) = run_actor(actor, [as_given]).values()
    assert given["source"] == "given" and listed["counts"] == given["counts"]
    assert listed["bboxes"] == given["bboxes"] and listed["scores"] == given["scores"]
    in_place = GroundingActor(spec, caption_layout="in-place")
    (row,) = run_actor(in_place, [decoded["caption_txt"]]).values()
    assert row["spans"] == listed["spans"] and row["scores"] != listed["scores"]


def test_image_only_samples_ground_the_description_the_lmm_writes(spec, decoded, one_thread):
    actor = GroundingActor(spec, max_new_tokens=6)
    row = decoded["image_only"]
    (result,) = run_actor(actor, [row]).values()
    image = torch.frombuffer(bytearray(row["pixels"]), dtype=torch.uint8)
    image = image.view(row["height"], row["width"], 3)
    (expected,) = actor.model.lmm.describe([image], max_new_tokens=6)
    assert expected.strip()  # the tiny LMM's greedy words, whatever they mean
    # batched generation (another image of another size beside it) writes the same description
    assert actor.model.lmm.describe([image, image[:10]], max_new_tokens=6)[0] == expected
    assert result["status"] == "ok" and result["source"] == "generated"
    assert result["text"] == expected
    assert result["phrases"] == [expected[a:b] for a, b in result["spans"]]
    assert len(result["counts"]) == len(result["phrases"]) > 0


def test_outputs_say_where_each_phrase_came_from(spec, decoded, one_thread):
    actor = GroundingActor(spec, max_new_tokens=4)
    keys = ("good_rgb", "caption_txt", "image_only", "bad_corrupt")
    rows = run_actor(actor, [decoded[k] for k in keys])
    assert pa.Table.from_pylist(list(rows.values()), RESULT_SCHEMA)  # the declared schema
    annotations, samples = shard_tables("mixed-000000", list(rows.values()), "m")
    assert annotations.schema.equals(ANNOTATIONS_SCHEMA) and samples.schema.equals(SAMPLES_SCHEMA)
    by_key = {r["key"]: r for r in samples.to_pylist()}
    assert by_key["good_rgb"]["source"] == "given" and by_key["good_rgb"]["text"] is None
    assert by_key["caption_txt"]["text"] == "a red circle"
    assert by_key["image_only"]["source"] == "generated"
    assert by_key["bad_corrupt"]["source"] is None and by_key["bad_corrupt"]["status"] == "error"
    for a in annotations.to_pylist():
        if a["source"] == "given":
            assert a["span"] is None and a["selector_score"] is None
        else:
            text = by_key[a["key"]]["text"]
            assert text[a["span"][0] : a["span"][1]] == a["phrase"] and a["selector_score"] > 0.9
    assert {a["source"] for a in annotations.to_pylist()} >= {"given", "caption"}
