"""Annotate WebDataset shards with grounded masks: one Parquet pair + done marker per shard.

    python jobs/annotate.py --input 'data/shard-{000000..000099}.tar' --output s3://bucket/labels \
        --lmm llava-hf/llava-1.5-7b-hf --dtype bfloat16 --sam vit_l \
        --sam-checkpoint sam_vit_l_0b3195.pth --heads heads.safetensors \
        --sam-heads-dtype bfloat16 --actors 8 --gpus-per-actor 1 --batch-size 8

    ray job submit --working-dir . -- python jobs/annotate.py ...   # the same, on a cluster

With no arguments it runs the embedded default: the toy world's sample shards (written once to
out/toy/samples/), the toy LMM + toy SAM + toy heads from models/toy/, output in out/annotate/.
Joins the Ray cluster named by --address or RAY_ADDRESS (``ray job submit`` sets it), else starts
a local Ray. Finished shards are skipped on a rerun; --overwrite redoes them. See pipeline/annotate.py,
schemas/ANNOTATIONS.md. Exit status 1 if a shard failed (a rerun retries it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.annotate import AnnotateConfig, run_annotation
from pipeline.lock import OutputLocked
from pipeline.runtime import ADDRESS_HELP, NUM_CPUS_HELP, connect
from pipeline.shards import cached_toy_shards
from pipeline.spec import ModelSpec, add_dtype_args

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "models" / "toy"
TOY_SAMPLES = Path("out/toy/samples")  # toy-world sample shards, written on first use
TOY_SAMPLE_SCENES, TOY_SCENES_PER_SHARD, TOY_SAMPLE_SEED = 24, 8, 1  # seed 1: not training data


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--input", action="append", help="shard dir, .tar, brace pattern or URI (repeatable)"
    )
    p.add_argument("--output", default="out/annotate", help="output folder or URI")
    p.add_argument("--lmm", help="llava-hf hub id or local LLaVA directory (default: toy LMM)")
    p.add_argument("--sam", help="SAM variant: vit_h, vit_l, vit_b, toy, tiny (default: toy)")
    p.add_argument("--sam-checkpoint", help="SAM weights, .pth or .safetensors")
    p.add_argument("--heads", help="heads .safetensors or F-LMM .pth (none: RANDOM heads)")
    add_dtype_args(p)
    p.add_argument("--batch-size", type=int, default=4, help="samples per model call")
    p.add_argument("--actors", type=int, default=1, help="model actors (one model each)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--overwrite", action="store_true", help="redo shards that are already done")
    p.add_argument(
        "--force", action="store_true", help="run even if another run holds the output's lock"
    )
    p.add_argument("--preview-images", type=int, default=6, help="images in preview.png (0: none)")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--num-cpus", type=int, help=NUM_CPUS_HELP)
    return p.parse_args(argv)


def toy_defaults(args: argparse.Namespace) -> None:
    """Fill what is unset with the toy world: sample shards, toy LMM, toy SAM, toy heads."""
    if not args.input:
        args.input = [
            str(
                cached_toy_shards(
                    TOY_SAMPLES, TOY_SAMPLE_SCENES, TOY_SCENES_PER_SHARD, TOY_SAMPLE_SEED, "sample"
                )
            )
        ]
    if args.lmm is None:
        args.lmm = str(TOY / "llava")
        args.sam = args.sam or "toy"
        args.sam_checkpoint = args.sam_checkpoint or str(TOY / "sam.safetensors")
        toy_heads = TOY / "heads.safetensors"
        if args.heads is None and toy_heads.is_file():
            args.heads = str(toy_heads)
    if args.heads is None:
        print(
            "WARNING: no --heads (and no models/toy/heads.safetensors yet): the heads are RANDOMLY "
            "INITIALISED, so the masks are noise; train heads and pass --heads",
            file=sys.stderr,
        )


def config_of(args: argparse.Namespace) -> AnnotateConfig:
    spec = ModelSpec(
        args.lmm,
        args.sam or "vit_l",
        args.sam_checkpoint,
        args.heads,
        args.dtype,
        sam_heads_dtype=args.sam_heads_dtype,
    )
    return AnnotateConfig(
        inputs=tuple(args.input),
        output=args.output,
        model=spec,
        batch_size=args.batch_size,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        overwrite=args.overwrite,
        force=args.force,
        preview_images=args.preview_images,
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    toy_defaults(args)
    config = config_of(args)
    try:  # inputs, output and its lock are checked before Ray starts or a model loads
        summary = run_annotation(
            config, on_shard=_progress, start_ray=lambda: connect(args.address, args.num_cpus)
        )
    except (ValueError, OSError, OutputLocked) as error:
        sys.exit(f"error: {error}")
    for name, reason in summary.failed.items():
        print(f"FAILED {name}: {reason}", file=sys.stderr)
    print(summary.line(), flush=True)
    if summary.failed:
        sys.exit(1)


def _progress(name: str, done: dict) -> None:
    print(
        f"shard {name}: {done['samples']} samples, {done['annotations']} annotations, "
        f"{done['errors']} errors",
        flush=True,
    )


if __name__ == "__main__":
    main()
