"""The shipped toy heads (trained by jobs/train.py) ground held-out toy phrases as well as their
documented figure says (models/toy/heads_metrics.json), far better than random heads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flmm.build import build_flmm, build_sam, sam_config
from flmm.lmm import FrozenLMM
from flmm.metrics import mask_iou
from toyworld.scenes import EVAL_START, make_scene, scene_seed
from toyworld.vqa import TOY_PROMPT

TOY = Path(__file__).resolve().parents[1] / "models" / "toy"
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread, restored


def mean_iou(model, scenes) -> float:
    ious = []
    for scene in scenes:
        phrases = [obj.expressions[0] for obj in scene.objects]
        with torch.inference_mode():
            (out,) = model([model.prepare(torch.from_numpy(scene.image), phrases)])
        for obj, logits in zip(scene.objects, out.refined[:, 0]):
            ious.append(mask_iou((logits > 0).numpy(), obj.mask))
    return float(np.mean(ious))


def documented_giou() -> float:
    """The refined gIoU of the shipped heads under the ``flmm`` protocol (the first expression of
    every object, all objects of an image in one sequence) on the 100 held-out scenes
    ``scene_seed(0, EVAL_START + i)`` (267 objects), as jobs/evaluate.py measured it."""
    return json.loads((TOY / "heads_metrics.json").read_text())["val/flmm"]["refined"]["giou"]


def shipped_heads_miou(n_scenes: int) -> float:
    lmm = FrozenLMM.from_pretrained(str(TOY / "llava"), prompt=TOY_PROMPT)
    sam = build_sam(sam_config("toy"), TOY / "sam.safetensors")
    scenes = [make_scene(scene_seed(0, EVAL_START + i)) for i in range(n_scenes)]  # held out
    return mean_iou(build_flmm(lmm, sam, TOY / "heads.safetensors"), scenes)


def test_shipped_toy_heads_reach_their_documented_giou_on_held_out_scenes():
    """The first 12 of the documented 100 scenes, against the documented gIoU (0.760) minus 0.08.
    Measured per 12-scene window of the 100 (every 11th start): 0.702 to 0.853 (std 0.047; these
    12: 0.741), so 0.08 (bar 0.680) passes the shipped heads on any such sample. Broken
    groundings fall below it (measured with earlier heads, 0.745 documented): the U-Net's masks
    without the SAM refiner 0.591, phrases paired with the wrong objects 0.030, random-init heads
    ~0.09."""
    trained = shipped_heads_miou(12)
    assert trained >= documented_giou() - 0.08, (trained, documented_giou())


@pytest.mark.slow  # the LMM, SAM and heads over 100 scenes: ~10 s idle, ~30 s loaded
def test_shipped_toy_heads_reproduce_their_documented_giou_on_all_100_scenes():
    """The very scenes and protocol of the documented figure: the same number (measured here
    0.76040 = documented to the last digit); 0.005 leaves room for other CPUs' rounding only."""
    trained = shipped_heads_miou(100)
    assert trained == pytest.approx(documented_giou(), abs=0.005), (trained, documented_giou())


def test_bfloat16_sam_and_heads_keep_the_toy_masks():
    """``autocast_dtype=bfloat16`` (ModelSpec ``sam_heads_dtype``) runs SAM and the heads in bf16:
    SAM's matmuls run reduced (its embedding is not float32's bit for bit), the outputs stay
    float32, and the masks stay those of float32."""
    lmm = FrozenLMM.from_pretrained(str(TOY / "llava"), prompt=TOY_PROMPT)
    sam = build_sam(sam_config("toy"), TOY / "sam.safetensors")
    full = build_flmm(lmm, sam, TOY / "heads.safetensors")
    reduced = build_flmm(lmm, sam, TOY / "heads.safetensors", autocast_dtype=torch.bfloat16)
    ious = []
    for i in range(4):
        scene = make_scene(scene_seed(0, 1_000_000 + i))
        phrases = [obj.expressions[0] for obj in scene.objects]
        with torch.inference_mode():
            x = full.prepare(torch.from_numpy(scene.image), phrases)
            e_full, e_reduced = full.embed(x.sam_pixels), reduced.embed(x.sam_pixels)
            assert not torch.equal(e_full, e_reduced)
            assert torch.allclose(e_full, e_reduced.float(), atol=0.1 * e_full.abs().max().item())
            (a,), (b,) = full([x]), reduced([x])
        assert b.refined.dtype == b.unet.dtype == torch.float32
        for pa, pb in zip(a.refined[:, 0] > 0, b.refined[:, 0] > 0):
            union = (pa | pb).sum().item()
            ious.append((pa & pb).sum().item() / union if union else 1.0)
    assert np.mean(ious) > 0.98 and min(ious) > 0.9, ious


def test_the_shipped_keyword_selector_reads_held_out_toy_texts_as_documented():
    """The selector trained beside the toy heads (jobs/train.py on the toy shards' texts), on
    the first 40 of the 300 held-out scenes documented in models/toy/selector.json, per kind
    of text: exact-span F1 at least the documented figure minus 0.05. It is asked to describe
    images with the toy LMM's list question, the one its lists were trained on."""
    from flmm.build import read_heads_file
    from toyworld.selector import EVAL_KINDS, caption_features, evaluate
    from toyworld.vqa import LIST_INSTRUCTION

    documented = json.loads((TOY / "selector.json").read_text())
    _, selector = read_heads_file(TOY / "heads.safetensors")
    assert selector is not None and selector.config.describe_instruction == LIST_INSTRUCTION
    lmm = FrozenLMM.from_pretrained(str(TOY / "llava"), prompt=TOY_PROMPT)
    for kind in EVAL_KINDS:
        measured = evaluate(selector, caption_features(lmm, 0, EVAL_START, 40, kind=kind))
        assert measured["span_f1"] >= documented[kind]["span_f1"] - 0.05, (kind, measured)


@pytest.mark.slow  # 1,699 queries through the toy models: ~50 s idle
def test_kinds_table_adds_up_to_the_documented_standard_row():
    """``python -m toyworld.kinds`` scores the val split's scenes one expression kind at a time;
    its ``all`` row is jobs/evaluate.py's ``standard`` row of heads_metrics.json (same scenes,
    same queries), and every kind's rows add up to it."""
    from toyworld.kinds import kind_metrics
    from toyworld.models import toy_model_spec

    table = kind_metrics(toy_model_spec().build(), 100)
    documented = json.loads((TOY / "heads_metrics.json").read_text())["val/standard"]
    for output in ("unet", "refined"):
        assert table["all"][output]["n"] == documented[output]["n"]
        assert table["all"][output]["giou"] == pytest.approx(documented[output]["giou"], abs=0.005)
        kinds = [row[output] for kind, row in table.items() if kind != "all"]
        assert sum(k["n"] for k in kinds) == table["all"][output]["n"]
        weighted = sum(k["giou"] * k["n"] for k in kinds) / table["all"][output]["n"]
        assert weighted == pytest.approx(table["all"][output]["giou"])
