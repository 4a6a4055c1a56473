"""Visual chain-of-thought on the toy world (issue 37): answer accuracy from the whole image and
with ``--cot`` (each view and margin asked for), overall, per question kind and per asked object's
size, and the seconds per image of each mode (median over batches, with the spread).

    python bench/cot.py [--scenes 300] [--views crop:0.25 crop:1.0 focus:0.25] [--threads 2]

Held-out scenes (``toyworld.vqa_set``), the shipped toy LMM, SAM and heads; the same scenes and
the same plain answers for every view.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch

from flmm.cot import CropConfig
from pipeline.evaluate import Skipped, batched, eval_sets, iter_samples
from pipeline.vqa import VQA, AnswerAccuracy, VQAAsker
from toyworld.models import toy_model_spec
from toyworld.vqa_set import WORLDS, write_vqa_shards


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scenes", type=int, default=300)
    p.add_argument("--views", nargs="+", default=["crop:0.25", "crop:1.0", "focus:0.25"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--lmm", help="another toy LMM directory (default: the shipped one)")
    p.add_argument(
        "--world",
        choices=sorted(WORLDS),
        default="default",
        help="the scenes: the toy world's own, or its objects at 40%% of their size (far away)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = toy_model_spec()
    model = (dataclasses.replace(spec, lmm=args.lmm) if args.lmm else spec).build()
    views = [(v, float(m)) for v, m in (a.split(":") for a in args.views)]
    askers = {
        f"{v} {m}": VQAAsker(model, args.max_new_tokens, CropConfig(m, view=v)) for v, m in views
    }
    scores: dict[str, dict[str, AnswerAccuracy]] = {}
    seconds: dict[str, list[float]] = {"plain": [], **{name: [] for name in askers}}
    with tempfile.TemporaryDirectory() as tmp:
        write_vqa_shards(tmp, args.scenes, config=WORLDS[args.world])
        (eval_set,) = eval_sets([tmp])
        skipped = Skipped()
        for batch in batched(
            iter_samples(eval_set.paths, skipped, None, False, False, True), args.batch
        ):
            images = [torch.from_numpy(x.image) for x in batch]
            questions = [x.question for x in batch]
            start = time.perf_counter()
            plain = next(iter(askers.values())).plain(images, questions)  # (no view in it)
            seconds["plain"].append((time.perf_counter() - start) / len(batch))
            answers = {"plain": [(a, None) for a in plain]}
            for name, asker in askers.items():
                start = time.perf_counter()
                answers[name] = asker.cot(images, questions)
                seconds[name].append((time.perf_counter() - start) / len(batch))
            for b, sample in enumerate(batch):
                for key in (VQA, *sample.subset):
                    for name, given in answers.items():
                        answer, box = given[b]
                        scores.setdefault(key, {}).setdefault(name, AnswerAccuracy())
                        scores[key][name].update(answer, sample.answers, box is not None)
    names = list(answers)
    print(
        f"{args.scenes} held-out toy scenes ({args.world} world), one question each; accuracy "
        "(in parentheses: the fraction answered from the evidence)"
    )
    print("| subset | n | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for key in sorted(scores, key=lambda k: (k != VQA, k)):
        cells = []
        for name in names:
            r = scores[key][name].result()
            cells.append(
                f"{r['accuracy']:.3f}" + ("" if name == "plain" else f" ({r['cropped']:.2f})")
            )
        print(f"| {key} | {scores[key]['plain'].n} | " + " | ".join(cells) + " |")
    print("\nseconds per image (median over batches of", args.batch, "; min-max)")
    for name, values in seconds.items():
        print(f"- {name}: {statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})")


if __name__ == "__main__":
    main()
