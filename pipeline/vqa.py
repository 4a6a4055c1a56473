"""The ``vqa`` evaluation protocol: answer accuracy of the frozen LMM, without and with visual
chain-of-thought (``--cot``, ``flmm.cot``).

Per sample (any eval shard whose JSON has ``question`` and ``answers``, a list of the accepted
answers; optional ``subset``, a name or a list of names the sample is also scored under): the LMM answers the
question from the whole image (output ``plain``: one batched greedy generation,
``FrozenLMM.answer``), and as the annotation job's ``--cot`` does (output ``cot``: the objects
the question names grounded, the question answered again from their crop;
``pipeline.grounding.GroundingActor``). An answer is right when, normalised
(``normalize_answer``), it equals one of the accepted answers normalised.

Scores (``metrics.json``): ``<set>/vqa`` over all samples and ``<set>/vqa-<subset>`` per subset,
each ``{"plain": {"accuracy", "n"}, "cot": {"accuracy", "n", "cropped"}}`` (``cropped``: the
fraction answered from a crop, the rest had no evidence and were answered from the whole image).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from flmm.cot import CropConfig
from pipeline.decode import SampleError
from pipeline.grounding import GroundingActor, question_rows

VQA = "vqa"
VQA_OUTPUTS = ("plain", "cot")
ARTICLES = {"a", "an", "the"}


def normalize_answer(answer: str) -> str:
    """Lower case, punctuation to spaces, leading articles dropped, whitespace collapsed:
    ``" The Red circle."`` → ``"red circle"``."""
    words = re.sub(r"[^\w\s]", " ", answer.lower()).split()
    while words and words[0] in ARTICLES:
        words = words[1:]
    return " ".join(words)


class AnswerAccuracy:
    """The fraction of right answers; for the ``cot`` output, also the fraction of answers given
    from a crop."""

    def __init__(self) -> None:
        self.right = 0
        self.n = 0
        self.cropped = 0

    def update(self, answer: str, accepted: list[str], cropped: bool = False) -> None:
        self.right += normalize_answer(answer) in {normalize_answer(a) for a in accepted}
        self.cropped += cropped
        self.n += 1

    def result(self) -> dict:
        """``{"accuracy", "n", "cropped"}`` (fractions; 0 for no sample)."""
        n = max(self.n, 1)
        return {"accuracy": self.right / n, "n": self.n, "cropped": self.cropped / n}


def vqa_fields(meta: dict) -> tuple[str, list[str], list[str]]:
    """A sample's ``question`` (stripped), ``answers`` (accepted answers) and subsets (``subset``
    as a list; none when missing). Raises SampleError: ``no_question`` (missing or blank
    question), ``bad_text`` (a question that is not a string, ``answers`` not a non-empty list
    of strings, a ``subset`` that is not a non-empty string or a list of them)."""
    question, answers, subset = meta.get("question"), meta.get("answers"), meta.get("subset")
    if question is None or isinstance(question, str) and not question.strip():
        raise SampleError("no_question", "the sample has no question")
    if not isinstance(question, str):
        raise SampleError("bad_text", "`question` must be a string")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise SampleError("bad_text", "`answers` must be a non-empty list of strings")
    subsets = [subset] if isinstance(subset, str) else [] if subset is None else subset
    if not isinstance(subsets, list) or not all(isinstance(s, str) and s for s in subsets):
        raise SampleError("bad_text", "`subset` must be a non-empty string or a list of them")
    return question.strip(), answers, subsets


def vqa_outputs() -> dict[str, AnswerAccuracy]:
    """One score's accumulators (``vqa`` or a ``vqa-<subset>``): one per ``VQA_OUTPUTS``."""
    return {output: AnswerAccuracy() for output in VQA_OUTPUTS}


class VQAAsker:
    """A batch's questions answered from the whole image and with ``--cot``, over the
    evaluation's model (the annotation job's ``GroundingActor``: the heads' keyword selector,
    else the LMM's proposals, pick the question's objects)."""

    def __init__(self, model, max_new_tokens: int = 64, crop: CropConfig | None = None):
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.actor = GroundingActor(
            None, max_new_tokens=max_new_tokens, cot=True, cot_crop=crop, model=model
        )

    def __call__(self, images: list[np.ndarray], questions: list[str]):
        """Per image ``[H, W, 3]`` uint8 and its question: ``(plain, cot, box)``, the answers
        from the whole image and from the evidence crop, and the crop's box (None: whole)."""
        tensors = [torch.from_numpy(image) for image in images]
        plain = self.plain(tensors, questions)
        return [(p, *looked) for p, looked in zip(plain, self.cot(tensors, questions))]

    def plain(self, images: list[torch.Tensor], questions: list[str]) -> list[str]:
        """The answers from the whole images (``[H, W, 3]`` uint8 tensors): one generation."""
        return self.model.lmm.answer(images, questions, self.max_new_tokens)

    def cot(self, images: list[torch.Tensor], questions: list[str]) -> list[tuple]:
        """Per image its ``--cot`` answer and the box it was given from (None: the whole
        image)."""
        with torch.inference_mode():
            texts, *_ = self.actor.run(question_rows(questions), images)
        return [(t.answer, t.box) for t in texts]


def score_batch(asker: VQAAsker, batch: list, metrics: dict) -> int:
    """Ask a batch of VQA samples (``EvalSample``s with ``answers``) both ways and score each,
    overall and in its subset (the accumulator is made on first sight); returns the number of
    questions (one per sample)."""
    answered = asker([x.image for x in batch], [x.question for x in batch])
    for sample, (plain, cot, box) in zip(batch, answered):
        keys = [VQA, *(f"{VQA}-{subset}" for subset in sample.subset)]
        for key in keys:
            outputs = metrics.setdefault(key, vqa_outputs())
            outputs["plain"].update(plain, sample.answers)
            outputs["cot"].update(cot, sample.answers, cropped=box is not None)
    return len(batch)
