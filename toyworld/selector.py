"""The toy world's keyword selector, evaluated: the selector of a heads file (trained beside the
heads by ``jobs/train.py`` on the toy shards' texts) on texts of held-out scenes.

    held-out toy scene → caption, description or list with gold spans (toyworld.captions)
      → one prefill of image + text (FrozenLMM.prepare_text) → hidden states of the text's
      tokens [T, L, D] → KeywordSelector.select → character spans (char_span) vs gold spans

    python -m toyworld.selector --heads models/toy/heads.safetensors

writes the held-out metrics to ``selector.json`` beside the heads file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flmm.build import read_heads_file
from flmm.lmm import FrozenLMM
from flmm.selector import OUTSIDE, KeywordSelector, bio_tags, char_span, read_spans, span_f1
from toyworld.captions import make_caption, make_description, make_list, scene_text
from toyworld.scenes import EVAL_START, make_scene, scene_seed
from toyworld.vqa import TOY_PROMPT


@dataclass
class CaptionFeatures:
    """One caption: hidden ``[T, L, D]`` float32 of its tokens, gold tags ``[T]``, token
    ``offsets`` in ``text``, gold character ``spans``."""

    text: str
    hidden: torch.Tensor
    tags: torch.Tensor
    offsets: list[tuple[int, int]]
    spans: tuple[tuple[int, int], ...]


TEXT_KINDS = ("caption", "description", "list", "mixed")


def toy_text(scene, kind: str):
    """The text of a scene: a caption, a description, a list (what the image-only mode grounds:
    the toy LMM's answer to ``LIST_INSTRUCTION``), or (``mixed``) the scene's training text
    (``scene_text``: what the training job's toy shards carry)."""
    rng = np.random.default_rng(scene.seed)
    if kind == "mixed":
        return scene_text(scene)
    if kind == "list":
        return make_list(scene)
    if kind == "description":
        return make_description(scene, rng)
    return make_caption(scene, rng)


@torch.inference_mode()
def caption_features(
    lmm: FrozenLMM, seed: int, first: int, n: int, batch: int = 16, kind: str = "caption"
) -> list[CaptionFeatures]:
    """Texts (``toy_text`` of ``kind``) of scenes ``first … first + n - 1`` (scene seeds from
    ``seed``; text choices from the scene's seed) and their tokens' hidden states, ``batch``
    prefills at a time."""
    out = []
    for start in range(first, first + n, batch):
        samples, metas = [], []
        for index in range(start, min(start + batch, first + n)):
            scene = make_scene(scene_seed(seed, index))
            caption = toy_text(scene, kind)
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


EVAL_KINDS = ("caption", "description", "list")


def evaluate_toy_selector(
    lmm: FrozenLMM, selector: KeywordSelector, scenes: int = 300, seed: int = 0
) -> dict:
    """Held-out metrics (``evaluate``) of ``selector`` per kind of text (``EVAL_KINDS``), on
    scenes ``EVAL_START …`` of ``seed``."""
    return {
        kind: evaluate(selector, caption_features(lmm, seed, EVAL_START, scenes, kind=kind))
        for kind in EVAL_KINDS
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lmm", default="models/toy/llava")
    parser.add_argument("--heads", required=True, help="heads file with a keyword selector")
    parser.add_argument("--eval-scenes", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lmm = FrozenLMM.from_pretrained(args.lmm, prompt=TOY_PROMPT)
    _, selector = read_heads_file(args.heads)
    if selector is None:
        sys.exit(f"error: {args.heads} has no keyword selector")
    start = time.perf_counter()
    metrics = evaluate_toy_selector(lmm, selector, args.eval_scenes)
    record = {
        "heads": str(args.heads),
        "eval_scene_start": EVAL_START,
        "eval_scenes": args.eval_scenes,
        "describe_instruction": selector.config.describe_instruction,
        "layer_weights": torch.softmax(selector.layer_logits, 0).tolist(),
        **metrics,
        "seconds": round(time.perf_counter() - start, 1),
    }
    Path(args.heads).with_name("selector.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
