"""The model stage: a Ray actor holding one F-LMM, grounding decoded samples in batches.

``GroundingActor`` is a callable class for ``Dataset.map_batches``: built once per actor from a
``ModelSpec`` (on the GPU Ray gives it, else CPU), called on ``DECODED_SCHEMA`` batches, returning
``RESULT_SCHEMA`` rows: one per sample, the phrase annotations as parallel lists. Error and
shard-level rows pass through unchanged. A batch the model raises on is retried sample by
sample, so one bad sample becomes a ``model_error`` row and the rest of the batch is kept.

What a sample grounds (``DECODED_SCHEMA.source``): its given phrases; or, in a caption, the
spans picked by the keyword selector (from the caption's own prefill) or proposed by the frozen
LMM (``flmm.proposals``: one batched greedy ``generate`` of the batch's captions, the proposals
found in the caption and grounded in place); or, for an image-only sample, the spans the selector
picks in a description the LMM writes first, or every item of a list of what the LMM sees; or,
for a question sample, the LMM's answer to the question (one batched greedy ``generate`` of the
batch's questions) taken as the text whose phrases are picked, by the selector or the LMM's
proposals as a caption's, or grounded whole (``ground_answer="whole"``); ``in-place``, the
answer is prefilled in its conversation (image + question → answer, ``FLMM.prepare_text``'s
``instruction``) and grounded there; ``listed``, as a caption is. With ``cot``
(visual chain-of-thought, ``flmm.cot``), a question sample is looked at twice: first the
objects its question names are grounded (the question is the text their phrases are picked in,
as a caption's), then the LMM answers the question from its view of the box around those masks
(``flmm.cot.evidence_box``, ``second_view``; the whole image when there are none); the sample's
source is ``evidence``, its rows the evidence masks. ``--phrases`` (``proposer_for``): ``auto``
takes the selector when the heads file has one and the LMM otherwise; ``selector`` without one
makes caption and image-only samples ``no_selector`` error rows.

Postprocessing (``annotate_logits``): mask = sigmoid(refined) > threshold in the original image
frame, as COCO RLE; bbox = the mask's tight box, XYWH pixels (zeros for an empty mask); score =
the mean probability over the mask's pixels (0 for an empty mask), a confidence in [threshold, 1].
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pycocotools.mask as mask_utils
import ray
import torch

from flmm.cot import Box, CropConfig, evidence_box, second_view, xywh
from flmm.heads import FLMMHeads
from flmm.proposals import (
    CAPTION_SLOT,
    LIST_PROMPT,
    PROPOSE_PROMPT,
    has_word,
    listed_text,
    locate,
    parse_proposals,
    whole_words,
)
from pipeline.decode import pixels_of
from pipeline.modes import (
    check_caption_layout,
    check_cot,
    check_ground_answer,
    check_propose_prompt,
    proposer_for,
)
from pipeline.spec import ModelSpec
from schemas.results import RESULT_SCHEMA, STAGES

PASSED_THROUGH = ("shard", "key", "n_samples", "status", "error_kind", "error", "height", "width")
PASSED_THROUGH += ("phrases", "text", "question", "source", "warning", "shard_error")
PASSED_THROUGH += ("read_s", "decode_s")


def annotate_logits(logits: torch.Tensor, threshold: float = 0.5):
    """logits ``[P, 1, H, W]`` (original frame) → RLE counts (P str), bboxes float32 ``[P, 4]``
    XYWH pixels, scores float32 ``[P]`` (mean probability inside each mask)."""
    prob = torch.sigmoid(logits[:, 0].float()).cpu()
    masks = prob > threshold
    stacked = np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8))  # [H, W, P]
    rles = mask_utils.encode(stacked)
    bboxes = mask_utils.toBbox(rles).astype(np.float32).reshape(-1, 4)
    area = masks.flatten(1).sum(1)
    scores = (prob * masks).flatten(1).sum(1) / area.clamp(min=1)
    counts = [rle["counts"].decode("ascii") for rle in rles]
    return counts, bboxes, scores.numpy().astype(np.float32)


def masks_of(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``[P, 1, H, W]`` logits → ``[P, H, W]`` bool masks, sigmoid > ``threshold``."""
    return logits[:, 0].float().sigmoid() > threshold


def question_rows(questions: list[str]) -> list[dict]:
    """Ok question samples as ``GroundingActor.run`` reads them (the decoded row's fields it
    uses), one per question: how the evaluation and the benches ask a batch outside the job."""
    return [
        {"source": "answer", "question": q, "text": "", "phrases": [], "warning": ""}
        for q in questions
    ]


def _in_ray_actor() -> bool:
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


class GroundingActor:
    """One F-LMM per actor. Resources (``num_gpus``, pool size, batch size) are declared where
    the stage is added, in ``pipeline.annotate``."""

    def __init__(
        self,
        spec: ModelSpec,
        threshold: float = 0.5,
        max_new_tokens: int = 64,
        describe_prompt: str | None = None,
        phrases: str = "auto",
        propose_prompt: str = PROPOSE_PROMPT,
        list_prompt: str = LIST_PROMPT,
        caption_layout: str = "listed",
        ground_answer: str = "phrases",
        cot: bool = False,
        cot_crop: CropConfig | None = None,
        threads: int = 0,
        model=None,
    ):
        if model is None and spec.resolved_device().type == "cpu" and _in_ray_actor():
            # ``threads`` intra-op threads (``pipeline.annotate.fitted``: the actor's share of
            # the cluster's cores), never more than this node's cores: more threads than cores
            # makes each op wait on the slowest thread. 0: one per CPU Ray gave this actor.
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
            torch.set_num_threads(min(threads or max(1, round(cpus)), os.cpu_count() or 1))
        self.spec = spec
        self.model = model
        if model is None:  # (a given model, the evaluation's, is used as it is)
            self.model = spec.build()
            # NHWC convolutions for the U-Net, most of the heads' time at small LMMs: faster on
            # CPU, the same logits to rounding (measured in bench/NOTES.md)
            if isinstance(self.model.heads, FLMMHeads):  # (localization heads have no U-Net)
                self.model.heads.mask_decoder.to(memory_format=torch.channels_last)
        self.threshold = threshold
        self.max_new_tokens = max_new_tokens
        self.describe_prompt = describe_prompt
        self.proposer = proposer_for(phrases, self.model.selector is not None)
        self.propose_prompt = check_propose_prompt(propose_prompt)
        self.list_prompt = list_prompt
        self.caption_layout = check_caption_layout(caption_layout)
        self.ground_answer = check_ground_answer(ground_answer)
        self.cot = check_cot(cot, ground_answer)
        self.cot_crop = cot_crop or CropConfig()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._check_selector(row) for row in batch.to_pylist()]
        ok = [row for row in rows if row["status"] == "ok"]
        start = time.perf_counter()
        outcomes = self._ground(ok)
        share = (time.perf_counter() - start) / max(1, len(ok))
        results = iter(outcomes)  # one per ok row, in order: matched by position
        out = []
        for row in rows:
            result = {name: row[name] for name in PASSED_THROUGH}
            result.update(counts=[], bboxes=[], scores=[], mask_size=[], model_s=0.0)
            result.update(spans=[], selector_scores=[], proposer="", answer="", evidence_box=[])
            result.update(dict.fromkeys(STAGES, 0.0))
            if row["status"] == "ok":
                result["model_s"] = share
                outcome = next(results)
                if isinstance(outcome, Exception):
                    error = f"{type(outcome).__name__}: {outcome}"
                    result.update(status="error", error_kind="model_error", error=error)
                else:
                    result.update(outcome)
            out.append(result)
        return pa.Table.from_pylist(out, RESULT_SCHEMA)

    def _check_selector(self, row: dict) -> dict:
        """With ``--phrases selector``, a caption / image-only / question row becomes a
        ``no_selector`` error row when the heads have no keyword selector (a question whose
        answer is grounded whole needs none)."""
        if row["status"] != "ok" or row["source"] == "given" or self.proposer != "missing":
            return row
        if row["source"] == "answer" and self.ground_answer == "whole" and not self.cot:
            return row
        error = (
            f"a {row['source']} sample needs a keyword selector with --phrases selector, and the "
            "heads file has none: give heads trained with a selector, `phrases`, or --phrases lmm"
        )
        return {**row, "status": "error", "error_kind": "no_selector", "error": error}

    def _ground(self, rows: list[dict]) -> list[dict | Exception]:
        """Per row, in order: its annotations, or the exception the model raised on it alone.
        Rows are matched by position, never by key: keys repeat across shards, and one batch
        can hold rows of several shards."""
        if not rows:
            return []
        try:
            return self._forward(rows)
        except Exception as error:  # noqa: BLE001 - isolate the failing sample(s) below
            if len(rows) == 1:
                return [error]
        return [self._forward_or_error(row) for row in rows]

    def _forward_or_error(self, row: dict) -> dict | Exception:
        try:
            return self._forward([row])[0]
        except Exception as error:  # noqa: BLE001 - becomes a model_error row
            return error

    def _forward(self, rows: list[dict]) -> list[dict]:
        """The model stage by stage (descriptions of image-only samples, one batched LMM prefill
        and ``FLMM.select``, one SAM encoding per image, ``FLMM.decode_selected``: the heads
        over all phrases), each stage timed; per
        sample: annotations + stage shares. A generated description that is empty grounds
        nothing (ok, 0 annotations, a warning)."""
        clock = _StageClock(self.model.image_encoder.pixel_mean.device)
        with torch.inference_mode():
            images = [torch.from_numpy(pixels_of(r).copy()) for r in rows]
            texts, todo, selections, groundings = self.run(rows, images, clock)
            out = [self._empty_result(row, text) for row, text in zip(rows, texts)]
            for b, selection, grounding in zip(todo, selections, groundings):
                out[b].update(self._annotations(rows[b], texts[b].text, selection, grounding))
        clock.mark("post_s")
        shares = {stage: seconds / len(rows) for stage, seconds in clock.seconds.items()}
        return [{**o, **shares} for o in out]

    def run(self, rows: list[dict], images: list[torch.Tensor], clock: _StageClock | None = None):
        """The model over ok rows (``images``: theirs, ``[H, W, 3]`` uint8 tensors): per row its
        ``Text``; the rows with something to ground (indices), and for each its ``Selection``
        and ``Grounding`` (logits in the original frame). Call under ``torch.inference_mode``;
        the ``clock``'s stages are marked as they end."""
        clock = clock or _StageClock(torch.device("cpu"))
        model = self.model
        texts = self._texts(rows, images)
        clock.mark("describe_s")
        todo = [b for b, t in enumerate(texts) if rows[b]["source"] == "given" or t.groundable]
        inputs = [self._input(images[b], rows[b], texts[b]) for b in todo]
        clock.mark("prepare_s")
        selections, groundings = [], []
        if inputs:
            lmm_out = model.lmm([x.lmm for x in inputs])
            selections = model.select(inputs, lmm_out)
            if self.caption_layout == "listed":  # (the selector's spans: a second prefill)
                selections = model.listed(inputs, selections)
            clock.mark("lmm_s")
            embeddings = model.encode_images(inputs)
            clock.mark("sam_s")
            groundings = model.decode_selected(inputs, selections, embeddings)
            clock.mark("heads_s")
        if self.cot:  # (questions whose first look picked nothing are answered too)
            self._look_again(rows, images, texts, dict(zip(todo, groundings)))
            clock.mark("describe_s")
        return texts, todo, selections, groundings

    def _look_again(self, rows: list[dict], images, texts: list[Text], found: dict) -> None:
        """``cot``'s second look, in place of ``texts``: every question row's question answered
        (one batched generation) from the crop around its evidence masks (``found``: row index →
        its ``Grounding``; ``sigmoid(refined) > threshold`` as written), or from the whole image
        when it has none (a warning); each row's ``Text`` gains its answer and crop box."""
        asked = [b for b, r in enumerate(rows) if r["source"] == "answer"]
        if not asked:
            return
        boxes: dict[int, Box | None] = dict.fromkeys(asked)
        for b in asked:
            grounding = found.get(b)  # (None: nothing picked in the question, or not grounded)
            if grounding is not None:
                boxes[b] = evidence_box(masks_of(grounding.refined, self.threshold), self.cot_crop)
        views = [
            images[b] if boxes[b] is None else second_view(images[b], boxes[b], self.cot_crop)
            for b in asked
        ]
        questions = [rows[b]["question"] for b in asked]
        answers = self.model.lmm.answer(views, questions, self.max_new_tokens)
        for b, answer in zip(asked, answers):
            warning = texts[b].warning
            if boxes[b] is None:
                warning = "; ".join(w for w in (warning, NO_EVIDENCE) if w)
            texts[b] = replace(texts[b], answer=answer, box=boxes[b], warning=warning)

    def _input(self, image: torch.Tensor, row: dict, text: Text):
        """The model's input for a row: its given phrases, or its text (with the spans proposed
        before the prefill, laid out as given phrases under the listed layout)."""
        if row["source"] == "given":
            return self.model.prepare(image, row["phrases"])
        listed = self.caption_layout == "listed"
        # in place, an answer is prefilled in its conversation (image + question → answer);
        # listed, its phrases are picked as a caption's, under the grounding prompt (the toy
        # selector picks an answer's phrases there, and mostly "the" in the conversation)
        in_conversation = row["source"] == "answer" and not listed and not self.cot
        question = row["question"] if in_conversation else None
        return self.model.prepare_text(image, text.text, text.spans, listed, question)

    def _annotations(self, row: dict, text: str, selection, grounding) -> dict:
        """The phrase lists of one sample: its phrases (selected ones: their text, span and
        confidence) and, per phrase, RLE counts, box and score."""
        result = {}
        if row["source"] != "given":
            result["phrases"] = [text[a:b] for a, b in selection.spans]
            result["spans"] = [list(span) for span in selection.spans]
            result["selector_scores"] = selection.confidences
        if grounding is not None:
            counts, bboxes, scores = annotate_logits(grounding.refined, self.threshold)
            result.update(counts=counts, bboxes=bboxes.tolist(), scores=scores.tolist())
            result["mask_size"] = list(grounding.refined.shape[-2:])
        return result

    def _texts(self, rows: list[dict], images: list[torch.Tensor]) -> list[Text]:
        """Per row, the text to ground phrases in and how they are picked: given phrases; a
        caption, a generated description or a question's answer (one batched generation for
        all question rows) whose spans the keyword selector picks; or, with LMM proposals, the
        caption's or answer's spans the LMM proposed (one batched generation for all of them)
        or the list of what the LMM sees (one for all image-only rows); or the whole answer."""
        texts = [Text(r["text"]) if r["source"] == "caption" else Text("") for r in rows]
        asked = [b for b, r in enumerate(rows) if r["source"] == "answer"]
        if self.cot:  # the first look grounds the objects the question names; answered later
            for b in asked:
                texts[b] = Text(rows[b]["question"])
            asked = []
        questions = [rows[b]["question"] for b in asked]
        for b, answer in zip(asked, self._ask(images, asked, questions)):
            texts[b] = self._answer_text(answer)
        generated = [b for b, r in enumerate(rows) if r["source"] == "generated"]
        if self.proposer == "lmm":
            picks = [b for b, t in enumerate(texts) if t.text and t.spans is None]
            asks = [self.propose_prompt.replace(CAPTION_SLOT, texts[b].text) for b in picks]
            for b, answer in zip(picks, self._ask(images, picks, asks)):
                texts[b] = proposed_text(texts[b].text, answer, self._source(rows[b]))
            asks = [self.list_prompt] * len(generated)
            for b, answer in zip(generated, self._ask(images, generated, asks)):
                texts[b] = listed(answer)
        elif generated:
            instruction = self._describe_instruction()
            descriptions = self.model.lmm.describe(
                [images[b] for b in generated], self.max_new_tokens, instruction
            )
            for b, description in zip(generated, descriptions):
                texts[b] = Text(description, warning="" if description else EMPTY_DESCRIPTION)
        return texts

    def _answer_text(self, answer: str) -> Text:
        """A question's answer → the text to pick its phrases in (spans None: picked later), or
        with ``ground_answer="whole"`` the answer as one span (its words, edge punctuation
        trimmed: ``whole_words``); an answer with no word grounds nothing (a warning)."""
        if not has_word(answer):
            return Text(answer, [], "the LMM's answer is empty" if not answer else NO_WORD)
        if self.ground_answer == "phrases":
            return Text(answer)
        return Text(answer, [whole_words(answer, 0, len(answer))])

    def _ask(self, images, rows: list[int], instructions: list[str]) -> list[str]:
        """The LMM's answers for ``rows`` (indices into the batch), one instruction each; one
        batched generation, none for no rows."""
        if not rows:
            return []
        return self.model.lmm.answer([images[b] for b in rows], instructions, self.max_new_tokens)

    def _source(self, row: dict) -> str:
        """The source a row's results are written under: its own, or ``evidence`` for a
        question sample looked at twice (``cot``)."""
        return "evidence" if self.cot and row["source"] == "answer" else row["source"]

    def _describe_instruction(self) -> str | None:
        """``--describe-prompt``, else the instruction the selector was trained to read, else
        None (the grounding prompt's)."""
        if self.describe_prompt is not None:
            return self.describe_prompt
        return self.model.selector.config.describe_instruction if self.model.selector else None

    def _empty_result(self, row: dict, text: Text) -> dict:
        """An ok sample's result before grounding: no phrase grounded yet, masks of its own
        size, the text its phrases are picked from, and who picks them."""
        empty = {"counts": [], "bboxes": [], "scores": [], "spans": [], "selector_scores": []}
        given, source = row["source"] == "given", self._source(row)
        phrases = row["phrases"] if given else []
        warning = "; ".join(w for w in (row["warning"], text.warning) if w)
        proposer = "" if given else self.proposer
        if source == "answer" and self.ground_answer == "whole":
            proposer = "whole"
        answer = {"answer": text.text, "evidence": text.answer}.get(source, "")
        box = xywh(text.box) if text.box is not None else []
        return {**empty, "phrases": phrases, "mask_size": [row["height"], row["width"]],
                "text": text.text, "answer": answer, "warning": warning, "source": source,
                "proposer": proposer, "evidence_box": box}  # fmt: skip


EMPTY_DESCRIPTION = "the generated description is empty"
NO_EVIDENCE = "no evidence found for the question's objects: answered from the whole image"
NO_WORD = "the LMM's answer holds no word to ground"


@dataclass(frozen=True)
class Text:
    """The text a sample's phrases are picked from ("" for given phrases), the spans to ground
    in it when proposed before the prefill (None: the selector picks them), and a warning; under
    ``cot``, a question's text is the question, and the second look adds the answer and the
    box it was answered from (original pixels, ``flmm.cot``; None: the whole image)."""

    text: str
    spans: list[tuple[int, int]] | None = None
    warning: str = ""
    answer: str = ""
    box: Box | None = None

    @property
    def groundable(self) -> bool:
        """Whether a text sample has anything to ground: a text to select from, or spans."""
        return bool(self.text.strip()) if self.spans is None else bool(self.spans)


def proposed_text(caption: str, answer: str, source: str = "caption") -> Text:
    """A caption (or a question's answer: ``source`` "answer") and the LMM's answer to the
    proposal instruction → the text with the spans of the proposals found in it; the ones not
    found are named in the warning."""
    proposals = parse_proposals(answer)
    located = locate(caption, proposals)
    warning = ""
    if located.missing:
        names = ", ".join(repr(p[:40]) for p in located.missing[:5])
        where = {"answer": "answer", "evidence": "question"}.get(source, "caption")
        warning = f"{len(located.missing)} proposed phrase(s) not in the {where}: {names}"
    elif not proposals:
        warning = "the LMM proposed no phrase"
    return Text(caption, located.spans, warning)


def listed(answer: str) -> Text:
    """The LMM's list of what it sees → the items as one text (``"p1. p2."``) with their spans."""
    items = parse_proposals(answer)
    if not items:
        return Text("", [], "the LMM listed nothing")
    text, spans = listed_text(items)
    return Text(text, spans)


class _StageClock:
    """Seconds between successive ``mark(stage)`` calls; on CUDA each mark synchronises first,
    so that a stage's time is its kernels' time, not their launch."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def mark(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.last
        self.last = now
