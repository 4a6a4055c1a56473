"""Grounding metrics over predicted and ground-truth masks.

- IoU of one object (``mask_iou``): intersection / union of its predicted and ground-truth masks;
  **0 when both are empty** (union 0). The one empty-mask rule of this project, F-LMM's: its
  RefCOCO evaluation (mmdet's ``RefSegMetric``: I / U, NaN → 0) and its PNG evaluation
  (``compute_mask_IoU``: I / (U + 1e-12)) both score an empty pair 0. (gRefCOCO's gIoU, which
  scores an empty prediction of a no-target expression 1, is another protocol, not done here;
  LISA's ReasonSeg scores, which also score an empty pair 1, are ``pipeline.reason.ReasonIoU``.)
- cIoU (cumulative IoU): Σ intersection / Σ union over all objects (0 when Σ union is 0);
- gIoU (generalised / mean IoU): the mean of per-object IoU (``mask_iou``'s rule);
- AR (average recall, Panoptic Narrative Grounding's "average accuracy"): the area under the
  curve of recall (the fraction of phrases with IoU ≥ t) over IoU thresholds t, overall and over
  the things / stuff and singular / plural phrases (``AverageRecall``).

All are fractions in [0, 1]. Accumulators from several workers combine with ``merge``.
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


def _iou(intersection: int, union: int) -> float:
    """The IoU of pixel counts; 0 for an empty union (the module's rule)."""
    return intersection / union if union > 0 else 0.0


def mask_iou(pred, gt) -> float:
    """IoU of one object's bool ``[H, W]`` masks (torch tensors or numpy arrays, same shape and
    frame); 0 when both are empty."""
    if pred.ndim != 2:
        raise ValueError(f"mask_iou takes one object's [H, W] masks, got {tuple(pred.shape)}")
    (intersection,), (union,) = _intersection_union(pred, gt)
    return _iou(intersection, union)


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
        """Per-object IoU (``mask_iou``'s: 0 where the union is empty)."""
        return [_iou(i, u) for i, u in zip(self.intersections, self.unions)]

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


# PNG's thresholds: ``np.arange(0, 1, 0.00001)`` in ``average_accuracy`` of both the benchmark's
# evaluation (github.com/BCV-Uniandes/PNG ``baseline/utils/meters.py``) and F-LMM's
# (github.com/wusize/F-LMM ``scripts/multiprocess_eval_png.py``): 100,000 thresholds 0, 1e-5, …,
# 0.99999, not COCO's 0.5:0.05:0.95.
AR_THRESHOLDS = np.arange(0.0, 1.0, 0.00001)
# Both scripts sum recall(t_i) · (t_{i+1} − t_i) over consecutive pairs, i = 0 … N − 2 (a left
# Riemann sum): ``_AR_AREA[k]`` is that sum's weight of the first k thresholds.
_AR_AREA = np.concatenate([[0.0], np.cumsum(np.abs(np.diff(AR_THRESHOLDS)))])


def average_recall(ious) -> float:
    """PNG's average recall of per-phrase IoUs (0 for no phrase).

    The authors' ``average_accuracy``: Σ_{i=0}^{N−2} (t_{i+1} − t_i) · |{p : iou_p ≥ t_i}| / n
    over ``AR_THRESHOLDS``, pooled over all phrases (not per image). Exchanging the sums, each
    phrase contributes the weight of the thresholds at or below its IoU, so this is exact in
    O(n log N) instead of O(n N): an IoU x off the grid counts (⌊x·10⁵⌋ + 1)·10⁻⁵, an IoU of 1
    counts 0.99999 (the last threshold has no width), an IoU of 0 counts 10⁻⁵ (t_0 = 0 ≤ 0).
    """
    ious = np.asarray(ious, dtype=np.float64).reshape(-1)
    if ious.size == 0:
        return 0.0
    passed = np.searchsorted(AR_THRESHOLDS[:-1], ious, side="right")  # #{i ≤ N−2 : t_i ≤ iou}
    return float(_AR_AREA[passed].mean())


class AverageRecall(MaskIoU):
    """``MaskIoU`` that also keeps each phrase's kind and reports PNG's average recall.

    ``update(pred, gt, thing=..., plural=...)``: masks as ``MaskIoU.update``; ``thing`` and
    ``plural`` a bool for one ``[H, W]`` mask, or one bool per mask of ``[N, H, W]``. How a phrase
    is a thing or plural is the caller's (PNG: ``pipeline.png.phrase_kinds``).

    ``result()`` adds to cIoU / gIoU / n: ``ar`` over all phrases and ``ar_things``, ``ar_stuff``,
    ``ar_singular``, ``ar_plural`` over those phrases (F-LMM's split: stuff = not thing, singular
    = not plural), ``n_things`` … ``n_plural``, and ``acc_50``: the fraction of phrases with
    IoU > 0.5 (strictly, as both scripts' "acc@0.5").
    """

    SPLITS = ("things", "stuff", "singular", "plural")

    def __init__(self) -> None:
        super().__init__()
        self.things: list[bool] = []
        self.plurals: list[bool] = []

    def update(self, pred, gt, *, thing, plural) -> None:
        n = 1 if pred.ndim == 2 else pred.shape[0]
        things, plurals = np.broadcast_to(thing, (n,)), np.broadcast_to(plural, (n,))
        super().update(pred, gt)
        self.things.extend(bool(t) for t in things)
        self.plurals.extend(bool(p) for p in plurals)

    def merge(self, other: AverageRecall) -> AverageRecall:
        super().merge(other)
        self.things.extend(other.things)
        self.plurals.extend(other.plurals)
        return self

    def result(self) -> dict:
        ious = np.array(self.ious(), dtype=np.float64)
        things, plurals = np.array(self.things, bool), np.array(self.plurals, bool)
        splits = {"things": things, "stuff": ~things, "singular": ~plurals, "plural": plurals}
        out = {**super().result(), "ar": average_recall(ious)}
        for name, chosen in splits.items():
            out[f"ar_{name}"] = average_recall(ious[chosen])
        out.update({f"n_{name}": int(chosen.sum()) for name, chosen in splits.items()})
        out["acc_50"] = float((ious > 0.5).mean()) if ious.size else 0.0
        return out
