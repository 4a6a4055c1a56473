"""The shipped toy heads (trained by jobs/train.py) ground held-out toy phrases better than the
randomly initialised heads they started from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flmm.build import build_flmm, build_sam, sam_config
from flmm.lmm import FrozenLlava
from toyworld.scenes import make_scene, scene_seed

TOY = Path(__file__).resolve().parents[1] / "models" / "toy"


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


def test_shipped_toy_heads_beat_their_random_initialisation_on_held_out_scenes():
    torch.set_num_threads(1)
    lmm = FrozenLlava.from_pretrained(str(TOY / "llava"))
    scenes = [make_scene(scene_seed(0, 1_000_000 + i)) for i in range(6)]  # held out
    sam = build_sam(sam_config("toy"), TOY / "sam.safetensors")
    trained = mean_iou(build_flmm(lmm, sam, TOY / "heads.safetensors"), scenes)
    torch.manual_seed(0)
    sam = build_sam(sam_config("toy"), TOY / "sam.safetensors")
    untrained = mean_iou(build_flmm(lmm, sam), scenes)
    assert trained > untrained + 0.1, (trained, untrained)
