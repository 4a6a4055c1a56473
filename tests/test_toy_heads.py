"""The shipped toy heads (trained by jobs/train.py) ground held-out toy phrases as well as their
documented figure says (models/toy/heads_metrics.json), far better than random heads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flmm.build import build_flmm, build_sam, sam_config
from flmm.lmm import FrozenLlava
from toyworld.scenes import make_scene, scene_seed

TOY = Path(__file__).resolve().parents[1] / "models" / "toy"


@pytest.fixture(autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def mean_iou(model, scenes) -> float:
    ious = []
    for scene in scenes:
        phrases = [obj.expressions[0] for obj in scene.objects]
        with torch.inference_mode():
            (out,) = model([model.prepare(torch.from_numpy(scene.image), phrases)])
        for obj, logits in zip(scene.objects, out.refined[:, 0]):
            pred, gt = (logits > 0).numpy(), obj.mask
            union = (pred | gt).sum()
            ious.append((pred & gt).sum() / union if union else 0.0)
    return float(np.mean(ious))


def test_shipped_toy_heads_reach_their_documented_giou_on_held_out_scenes():
    """The first expression of every object, all objects of an image in one sequence: the
    ``flmm`` protocol, whose refined gIoU over 100 held-out scenes is documented. On these 12 of
    them the heads measured 0.724 (documented 0.745; 6 scenes: 0.741): the margin of 0.08 covers
    that sampling spread, and a real regression (random heads: 0.09) fails far below it."""
    documented = json.loads((TOY / "heads_metrics.json").read_text())["val/flmm"]["refined"]
    lmm = FrozenLlava.from_pretrained(str(TOY / "llava"))
    scenes = [make_scene(scene_seed(0, 1_000_000 + i)) for i in range(12)]  # held out
    sam = build_sam(sam_config("toy"), TOY / "sam.safetensors")
    trained = mean_iou(build_flmm(lmm, sam, TOY / "heads.safetensors"), scenes)
    assert trained >= documented["giou"] - 0.08, (trained, documented["giou"])


def test_bfloat16_sam_and_heads_keep_the_toy_masks():
    """``autocast_dtype=bfloat16`` (ModelSpec ``sam_heads_dtype``) runs SAM and the heads in bf16:
    SAM's matmuls run reduced (its embedding is not float32's bit for bit), the outputs stay
    float32, and the masks stay those of float32."""
    lmm = FrozenLlava.from_pretrained(str(TOY / "llava"))
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
