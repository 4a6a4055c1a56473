"""Find a frozen LMM's localization heads on shards with masks → a localization-heads file.

The training-free mode (``flmm.localization``) needs no trained parameters, only the chosen
(layer, head) pairs and two grounding settings. This job finds them in two passes over the same
calibration phrases (the shards' objects in order, one expression per object drawn once with
``seed``, each phrase grounded alone):

1. **Votes.** Every layer × head captured; each phrase votes for its ``per_phrase``
   image-attentive heads of lowest spatial entropy (``flmm.localization.rank_heads``). The
   ``max_heads`` most voted are the candidates. The phrases of even and of odd images (two
   disjoint halves) also vote apart: how many of the heads each half would choose agree is the
   choice's stability.
2. **Settings.** Only the candidates captured; for every k ≤ ``max_heads`` (the k most voted)
   and every bar in ``thresholds``, the coarse mask's IoU with the object's mask, original
   frame. The (k, threshold) of the best mean IoU (gIoU; ties: fewer heads, then the lower bar)
   is written.

No mask touches the votes (Kang et al.'s criteria are unsupervised); the masks only pick k and
the bar. The file (JSON) records the LMM, its prompt, the heads with their vote shares, the
halves' agreement and the calibration gIoU table; ``--heads`` of the annotate, evaluate and
ground jobs takes it in place of trained heads.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flmm.lmm import FrozenLMM, phrase_slots
from flmm.localization import (
    HeadSearchConfig,
    HeadVotes,
    LocalizationConfig,
    coarse_logits,
    image_attention,
    rank_heads,
    save_localization,
)
from flmm.metrics import mask_iou
from pipeline.evaluate import Skipped, batched, iter_samples
from pipeline.spec import ModelSpec


@dataclass(frozen=True)
class FindHeadsConfig:
    """shards: paths of .tar shards with object masks; model: the LMM (its heads and SAM are not
    read); phrases: calibration phrases (one per object); see the module for the rest."""

    shards: tuple[str, ...]
    model: ModelSpec
    output: Path
    phrases: int = 1000
    max_heads: int = 5
    search: HeadSearchConfig = field(default_factory=HeadSearchConfig)
    sigma: float = 1.0
    thresholds: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
    dense_prompt: bool = False
    batch_size: int = 8
    seed: int = 0


@dataclass
class Phrase:
    """One calibration phrase: image ``[H, W, 3]`` uint8 (the ``index``-th image read), phrase,
    mask ``[H, W]`` bool."""

    index: int
    image: np.ndarray
    phrase: str
    mask: np.ndarray


def calibration_phrases(config: FindHeadsConfig, skipped: Skipped) -> Iterator[Phrase]:
    """The first ``config.phrases`` objects of the shards, one expression each (drawn with
    ``config.seed``: both passes see the same phrases)."""
    rng = random.Random(config.seed)
    n = 0
    for index, sample in enumerate(iter_samples(config.shards, skipped)):
        for expressions, mask in zip(sample.expressions, sample.masks):
            if n == config.phrases:
                return
            n += 1
            yield Phrase(index, sample.image, rng.choice(expressions), mask)


def _forward(lmm: FrozenLMM, batch: list[Phrase]):
    samples = [lmm.prepare(torch.from_numpy(p.image), [p.phrase]) for p in batch]
    with torch.inference_mode():
        return samples, lmm(samples)


def vote(
    lmm: FrozenLMM, config: FindHeadsConfig, log: Callable[[str], None]
) -> tuple[HeadVotes, list[HeadVotes], Skipped]:
    """Pass 1 (every head captured): the votes of all phrases, and of each half (even, odd
    images)."""
    skipped = Skipped()
    votes = HeadVotes(lmm.num_layers, lmm.num_heads)
    halves = [HeadVotes(lmm.num_layers, lmm.num_heads) for _ in range(2)]
    start = last = time.perf_counter()
    for batch in batched(calibration_phrases(config, skipped), config.batch_size):
        samples, out = _forward(lmm, batch)
        for b, sample in enumerate(samples):
            mass = image_attention(
                out.token_maps[b], phrase_slots(sample.phrase_tokens), sample.image
            )[0]
            views = out.attention[b][0].unflatten(0, (lmm.num_views, -1)).mean(dim=0)
            ranked = rank_heads(mass, views, config.search)
            votes.add(ranked)
            halves[batch[b].index % 2].add(ranked)
        if time.perf_counter() - last >= 10:
            last = time.perf_counter()
            log(f"  votes: {votes.phrases} phrases, {last - start:.0f} s")
    return votes, halves, skipped


def calibrate(
    lmm: FrozenLMM,
    candidates: list[tuple[int, int]],
    config: FindHeadsConfig,
    log: Callable[[str], None],
) -> np.ndarray:
    """Pass 2 (only the candidates captured): mean IoU ``[k, threshold]`` of the coarse masks of
    the k most voted candidates (k = 1..len(candidates)) at each bar."""
    lmm.capture_heads = tuple(candidates)
    n_k, n_t = len(candidates), len(config.thresholds)
    total, n = np.zeros((n_k, n_t)), 0
    start = last = time.perf_counter()
    try:
        for batch in batched(calibration_phrases(config, Skipped()), config.batch_size):
            samples, out = _forward(lmm, batch)
            for b, (sample, phrase) in enumerate(zip(samples, batch)):
                maps = out.attention[b].unflatten(1, (lmm.num_views, n_k))  # [1, V, K, h, w]
                gt = torch.from_numpy(phrase.mask)
                for k in range(1, n_k + 1):
                    heads = maps[:, :, :k].flatten(1, 2)  # [1, V·k, h, w]
                    for t, bar in enumerate(config.thresholds):
                        # the coarse mask as LocalizationHeads grounds with these settings
                        settings = _settings(lmm, candidates[:k], config, bar)
                        _, coarse = coarse_logits(heads, sample.geometry, settings)
                        total[k - 1, t] += mask_iou(coarse[0, 0] > 0, gt)
                n += 1
            if time.perf_counter() - last >= 10:
                last = time.perf_counter()
                log(f"  settings: {n} phrases, {last - start:.0f} s")
    finally:
        lmm.capture_heads = None
    return total / max(1, n)


def _settings(
    lmm: FrozenLMM, heads: list[tuple[int, int]], config: FindHeadsConfig, threshold: float
) -> LocalizationConfig:
    """The localization-heads settings of ``heads`` at bar ``threshold`` on ``lmm``."""
    return LocalizationConfig(
        tuple(heads),
        lmm.num_layers,
        lmm.num_heads,
        lmm.num_views,
        config.sigma,
        threshold,
        config.dense_prompt,
    )


def best_settings(giou: np.ndarray) -> tuple[int, int]:
    """(k index, threshold index) of the highest gIoU; ties: fewer heads, then lower bar."""
    best = giou.max()
    k, t = np.argwhere(giou >= best - 1e-12)[0]
    return int(k), int(t)


def _lmm_id(lmm: str) -> str:
    """The LMM as recorded: a local directory under the working directory relative to it (the
    shipped toy's file is read on other machines), else as given."""
    path = Path(lmm)
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        return str(path.relative_to(Path.cwd()))
    return lmm


def find_heads(config: FindHeadsConfig, log: Callable[[str], None] = print) -> dict:
    """Both passes; writes ``config.output`` and returns its record (with ``seconds``)."""
    start = time.perf_counter()
    lmm = config.model.build_lmm()
    log(
        f"finding localization heads of {config.model.lmm} ({lmm.num_layers} layers x "
        f"{lmm.num_heads} heads) on up to {config.phrases} phrases"
    )
    votes, halves, skipped = vote(lmm, config, log)
    if votes.phrases == 0:
        raise ValueError(f"no calibration phrase in {list(config.shards)} ({skipped.describe()})")
    candidates = votes.chosen(config.max_heads)
    if not candidates:
        raise ValueError("no head attends to the image above the elbow in any phrase")
    giou = calibrate(lmm, candidates, config, log)
    k, t = best_settings(giou)
    chosen = candidates[: k + 1]
    settings = _settings(lmm, chosen, config, config.thresholds[t])
    half_heads = [h.chosen(len(chosen)) for h in halves]
    agree = len(set(half_heads[0]) & set(half_heads[1]))
    seconds = time.perf_counter() - start
    calibration = {
        "phrases": votes.phrases,
        "skipped": dict(skipped.counts),
        "seed": config.seed,
        "per_phrase": config.search.per_phrase,
        "skip_layers": config.search.skip_layers,
        "entropy_factor": config.search.entropy_factor,
        "candidates": [
            {"layer": a, "head": b, "votes": votes.frequency((a, b))} for a, b in candidates
        ],
        "halves": {
            "even_images": [list(p) for p in half_heads[0]],
            "odd_images": [list(p) for p in half_heads[1]],
            "agree": agree,
        },
        "thresholds": list(config.thresholds),
        "coarse_giou": [[round(float(v), 4) for v in row] for row in giou],
        "chosen_giou": round(float(giou[k, t]), 4),
        "seconds": round(seconds, 1),
    }
    metadata = {
        "lmm": _lmm_id(config.model.lmm),
        "family": lmm.family.name,
        "prompt": lmm.prompt.instruction,
        "calibration": calibration,
    }
    save_localization(settings, config.output, metadata)
    heads = ", ".join(f"L{a}H{b} ({votes.frequency((a, b)):.0%})" for a, b in chosen)
    log(
        f"chose {len(chosen)} heads: {heads}; bar {config.thresholds[t]} x mean; calibration "
        f"coarse gIoU {giou[k, t]:.3f} on {votes.phrases} phrases; halves agree on "
        f"{agree}/{len(chosen)}; skipped samples: {skipped.total()}; {seconds:.0f} s → "
        f"{config.output}"
    )
    return {**metadata, "heads": [list(p) for p in chosen], "seconds": seconds}
