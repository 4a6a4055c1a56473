"""The toy world's reasoning shards (``toyworld.reasoning``): held-out scenes whose question the
one object in ``objects`` answers, checked against the scene's geometry by hand, and the
``reason`` evaluation protocol over them with the shipped toy models."""

import json

import numpy as np
import pytest

from pipeline.evaluate import eval_sets, evaluate_set
from pipeline.formats import decode_rle
from pipeline.reason import REASON_KEYS
from pipeline.sources import iter_tar_samples
from toyworld.instructions import REASON_TEMPLATES, STAGE_5_REASONS
from toyworld.lmm import INSTRUCTION_KINDS, instruction_question
from toyworld.models import toy_heads, toy_model_spec
from toyworld.reasoning import reason_kind, reason_scenes, reason_shards
from toyworld.scenes import EVAL_START, make_scene
from toyworld.vqa import SCENE_CONFIG, list_name


def referent_fits(objects, referent, kind: str, question: str) -> bool:
    """The question's rule, worked from the objects' visible areas, centres (x right, y down)
    and colours: the largest / smallest visible area, left of / above the object the question
    names, the one colour no other object has."""
    others = [o for o in objects if o is not referent]
    if kind in ("largest", "smallest"):
        areas = [int(o.mask.sum()) for o in others]
        area = int(referent.mask.sum())
        return area > max(areas) if kind == "largest" else area < min(areas)
    if kind == "odd_colour":
        return all(o.colour != referent.colour for o in others) and len(others) >= 2
    anchor_name = question.removeprefix(REASON_TEMPLATES[kind].split("{}")[0]).removesuffix("?")
    (anchor,) = [o for o in objects if anchor_name in o.expressions]
    axis = 0 if kind == "left_of" else 1
    return referent.centre[axis] < anchor.centre[axis]


def test_reason_scenes_are_held_out_and_answered_by_their_referent():
    asked = list(reason_scenes(100))
    assert [a.index for a in asked] == sorted({a.index for a in asked})
    assert asked[0].index >= EVAL_START and asked[-1].index > EVAL_START + 99  # some skipped
    assert {a.kind for a in asked} == set(STAGE_5_REASONS)  # the kinds the shipped LMM learnt
    for a in asked:
        assert a.referent in a.scene.objects
        assert a.question.answer == list_name(a.referent)
        fits = [
            referent_fits(a.scene.objects, o, a.kind, a.question.instruction)
            for o in a.scene.objects
        ]
        assert fits == [o is a.referent for o in a.scene.objects], a.index  # it, and it alone
    # the questions the toy LMM's record (models/toy/llava/toy_world.json) was scored on
    for a in asked[:10]:
        rng = np.random.default_rng([0, a.index, 100 + INSTRUCTION_KINDS.index("reason")])
        question = instruction_question(a.scene, "reason", rng, SCENE_CONFIG)
        assert question == a.question


def test_reason_kind_names_the_template_and_refuses_other_text():
    assert reason_kind("Which object is the largest?") == "largest"
    assert reason_kind("Which object is above the red circle?") == "above"
    assert reason_kind("Which object is left of the star?") == "left_of"
    with pytest.raises(ValueError, match="not a reason question"):
        reason_kind("Which object is above ?")
    with pytest.raises(ValueError, match="not a reason question"):
        reason_kind("What colour is the circle?")


def test_reason_shards_carry_the_question_and_the_referent_mask_alone(tmp_path):
    paths = reason_shards(tmp_path, 6, scenes_per_shard=4)
    assert [p.name for p in paths] == ["reason-000000.tar", "reason-000001.tar"]
    (eval_set,) = eval_sets([str(tmp_path)])
    assert eval_set.name == "reason"
    samples = [(key, files) for p in paths for key, files, _ in iter_tar_samples(str(p))]
    assert len(samples) == 6
    for key, files in samples:
        meta = json.loads(files["json"])
        scene = make_scene(meta["scene_seed"], SCENE_CONFIG)
        assert key.startswith("reason_") and int(key.removeprefix("reason_")) >= EVAL_START
        assert meta["kind"] == reason_kind(meta["question"]) and meta["is_sentence"] is False
        (obj,) = meta["objects"]
        (referent,) = [o for o in scene.objects if list_name(o) == meta["answer"]]
        assert np.array_equal(decode_rle(obj["mask"]), referent.mask)
        assert referent_fits(scene.objects, referent, meta["kind"], meta["question"])
        assert meta["answer"] in obj["expressions"] and obj["expressions"] == meta["phrases"]
        assert (meta["width"], meta["height"]) == scene.image.shape[1::-1]


@pytest.mark.skipif(not toy_heads().is_file(), reason="the toy heads are not trained")
def test_reason_protocol_grounds_the_toy_lmms_answers_on_four_scenes(tmp_path, one_thread):
    reason_shards(tmp_path, 4)
    (eval_set,) = eval_sets([str(tmp_path)])
    model = toy_model_spec().build()
    result = evaluate_set(model, eval_set, ("reason",), batch_size=4, log=lambda _: None)
    assert result.samples == 4 and not result.skipped.total()
    counts = {key: result.metrics[key]["refined"].result()["n"] for key in REASON_KEYS}
    assert counts == {"reason": 4, "reason-short": 4, "reason-long": 0}
    # measured: 3 of these 4 answers right (the third names "the small yellow cross", which the
    # scene lacks, for the big one), refined gIoU 0.89; bench/reasoning.py on 100 scenes: 0.80,
    # and 0.11 with a random-init LMM under the same heads
    assert result.metrics["reason"]["refined"].result()["giou"] > 0.5
