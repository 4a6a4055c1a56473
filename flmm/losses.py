"""Mask losses of F-LMM: BCE + Dice on the U-Net's and on the SAM refiner's mask logits.

Paper, Method: "Visual Grounding with Mask Head" (training objective of the mask decoder and
the mask refiner). All losses are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_same_shape(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"logits {list(logits.shape)} and target {list(target.shape)} differ")


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over every pixel of every mask.

    Args:
        logits: [N, 1, H, W] or [N, H, W] mask logits.
        target: same shape, values in {0, 1}.
    Returns:
        scalar float32.
    """
    _check_same_shape(logits, target)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice loss ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` per mask, mean over masks.

    Args:
        logits: [N, 1, H, W] or [N, H, W] mask logits; p = sigmoid(logits).
        target: same shape, values in {0, 1}.
    Returns:
        scalar float32.
    """
    _check_same_shape(logits, target)
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    dice = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return (1 - dice).mean()


def mask_losses(
    unet_logits: torch.Tensor,
    refined_logits: torch.Tensor,
    gt: torch.Tensor,
    target_size: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """BCE + Dice of the U-Net and of the SAM refiner against the same ground truth.

    Args:
        unet_logits: [P, 1, h, w] coarse logits at the U-Net's resolution.
        refined_logits: [P, 1, H, W] refined logits, original frame.
        gt: [P, H, W] ground-truth masks in {0, 1}, original frame.
        target_size: None: both targets come from ``gt`` itself (resized nearest to (h, w) for
            the U-Net terms). (h0, w0): F-LMM's targets, the image's size in the LMM's input
            pixels (``flmm.families.ImageInputs.pixels``): ``gt`` is first resized (nearest) to
            it, and both targets come from that (nearest to (h, w), and back to (H, W)), so the
            refined logits are scored against a mask no finer than the LMM's frame. As F-LMM's
            ``RefCOCO2PNG.transform_concat`` (flmm/datasets/transforms.py: ``masks``) and
            ``FrozenLlavaSAM.compute_loss`` (flmm/models/frozen_llava.py: ``gt_masks``,
            ``sam_gt_masks``) do.
    Returns:
        dict of float32 scalars: unet_bce, unet_dice, sam_bce, sam_dice, total (their sum).
    """
    gt = gt.float()[:, None]  # [P, 1, H, W]
    source = gt if target_size is None else F.interpolate(gt, target_size, mode="nearest")
    gt_small = F.interpolate(source, unet_logits.shape[-2:], mode="nearest")
    if target_size is not None:
        gt = F.interpolate(source, gt.shape[-2:], mode="nearest")
    losses = {
        "unet_bce": bce_loss(unet_logits, gt_small),
        "unet_dice": dice_loss(unet_logits, gt_small),
        "sam_bce": bce_loss(refined_logits, gt),
        "sam_dice": dice_loss(refined_logits, gt),
    }
    losses["total"] = torch.stack(list(losses.values())).sum()
    return losses
