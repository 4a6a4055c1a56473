"""cIoU / gIoU of flmm/metrics.py on hand-made masks whose counts are worked out here."""

import numpy as np
import pytest
import torch

from flmm.metrics import MaskIoU


def _masks(shape, pred_pixels, gt_pixels):
    pred, gt = np.zeros(shape, bool), np.zeros(shape, bool)
    for y, x in pred_pixels:
        pred[y, x] = True
    for y, x in gt_pixels:
        gt[y, x] = True
    return pred, gt


# I = 2 ((0,1), (0,2)), U = 4 ((0,0)..(0,3)).
HALF = _masks((4, 5), [(0, 0), (0, 1), (0, 2)], [(0, 1), (0, 2), (0, 3)])
# I = U = 3.
EXACT = _masks((4, 5), [(1, 1), (2, 2), (3, 3)], [(1, 1), (2, 2), (3, 3)])
EMPTY = _masks((4, 5), [], [])


def test_ciou_sums_counts_and_giou_averages_per_object_iou():
    metric = MaskIoU()
    metric.update(*HALF)
    metric.update(*EXACT)
    result = metric.result()
    assert result["ciou"] == pytest.approx((2 + 3) / (4 + 3))
    assert result["giou"] == pytest.approx((2 / 4 + 3 / 3) / 2)
    assert result["n"] == 2


def test_an_empty_union_counts_zero_for_giou_and_nothing_for_ciou():
    metric = MaskIoU()
    for pred, gt in (HALF, EXACT, EMPTY):
        metric.update(pred, gt)
    result = metric.result()
    assert result["ciou"] == pytest.approx(5 / 7)
    assert result["giou"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert result["n"] == 3


def test_no_union_at_all_gives_zeros_not_nan():
    metric = MaskIoU()
    assert metric.result() == {"ciou": 0.0, "giou": 0.0, "n": 0}
    metric.update(*EMPTY)
    assert metric.result() == {"ciou": 0.0, "giou": 0.0, "n": 1}


def test_merge_of_two_accumulators_equals_one_over_all_objects():
    pairs = [HALF, EXACT, EMPTY, (HALF[1], EXACT[0])]
    whole, first, second = MaskIoU(), MaskIoU(), MaskIoU()
    for k, pair in enumerate(pairs):
        whole.update(*pair)
        (first if k % 2 else second).update(*pair)
    assert first.merge(second).result() == whole.result()


def test_torch_numpy_and_batched_inputs_agree():
    numpy_metric, torch_metric, batch_metric = MaskIoU(), MaskIoU(), MaskIoU()
    for pred, gt in (HALF, EXACT):
        numpy_metric.update(pred, gt)
        torch_metric.update(torch.from_numpy(pred), gt)
    batch_metric.update(
        torch.from_numpy(np.stack([HALF[0], EXACT[0]])),
        torch.from_numpy(np.stack([HALF[1], EXACT[1]])),
    )
    assert torch_metric.result() == numpy_metric.result() == batch_metric.result()


def test_non_bool_or_mismatched_masks_are_refused():
    with pytest.raises(TypeError, match="bool"):
        MaskIoU().update(HALF[0].astype(np.float32), HALF[1])
    with pytest.raises(ValueError, match="shape|H, W"):
        MaskIoU().update(HALF[0], HALF[1][:3])
