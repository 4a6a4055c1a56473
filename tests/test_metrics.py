"""cIoU / gIoU / PNG average recall of flmm/metrics.py on hand-made masks whose counts are worked
out here."""

import numpy as np
import pytest
import torch

from flmm.metrics import AR_THRESHOLDS, AverageRecall, MaskIoU, average_recall, mask_iou


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


def test_one_objects_iou_follows_the_accumulators_rule_for_numpy_and_torch():
    for pair, expected in ((HALF, 0.5), (EXACT, 1.0), (EMPTY, 0.0), ((HALF[1], EXACT[0]), 0.0)):
        assert mask_iou(*pair) == expected
        assert mask_iou(*(torch.from_numpy(m) for m in pair)) == expected
    metric = MaskIoU()
    for pair in (HALF, EXACT, EMPTY):
        metric.update(*pair)
    assert metric.ious() == [mask_iou(*pair) for pair in (HALF, EXACT, EMPTY)]
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        mask_iou(np.stack(HALF), np.stack(EXACT))


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


def _row(pred_cols, gt_cols, width=7):
    """A one-row mask pair: the columns set in the prediction and in the ground truth."""
    return _masks((1, width), [(0, x) for x in pred_cols], [(0, x) for x in gt_cols])


def test_average_recall_and_its_splits_equal_a_hand_computation():
    """Four phrases; PNG's AR (thresholds 0, 1e-5, …, 0.99999; Σ (t_{i+1} − t_i) · recall(t_i))
    gives a phrase of IoU x off the grid (⌊x·10⁵⌋ + 1)·10⁻⁵, IoU 1 gives 0.99999, IoU 0 gives
    10⁻⁵ (recall(0) counts every phrase):

    | phrase | I / U     | kind              | contributes |
    | A      | 3/3 = 1   | thing, singular   | 0.99999     |
    | B      | 2/3       | thing, plural     | 0.66667     |
    | C      | 1/3       | stuff, singular   | 0.33334     |
    | D      | 0/2 = 0   | stuff, singular   | 0.00001     |

    AR = 2.00001 / 4 = 0.5000025; things (A, B) = 1.66666 / 2 = 0.83333; stuff (C, D) =
    0.33335 / 2 = 0.166675; singular (A, C, D) = 1.33334 / 3; plural (B) = 0.66667;
    acc_50 (IoU > 0.5: A, B) = 0.5; cIoU = (3 + 2 + 1 + 0) / (3 + 3 + 3 + 2) = 6/11.
    """
    metric = AverageRecall()
    metric.update(*_row([0, 1, 2], [0, 1, 2]), thing=True, plural=False)  # A
    b, c = _row([0, 1, 2], [0, 1]), _row([3, 4, 5], [4])
    metric.update(
        np.stack([b[0], c[0]]), np.stack([b[1], c[1]]), thing=[True, False], plural=[True, False]
    )  # B, C as one batch
    metric.update(*_row([0], [6]), thing=False, plural=False)  # D
    result = metric.result()
    assert result["ar"] == pytest.approx(0.5000025, abs=1e-9)
    assert result["ar_things"] == pytest.approx(0.83333, abs=1e-9)
    assert result["ar_stuff"] == pytest.approx(0.166675, abs=1e-9)
    assert result["ar_singular"] == pytest.approx(1.33334 / 3, abs=1e-9)
    assert result["ar_plural"] == pytest.approx(0.66667, abs=1e-9)
    assert (result["n"], result["n_things"], result["n_stuff"]) == (4, 2, 2)
    assert (result["n_singular"], result["n_plural"]) == (3, 1)
    assert result["acc_50"] == 0.5
    assert result["ciou"] == pytest.approx(6 / 11)


def _authors_average_accuracy(ious):
    """PNG's / F-LMM's ``average_accuracy`` as their scripts compute it (independently written
    here: recall at every threshold, then the sum over consecutive pairs), vectorised."""
    ious = np.asarray(ious, dtype=np.float64)
    accuracy = (ious[None, :] >= AR_THRESHOLDS[:, None]).sum(axis=1) / len(ious)
    widths = np.abs(AR_THRESHOLDS[1:] - AR_THRESHOLDS[:-1])
    return float((widths * accuracy[:-1]).sum())


def test_average_recall_equals_the_authors_threshold_loop():
    rng = np.random.default_rng(0)
    on_grid = AR_THRESHOLDS[[0, 1, 12345, 50000, 99998, 99999]]
    ious = np.concatenate([rng.random(60), on_grid, [0.0, 1.0, 0.5, 0.25, 1 / 3]])
    assert average_recall(ious) == pytest.approx(_authors_average_accuracy(ious), abs=1e-9)
    assert average_recall([]) == 0.0


def test_average_recall_merges_and_empty_splits_are_zero():
    whole, first, second = AverageRecall(), AverageRecall(), AverageRecall()
    pairs = [(HALF, True, False), (EXACT, False, True), (EMPTY, True, True)]
    for k, (pair, thing, plural) in enumerate(pairs):
        whole.update(*pair, thing=thing, plural=plural)
        (first if k % 2 else second).update(*pair, thing=thing, plural=plural)
    assert first.merge(second).result() == pytest.approx(whole.result())
    only_things = AverageRecall()
    only_things.update(*EXACT, thing=True, plural=False)
    result = only_things.result()
    assert (result["ar_stuff"], result["n_stuff"], result["ar_plural"]) == (0.0, 0, 0.0)
    assert result["ar_things"] == pytest.approx(0.99999, abs=1e-12)
