"""Evaluation of F-LMM heads on eval shards: cIoU / gIoU (referring sets) or PNG's average recall
(Panoptic Narrative Grounding sets) of the U-Net and the refined masks.

Data path for one eval set (shards of ``schemas/INPUT_FORMAT.md`` with ``objects``):

    tar samples → decode + validate on CPU → EvalSample (image, expressions, GT masks [N, H, W])
                                           ↘ SkipSample(reason): counted per reason, never a crash
    batch of B images → queries of every protocol (one LMM sequence each, below)
      → one LMM prefill over all sequences, one SAM encoding per image (shared by its sequences)
      → heads → logits [P, 1, H, W] (original frame) → sigmoid > 0.5 → MaskIoU per protocol/output

Protocols (how an image's objects become LMM sequences):
  * ``standard``: every expression of every object is its own query, alone in its own sequence;
    n = number of expressions.
  * ``flmm`` (F-LMM's): the first expression of each object (as the authors' script reads it:
    the annotators' raw text, lower-cased, where the shards keep it), all objects of the image in
    one sequence, each annotation id once; n = number of distinct objects. Easier than
    ``standard``: each object is named by its first expression only, with the other objects'
    names in context.
  * ``flmm-separate`` (the authors' script without ``--concat``): the same first expressions,
    each alone in its own sequence; n = number of distinct objects.

PNG protocols (shards of ``jobs/prepare_refcoco.py --dataset png``, ``pipeline/png.py``), scored
by average recall overall and over things / stuff / singular / plural phrases
(``flmm.metrics.AverageRecall``, ``pipeline.png.phrase_kinds``):
  * ``png`` (F-LMM's, github.com/wusize/F-LMM ``scripts/multiprocess_eval_png.py`` with
    ``flmm/datasets/png.py``): each narrative of an image is one sequence, its text whole after
    the prompt (``FrozenLMM.prepare_text``); every grounded phrase is grounded in place, from its
    own tokens' maps and hidden states in that prefill (``flmm.prompt.span_slots``,
    ``FrozenLMM.in_place``); n = grounded phrases of all narratives, nothing de-duplicated (as
    theirs). They score the refined masks only; both are reported here. Unlike theirs, a
    narrative without a grounded phrase is left out (their reader then returns a random other
    narrative).
  * ``png-separate``: the same phrases, each alone in its own sequence (``" phrase."``).

Reasoning segmentation (shards of ``jobs/prepare_refcoco.py --dataset reasonseg``,
``pipeline/reasonseg.py``): ``reason``, the LMM answers each sample's question and its answer is
grounded into one mask, scored with LISA's cIoU / gIoU, overall and over short queries / long
sentences (``pipeline/reason.py``).

Question answering (any shards whose JSON has ``question`` and ``answers``): ``vqa``, the LMM's
answer accuracy from the whole image and with visual chain-of-thought (``pipeline/vqa.py``);
samples need no ``objects``.

``default_protocols``: the referring protocols for referring sets, the PNG ones for PNG sets,
``reason`` for ReasonSeg sets, ``vqa`` for sets of ``vqa-*.tar`` shards.

The loop is a plain single-process one (eval sets are small); the model is the same ``FLMM``
the other jobs run.
What it writes (``metrics.json``, ``*.stats.json``, the markdown table): ``pipeline/eval_report.py``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flmm.cot import CropConfig
from flmm.metrics import AverageRecall, MaskIoU
from flmm.model import FLMM, GroundingInput
from flmm.prompt import span_slots
from pipeline.decode import SampleError, decode_sample, object_targets
from pipeline.eval_report import (  # markdown_table: for jobs/evaluate.py, with the rest
    OUTPUTS,
    markdown_table,  # noqa: F401
    metrics_json,
    stats_json,
    write_json,
)
from pipeline.grounding import masks_of
from pipeline.png import PNG_NAME, narrative_queries, phrase_kinds
from pipeline.progress import track
from pipeline.reason import REASON, ReasonGrounder, reason_fields, reason_metrics, score_batch
from pipeline.reasonseg import REASON_NAME
from pipeline.sources import iter_tar_samples, resolve_shards, sample_files, shard_name
from pipeline.spec import ModelSpec
from pipeline.vqa import VQA, VQAAsker, vqa_fields, vqa_outputs
from pipeline.vqa import score_batch as score_vqa

PROTOCOLS = ("standard", "flmm", "flmm-separate")  # referring sets (RefCOCO/+/g, toy)
PNG_PROTOCOLS = ("png", "png-separate")  # Panoptic Narrative Grounding sets
ALL_PROTOCOLS = PROTOCOLS + PNG_PROTOCOLS + (REASON, VQA)


# --------------------------------------------------------------------------------------------
# Eval sets and samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    """A named list of ``.tar`` shards (paths or URIs), read in order."""

    name: str
    paths: tuple[str, ...]


def split_name(shard: str) -> str:
    """``val-000003.tar`` → ``val``; ``refcoco_unc-testA-000000.tar`` → ``refcoco_unc-testA``."""
    stem = shard_name(shard)
    prefix, _, number = stem.rpartition("-")
    return prefix if prefix and number.isdigit() else stem


def eval_sets(specs: Iterable[str]) -> list[EvalSet]:
    """Parse ``--shards`` values: ``[name=]path``, path a ``.tar`` file, a directory of them or a
    brace pattern, local or a URI (``s3://...``), found as the annotation job finds its inputs
    (``pipeline.sources.resolve_shards``).

    Without a name, shards are grouped by split name (``split_name``), so a directory written by
    ``jobs/prepare_refcoco.py`` gives one set per split. Sets with the same name are merged.
    """
    groups: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, path_text = spec.rpartition("=")
        path = path_text if sep else spec
        try:
            shards = resolve_shards([path])
        except (ValueError, OSError) as error:
            raise ValueError(f"--shards {spec}: no .tar shards at {path} ({error})") from None
        for shard in shards:
            paths = groups.setdefault(name if sep else split_name(shard), [])
            if shard not in paths:
                paths.append(shard)
    return [EvalSet(name, tuple(paths)) for name, paths in groups.items()]


def default_protocols(eval_set: EvalSet) -> tuple[str, ...]:
    """``PNG_PROTOCOLS`` for a set of PNG shards (``png_coco-{split}-*.tar``), ``reason`` for
    ReasonSeg shards (``reason_seg-{split}-*.tar``), else ``PROTOCOLS``."""
    named = ((PNG_NAME, PNG_PROTOCOLS), (REASON_NAME, (REASON,)), (VQA, (VQA,)))
    for prefix, protocols in named:
        if eval_set.paths and all(shard_name(p).startswith(f"{prefix}-") for p in eval_set.paths):
            return protocols
    return PROTOCOLS


@dataclass
class EvalSample:
    """One image with its referred objects.

    image ``[H, W, 3]`` uint8 RGB, original frame; expressions: per object, its expressions
    (non-empty); masks ``[N, H, W]`` bool ground truth of the N objects, original frame;
    firsts: per object, the text F-LMM's protocols name it by (its ``raw[0].lower()`` when the
    sample has the annotators' raw text, else its first expression); distinct: the objects
    F-LMM's protocols count (the first of each ``ann_id``; all without ids). PNG samples only
    (None otherwise): narratives, per narrative its text and its objects' ``(index, [start,
    end))`` there (``pipeline.png.narrative_queries``); things, plurals: per object, its kind
    (``pipeline.png.phrase_kinds``). Question samples (None otherwise): question, is_sentence,
    ignore (bool ``[H, W]``, pixels left out of the score) (``pipeline.reason.reason_fields``);
    VQA samples: question, answers (accepted) and subset (``pipeline.vqa.vqa_fields``), and
    maybe no objects (``expressions`` empty, ``masks`` ``[0, H, W]``).
    """

    key: str
    image: np.ndarray
    expressions: list[list[str]]
    masks: np.ndarray
    firsts: list[str] | None = None
    distinct: list[int] | None = None
    narratives: list[tuple[str, list[tuple[int, tuple[int, int]]]]] | None = None
    things: list[bool] | None = None
    plurals: list[bool] | None = None
    question: str | None = None
    is_sentence: bool | None = None
    ignore: np.ndarray | None = None
    answers: list[str] | None = None
    subset: list[str] | None = None


class SkipSample(Exception):
    """A sample that cannot be evaluated; the message is the reason (counted per reason)."""


def eval_sample(
    key: str,
    raw: dict,
    narratives_required: bool = False,
    question_required: bool = False,
    answers_required: bool = False,
) -> EvalSample:
    """A sample's raw files (``sources.sample_files``) → EvalSample, or SkipSample(reason).

    Decoding and validation are the other jobs' (``decode.decode_sample``, ``object_targets``);
    the reason is the ``SampleError`` kind (``decode.ERROR_KINDS``), or ``bad_narratives`` (PNG
    fields that do not fit), or ``no_narratives`` (none, when ``narratives_required``); with
    ``question_required``, ``reason_fields``'s kinds (``no_question`` …); with
    ``answers_required`` (``vqa``), ``vqa_fields``'s, and ``objects`` may be missing.
    """
    try:
        rgb, meta = decode_sample(raw)
        answered = vqa_fields(meta) if answers_required else (None,) * 3
        optional = answers_required and "objects" not in meta
        targets = [] if optional else object_targets(meta, *rgb.shape[:2])
        if not all(expressions for expressions, _ in targets):
            raise SampleError("bad_objects", "an object has no expressions")
        asked = reason_fields(meta, *rgb.shape[:2]) if question_required else (None,) * 3
    except SampleError as error:
        raise SkipSample(error.kind) from error
    try:
        narratives = narrative_queries(meta)
    except ValueError as error:
        raise SkipSample("bad_narratives") from error
    if narratives is None and narratives_required:
        raise SkipSample("no_narratives")
    masks = (
        np.stack([mask for _, mask in targets]) if targets else np.zeros((0, *rgb.shape[:2]), bool)
    )
    expressions = [expressions for expressions, _ in targets]
    firsts, distinct, seen = [], [], set()
    for k, (obj, phrases) in enumerate(zip(meta.get("objects", []), expressions)):
        raw = obj.get("raw")
        firsts.append(
            raw[0].lower()
            if isinstance(raw, list) and raw and isinstance(raw[0], str)
            else phrases[0]
        )
        ann_id = obj.get("ann_id")
        if ann_id is None or ann_id not in seen:
            distinct.append(k)
            seen.add(ann_id)
    things, plurals = phrase_kinds(meta) if narratives is not None else (None, None)
    kinds = (narratives, things, plurals)
    sample = EvalSample(key, rgb, expressions, masks, firsts, distinct, *kinds, *asked)
    if answers_required:
        sample.question, sample.answers, sample.subset = answered
    return sample


@dataclass
class Skipped:
    """Skipped samples per reason, with the first few keys of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, key: str, reason: str) -> None:
        self.counts[reason] += 1
        keys = self.examples.setdefault(reason, [])
        if len(keys) < 5:
            keys.append(key)

    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        return "; ".join(
            f"{reason}: {n} (e.g. {', '.join(self.examples[reason])})"
            for reason, n in sorted(self.counts.items())
        )


def iter_samples(
    paths: Iterable[str],
    skipped: Skipped,
    limit: int | None = None,
    narratives_required: bool = False,
    question_required: bool = False,
    answers_required: bool = False,
):
    """Valid samples of ``paths`` in order, at most ``limit`` samples *read* (skipped included);
    bad samples go to ``skipped`` (so do samples without PNG narratives, when
    ``narratives_required``, or without a question, when ``question_required``, or without
    a question and answers, when ``answers_required``). Shards are read by the annotation job's reader, so a cut or
    corrupt shard raises ``pipeline.sources.ShardError`` instead of evaluating fewer samples."""
    read = 0
    for path in paths:
        for key, files, exts in iter_tar_samples(str(path)):
            if limit is not None and read >= limit:
                return
            read += 1
            try:
                raw = sample_files(files, exts)
                yield eval_sample(
                    key, raw, narratives_required, question_required, answers_required
                )
            except SkipSample as reason:
                skipped.add(key, str(reason))


def batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------
# Queries and grounding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sequence:
    """One LMM sequence: ``phrases`` of image ``image`` (index in the batch), each referring to
    the object ``objects[i]`` of that image, scored under ``protocol``. With ``text``, the
    sequence is that text whole (a PNG narrative) and phrase i is its characters ``spans[i]``,
    grounded in place; else the phrases are the answer ``" p1. p2."``."""

    protocol: str
    image: int
    phrases: tuple[str, ...]
    objects: tuple[int, ...]
    text: str | None = None
    spans: tuple[tuple[int, int], ...] = ()


def sequences(
    expressions: list[list[str]],
    protocol: str,
    image: int = 0,
    firsts: list[str] | None = None,
    distinct: list[int] | None = None,
    narratives: list[tuple[str, list[tuple[int, tuple[int, int]]]]] | None = None,
) -> list[Sequence]:
    """The LMM sequences of one image's objects (``expressions`` per object) under ``protocol``;
    F-LMM's protocols name object k by ``firsts[k]`` (default: its first expression) and count
    only the ``distinct`` objects (default: all; see ``EvalSample``); ``png`` grounds the
    objects of each of the ``narratives`` in place (``EvalSample.narratives``)."""
    if protocol == "png":
        return [
            Sequence(
                protocol,
                image,
                tuple(text[start:end] for _, (start, end) in grounded),
                tuple(k for k, _ in grounded),
                text,
                tuple(span for _, span in grounded),
            )
            for text, grounded in narratives or []
        ]
    if protocol in (REASON, VQA):  # (asked by ``pipeline.reason``, ``pipeline.vqa``)
        return []
    if protocol == "png-separate":
        return [
            Sequence(protocol, image, (phrases[0],), (k,)) for k, phrases in enumerate(expressions)
        ]
    if protocol == "standard":
        return [
            Sequence(protocol, image, (phrase,), (k,))
            for k, phrases in enumerate(expressions)
            for phrase in phrases
        ]
    firsts = firsts or [phrases[0] for phrases in expressions]
    objects = tuple(range(len(expressions)) if distinct is None else distinct)
    if protocol == "flmm":
        return [Sequence(protocol, image, tuple(firsts[k] for k in objects), objects)]
    if protocol == "flmm-separate":
        return [Sequence(protocol, image, (firsts[k],), (k,)) for k in objects]
    raise ValueError(f"unknown protocol {protocol!r}; known: {ALL_PROTOCOLS}")


def lmm_features(model: FLMM, tensors: list[torch.Tensor], seqs: list[Sequence]):
    """One LMM prefill over ``seqs`` (images ``[H, W, 3]`` uint8 tensors, by ``Sequence.image``)
    → (per sequence its ``LMMSample``, attention ``[P, V·L·H, h, w]``, hidden per phrase
    ``[n_tok, L, D]``). A text sequence's phrases are its spans' tokens in that prefill."""
    prepared = []  # (sample, the text tokens' character offsets, or None for phrases)
    for s in seqs:
        if s.text is None:
            prepared.append((model.lmm.prepare(tensors[s.image], list(s.phrases)), None))
        else:
            prepared.append(model.lmm.prepare_text(tensors[s.image], s.text))
    lmm_out = model.lmm([sample for sample, _ in prepared])
    attention, hidden = [], []
    for b, (s, (sample, offsets)) in enumerate(zip(seqs, prepared)):
        if offsets is None:
            attention.append(lmm_out.attention[b])
            hidden.append(lmm_out.hidden[b])
            continue
        slots = span_slots(offsets, list(s.spans))
        if any(slot is None for slot in slots):
            raise ValueError(f"a span of {s.text[:40]!r} maps to no token")
        maps, hiddens = model.lmm.in_place(lmm_out, b, sample.image, slots)
        attention.append(maps)
        hidden.append(hiddens)
    return [sample for sample, _ in prepared], attention, hidden


def ground(model: FLMM, images: list[np.ndarray], seqs: list[Sequence]):
    """Logits of every sequence's phrases: one LMM prefill over ``seqs`` (``lmm_features``), one
    SAM encoding per image (shared by that image's sequences). Returns ``model.decode``'s
    Groundings, in order."""
    tensors = [torch.from_numpy(image) for image in images]
    sam = [model.image_encoder.preprocess(t) for t in tensors]  # (pixels [1,3,S,S], (h1, w1))
    samples, attention, hidden = lmm_features(model, tensors, seqs)
    inputs = [GroundingInput(sample, *sam[s.image]) for sample, s in zip(samples, seqs)]
    embeddings = model.embed(torch.cat([pixels for pixels, _ in sam]))
    per_sequence = embeddings[torch.tensor([s.image for s in seqs], device=embeddings.device)]
    return model.decode(inputs, attention, hidden, per_sequence)


# --------------------------------------------------------------------------------------------
# The evaluation loop
# --------------------------------------------------------------------------------------------


@dataclass
class SetResult:
    """Accumulators and counts of one eval set."""

    metrics: dict[str, dict[str, MaskIoU]]  # protocol → output → accumulator (AverageRecall: PNG)
    skipped: Skipped = field(default_factory=Skipped)
    samples: int = 0  # evaluated (valid) samples
    queries: int = 0  # phrases grounded, all protocols
    seconds: float = 0.0


def evaluate_set(
    model: FLMM,
    eval_set: EvalSet,
    protocols: tuple[str, ...],
    batch_size: int,
    limit: int | None = None,
    log: Callable[[str], None] = print,
    log_every: float = 10.0,
    grounder: ReasonGrounder | None = None,
    asker: VQAAsker | None = None,
) -> SetResult:
    """Run ``model`` over ``eval_set`` under each protocol; batches of ``batch_size`` images.
    ``reason`` asks and grounds with ``grounder`` (default: ``ReasonGrounder(model)``), ``vqa``
    asks with ``asker`` (default: ``VQAAsker(model)``)."""
    metrics = {}
    for p in protocols:
        if p == REASON:
            metrics.update(reason_metrics(OUTPUTS))
        elif p == VQA:
            metrics[VQA] = vqa_outputs()  # (``vqa-<subset>`` added as subsets are seen)
        else:
            metrics[p] = accumulators(p)
    result = SetResult(metrics)
    start = last_log = time.perf_counter()
    paths = track(eval_set.paths, len(eval_set.paths), f"{eval_set.name} shards")
    png, asked, vqa = (
        any(p in PNG_PROTOCOLS for p in protocols),
        REASON in protocols,
        VQA in protocols,
    )
    if asked and grounder is None:
        grounder = ReasonGrounder(model)
    if vqa and asker is None:
        asker = VQAAsker(model)
    samples = iter_samples(paths, result.skipped, limit, png, asked, vqa)
    for batch in batched(samples, batch_size):
        seqs = [
            s
            for b, x in enumerate(batch)
            for p in protocols
            for s in sequences(x.expressions, p, b, x.firsts, x.distinct, x.narratives)
        ]
        with torch.inference_mode():
            groundings = ground(model, [x.image for x in batch], seqs) if seqs else []
        for seq, grounding in zip(seqs, groundings):
            update(result.metrics[seq.protocol], batch[seq.image], seq.objects, grounding)
        if asked:
            result.queries += score_batch(grounder, batch, result.metrics)
        if vqa:
            result.queries += score_vqa(asker, batch, result.metrics)
        result.samples += len(batch)
        result.queries += sum(len(s.phrases) for s in seqs)
        if time.perf_counter() - last_log >= log_every:
            last_log = time.perf_counter()
            log(f"  {eval_set.name}: {progress(result, last_log - start)}")
    result.seconds = time.perf_counter() - start
    log(f"  {eval_set.name}: done, {progress(result, result.seconds)}")
    return result


def accumulators(protocol: str) -> dict[str, MaskIoU]:
    """The metric of a protocol per output: PNG's average recall, else cIoU / gIoU."""
    return {o: AverageRecall() if protocol in PNG_PROTOCOLS else MaskIoU() for o in OUTPUTS}


def update(metrics: dict[str, MaskIoU], sample: EvalSample, objects: tuple[int, ...], grounding):
    """Score one sequence's masks (``OUTPUTS``) against its objects' ground truth."""
    gt = torch.from_numpy(sample.masks[list(objects)])
    for output, logits in (("unet", grounding.coarse), ("refined", grounding.refined)):
        metric = metrics[output]
        if isinstance(metric, AverageRecall):
            thing = [sample.things[k] for k in objects]
            plural = [sample.plurals[k] for k in objects]
            metric.update(masks_of(logits), gt, thing=thing, plural=plural)
        else:
            metric.update(masks_of(logits), gt)


def progress(result: SetResult, seconds: float) -> str:
    return (
        f"{result.samples} samples, {result.queries} queries, "
        f"{result.skipped.total()} skipped, {seconds:.0f}s"
    )


# --------------------------------------------------------------------------------------------
# Config and entry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    sets: tuple[EvalSet, ...]
    model: ModelSpec
    protocols: tuple[str, ...] | None = None  # None: each set's own (``default_protocols``)
    batch_size: int = 8
    limit: int | None = None
    output: Path = Path("out/evaluate/metrics.json")
    ground_answer: str = "whole"  # reason: the answer grounded whole, or its phrases united
    max_new_tokens: int = 64  # reason, vqa: the answer's length
    cot_margin: float = CropConfig.margin  # vqa: the evidence crop's margin (``flmm.cot``)
    cot_view: str = CropConfig.view  # vqa: the second look's view (``flmm.cot.VIEWS``)


def evaluate(config: EvalConfig, log: Callable[[str], None] = print) -> dict[str, SetResult]:
    """Load the model once, evaluate every set; write ``metrics.json`` and ``*.stats.json``."""
    model = config.model.build()
    grounder = ReasonGrounder(model, config.ground_answer, config.max_new_tokens)
    crop = CropConfig(config.cot_margin, view=config.cot_view)
    asker = VQAAsker(model, config.max_new_tokens, crop)
    results = {}
    for eval_set in config.sets:
        protocols = config.protocols or default_protocols(eval_set)
        log(f"{eval_set.name}: {len(eval_set.paths)} shard(s), protocols {', '.join(protocols)}")
        results[eval_set.name] = evaluate_set(
            model, eval_set, protocols, config.batch_size, config.limit, log,
            grounder=grounder, asker=asker,
        )  # fmt: skip
    write_json(metrics_json(results), config.output)
    write_json(stats_json(results), config.output.with_suffix(".stats.json"))
    return results
