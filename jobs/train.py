"""Train F-LMM's heads on WebDataset shards with Ray Train (frozen LMM + SAM in Ray Data actors).

    python jobs/train.py --shards 'data/refcoco-train-{000000..000199}.tar' \
        --lmm llava-hf/llava-1.5-7b-hf --dtype bfloat16 --sam vit_l \
        --sam-checkpoint sam_vit_l_0b3195.pth --workers 8 --gpus-per-worker 1 \
        --encode-actors 4 --encode-gpus 1 --output heads.safetensors

    ray job submit --working-dir . -- python jobs/train.py ...   # the same, on a cluster

With no arguments it trains the toy world's heads: toy training shards (written once to
out/toy/train/), toy LMM + toy SAM from models/toy/, heads to out/train/heads.safetensors.
--recipe names the training settings: `flmm` (F-LMM's: 8 epochs of 1 image per worker, lr 1e-4,
U-Net width 64, loss weighted per mask on targets through the LMM's frame, each object's
expression drawn once; the default with --lmm) or `toy` (the toy heads' recipe: 4 epochs of 4
images, lr 5e-4, width 32, loss per image on full-resolution targets, expressions redrawn every
epoch; the default without --lmm). --epochs, --batch-size, --lr, --unet-channels override it.
Samples whose JSON has a caption and their objects' spans in it also train the keyword selector
(saved in the same heads file: caption and image-only annotation need it). `--init-heads H
--train selector` trains that selector alone on top of the heads H (a fresh one, or H's own as
the start), on the captioned samples only, with the LMM alone in the frozen stage (no SAM):

    python jobs/train.py --init-heads heads.safetensors --train selector --epochs 1

writes H's tensors unchanged plus the selector's. Rerunning the same command (same --name and
--storage) resumes from the latest checkpoint; a finished run is not trained again, its heads
are exported. Each worker logs its step metrics.
Joins the Ray cluster named by --address or RAY_ADDRESS (``ray job submit`` sets it), else starts
a local Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from flmm.optim import OptimConfig
from pipeline.runtime import ADDRESS_HELP, NUM_CPUS_HELP, connect
from pipeline.spec import add_model_args, model_spec
from pipeline.train import FLMM_RECIPE, TRAIN_PARTS, Recipe, TrainJob, fit_heads, heads_width
from toyworld.models import toy_model_spec
from toyworld.shards import toy_shards
from toyworld.vqa import LIST_INSTRUCTION

# The recipe the shipped toy heads (models/toy/heads.safetensors) were trained with: a short CPU
# run (a higher lr than F-LMM's 1e-4), a quarter of F-LMM's U-Net weights (16 attention channels
# need no more), and the loss and expression draw of the time (per image, full-resolution
# targets, redrawn every epoch). 4 epochs over the toy's 2,000 training scenes: the same 2,000
# steps as 8 over 1,000, with twice the scenes seen.
TOY_RECIPE = Recipe("toy", 4, 4, 5e-4, 32, "images", "original", True)
RECIPES = {recipe.name: recipe for recipe in (FLMM_RECIPE, TOY_RECIPE)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", action="append", help="shard dir, .tar, brace pattern or URI")
    p.add_argument("--output", default="out/train/heads.safetensors", help="final heads file")
    p.add_argument("--storage", default="out/train/runs", help="Ray Train storage (checkpoints)")
    p.add_argument("--name", default="flmm-heads", help="run name (same name + storage: resume)")
    add_model_args(p, heads="--init-heads", sam_heads_dtype=False)
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="training settings (default: flmm with --lmm, toy without)",
    )
    p.add_argument(
        "--train",
        choices=TRAIN_PARTS,
        default="all",
        help="all: the heads (and a keyword selector on captioned samples); selector: the "
        "keyword selector alone, on top of --init-heads (left as they are)",
    )
    p.add_argument("--epochs", type=int, help="default: the recipe's")
    p.add_argument(
        "--batch-size", type=int, help="images (captions) per worker per step (the recipe's)"
    )
    p.add_argument("--lr", type=float, help="default: the recipe's")
    p.add_argument(
        "--selector-lr-scale",
        type=float,
        default=OptimConfig.selector_lr_scale,
        help="the keyword selector's lr as a multiple of --lr (default %(default)s)",
    )
    p.add_argument("--workers", type=int, default=1, help="DDP workers")
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--encode-actors", type=int, default=1, help="frozen LMM + SAM actors")
    p.add_argument("--encode-gpus", type=float, default=0.0, help="GPUs per frozen actor")
    p.add_argument("--encode-cpus", type=float, default=1.0, help="CPUs per frozen actor")
    p.add_argument("--encode-batch", type=int, default=8, help="images per frozen forward")
    p.add_argument(
        "--unet-channels", type=int, help="U-Net level-0 width (--init-heads', else the recipe's)"
    )
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps")
    p.add_argument("--log-every", type=int, default=10, help="steps")
    p.add_argument("--max-failures", type=int, default=3, help="worker failures to recover from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--describe-prompt",
        help="the instruction image-only samples are to be described with, recorded with the "
        "keyword selector (default: the grounding prompt's; toy: the toy LMM's list question)",
    )
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--num-cpus", type=int, help=NUM_CPUS_HELP)
    p.add_argument("--summary", help="also write the run summary here (JSON)")
    return p.parse_args(argv)


def recipe_of(args: argparse.Namespace) -> Recipe:
    """--recipe, else F-LMM's with --lmm and the toy's without."""
    return RECIPES[args.recipe or ("flmm" if args.lmm else "toy")]


def job_of(args: argparse.Namespace) -> TrainJob:
    """The training job: --shards, else the toy world's training shards (written on first use,
    once the job is known to be valid); without --lmm the toy LMM + toy SAM (heads start from
    --init-heads, or from SAM's decoder and a random U-Net) and the toy LMM's list question as
    the describe prompt; the U-Net as wide as --init-heads'; the recipe's settings where no flag
    gives them."""
    recipe = recipe_of(args)
    spec = model_spec(args, default=toy_model_spec(heads=False))
    describe_prompt = args.describe_prompt or (None if args.lmm else LIST_INSTRUCTION)
    job = TrainJob(
        shards=tuple(args.shards or ()),
        spec=spec,
        output=args.output,
        storage=args.storage,
        name=args.name,
        epochs=args.epochs or recipe.epochs,
        batch_size=args.batch_size or recipe.batch_size,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        encode_actors=args.encode_actors,
        encode_gpus=args.encode_gpus,
        encode_cpus=args.encode_cpus,
        encode_batch=args.encode_batch,
        unet_channels=args.unet_channels or recipe.unet_channels,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        max_failures=args.max_failures,
        seed=args.seed,
        optim=OptimConfig(lr=args.lr or recipe.lr, selector_lr_scale=args.selector_lr_scale),
        describe_prompt=describe_prompt,
        loss_weighting=recipe.loss_weighting,
        loss_target=recipe.loss_target,
        redraw_expressions=recipe.redraw_expressions,
        train=args.train,
    )
    if spec.heads and not args.unet_channels:
        job = dataclasses.replace(job, unet_channels=heads_width(spec.heads))
    return job if args.shards else dataclasses.replace(job, shards=(str(toy_shards("train")),))


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        job = job_of(args)
        connect(args.address, args.num_cpus)
        summary = fit_heads(job)
    except ValueError as error:  # bad inputs: no shards, too few samples, missing paths
        sys.exit(f"error: {error}")
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    metrics = summary["metrics"] or {}
    print(
        f"trained {summary['steps']}/{summary['total_steps']} steps on {summary['samples']} "
        f"samples ({summary['unusable_samples']} unusable) in {summary['seconds']:.0f}s; "
        f"final loss {metrics.get('loss', float('nan')):.4f}; heads → {summary['output']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
