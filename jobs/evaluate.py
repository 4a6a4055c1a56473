"""Evaluate F-LMM heads on eval shards: cIoU / gIoU (referring sets) or PNG average recall of the
U-Net and refined masks → metrics.json.

    python jobs/evaluate.py --lmm llava-hf/llava-1.5-7b-hf --dtype bfloat16 --sam vit_l \
        --sam-checkpoint sam_vit_l.pth --heads heads.safetensors \
        --shards shards/refcoco [--shards testA=other/dir] [--shards shards/png] \
        [--protocol standard|flmm|flmm-separate|png|png-separate|reason|vqa|all]

--shards takes `[name=]path` (a directory of .tar shards or one .tar) and may repeat; unnamed shards
are grouped by split name (`refcoco_unc-val-000000.tar` → `refcoco_unc-val`). Writes
`{"<set>/<protocol>": {"unet": {"ciou", "giou", "n"}, "refined": {...}}}` (fractions) to --output,
per-set counts and skipped samples (with reasons) beside it as `*.stats.json`, and prints a table
(×100). Protocols: standard = each expression its own query; flmm = first expression per object,
all objects of an image in one sequence; flmm-separate = each first expression alone; png = each
PNG narrative prefilled whole, its grounded phrases grounded in place (average recall overall,
things / stuff, singular / plural, as F-LMM's PNG script); png-separate = each PNG phrase alone;
reason = the LMM answers each sample's `question`, the answer is grounded (--ground-answer whole,
the default: one mask; phrases: its phrases' masks united) and scored with LISA's cIoU / gIoU
(ignore regions left out), overall and over short queries / long sentences
(`<set>/reason`, `<set>/reason-short`, `<set>/reason-long`); vqa = the LMM answers each sample's
`question`, from the whole image and with visual chain-of-thought (the question's objects
grounded, the question answered again from their crop: jobs/annotate.py --cot), scored against
the JSON's `answers` (`<set>/vqa`, and `<set>/vqa-<subset>` per JSON `subset`).
`all` (default) runs, per set, the PNG protocols on PNG shards (`png_coco-*.tar`, written by
`jobs/prepare_refcoco.py --dataset png`), reason on ReasonSeg shards (`reason_seg-*.tar`, written
by `jobs/prepare_refcoco.py --dataset reasonseg`) and the three referring ones on any other.
See pipeline/evaluate.py.

With no arguments it evaluates the shipped toy heads (models/toy/heads.safetensors, with the toy
LMM and toy SAM) on the toy world's held-out scenes, written once to ./out/toy/val.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from flmm.cot import VIEWS, CropConfig
from pipeline.evaluate import (
    ALL_PROTOCOLS,
    EvalConfig,
    eval_sets,
    evaluate,
    markdown_table,
    metrics_json,
)
from pipeline.modes import GROUND_ANSWERS
from pipeline.plan import add_plan_args, resolve_batch_size
from pipeline.spec import ModelSpec, add_model_args, model_spec
from toyworld.models import toy_model_spec
from toyworld.shards import toy_shards


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--shards", action="append", help="[name=]dir or .tar (repeatable; default: toy)"
    )
    add_model_args(p)
    add_plan_args(p, default=8)
    p.add_argument("--limit", type=int, help="at most this many samples read per eval set")
    p.add_argument("--protocol", default="all", choices=[*ALL_PROTOCOLS, "all"])
    p.add_argument("--output", type=Path, default=Path("out/evaluate/metrics.json"))
    p.add_argument(
        "--ground-answer",
        default="whole",
        choices=GROUND_ANSWERS,
        help="reason: ground the answer whole, or its phrases (masks united)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="reason, vqa: answer length")
    p.add_argument(
        "--cot-margin",
        type=float,
        default=CropConfig.margin,
        help="vqa: widen the evidence box by this fraction of its size per side",
    )
    p.add_argument(
        "--cot-view",
        choices=VIEWS,
        default=CropConfig.view,
        help="vqa: answer from the evidence crop, or from the frame in focus on it (auto: the "
        "crop when the box is at most 15%% of the image)",
    )
    return p.parse_args(argv)


def spec_of(args: argparse.Namespace) -> ModelSpec:
    """The models to load; without --lmm, the shipped toy LMM, toy SAM and toy heads."""
    spec = model_spec(args, default=toy_model_spec())
    if spec.heads is None and args.lmm is None:
        sys.exit(
            "error: the toy heads (models/toy/heads.safetensors) do not exist yet: train them "
            "with jobs/train.py, or pass --heads"
        )
    if spec.heads is None:
        sys.exit("error: give --heads (a heads checkpoint to evaluate)")
    if not Path(spec.heads).is_file():
        sys.exit(f"error: heads checkpoint {spec.heads} not found")
    return spec


def on_gpu(spec: ModelSpec) -> bool:
    """Whether this process will run the model on a GPU (the memory plan's device)."""
    return spec.resolved_device().type == "cuda"


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        model = spec_of(args)
        specs = args.shards or [str(toy_shards("val"))]
        config = EvalConfig(
            sets=tuple(eval_sets(specs)),
            model=model,
            protocols=None if args.protocol == "all" else (args.protocol,),
            batch_size=resolve_batch_size(args, model, 1, float(on_gpu(model))),
            limit=args.limit,
            output=args.output,
            ground_answer=args.ground_answer,
            max_new_tokens=args.max_new_tokens,
            cot_margin=args.cot_margin,
            cot_view=args.cot_view,
        )
        start = time.perf_counter()
        results = evaluate(config)
    except (ValueError, KeyError) as error:  # bad --shards or --sam, heads that do not fit, ...
        sys.exit(f"error: {error}")
    print(markdown_table(metrics_json(results)))
    for name, r in results.items():
        if r.skipped.total():
            print(f"{name}: skipped {r.skipped.total()} sample(s): {r.skipped.describe()}")
    samples = sum(r.samples for r in results.values())
    skipped = sum(r.skipped.total() for r in results.values())
    queries = sum(r.queries for r in results.values())
    print(
        f"evaluated {samples} samples ({skipped} skipped), {queries} queries in "
        f"{time.perf_counter() - start:.1f}s → {args.output}"
    )


if __name__ == "__main__":
    main()
