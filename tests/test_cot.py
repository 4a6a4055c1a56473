"""Visual chain-of-thought (issue 37, item 3): a question's objects grounded first, the question
answered again from their crop. The crop's geometry by hand; the GroundingActor with ``cot`` on
tiny random models of every family (the second look batched = one at a time, the crop box the
written masks' box in the original frame); the shipped toy model (the box lies around the
object the question names); the annotate job with ``--cot``; the ``vqa`` evaluation protocol."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
import pytest
import torch
from annotate_inputs import decoded_by_key, image_bytes, meta, write_tar
from grounding_helpers import every_token_selector_spec, lm_calls

from flmm.cot import CropConfig, crop, evidence_box, focus, second_view, xywh
from flmm.tiny_lmms import MODEL_TYPES
from pipeline.annotate import AnnotateConfig, run_annotation
from pipeline.decode import DECODED_SCHEMA, pixels_of
from pipeline.evaluate import EvalSet, evaluate_set
from pipeline.export import export_html
from pipeline.grounding import NO_EVIDENCE, GroundingActor, question_rows
from pipeline.spec import ModelSpec
from pipeline.vqa import AnswerAccuracy, normalize_answer, vqa_fields

NEW_TOKENS = 5
HUGE = ("which object is left of the red circle and " * 500)[:20_000]


def ask(question, **extra) -> bytes:
    return json.dumps({"question": question, **extra}).encode()


SHARD = {
    "ask_colour": {"png": image_bytes("RGB", size=(40, 28), seed=1), "json": ask("red circle?")},
    "ask_shape": {
        "jpg": image_bytes("RGB", size=(30, 44), fmt="JPEG", seed=2),
        "json": ask("What shape is the small blue object on the right?"),
    },
    "ask_empty": {"png": image_bytes("RGB", seed=4), "json": ask("  \n")},
    "given": {"png": image_bytes("RGB", seed=6), "json": meta()},
}
ASKED = ("ask_colour", "ask_shape")


# --------------------------------------------------------------------------------------------
# The crop's geometry
# --------------------------------------------------------------------------------------------


def test_the_evidence_box_is_the_masks_box_widened_and_clipped():
    masks = torch.zeros(2, 50, 60, dtype=torch.bool)
    masks[0, 10:20, 20:30] = True  # rows 10..19, columns 20..29
    masks[1, 30:34, 40:44] = True  # a second mask: the box is around their union
    config = CropConfig(margin=0.25, min_side=1)
    # union: x 20..44 (24 wide → 6 each side), y 10..34 (24 high → 6 each side)
    assert evidence_box(masks, config) == (14, 4, 50, 40)
    assert evidence_box(masks, CropConfig(margin=0.0, min_side=1)) == (20, 10, 44, 34)
    # a speck is widened to min_side about its centre; at an edge the box stops there
    speck = torch.zeros(1, 50, 60, dtype=torch.bool)
    speck[0, 25, 30] = True
    assert evidence_box(speck, CropConfig(margin=0.0, min_side=10)) == (26, 21, 36, 31)
    corner = torch.zeros(1, 50, 60, dtype=torch.bool)
    corner[0, 0:4, 56:60] = True
    assert evidence_box(corner, CropConfig(margin=1.0, min_side=1)) == (52, 0, 60, 8)
    assert evidence_box(torch.zeros(3, 50, 60, dtype=torch.bool)) is None
    assert xywh((14, 4, 50, 40)) == [14.0, 4.0, 36.0, 36.0]


def test_a_crop_pixel_is_the_original_pixel_offset_by_the_box():
    image = torch.arange(50 * 60 * 3, dtype=torch.int32).reshape(50, 60, 3)
    masks = torch.zeros(1, 50, 60, dtype=torch.bool)
    masks[0, 12:17, 33:41] = True
    x0, y0, x1, y1 = box = evidence_box(masks, CropConfig(margin=0.5, min_side=1))
    view = crop(image, box)
    assert view.shape == (y1 - y0, x1 - x0, 3)
    for v, u in ((0, 0), (3, 7), (view.shape[0] - 1, view.shape[1] - 1)):
        assert torch.equal(view[v, u], image[y0 + v, x0 + u])
    inside = torch.zeros_like(masks[0])
    inside[y0:y1, x0:x1] = True
    assert not (masks[0] & ~inside).any()  # the evidence lies in the crop


def test_focus_keeps_the_frame_and_paints_over_what_is_outside_the_box():
    image = torch.full((20, 30, 3), 90, dtype=torch.uint8)  # a background
    image[2:6, 3:9] = torch.tensor([200, 10, 10], dtype=torch.uint8)  # a distractor
    image[10:14, 12:20] = torch.tensor([10, 200, 10], dtype=torch.uint8)  # the evidence
    box = (11, 9, 21, 15)
    view = second_view(image, box, CropConfig(view="focus"))
    assert view.shape == image.shape  # sizes and places kept
    assert torch.equal(view[9:15, 11:21], image[9:15, 11:21])
    outside = torch.ones(20, 30, dtype=torch.bool)
    outside[9:15, 11:21] = False
    assert (view[outside] == 90).all()  # the distractor is gone, painted the median colour
    # auto: a box of at most a quarter of the image is cropped (zoomed in), a larger one focused
    assert torch.equal(second_view(image, box, CropConfig()), image[9:15, 11:21])
    assert torch.equal(second_view(image, box, CropConfig(view="crop")), image[9:15, 11:21])
    large = (0, 0, 20, 10)  # a third of the image
    assert torch.equal(second_view(image, large, CropConfig()), focus(image, large))
    assert not torch.equal(second_view(image, large, CropConfig(view="crop")), focus(image, large))
    with pytest.raises(ValueError, match="--cot-view"):
        CropConfig(view="zoom")


@pytest.mark.parametrize("margin", [-0.1, float("nan"), float("inf")])
def test_a_bad_margin_is_refused(margin):
    with pytest.raises(ValueError, match="--cot-margin"):
        CropConfig(margin=margin)


# --------------------------------------------------------------------------------------------
# The model stage, every family
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_tar(tmp_path_factory.mktemp("cot") / "c-000000.tar", SHARD)


@pytest.fixture(scope="module")
def decoded(shard):
    return decoded_by_key(shard)


@pytest.fixture(scope="module", params=MODEL_TYPES)
def actor(request, tiny_lmm_dir, tmp_path_factory):
    lmm_dir = tiny_lmm_dir(request.param)
    spec = every_token_selector_spec(lmm_dir, tmp_path_factory.mktemp(request.param))
    return GroundingActor(spec, max_new_tokens=NEW_TOKENS, cot=True)


def union_of(result: dict) -> torch.Tensor:
    """The union of a result's written masks, bool ``[H, W]`` (original frame)."""
    size = [result["height"], result["width"]]
    rles = [{"size": size, "counts": c.encode()} for c in result["counts"]]
    masks = mask_utils.decode(rles).astype(bool)  # [H, W, P]
    return torch.from_numpy(masks).permute(2, 0, 1)


def test_every_family_looks_twice_in_batches_as_alone(actor, decoded, one_thread):
    rows = [decoded[k] for k in ("given", *ASKED)]
    with lm_calls(actor) as calls:
        table = actor(pa.Table.from_pylist(rows, DECODED_SCHEMA))
    results = {r["key"]: r for r in table.to_pylist()}
    assert {r["status"] for r in results.values()} == {"ok"}
    for key in ASKED:
        row, result = decoded[key], results[key]
        question = row["question"]
        assert (result["source"], result["question"], result["text"]) == (
            "evidence", question, question)  # fmt: skip
        # the evidence: the objects the question names (every token, by this selector)
        assert result["phrases"] and result["proposer"] == "selector"
        assert result["phrases"] == [question[a:b] for a, b in result["spans"]]
        box = evidence_box(union_of(result), actor.cot_crop)
        image = torch.from_numpy(pixels_of(row).copy())
        if box is None:
            assert result["evidence_box"] == [] and NO_EVIDENCE in result["warning"]
            view = image
        else:  # the box the answer was given from is the written masks' box
            assert result["evidence_box"] == xywh(box)
            view = second_view(image, box, actor.cot_crop)
        alone = actor.model.lmm.answer([view], [question], NEW_TOKENS)[0]
        assert result["answer"] == alone
    assert results["given"]["source"] == "given" and results["given"]["evidence_box"] == []
    # one prefill over the batch's given phrases and questions (where the selector picks the
    # questions' objects), one over those objects listed (the default layout); one generation
    # answers both questions from their views (none before: the objects are picked, not asked)
    assert calls == {"prefill": [3, 2], "generate": [2]}


def test_cot_takes_no_whole_answer_and_a_sane_margin(tmp_path):
    spec = ModelSpec("unused", "tiny")
    with pytest.raises(ValueError, match="--cot grounds the question's objects"):
        AnnotateConfig(("x.tar",), str(tmp_path), spec, cot=True, ground_answer="whole")
    with pytest.raises(ValueError, match="--cot-margin"):
        AnnotateConfig(("x.tar",), str(tmp_path), spec, cot=True, cot_margin=-1.0)


# --------------------------------------------------------------------------------------------
# The shipped toy model: the evidence is where the question's object is
# --------------------------------------------------------------------------------------------


def test_the_toy_models_crop_is_around_the_object_the_question_names(one_thread):
    from toyworld.models import toy_heads, toy_model_spec
    from toyworld.scenes import EVAL_START, make_scene, scene_seed

    if not toy_heads().is_file():
        pytest.skip("the toy heads are not shipped in this checkout")
    actor = GroundingActor(toy_model_spec(), max_new_tokens=4, cot=True)
    questions, images, objects = [], [], []
    for index in range(EVAL_START, EVAL_START + 40):
        scene = make_scene(scene_seed(0, index))
        obj = scene.objects[0]
        names = [e for e in obj.expressions if obj.colour not in e.split()]
        if not names:
            continue
        question = f"What colour is {names[0]}?"
        questions.append(question)
        images.append(torch.from_numpy(scene.image))
        objects.append(obj)
        if len(questions) == 6:
            break
    with torch.inference_mode():
        texts, *_ = actor.run(question_rows(questions), images)
    covered = []
    for text, obj, image in zip(texts, objects, images):
        assert text.box is not None, text
        x0, y0, x1, y1 = text.box
        inside = np.zeros(obj.mask.shape, bool)
        inside[y0:y1, x0:x1] = True
        covered.append((obj.mask & inside).sum() / obj.mask.sum())
        assert (x1 - x0) * (y1 - y0) < image.shape[0] * image.shape[1]  # a crop, not the image
    assert np.median(covered) > 0.9, covered


# --------------------------------------------------------------------------------------------
# The annotate job and the evaluation
# --------------------------------------------------------------------------------------------


def test_cot_through_the_annotate_job(ray_session, tiny_llava_dir, tmp_path):
    spec = every_token_selector_spec(tiny_llava_dir, tmp_path)
    shard = write_tar(tmp_path / "c-000000.tar", {
        **SHARD, "ask_huge": {"png": image_bytes("RGB", seed=9), "json": ask(HUGE)}})  # fmt: skip
    out = tmp_path / "out"
    config = AnnotateConfig((str(shard),), str(out), spec, batch_size=3, cot=True)
    config = AnnotateConfig(**{**config.__dict__, "max_new_tokens": NEW_TOKENS})
    summary = run_annotation(config)
    assert summary.done == ["c-000000"] and summary.errors == 1
    samples = {r["key"]: r for r in pq.read_table(out / "samples" / "c-000000.parquet").to_pylist()}
    annotations = pq.read_table(out / "annotations" / "c-000000.parquet").to_pylist()
    assert samples["ask_empty"]["error_kind"] == "no_question"
    assert samples["ask_huge"]["warning"].startswith("question truncated from 20000")
    for key in (*ASKED, "ask_huge"):
        sample = samples[key]
        assert (sample["status"], sample["source"]) == ("ok", "evidence")
        assert sample["question"] == sample["text"] and sample["answer"] is not None
        rows = [a for a in annotations if a["key"] == key]
        assert len(rows) == sample["n_annotations"] > 0
        assert {a["source"] for a in rows} == {"evidence"}
        assert all(a["phrase"] == sample["question"][slice(*a["span"])] for a in rows)
        if sample["evidence_box"] is not None:  # XYWH inside the image
            x, y, w, h = sample["evidence_box"]
            assert 0 <= x < x + w <= sample["width"] and 0 <= y < y + h <= sample["height"]
    assert samples["given"]["evidence_box"] is None
    done = json.loads((out / "_done" / "c-000000.json").read_text())
    assert done["schema_version"] == 6
    # the gallery shows each question and its answer, and the box it was answered from
    export_html(str(out), str(tmp_path / "gallery.html"))
    page = (tmp_path / "gallery.html").read_text()
    (data,) = re.findall(
        r'<script id="data" type="application/json">(.*?)</script>', page, re.DOTALL
    )
    items = {item["key"]: item for item in json.loads(data)["items"]}
    for key in (*ASKED, "ask_huge"):
        sample, item = samples[key], items[key]
        assert (item["question"], item["answer"]) == (sample["question"], sample["answer"])
        scale = max(item["width"], item["height"]) / max(sample["width"], sample["height"])
        box = sample["evidence_box"]
        assert item["box"] == (None if box is None else [round(v * scale, 1) for v in box])
    assert items["given"]["question"] is None and items["given"]["box"] is None
    assert "answered from here" in page


def test_answers_are_normalised_and_vqa_fields_checked():
    assert normalize_answer(" The Red  circle.") == "red circle"
    accuracy = AnswerAccuracy()
    accuracy.update("Yellow.", ["yellow"], cropped=True)
    accuracy.update("a cross", ["star"])
    assert accuracy.result() == {"accuracy": 0.5, "n": 2, "cropped": 0.5}
    assert vqa_fields({"question": " Why? ", "answers": ["no"], "subset": "x"}) == (
        "Why?", ["no"], ["x"])  # fmt: skip
    for bad in ({"question": "Why?"}, {"question": "Why?", "answers": [1]},
                {"question": "Why?", "answers": ["a"], "subset": [""]}):  # fmt: skip
        with pytest.raises(Exception, match="must be") as error:
            vqa_fields(bad)
        assert error.value.kind == "bad_text"


def test_the_vqa_protocol_scores_both_looks_per_subset(tmp_path, one_thread):
    from toyworld.models import toy_heads, toy_model_spec
    from toyworld.vqa_set import write_vqa_shards

    if not toy_heads().is_file():
        pytest.skip("the toy heads are not shipped in this checkout")
    paths = write_vqa_shards(tmp_path, 8)
    model = toy_model_spec().build()
    result = evaluate_set(model, EvalSet("vqa", tuple(map(str, paths))), ("vqa",), 4,
                          log=lambda _: None)  # fmt: skip
    metrics = {k: {o: a.result() for o, a in v.items()} for k, v in result.metrics.items()}
    assert result.samples == 8 and metrics["vqa"]["plain"]["n"] == 8
    # every sample is scored under its kind, and object questions under their object's size
    kinds = sum(metrics[f"vqa-{k}"]["plain"]["n"] for k in ("colour", "shape", "size",
                "position", "count", "existence") if f"vqa-{k}" in metrics)  # fmt: skip
    assert kinds == 8
    sizes = [
        metrics.get(f"vqa-{s}-object", {"cot": {"n": 0}})["cot"]["n"] for s in ("small", "big")
    ]
    objects_asked = sum(metrics.get(f"vqa-{k}", {"plain": {"n": 0}})["plain"]["n"]
                        for k in ("colour", "shape", "size", "position"))  # fmt: skip
    assert sum(sizes) == objects_asked
    for outputs in metrics.values():
        for output in ("plain", "cot"):
            assert 0 <= outputs[output]["accuracy"] <= 1


def test_a_question_whose_first_look_picks_nothing_is_answered_from_the_whole_image(
    tiny_llava_dir, decoded, one_thread
):
    """The LMM's proposals (a random tiny LMM's) found nowhere in the question: nothing to
    ground in the whole batch, and still every question is answered, from its whole image."""
    actor = GroundingActor(
        ModelSpec(str(tiny_llava_dir), "tiny"), max_new_tokens=NEW_TOKENS, phrases="lmm", cot=True
    )
    rows = [decoded[k] for k in ASKED]
    table = actor(pa.Table.from_pylist(rows, DECODED_SCHEMA)).to_pylist()
    unfounded = [(row, result) for row, result in zip(rows, table) if not result["spans"]]
    assert unfounded  # (a row whose proposals named a word of the question is not this case)
    for row, result in unfounded:
        image = torch.from_numpy(pixels_of(row).copy())
        assert result["status"] == "ok" and result["source"] == "evidence"
        assert result["evidence_box"] == [] and NO_EVIDENCE in result["warning"]
        assert result["answer"] == actor.model.lmm.answer([image], [row["question"]], NEW_TOKENS)[0]
