"""The toy world's keyword selector: trained on toy captions with gold spans over the frozen toy
LMM's hidden states, evaluated on captions of held-out scenes.

    toy scene → caption or description with gold spans (toyworld.captions) → one prefill of
      image + text
      (FrozenLlava.prepare_text) → hidden states of the caption's tokens [T, L, D]
      → BIO tags of the gold spans → KeywordSelector, cross-entropy, AdamW

Features are computed once (the LMM is frozen) and the selector trains on them for a few epochs;
``evaluate`` reads spans back as the annotation job does (``KeywordSelector.select`` +
``char_span``) and scores exact character spans.

    python -m toyworld.selector --lmm models/toy/llava --heads models/toy/heads.safetensors

adds the selector to the heads file and writes its recipe and held-out metrics to
``selector.json`` beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flmm.checkpoint import read_metadata, read_state_dict, save_tensors
from flmm.lmm import FrozenLlava
from flmm.selector import (
    OUTSIDE,
    PREFIX,
    KeywordSelector,
    SelectorConfig,
    bio_tags,
    char_span,
    read_spans,
    selector_state,
    span_f1,
)
from toyworld.captions import make_caption, make_description
from toyworld.scenes import EVAL_START, make_scene, scene_seed


@dataclass(frozen=True)
class SelectorRecipe:
    """scenes: training captions (one per scene); epochs over them; batch: captions per step."""

    scenes: int = 1200
    epochs: int = 30
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0
    prefill_batch: int = 16


@dataclass
class CaptionFeatures:
    """One caption: hidden ``[T, L, D]`` float32 of its tokens, gold tags ``[T]``, token
    ``offsets`` in ``text``, gold character ``spans``."""

    text: str
    hidden: torch.Tensor
    tags: torch.Tensor
    offsets: list[tuple[int, int]]
    spans: tuple[tuple[int, int], ...]


TEXT_KINDS = ("caption", "description", "mixed")


def toy_text(scene, index: int, kind: str):
    """The text of scene ``index``: a caption, a description, or (``mixed``) a description for
    every third scene, as the image-only mode grounds generated descriptions."""
    rng = np.random.default_rng(scene.seed)
    if kind == "description" or (kind == "mixed" and index % 3 == 2):
        return make_description(scene, rng)
    return make_caption(scene, rng)


@torch.inference_mode()
def caption_features(
    lmm: FrozenLlava, seed: int, first: int, n: int, batch: int = 16, kind: str = "caption"
) -> list[CaptionFeatures]:
    """Texts (``toy_text`` of ``kind``) of scenes ``first … first + n - 1`` (scene seeds from
    ``seed``; text choices from the scene's seed) and their tokens' hidden states, ``batch``
    prefills at a time."""
    out = []
    for start in range(first, first + n, batch):
        samples, metas = [], []
        for index in range(start, min(start + batch, first + n)):
            scene = make_scene(scene_seed(seed, index))
            caption = toy_text(scene, index, kind)
            sample, offsets = lmm.prepare_text(torch.from_numpy(scene.image), caption.text)
            samples.append(sample)
            metas.append((caption, offsets))
        hidden = lmm(samples).token_hidden.float()
        for b, (caption, offsets) in enumerate(metas):
            h = hidden[b, : len(offsets)].cpu()
            out.append(
                CaptionFeatures(
                    caption.text, h, bio_tags(offsets, list(caption.spans)), offsets,
                    caption.spans,
                )
            )  # fmt: skip
    return out


def train(features: list[CaptionFeatures], config: SelectorConfig, recipe: SelectorRecipe):
    """A selector fitted to ``features``; returns it and the last epoch's mean loss."""
    torch.manual_seed(recipe.seed)
    selector = KeywordSelector(config)
    optim = torch.optim.AdamW(selector.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    tags = torch.cat([f.tags for f in features])
    # Tokens inside spans are the minority: weight the classes by inverse frequency.
    counts = torch.bincount(tags, minlength=3).float().clamp(min=1)
    weight = counts.sum() / (3 * counts)
    steps_per_epoch = max(1, len(features) // recipe.batch)
    generator = torch.Generator().manual_seed(recipe.seed)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optim, recipe.epochs * steps_per_epoch)
    loss_sum = 0.0
    for _ in range(recipe.epochs):
        order = torch.randperm(len(features), generator=generator).tolist()
        loss_sum = 0.0
        for step in range(steps_per_epoch):
            chosen = [features[i] for i in order[step * recipe.batch : (step + 1) * recipe.batch]]
            hidden, gold, mask = padded(chosen)
            logits = selector(hidden, mask)
            loss = F.cross_entropy(logits[mask], gold[mask], weight=weight)
            optim.zero_grad()
            loss.backward()
            optim.step()
            schedule.step()
            loss_sum += loss.item()
    return selector.eval(), loss_sum / steps_per_epoch


def padded(features: list[CaptionFeatures]):
    """A batch of captions padded to the longest: hidden ``[B, T, L, D]``, tags ``[B, T]``,
    mask ``[B, T]`` (True on real tokens)."""
    length = max(len(f.tags) for f in features)
    hidden = torch.zeros(len(features), length, *features[0].hidden.shape[1:])
    tags = torch.full((len(features), length), OUTSIDE, dtype=torch.long)
    mask = torch.zeros(len(features), length, dtype=torch.bool)
    for b, f in enumerate(features):
        n = len(f.tags)
        hidden[b, :n], tags[b, :n], mask[b, :n] = f.hidden, f.tags, True
    return hidden, tags, mask


def evaluate(selector: KeywordSelector, features: list[CaptionFeatures]) -> dict:
    """Exact-span F1 (character spans, as the job reads them), span precision and recall, and
    token F1 (a token is positive when tagged B or I)."""
    predicted, gold = [], []
    tp = fp = fn = 0
    with torch.no_grad():
        for f in features:
            probs = torch.softmax(selector(f.hidden), dim=-1)  # as KeywordSelector.select
            spans = read_spans(probs, selector.config.min_confidence)
            predicted.append({char_span(f.offsets, s, f.text) for s in spans})
            gold.append(set(f.spans))
            pred_tok = probs.argmax(-1) != OUTSIDE
            gold_tok = f.tags != OUTSIDE
            tp += int((pred_tok & gold_tok).sum())
            fp += int((pred_tok & ~gold_tok).sum())
            fn += int((~pred_tok & gold_tok).sum())
    hits = sum(len(p & g) for p, g in zip(predicted, gold))
    return {
        "span_f1": span_f1(predicted, gold),
        "span_precision": hits / max(1, sum(map(len, predicted))),
        "span_recall": hits / max(1, sum(map(len, gold))),
        "token_f1": 2 * tp / max(1, 2 * tp + fp + fn),
        "captions": len(features),
    }


def fit_toy_selector(lmm: FrozenLlava, recipe: SelectorRecipe, eval_scenes: int = 300):
    """Features of ``recipe.scenes`` training texts (captions, and descriptions for every third
    scene) and of ``eval_scenes`` held-out captions and descriptions, the fitted selector, and
    its held-out metrics per kind of text."""
    config = SelectorConfig(lmm.num_layers, lmm.hidden_size)
    start = time.perf_counter()
    batch = recipe.prefill_batch
    train_set = caption_features(lmm, recipe.seed, 0, recipe.scenes, batch, "mixed")
    held_out = {
        kind: caption_features(lmm, recipe.seed, EVAL_START, eval_scenes, batch, kind)
        for kind in ("caption", "description")
    }
    features_s = time.perf_counter() - start
    selector, loss = train(train_set, config, recipe)
    metrics = {kind: evaluate(selector, texts) for kind, texts in held_out.items()}
    metrics.update(
        loss=loss, features_s=features_s, train_s=time.perf_counter() - start - features_s
    )
    return selector, metrics


def add_selector(heads_file: str | Path, selector: KeywordSelector) -> Path:
    """Rewrite ``heads_file`` with the selector's tensors (``selector.*``) beside the heads',
    replacing a selector it held; its metadata is kept."""
    tensors = {k: v for k, v in read_state_dict(heads_file).items() if not k.startswith(PREFIX)}
    metadata = read_metadata(heads_file)
    return save_tensors({**tensors, **selector_state(selector)}, heads_file, metadata)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lmm", default="models/toy/llava")
    parser.add_argument("--heads", required=True, help="heads file the selector is added to")
    parser.add_argument("--scenes", type=int, default=SelectorRecipe.scenes)
    parser.add_argument("--epochs", type=int, default=SelectorRecipe.epochs)
    parser.add_argument("--eval-scenes", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lmm = FrozenLlava.from_pretrained(args.lmm)
    recipe = SelectorRecipe(scenes=args.scenes, epochs=args.epochs)
    selector, metrics = fit_toy_selector(lmm, recipe, args.eval_scenes)
    add_selector(args.heads, selector)
    record = {"recipe": dataclasses.asdict(recipe), "eval_scenes": args.eval_scenes, **metrics}
    Path(args.heads).with_name("selector.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
