"""The annotate job's choices of what to ground and how (``--phrases``, ``--ground-answer``,
``--cot``, ``--caption-layout``, ``--propose-prompt``), checked here apart from the model stage
(``pipeline.grounding``), so that a driver checks a run's options without importing model code."""

from __future__ import annotations

from flmm.proposals import CAPTION_SLOT

PHRASES = ("auto", "selector", "lmm")


def proposer_for(phrases: str, has_selector: bool) -> str:
    """Who picks the phrases of captions and image-only samples: ``"selector"`` (the heads'
    keyword selector), ``"lmm"`` (the frozen LMM's proposals) or ``"missing"`` (``selector``
    asked for, and the heads have none). ``auto``: the selector when there is one."""
    if check_phrases(phrases) == "auto":
        return "selector" if has_selector else "lmm"
    if phrases == "selector" and not has_selector:
        return "missing"
    return phrases


def check_phrases(phrases: str) -> str:
    if phrases not in PHRASES:
        raise ValueError(f"--phrases {phrases!r}: one of {PHRASES}")
    return phrases


GROUND_ANSWERS = ("phrases", "whole")


def check_ground_answer(ground_answer: str) -> str:
    """How a question's answer is grounded: ``phrases`` picked in it (as a caption's, by
    ``--phrases``), or ``whole``, the whole answer as one phrase."""
    if ground_answer not in GROUND_ANSWERS:
        raise ValueError(f"--ground-answer {ground_answer!r}: one of {GROUND_ANSWERS}")
    return ground_answer


def check_cot(cot: bool, ground_answer: str) -> bool:
    """``--cot`` grounds the objects a question names (its evidence), not the answer, so it
    takes no ``--ground-answer whole``."""
    if cot and ground_answer == "whole":
        raise ValueError("--cot grounds the question's objects, not the answer: drop "
                         "--ground-answer whole")  # fmt: skip
    return cot


CAPTION_LAYOUTS = ("in-place", "listed")


def check_caption_layout(layout: str) -> str:
    """How the phrases picked in a caption or description are grounded: ``in-place`` in the
    text's own prefill, or ``listed`` in a second prefill as given phrases (``FLMM.listed``)."""
    if layout not in CAPTION_LAYOUTS:
        raise ValueError(f"--caption-layout {layout!r}: one of {CAPTION_LAYOUTS}")
    return layout


def check_propose_prompt(prompt: str) -> str:
    """The proposal instruction, which must hold the caption's slot once."""
    if prompt.count(CAPTION_SLOT) != 1:
        raise ValueError(f"--propose-prompt must hold {CAPTION_SLOT} once, got {prompt!r}")
    return prompt
