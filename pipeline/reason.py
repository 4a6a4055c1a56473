"""The ``reason`` evaluation protocol: reasoning segmentation as LISA scores it (ReasonSeg).

Per sample (shards of ``jobs/prepare_refcoco.py --dataset reasonseg``, ``pipeline/reasonseg.py``,
or any eval shard whose JSON has a ``question``): the frozen LMM answers the sample's question
(one batched greedy generation, ``FrozenLMM.answer``), the answer is grounded as the annotation
job grounds a question sample's (``pipeline.grounding.GroundingActor.run``): whole, as one phrase
(``ground_answer="whole"``, the default: LISA outputs one mask per query), or its phrases picked
as a caption's (the heads' keyword selector, else the LMM's proposals), their masks united.
The one predicted mask (U-Net and refined, ``sigmoid > 0.5``, original frame) is scored against
the gold target, with the sample's ``ignore`` pixels left out (``ReasonIoU``); an answer with
nothing to ground predicts an empty mask.

Scores (``metrics.json``): ``<set>/reason`` over all samples, ``<set>/reason-short`` over the
short queries and ``<set>/reason-long`` over the long sentences (the JSON's ``is_sentence``; a
sample without it counts as short), LISA's split of ReasonSeg.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.decode import SampleError
from pipeline.formats import decode_rle
from pipeline.grounding import GroundingActor, masks_of, question_rows

REASON = "reason"
REASON_KEYS = (REASON, f"{REASON}-short", f"{REASON}-long")  # metrics.json's protocol names
EPSILON = 1e-5  # LISA's gIoU: I / (U + 1e-5)
C_EPSILON = 1e-10  # LISA's cIoU: ΣI / (ΣU + 1e-10)


class ReasonIoU:
    """cIoU / gIoU as LISA computes them (github.com/dvlab-research/LISA ``train_ds.py``,
    ``validate``; ``utils/utils.py``, ``intersectionAndUnionGPU`` with ``ignore_index=255``):
    per sample, the ignored pixels are taken out of the prediction and the target, then
    I = |pred ∩ target|, U = |pred ∪ target|; the sample's IoU is I / (U + 1e-5), **1 when U
    is 0** (no target and nothing predicted: LISA's "no-object target" rule, unlike the
    project's ``flmm.metrics``, which scores an empty pair 0); gIoU = mean of the per-sample
    IoUs, cIoU = ΣI / (ΣU + 1e-10). Counts are kept per sample as ints (``merge`` is exact)."""

    def __init__(self) -> None:
        self.intersections: list[int] = []
        self.unions: list[int] = []

    def update(self, pred: np.ndarray, target: np.ndarray, ignore: np.ndarray) -> None:
        """One sample's bool ``[H, W]`` masks (numpy or torch), all in the same frame."""
        pred, target, ignore = (np.asarray(m, dtype=bool) for m in (pred, target, ignore))
        if not pred.shape == target.shape == ignore.shape or pred.ndim != 2:
            raise ValueError(
                f"masks must be one [H, W]: {pred.shape}, {target.shape}, {ignore.shape}"
            )
        pred, target = pred & ~ignore, target & ~ignore
        self.intersections.append(int((pred & target).sum()))
        self.unions.append(int((pred | target).sum()))

    def merge(self, other: ReasonIoU) -> ReasonIoU:
        self.intersections.extend(other.intersections)
        self.unions.extend(other.unions)
        return self

    def ious(self) -> list[float]:
        return [i / (u + EPSILON) + (u == 0) for i, u in zip(self.intersections, self.unions)]

    def result(self) -> dict:
        """``{"ciou", "giou", "n"}`` (0 for no sample)."""
        n = len(self.unions)
        return {
            "ciou": sum(self.intersections) / (sum(self.unions) + C_EPSILON),
            "giou": math.fsum(self.ious()) / n if n else 0.0,
            "n": n,
        }


class ReasonGrounder:
    """The LMM's answers to a batch's questions, grounded: the annotation job's
    ``GroundingActor`` over the evaluation's model."""

    def __init__(self, model, ground_answer: str = "whole", max_new_tokens: int = 64):
        self.actor = GroundingActor(
            None, max_new_tokens=max_new_tokens, ground_answer=ground_answer, model=model
        )

    def __call__(self, images: list[np.ndarray], questions: list[str]):
        """Per image ``[H, W, 3]`` uint8 and its question: ``(answer, unet, refined)``, the
        answer's text and its one predicted mask of each output, bool ``[H, W]``."""
        tensors = [torch.from_numpy(image) for image in images]
        with torch.inference_mode():
            texts, todo, _, groundings = self.actor.run(question_rows(questions), tensors)
        out = [(t.text, *[np.zeros(i.shape[:2], bool)] * 2) for t, i in zip(texts, images)]
        for b, grounding in zip(todo, groundings):
            unet, refined = (union(logits) for logits in (grounding.coarse, grounding.refined))
            out[b] = (texts[b].text, unet, refined)
        return out


def union(logits: torch.Tensor) -> np.ndarray:
    """``[P, 1, H, W]`` logits → bool ``[H, W]``: the union of the P masks (sigmoid > 0.5)."""
    return masks_of(logits).any(0).cpu().numpy()


def reason_metrics(outputs: tuple[str, ...]) -> dict[str, dict[str, ReasonIoU]]:
    """The accumulators of the ``reason`` protocol: ``REASON_KEYS`` × ``outputs``."""
    return {key: {output: ReasonIoU() for output in outputs} for key in REASON_KEYS}


def reason_fields(meta: dict, height: int, width: int) -> tuple[str, bool, np.ndarray]:
    """A sample's ``question`` (stripped), ``is_sentence`` (False when missing) and ignored
    pixels (bool ``[height, width]``: the union of its objects' ``ignore`` masks, none when they
    have none). Raises SampleError: ``no_question`` (missing or blank), ``bad_text`` (not a
    string, or ``is_sentence`` not a bool), ``bad_objects`` (an ``ignore`` that does not
    decode to the image's size)."""
    question = meta.get("question")
    if question is None or isinstance(question, str) and not question.strip():
        raise SampleError("no_question", "the sample has no question")
    if not isinstance(question, str) or meta.get("is_sentence", False) not in (True, False):
        raise SampleError("bad_text", "`question` must be a string, `is_sentence` a bool")
    ignore = np.zeros((height, width), bool)
    for obj in meta["objects"]:
        if obj.get("ignore") is None:
            continue
        try:
            mask = decode_rle(obj["ignore"])
            if mask.shape != ignore.shape:
                raise ValueError(f"size {list(mask.shape)}")
            ignore |= mask
        except Exception as error:  # noqa: BLE001 - malformed JSON structures of any kind
            raise SampleError("bad_objects", f"ignore: {type(error).__name__}") from None
    return question.strip(), bool(meta.get("is_sentence", False)), ignore


def score(metrics: dict, sample, masks: dict[str, np.ndarray]) -> None:
    """Score one sample's predicted masks (output → bool ``[H, W]``) in ``metrics``
    (``reason_metrics``), overall and in its split, against the union of its objects' masks
    (ReasonSeg: its one target) without its ignored pixels."""
    split = REASON_KEYS[2] if sample.is_sentence else REASON_KEYS[1]
    target = sample.masks.any(0)
    for key in (REASON, split):
        for output, pred in masks.items():
            metrics[key][output].update(pred, target, sample.ignore)


def score_batch(grounder: ReasonGrounder, batch: list, metrics: dict) -> int:
    """Ask and ground a batch of question samples (``EvalSample``s), score each (``score``);
    returns the number of queries (one per sample)."""
    answers = grounder([x.image for x in batch], [x.question for x in batch])
    for sample, (_, unet, refined) in zip(batch, answers):
        score(metrics, sample, {"unet": unet, "refined": refined})
    return len(batch)
