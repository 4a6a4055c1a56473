"""Annotate WebDataset shards with grounded masks: one Parquet pair + done marker per shard.

    python jobs/annotate.py --input 'data/shard-{000000..000099}.tar' --output s3://bucket/labels \
        --lmm llava-hf/llava-1.5-7b-hf --dtype bfloat16 --sam vit_l \
        --sam-checkpoint sam_vit_l_0b3195.pth --heads heads.safetensors \
        --sam-heads-dtype bfloat16 --actors 8 --gpus-per-actor 1 --batch-size 8

    ray job submit --working-dir . -- python jobs/annotate.py ...   # the same, on a cluster

With no arguments it runs the embedded default: the toy world's sample shards (written once to
out/toy/sample/), the toy LMM + toy SAM + toy heads from models/toy/, output in out/annotate/.
Joins the Ray cluster named by --address or RAY_ADDRESS (``ray job submit`` sets it), else starts
a local Ray. Finished shards are skipped on a rerun; --overwrite redoes them. See pipeline/annotate.py,
schemas/ANNOTATIONS.md. Exit status 1 if a shard failed (a rerun retries it).
"""

from __future__ import annotations

import argparse
import os
import sys

from flmm.cot import VIEWS, CropConfig
from flmm.proposals import LIST_PROMPT, PROPOSE_PROMPT
from pipeline.annotate import AnnotateConfig, Summary, run_annotation
from pipeline.lock import OutputLocked
from pipeline.modes import CAPTION_LAYOUTS, GROUND_ANSWERS, PHRASES
from pipeline.plan import add_plan_args, resolve_batch_size
from pipeline.runtime import ADDRESS_HELP, NUM_CPUS_HELP, connect
from pipeline.spec import add_model_args, model_spec
from toyworld.models import toy_model_spec
from toyworld.shards import toy_shards


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--input", action="append", help="shard dir, .tar, brace pattern or URI (repeatable)"
    )
    p.add_argument("--output", default="out/annotate", help="output folder or URI")
    add_model_args(p)
    add_plan_args(p, default=4)
    p.add_argument("--actors", type=int, default=1, help="model actors (one model each)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument(
        "--cpus-per-actor",
        type=float,
        default=1.0,
        help="CPUs each model actor reserves (CPU actors that would leave reading and writing "
        "less than one CPU get an equal share of the rest, with a note)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch threads of each CPU model actor (default 0: its share of the cluster's "
        "cores, cores // actors)",
    )
    p.add_argument("--overwrite", action="store_true", help="redo shards that are already done")
    p.add_argument(
        "--force", action="store_true", help="run even if another run holds the output's lock"
    )
    p.add_argument("--preview-images", type=int, default=6, help="images in preview.png (0: none)")
    p.add_argument(
        "--describe",
        action="store_true",
        help="ground a generated description of every image, not its text (image-only samples "
        "always are)",
    )
    p.add_argument(
        "--describe-prompt",
        help="instruction for descriptions (default: the one the heads file's selector was "
        "trained to read, else the grounding prompt's)",
    )
    p.add_argument(
        "--phrases",
        choices=PHRASES,
        default="auto",
        help="who picks the phrases of captions and bare images: the heads file's keyword "
        "selector, or the frozen LMM's proposals (auto: the selector if the heads file has one)",
    )
    p.add_argument(
        "--propose-prompt",
        default=PROPOSE_PROMPT,
        help="the LMM's instruction for a caption's phrases, with {caption} (default: %(default)r)",
    )
    p.add_argument(
        "--list-prompt",
        default=LIST_PROMPT,
        help="the LMM's instruction for what a bare image shows (default: %(default)r)",
    )
    p.add_argument(
        "--caption-layout",
        choices=CAPTION_LAYOUTS,
        default="listed",
        help="ground the phrases picked in a caption or description listed, as given phrases "
        "in a second prefill (default; bench/NOTES.md: on the toy 0.10 gIoU better), or in "
        "place, from the text's own prefill (keeps the text's context, e.g. for pronouns)",
    )
    p.add_argument(
        "--question",
        help="ask every image this question and ground its answer (default: only samples whose "
        "JSON has a `question`); replaces the samples' phrases and captions",
    )
    p.add_argument(
        "--ground-answer",
        choices=GROUND_ANSWERS,
        default="phrases",
        help="ground an answer's phrases, picked as a caption's (--phrases), or the whole answer "
        "as one phrase",
    )
    p.add_argument(
        "--cot",
        action="store_true",
        help="visual chain-of-thought for questions: ground the objects the question names, "
        "then answer from their crop; the rows are those evidence masks (source evidence)",
    )
    p.add_argument(
        "--cot-margin",
        type=float,
        default=CropConfig.margin,
        help="--cot: widen the evidence box by this fraction of its size per side "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--cot-view",
        choices=VIEWS,
        default=CropConfig.view,
        help="--cot: answer from the crop of the evidence box (zoomed in), or from the whole "
        "frame with everything outside the box painted over (focus: sizes and places kept); "
        "auto (default): the crop when the box is at most 15%% of the image, else the focus",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="length limit of generated text")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--num-cpus", type=int, help=NUM_CPUS_HELP)
    return p.parse_args(argv)


def config_of(args: argparse.Namespace) -> AnnotateConfig:
    """The run's config; what is unset is the toy world's: its sample shards (written on first
    use) and, without --lmm, the toy LMM + toy SAM + toy heads."""
    spec = model_spec(args, default=toy_model_spec())
    if spec.heads is None:
        print(
            "WARNING: no --heads (and no models/toy/heads.safetensors yet): the heads are RANDOMLY "
            "INITIALISED, so the masks are noise; train heads and pass --heads",
            file=sys.stderr,
        )
    return AnnotateConfig(
        inputs=tuple(args.input or [str(toy_shards("sample"))]),
        output=args.output,
        model=spec,
        batch_size=resolve_batch_size(args, spec, args.actors, args.gpus_per_actor),
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        torch_threads=args.torch_threads,
        overwrite=args.overwrite,
        force=args.force,
        preview_images=args.preview_images,
        describe=args.describe,
        max_new_tokens=args.max_new_tokens,
        describe_prompt=args.describe_prompt,
        phrases=args.phrases,
        propose_prompt=args.propose_prompt,
        list_prompt=args.list_prompt,
        caption_layout=args.caption_layout,
        question=args.question,
        ground_answer=args.ground_answer,
        cot=args.cot,
        cot_margin=args.cot_margin,
        cot_view=args.cot_view,
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:  # inputs, output and its lock are checked before Ray starts or a model loads
        config = config_of(args)
        summary = run_annotation(
            config, on_shard=_progress, start_ray=lambda: connect(args.address, args.num_cpus)
        )
    except (ValueError, OSError, OutputLocked) as error:
        sys.exit(f"error: {error}")
    for name, reason in summary.failed.items():
        print(f"FAILED {name}: {reason}", file=sys.stderr)
    if summary.planned:
        print(summary.traffic(), flush=True)
    print(summary.line(), flush=True)
    if summary.failed:
        sys.exit(1)


def _progress(name: str, done: dict, summary: Summary) -> None:
    """One line per finished shard: its counts, shards done of those planned, and an ETA."""
    finished = len(summary.done) + len(summary.failed)
    elapsed = done["timings"]["finished_after_s"]
    eta = elapsed / finished * (summary.planned - finished) if finished else 0.0
    print(
        f"shard {name}: {done['samples']} samples, {done['annotations']} annotations, "
        f"{done['errors']} errors [{finished}/{summary.planned} shards, {elapsed:.0f} s, "
        f"ETA {eta:.0f} s]",
        flush=True,
    )


if __name__ == "__main__":
    main()
