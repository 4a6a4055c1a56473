"""The shipped toy SAM (models/toy/sam.safetensors) and the recipe that pretrains it."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flmm.build import build_image_encoder, build_sam, sam_config
from toyworld.sam import Recipe, batch_loss, evaluate, make_optimizer, train_step, training_batch

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "toy" / "sam.safetensors"


@pytest.fixture(scope="module")
def shipped_sam():
    if not SHIPPED.exists():
        pytest.fail(f"{SHIPPED} missing; rebuild with python -m toyworld.sam --out {SHIPPED}")
    return build_sam(sam_config("toy"), SHIPPED)


def test_shipped_weights_are_fp16_sam_state_dict(shipped_sam):
    expected = set(shipped_sam.state_dict())
    with safe_open(str(SHIPPED), framework="pt") as f:
        keys = list(f.keys())
        assert set(keys) == expected
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F16"}


def test_shipped_sam_segments_held_out_objects_as_documented(shipped_sam):
    """Box- and point-prompted masks on 10 held-out objects reach the mIoU that
    models/toy/sam.json documents (measured over more objects) minus 0.1 for the small sample
    (these 10 measured box 0.850 / point 0.790 against 0.846 / 0.781); box-prompted masks beat
    the box itself (stars, crosses, circles are not boxes)."""
    documented = json.loads(SHIPPED.with_name("sam.json").read_text())
    scores = evaluate(shipped_sam, seed=Recipe().seed, n_objects=10)
    assert scores["box_miou"] >= documented["box_miou"] - 0.1, scores
    assert scores["point_miou"] >= documented["point_miou"] - 0.1, scores
    assert scores["box_miou"] > scores["box_as_mask_miou"] + 0.05


def test_recipe_steps_reduce_loss_on_a_fixed_batch():
    """A few optimiser steps of the pretraining recipe, on the tiny variant, lower its loss."""
    torch.manual_seed(0)
    sam = build_sam(sam_config("tiny"))
    recipe = Recipe(variant="tiny", steps=15, batch=2, lr=2e-3, warmup=1)
    batch = training_batch(recipe, step=0, encoder=build_image_encoder(sam))
    assert any(ex.use_box.any() for ex in batch) and any((~ex.use_box).any() for ex in batch)
    with torch.no_grad():
        before = float(batch_loss(sam, batch, recipe)["total"])
    opt, sched = make_optimizer(sam, recipe)
    assert all(p.requires_grad for p in sam.parameters())  # the image encoder trains too
    for _ in range(recipe.steps):
        train_step(sam, opt, sched, batch, recipe)
    with torch.no_grad():
        after = float(batch_loss(sam, batch, recipe)["total"])
    assert after < 0.8 * before
