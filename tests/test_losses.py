"""BCE / Dice mask losses, their targets and their weighting over a batch, against values
computed by hand or by the numpy references below."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flmm.heads import Grounding
from flmm.losses import bce_loss, dice_loss, mask_losses
from flmm.model import grounding_loss


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def np_bce(logits: np.ndarray, target: np.ndarray) -> float:
    p = np_sigmoid(logits)
    return float(np.mean(-(target * np.log(p) + (1 - target) * np.log(1 - p))))


def np_dice(logits: np.ndarray, target: np.ndarray) -> float:
    """Mean over masks (axis 0) of 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)."""
    p = np_sigmoid(logits).reshape(len(logits), -1)
    t = target.reshape(len(target), -1)
    return float(np.mean(1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)))


LOGITS = [[[0.0, 2.0], [-1.0, 3.0]], [[-2.0, 0.5], [1.0, -0.5]]]  # [2, 2, 2]
TARGET = [[[1, 0], [0, 1]], [[0, 0], [1, 1]]]


def test_bce_single_mask_by_hand():
    s = sigmoid
    expected = -(math.log(s(0.0)) + math.log(1 - s(2.0)) + math.log(1 - s(-1.0)) + math.log(s(3.0)))
    got = bce_loss(torch.tensor([LOGITS[0]]), torch.tensor([TARGET[0]]))
    assert got.item() == pytest.approx(expected / 4, rel=1e-6)


def test_dice_single_mask_by_hand():
    p = [sigmoid(0.0), sigmoid(2.0), sigmoid(-1.0), sigmoid(3.0)]
    inter, sum_p, sum_t = p[0] + p[3], sum(p), 2
    expected = 1 - (2 * inter + 1) / (sum_p + sum_t + 1)
    got = dice_loss(torch.tensor([LOGITS[0]]), torch.tensor([TARGET[0]]))
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("with_channel", [False, True])
def test_losses_average_over_masks_for_both_layouts(with_channel):
    logits, target = torch.tensor(LOGITS), torch.tensor(TARGET)
    if with_channel:
        logits, target = logits[:, None], target[:, None]
    assert bce_loss(logits, target).item() == pytest.approx(
        np_bce(np.array(LOGITS), np.array(TARGET)), rel=1e-6
    )
    assert dice_loss(logits, target).item() == pytest.approx(
        np_dice(np.array(LOGITS), np.array(TARGET)), rel=1e-6
    )


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ"):
        bce_loss(torch.zeros(2, 1, 2, 2), torch.zeros(2, 2, 2))


def test_mask_losses_resize_gt_nearest_for_unet_and_sum_to_total():
    # 4x4 GT whose nearest 2x2 resize keeps pixels (0, 0), (0, 2), (2, 0), (2, 2): [[1, 0], [0, 1]].
    # (Area or bilinear resizing would give 0.25 instead of 1 and 0.)
    gt = np.zeros((1, 4, 4), dtype=np.float32)
    gt[0, 0, 0] = gt[0, 2, 2] = 1
    unet = np.array([[[[0.5, -1.0], [2.0, 1.5]]]], dtype=np.float32)  # [1, 1, 2, 2]
    refined = np.linspace(-2, 2, 16, dtype=np.float32).reshape(1, 1, 4, 4)
    gt_small = np.array([[[[1, 0], [0, 1]]]], dtype=np.float32)

    losses = mask_losses(torch.from_numpy(unet), torch.from_numpy(refined), torch.from_numpy(gt))

    expected = {
        "unet_bce": np_bce(unet, gt_small),
        "unet_dice": np_dice(unet, gt_small),
        "sam_bce": np_bce(refined, gt[:, None]),
        "sam_dice": np_dice(refined, gt[:, None]),
    }
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name
    assert losses["total"].item() == pytest.approx(sum(expected.values()), rel=1e-5)


def test_losses_are_float32_for_low_precision_logits():
    logits = torch.tensor(LOGITS, dtype=torch.bfloat16)[:, None]
    gt = torch.tensor(TARGET, dtype=torch.bool)
    losses = mask_losses(logits, logits, gt)
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in losses.values())


def test_lmm_frame_targets_are_the_ground_truth_through_the_lmm_frame():
    """F-LMM's targets (flmm/models/frozen_llava.py ``compute_loss``; flmm/datasets/transforms.py):
    the ground truth resized (nearest) to the image's size in the LMM's input pixels, then to
    the U-Net's and to the original size. 6×6 GT through a 3×3 frame: nearest keeps rows and
    columns 0, 2, 4, so the pixel (3, 3) is lost and the 2×2 block at the top left survives."""
    gt = np.zeros((1, 6, 6), dtype=np.float32)
    gt[0, :2, :2] = gt[0, 3, 3] = 1
    refined_target = np.zeros((1, 1, 6, 6), dtype=np.float32)  # 3×3 [[1,0,0],[0]*3,[0]*3] → 6×6
    refined_target[0, 0, :2, :2] = 1
    unet_target = np.array([[[[1, 0], [0, 0]]]], dtype=np.float32)  # 3×3 → 2×2 keeps rows 0, 1
    full_unet_target = np.array([[[[1, 0], [0, 1]]]], dtype=np.float32)  # 6×6 → 2×2: rows 0, 3
    unet = np.array([[[[0.5, -1.0], [2.0, 1.5]]]], dtype=np.float32)
    refined = np.linspace(-2, 2, 36, dtype=np.float32).reshape(1, 1, 6, 6)
    args = torch.from_numpy(unet), torch.from_numpy(refined), torch.from_numpy(gt)

    lmm = mask_losses(*args, target_size=(3, 3))
    original = mask_losses(*args)

    for losses, unet_gt, sam_gt in [
        (lmm, unet_target, refined_target),
        (original, full_unet_target, gt[:, None]),
    ]:
        assert losses["unet_bce"].item() == pytest.approx(np_bce(unet, unet_gt), rel=1e-5)
        assert losses["unet_dice"].item() == pytest.approx(np_dice(unet, unet_gt), rel=1e-5)
        assert losses["sam_bce"].item() == pytest.approx(np_bce(refined, sam_gt), rel=1e-5)
        assert losses["sam_dice"].item() == pytest.approx(np_dice(refined, sam_gt), rel=1e-5)
    assert lmm["sam_bce"].item() != pytest.approx(original["sam_bce"].item(), rel=1e-3)


def _image_losses(unet: np.ndarray, refined: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """One image's four loss terms by the numpy references (U-Net and GT at the same size)."""
    gt = gt[:, None]
    return {
        "unet_bce": np_bce(unet, gt),
        "unet_dice": np_dice(unet, gt),
        "sam_bce": np_bce(refined, gt),
        "sam_dice": np_dice(refined, gt),
    }


def test_the_batch_loss_weights_each_image_by_its_number_of_masks():
    """Two images of 1 and 3 masks: F-LMM's ``compute_loss`` (flmm/models/frozen_llava.py) sums
    each image's losses times its mask count and divides by all masks, (1·L1 + 3·L2) / 4; the
    toy recipe's per-image mean is (L1 + L2) / 2."""
    rng = np.random.default_rng(0)
    shapes = [(1, 4, 5), (3, 6, 4)]
    gts = [(rng.random(s) > 0.5).astype(np.float32) for s in shapes]
    unets = [rng.normal(size=(s[0], 1, *s[1:])).astype(np.float32) for s in shapes]
    refineds = [rng.normal(size=(s[0], 1, *s[1:])).astype(np.float32) for s in shapes]
    outputs = [
        Grounding(torch.from_numpy(u), torch.from_numpy(r), torch.from_numpy(r))
        for u, r in zip(unets, refineds)
    ]
    masks = [torch.from_numpy(g) for g in gts]
    first, second = (_image_losses(u, r, g) for u, r, g in zip(unets, refineds, gts))

    per_mask = grounding_loss(outputs, masks)  # the default: F-LMM's
    per_image = grounding_loss(outputs, masks, weighting="images")

    for name in first:
        expected = (1 * first[name] + 3 * second[name]) / 4
        assert per_mask[name].item() == pytest.approx(expected, rel=1e-5), name
        assert per_image[name].item() == pytest.approx((first[name] + second[name]) / 2, rel=1e-5)
    total = sum((first[k] + 3 * second[k]) / 4 for k in first)
    assert per_mask["total"].item() == pytest.approx(total, rel=1e-5)
    assert per_mask["total"].item() != pytest.approx(per_image["total"].item(), rel=1e-3)
    with pytest.raises(ValueError, match="weighting"):
        grounding_loss(outputs, masks, weighting="phrases")
