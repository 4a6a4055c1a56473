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
    """Box- and point-prompted masks on the 200 held-out objects that models/toy/sam.json was
    measured on (~3 s) reach its mIoUs (box 0.846, point 0.781) within 0.02. The objects are
    the same, so the figures are too (equal to the last digit here); 0.02 is room for other
    CPUs' rounding, not for sampling (10-object windows of these 200 spread 0.65 to 0.91 on
    points). Broken point prompts fall far below: the first of the 3 masks instead of the best
    by predicted IoU 0.57, x and y swapped 0.42, the point labelled negative 0.37, random
    weights 0.06. Box-prompted masks also beat the box itself (0.565: stars, crosses and
    circles are not boxes)."""
    documented = json.loads(SHIPPED.with_name("sam.json").read_text())
    where = documented["eval"]
    scores = evaluate(shipped_sam, where["seed"], where["objects"], where["first_index"])
    assert scores["box_miou"] == pytest.approx(documented["box_miou"], abs=0.02), scores
    assert scores["point_miou"] == pytest.approx(documented["point_miou"], abs=0.02), scores
    assert scores["box_miou"] > scores["box_as_mask_miou"] + 0.2, scores


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
