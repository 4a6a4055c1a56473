"""Reasoning segmentation on the toy world (issue 37): the toy LMM answers held-out "Which object
…?" questions and its answer is grounded whole, beside the same objects named directly and
beside a random-init LMM under the same heads, with the cost per image of each.

The first ``--scenes`` held-out scenes that a reason question has one answer for
(``toyworld.reasoning.reason_shards``: largest, smallest, left of, above, odd colour), the
shipped toy LMM + SAM + heads, one process (``pipeline.evaluate.evaluate_set``, batches of
``--batch`` images). Modes, each one pass over the same shards:

  * ``reason``: ``--protocol reason``: the LMM answers (greedy, at most 64 new tokens), the
    answer is grounded whole, LISA's gIoU / cIoU against the referent's mask. An answer is right
    when, stripped and without a final period, it equals the referent's list name ("the big red
    circle", case-insensitive). The rows below it split the same run by answer: right, the name
    of another object of the scene, or anything else (a name of no object there).
  * ``given, list name``: the right answer given instead of asked (``flmm-separate``: the
    referent's first expression, which is its list name), one query per image: what a right
    answer grounds to.
  * ``given, all expressions``: ``standard``, each of the referent's expressions ("the red
    circle", "the circle", "the circle on the left", …) alone as a query; n counts them.
  * ``reason, random-init LMM``: ``reason`` with ``toyworld.lmm.write_control``'s LMM (the toy
    LMM's config and tokenizer, random weights) under the same SAM and heads.

Printed: markdown tables of gIoU / cIoU (U-Net and refined masks; referent sets score an empty
pair 0, the reason protocol 1, and no target here is empty), answer accuracy and seconds per
image (the pass's wall time over its images: reading, decoding, generation and grounding), then
per reason kind. Timings are the machine's: no assertion is made on them.

    python bench/reasoning.py [--scenes 100] [--batch 8] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.evaluate import EvalSet, SetResult, evaluate_set
from pipeline.reason import REASON, ReasonGrounder
from toyworld.lmm import write_control
from toyworld.models import toy_model_spec
from toyworld.reasoning import REASON_SPLIT, ReasonScene, reason_scenes, reason_shards
from toyworld.vqa import list_name

LIST_NAME = "flmm-separate"  # the first expression of each object, alone: here its list name
ALL_EXPRESSIONS = "standard"
ANSWER_CLASSES = ("right answer", "wrong: another object's name", "wrong: no object's name")


class AnswerLog:
    """A ``ReasonGrounder`` that keeps every answer, in sample order, and the seconds per image
    of each batch it asks and grounds."""

    def __init__(self, grounder: ReasonGrounder):
        self.grounder = grounder
        self.answers: list[str] = []
        self.seconds_per_image: list[float] = []

    def __call__(self, images, questions):
        start = time.perf_counter()
        out = self.grounder(images, questions)
        self.seconds_per_image.append((time.perf_counter() - start) / len(images))
        self.answers.extend(answer for answer, _, _ in out)
        return out


@dataclass(frozen=True)
class Row:
    """One row of the table: ``n`` queries, gIoU / cIoU per output (``unet``, ``refined``),
    answer accuracy (None: nothing asked), seconds per image (None: a subset of a run)."""

    mode: str
    lmm: str
    n: int
    giou: dict[str, float]
    ciou: dict[str, float]
    accuracy: float | None = None
    seconds: float | None = None


def right(answer: str, name: str) -> bool:
    """The answer names ``name``: stripped, without a final period, case-insensitive."""
    text = answer.strip()
    return text.removesuffix(".").strip().lower() == name.lower()


def scores(metric, keep: list[bool] | None = None) -> tuple[float, float, int]:
    """(gIoU, cIoU, n) of an accumulator's samples (``MaskIoU`` or ``ReasonIoU``, each with its
    own per-sample IoU; cIoU = ΣI / ΣU), only those where ``keep``."""
    keep = keep if keep is not None else [True] * len(metric.unions)
    ious = [iou for iou, k in zip(metric.ious(), keep) if k]
    inter = sum(i for i, k in zip(metric.intersections, keep) if k)
    union = sum(u for u, k in zip(metric.unions, keep) if k)
    return (sum(ious) / len(ious) if ious else 0.0), inter / union if union else 0.0, len(ious)


def row(mode: str, lmm: str, metrics: dict, keep=None, accuracy=None, seconds=None) -> Row:
    unet, refined = scores(metrics["unet"], keep), scores(metrics["refined"], keep)
    giou = {"unet": unet[0], "refined": refined[0]}
    ciou = {"unet": unet[1], "refined": refined[1]}
    return Row(mode, lmm, unet[2], giou, ciou, accuracy, seconds)


def evaluate(model, shards: EvalSet, protocol: str, batch: int, grounder=None) -> SetResult:
    result = evaluate_set(model, shards, (protocol,), batch, log=lambda _: None, grounder=grounder)
    assert not result.skipped.total(), result.skipped.describe()
    return result


def reason_rows(lmm: str, result: SetResult, log: AnswerLog, asked: list[ReasonScene]):
    """The reason pass's row, then rows of its samples by answer (``ANSWER_CLASSES``); per
    sample, right or not."""
    classes = [answer_class(a, x) for a, x in zip(log.answers, asked, strict=True)]
    hits = [c == ANSWER_CLASSES[0] for c in classes]
    metrics = result.metrics[REASON]
    seconds = result.seconds / result.samples
    rows = [row("reason (answer grounded whole)", lmm, metrics, None, _mean(hits), seconds)]
    for name in ANSWER_CLASSES:
        keep = [c == name for c in classes]
        if any(keep):
            accuracy = float(name == ANSWER_CLASSES[0])
            rows.append(row(f"reason, {name}", lmm, metrics, keep, accuracy))
    return rows, hits


def answer_class(answer: str, asked: ReasonScene) -> str:
    """Which of ``ANSWER_CLASSES``: right (``right``), the name of another object of the scene,
    or anything else (the name of no object there, or not a name)."""
    if right(answer, asked.question.answer):
        return ANSWER_CLASSES[0]
    names = [list_name(o) for o in asked.scene.objects]
    return ANSWER_CLASSES[1 if any(right(answer, name) for name in names) else 2]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def kind_table(asked: list[ReasonScene], results: dict, hits: dict) -> list[str]:
    """Per reason kind: n, the answers' accuracy and the refined masks' gIoU of each mode."""
    kinds = sorted({x.kind for x in asked})
    head = "| kind | n | accuracy | reason gIoU | given list name gIoU | given all gIoU |"
    head += " control accuracy | control reason gIoU |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    counts = [len(x.referent.expressions) for x in asked]  # standard's queries per image
    for kind in kinds + ["all"]:
        mine = [kind in ("all", x.kind) for x in asked]
        per_expression = [m for m, c in zip(mine, counts) for _ in range(c)]
        cells = [
            f"{_mean(h for h, m in zip(hits['toy'], mine) if m):.2f}",
            f"{scores(results['reason'].metrics[REASON]['refined'], mine)[0]:.3f}",
            f"{scores(results['list'].metrics[LIST_NAME]['refined'], mine)[0]:.3f}",
            f"{scores(results['all'].metrics[ALL_EXPRESSIONS]['refined'], per_expression)[0]:.3f}",
            f"{_mean(h for h, m in zip(hits['control'], mine) if m):.2f}",
            f"{scores(results['control'].metrics[REASON]['refined'], mine)[0]:.3f}",
        ]
        lines.append(f"| {kind} | {sum(mine)} | " + " | ".join(cells) + " |")
    return lines


def mode_table(rows: list[Row]) -> list[str]:
    head = "| mode | LMM | n | gIoU U-Net | gIoU refined | cIoU U-Net | cIoU refined |"
    lines = [
        head + " answer accuracy | s / image |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        accuracy = "–" if r.accuracy is None else f"{r.accuracy:.2f}"
        seconds = "–" if r.seconds is None else f"{r.seconds:.3f}"
        lines.append(
            f"| {r.mode} | {r.lmm} | {r.n} | {r.giou['unet']:.3f} | {r.giou['refined']:.3f} | "
            f"{r.ciou['unet']:.3f} | {r.ciou['refined']:.3f} | {accuracy} | {seconds} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    asked = list(reason_scenes(args.scenes))
    assert all(x.referent.expressions[0] == x.question.answer for x in asked)  # LIST_NAME's
    spec = toy_model_spec()
    results, hits, rows = {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        paths = reason_shards(Path(tmp, "shards"), args.scenes)
        shards = EvalSet(REASON_SPLIT, tuple(str(p) for p in paths))
        model = spec.build()
        log = AnswerLog(ReasonGrounder(model))
        results["reason"] = evaluate(model, shards, REASON, args.batch, log)
        toy_rows, hits["toy"] = reason_rows("toy", results["reason"], log, asked)
        rows += toy_rows
        print(f"toy: ask + ground, batch median {_median(log.seconds_per_image):.3f} s/image")
        wrong = [
            (a, x.question.answer) for a, x, h in zip(log.answers, asked, hits["toy"]) if not h
        ]
        print("toy: wrong answers (answer, right one), e.g.", wrong[:8], flush=True)
        for key, protocol, mode in (
            ("list", LIST_NAME, "given, list name (the right answer)"),
            ("all", ALL_EXPRESSIONS, "given, all expressions"),
        ):
            results[key] = evaluate(model, shards, protocol, args.batch)
            seconds = results[key].seconds / results[key].samples
            rows.append(row(mode, "toy", results[key].metrics[protocol], None, None, seconds))
        control = write_control(Path(tmp, "control"), seed=0)
        model = dataclasses.replace(spec, lmm=str(control)).build()
        log = AnswerLog(ReasonGrounder(model))
        results["control"] = evaluate(model, shards, REASON, args.batch, log)
        control_rows, hits["control"] = reason_rows("random init", results["control"], log, asked)
        rows += control_rows[:1]
        print("control answers, e.g.", [a[:60] for a in log.answers[:3]], flush=True)
    print(f"\n{args.scenes} held-out reason scenes, batch {args.batch}, {args.threads} threads\n")
    print("\n".join(mode_table(rows)) + "\n")
    print("\n".join(kind_table(asked, results, hits)))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


if __name__ == "__main__":
    main()
