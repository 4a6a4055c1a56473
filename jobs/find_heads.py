"""Find an LMM's localization heads (training-free grounding) on shards with masks → a .json file.

    python jobs/find_heads.py --lmm llava-hf/llava-1.5-7b-hf --dtype bfloat16 \
        --shards shards/refcoco_unc-train [--phrases 1000] --output llava15_heads.json
    python jobs/annotate.py --lmm llava-hf/llava-1.5-7b-hf --sam vit_l --sam-checkpoint ... \
        --heads llava15_heads.json --input ...

Two passes over the calibration phrases (see pipeline/find_heads.py): every head's image
attention and spatial entropy vote for the localization heads (no mask used); then the masks
pick how many of them to combine and the bar of the coarse mask. The file goes to --heads of the
annotate, evaluate and ground jobs, in place of trained heads (SAM then takes the coarse mask's
box; no keyword selector, so given phrases only).

With no arguments: the toy LMM on the toy world's training scenes, with its own search settings
(toyworld.models.toy_head_search) → out/find_heads/heads.json (the shipped one is
models/toy/localization_heads.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from flmm.localization import HeadSearchConfig
from pipeline.find_heads import FindHeadsConfig, find_heads
from pipeline.sources import resolve_shards
from pipeline.spec import add_model_args, model_spec
from toyworld.models import toy_head_search, toy_model_spec
from toyworld.shards import toy_shards


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--shards", action="append", help="dir or .tar with masks (repeatable; default: toy train)"
    )
    add_model_args(p, heads=None, sam_heads_dtype=False, sam=False)
    p.add_argument("--phrases", type=int, default=1000, help="calibration phrases (one per object)")
    p.add_argument(
        "--max-heads", type=int, default=5, help="most heads combined (k is calibrated up to it)"
    )
    p.add_argument(
        "--per-phrase", type=int, help="heads each phrase votes for (default 10; toy: 3)"
    )
    p.add_argument("--skip-layers", type=int, help="first layers never chosen (default 2; toy: 1)")
    p.add_argument("--sigma", type=float, default=1.0, help="Gaussian smoothing, grid cells")
    p.add_argument(
        "--dense-prompt", action="store_true", help="coarse mask as SAM's mask prompt too"
    )
    p.add_argument("--batch-size", type=int, default=8, help="phrases per LMM forward")
    p.add_argument("--seed", type=int, default=0, help="which expression of each object")
    p.add_argument("--output", type=Path, default=Path("out/find_heads/heads.json"))
    return p.parse_args(argv)


def config_of(args: argparse.Namespace) -> FindHeadsConfig:
    shards = args.shards or [str(toy_shards("train"))]
    search = HeadSearchConfig() if args.lmm else toy_head_search()
    if args.per_phrase is not None:
        search = dataclasses.replace(search, per_phrase=args.per_phrase)
    if args.skip_layers is not None:
        search = dataclasses.replace(search, skip_layers=args.skip_layers)
    return FindHeadsConfig(
        shards=tuple(resolve_shards(shards)),
        model=model_spec(args, default=toy_model_spec(heads=False)),
        output=args.output,
        phrases=args.phrases,
        max_heads=args.max_heads,
        search=search,
        sigma=args.sigma,
        dense_prompt=args.dense_prompt,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        find_heads(config_of(args))
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
