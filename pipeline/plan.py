"""``--batch-size auto`` and its check: the memory plan (``flmm.memory``) of a job's model, flags
and devices, made on the driver before any model loads.

The estimate comes from configs alone (``flmm.memory.model_shapes``) for a workload that is the
worst case of the samples the flags allow (``job_workload``). The budget is the memory one
model actor may use (``actor_budget``): ``--device-memory`` when given; else, for GPU actors,
the free memory of this machine's first GPU (read in a child process) times the GPU share of
one actor, which describes the actors' cards only where the driver runs on a machine like theirs
(one machine, or a cluster whose head has the workers' GPU); a driver without a GPU cannot know
it, so ``auto`` then asks for ``--device-memory`` and an explicit size goes unchecked (said so);
for CPU actors, this machine's ``MemAvailable`` shared by the actors (each holds its own
model). ``auto`` picks the largest batch up to ``flmm.memory.MAX_BATCH`` whose estimate fits;
an explicit size that does not fit is an error naming the largest that does (for GPU actors, or
with ``--device-memory``: see ``resolve_batch_size``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from flmm.memory import (
    GIB,
    MAX_BATCH,
    Budget,
    Workload,
    describe,
    estimate,
    fits,
    free_bytes,
    largest_batch,
)
from flmm.sam_variants import sam_config
from pipeline.spec import DTYPES, ModelSpec

CAPTION_TOKENS = 64  # a caption's tokens, planned for (LAION / CC3M alt texts are shorter)
PHRASE_TOKENS = 4  # a phrase's tokens
QUESTION_TOKENS = 32  # an instruction's or a question's tokens beyond the grounding prompt's


def batch_size_arg(text: str) -> int | str:
    """``--batch-size``: ``auto`` or a positive number of images."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of images, or auto") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1")
    return value


def add_plan_args(parser: argparse.ArgumentParser, default: int) -> None:
    """``--batch-size`` (a number, or ``auto``) and the memory plan's inputs."""
    parser.add_argument(
        "--batch-size",
        type=batch_size_arg,
        default=default,
        help="images per model call, or auto: the largest whose estimated memory fits the "
        "device (pipeline/plan.py); a number that does not fit is refused before loading "
        "(checked for GPU actors, or with --device-memory; default: %(default)s)",
    )
    parser.add_argument(
        "--device-memory",
        type=float,
        help="GiB one model actor may use, for the memory plan (default: the free memory of "
        "this machine's GPU, or its available memory for CPU actors)",
    )
    parser.add_argument(
        "--plan-phrases",
        type=int,
        default=8,
        help="memory plan: phrases grounded per image (default: %(default)s)",
    )
    parser.add_argument(
        "--plan-image-side",
        type=int,
        default=1024,
        help="memory plan: images' longest side, px (default: %(default)s; masks are held "
        "at the image's own size)",
    )


def job_workload(args: argparse.Namespace) -> Workload:
    """The worst case of the samples the flags allow: ``--plan-phrases`` phrases per image, a
    text of ``max(CAPTION_TOKENS, --max-new-tokens)`` tokens captured whole (a caption, a
    description, an answer; its phrases then listed in a second prefill unless
    ``--caption-layout in-place``), a generation of ``--max-new-tokens`` (an image-only sample
    or a question) from a prompt that may hold a caption (LMM proposals), on square images of
    ``--plan-image-side``."""
    new = args.max_new_tokens
    side = args.plan_image_side
    return Workload(
        phrases=args.plan_phrases,
        phrase_tokens=PHRASE_TOKENS,
        text_tokens=max(CAPTION_TOKENS, new),
        listed=getattr(args, "caption_layout", "listed") == "listed",
        new_tokens=new,
        prompt_extra=CAPTION_TOKENS + QUESTION_TOKENS,
        image_size=(side, side),
    )


def actor_budget(
    spec: ModelSpec, actors: int, gpus_per_actor: float, device_memory: float | None
) -> Budget | None:
    """The memory one model actor may use (see the module); None when it cannot be known here
    (GPU actors, no ``device_memory``, no GPU on this machine)."""
    device = "cuda" if gpus_per_actor > 0 and spec.device != "cpu" else "cpu"
    if device_memory is not None:
        return Budget(device, int(device_memory * GIB), "--device-memory")
    if device == "cpu":
        share = f", shared by {actors} actors" if actors > 1 else ""
        return Budget("cpu", free_bytes("cpu") // actors, f"cpu MemAvailable here{share}")
    if not torch.cuda.is_available():
        return None
    share = min(1.0, gpus_per_actor)
    source = "cuda:0 free here" + (f" × {share:g} GPU per actor" if share < 1 else "")
    return Budget("cuda", int(free_bytes("cuda") * share), source)


def resolve_batch_size(
    args: argparse.Namespace,
    spec: ModelSpec,
    actors: int = 1,
    gpus_per_actor: float = 1.0,
) -> int:
    """``args.batch_size`` planned: ``auto`` → the largest batch that fits the budget; a number
    → itself, when it fits. Prints the plan's line; ValueError when nothing fits, when ``auto``
    has no budget, or when the number does not fit. A number for CPU actors without
    ``--device-memory`` is left unchecked, without a line: the plan reads the model's shapes
    with the model libraries (seconds of the driver's start, before Ray can start), and a CPU
    actor's memory is rarely what bounds its batch (``auto`` reaches ``MAX_BATCH`` on CPU)."""
    cpu_actors = gpus_per_actor <= 0 or spec.device == "cpu"
    if args.batch_size != "auto" and args.device_memory is None and cpu_actors:
        return args.batch_size
    from flmm.shapes import model_shapes  # the model libraries, only when planning

    budget = actor_budget(spec, actors, gpus_per_actor, args.device_memory)
    try:
        work = job_workload(args)
        shapes = model_shapes(
            spec.lmm,
            sam_config(spec.sam_variant),
            spec.heads,
            DTYPES[spec.dtype],
            spec.prompt_config().instruction,
            work.image_size,
        )
    except (OSError, ValueError, KeyError, AttributeError) as error:
        if args.batch_size == "auto":
            raise ValueError(f"--batch-size auto: no memory plan for {spec.lmm}: {error}")
        print(f"WARNING: batch size {args.batch_size} unchecked: no memory plan ({error})",
              file=sys.stderr)  # fmt: skip
        return args.batch_size
    if budget is None:
        if args.batch_size == "auto":
            raise ValueError(
                "--batch-size auto: this machine has no GPU to read the actors' free memory "
                "from; give --device-memory (GiB one actor may use) or a --batch-size"
            )
        line = plan_line(shapes, work, args.batch_size, None)
        print(f"memory plan: {line}; unchecked (no GPU here: --device-memory)", flush=True)
        return args.batch_size
    return checked_batch_size(args.batch_size, shapes, work, budget)


def checked_batch_size(requested: int | str, shapes, work: Workload, budget: Budget) -> int:
    """``requested`` (``auto`` or a number) against ``budget`` for the model ``shapes``:
    ``auto`` → the largest batch up to ``MAX_BATCH`` that fits; a number → itself if it fits.
    ValueError (naming the largest that fits) otherwise."""
    if requested == "auto":
        batch = largest_batch(*shapes, work, budget, MAX_BATCH)
    else:
        batch = requested if fits(*shapes, work, requested, budget) else 0
    if batch == 0:
        best = 0 if requested == "auto" else largest_batch(*shapes, work, budget, requested - 1)
        if best == 0:
            raise ValueError(f"not even one image fits: {plan_line(shapes, work, 1, budget)}")
        raise ValueError(
            f"--batch-size {requested} does not fit: {plan_line(shapes, work, requested, budget)}"
            f"; use --batch-size {best} or less, or auto"
        )
    print(f"memory plan: {plan_line(shapes, work, batch, budget)}", flush=True)
    return batch


def plan_line(shapes, work: Workload, batch: int, budget: Budget | None) -> str:
    return describe(estimate(*shapes, work, batch), budget)
