"""Referring-segmentation metrics: cIoU and gIoU over predicted and ground-truth masks.

- cIoU (cumulative IoU): Σ intersection / Σ union over all objects (0 when Σ union is 0);
- gIoU (generalised / mean IoU): the mean of per-object IoU, where an object whose prediction and
  ground truth are both empty (union 0) counts as IoU 0.

Both are fractions in [0, 1]. Accumulators from several workers combine with ``merge``.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _intersection_union(pred, gt) -> tuple[list[int], list[int]]:
    """Per-object intersection and union pixel counts of bool ``[H, W]`` or ``[N, H, W]`` masks
    (torch tensors or numpy arrays, same shape)."""
    if tuple(pred.shape) != tuple(gt.shape) or pred.ndim not in (2, 3):
        raise ValueError(f"pred and gt must both be [H, W] or [N, H, W]: {pred.shape}, {gt.shape}")
    if isinstance(pred, torch.Tensor) or isinstance(gt, torch.Tensor):
        pred, gt = torch.as_tensor(pred), torch.as_tensor(gt)
        gt = gt.to(pred.device)
    for name, mask in (("pred", pred), ("gt", gt)):
        if mask.dtype not in (torch.bool, np.bool_):
            raise TypeError(
                f"{name} must be a bool mask (threshold logits first), got {mask.dtype}"
            )
    pred, gt = pred.reshape(-1, *pred.shape[-2:]), gt.reshape(-1, *gt.shape[-2:])
    intersection, union = (pred & gt).sum(axis=(1, 2)), (pred | gt).sum(axis=(1, 2))
    return [int(v) for v in intersection.tolist()], [int(v) for v in union.tolist()]


class MaskIoU:
    """Accumulates per-object intersection and union pixel counts; ``result()`` gives cIoU/gIoU.

    ``update(pred, gt)`` takes one object (bool ``[H, W]``) or a batch (bool ``[N, H, W]``), in
    the same frame (usually the original image's). Counts are kept per object as ints, so a merge
    of accumulators gives exactly what one accumulator over all objects gives.
    """

    def __init__(self) -> None:
        self.intersections: list[int] = []
        self.unions: list[int] = []

    def update(self, pred, gt) -> None:
        intersection, union = _intersection_union(pred, gt)
        self.intersections.extend(intersection)
        self.unions.extend(union)

    def merge(self, other: MaskIoU) -> MaskIoU:
        """Add ``other``'s objects to this accumulator; returns ``self``."""
        self.intersections.extend(other.intersections)
        self.unions.extend(other.unions)
        return self

    def ious(self) -> list[float]:
        """Per-object IoU, 0 where the union is empty."""
        return [i / u if u > 0 else 0.0 for i, u in zip(self.intersections, self.unions)]

    def result(self) -> dict:
        """``{"ciou": ΣI/ΣU (0 if ΣU == 0), "giou": mean per-object IoU (0 if no object),
        "n": number of objects}``."""
        n = len(self.unions)
        total_union = sum(self.unions)
        return {
            "ciou": sum(self.intersections) / total_union if total_union > 0 else 0.0,
            "giou": math.fsum(self.ious()) / n if n > 0 else 0.0,
            "n": n,
        }
