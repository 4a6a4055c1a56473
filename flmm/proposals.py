"""Phrase proposals by the frozen LMM itself: what to ground in a caption or a bare image when the
heads have no keyword selector (or ``--phrases lmm``).

Caption: the LMM is asked (``PROPOSE_PROMPT``, the caption in its ``{caption}`` slot) for the
caption's phrases that name visible things, copied verbatim, one per line; each proposal is then
found in the caption (``locate``: case-insensitive, on word boundaries, the first occurrence not
yet claimed). Bare image: the LMM lists what it sees (``LIST_PROMPT``); the items, laid out as
given phrases (``listed_text``), become the sample's text. The found spans are then grounded
(``pipeline.grounding``: laid out as given phrases, or in place in the caption's own prefill).

Spans are ``[start, end)`` Unicode code points (Python ``str`` indices) of the text.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

PROPOSE_PROMPT = (
    "Which phrases of this caption name things in the image? Copy them, one per line.\n"
    "Caption: {caption}"
)
LIST_PROMPT = "List the things you see in the image, one per line."
CAPTION_SLOT = "{caption}"

# (compared after edge punctuation is stripped; items without a letter or digit are dropped)
NONE_ANSWERS = {"none", "nothing", "n/a", "no", "no phrases"}
_NUMBERING = re.compile(r"^\s*(?:\(?\d{1,3}[.):]|[-*•·–—]|#)\s*")
_QUOTES = "\"'`“”‘’«»"
_EDGE_PUNCTUATION = ".,;:!?" + _QUOTES


def parse_proposals(answer: str) -> list[str]:
    """An LMM's answer → its proposed phrases, in order, each once (case-insensitive).

    Items are split at line breaks, then at ``;`` and ``,``, and at sentence ends (a period
    followed by a space: a list written as ``the red circle. the blue star.``); numbering
    (``1.``, ``2)``) and bullets (``-``, ``*``, ``•``) are removed from the start of each line;
    quotes, whitespace and trailing punctuation from both ends of each item. Empty items and
    ``none``-like answers are dropped."""
    items = []
    for line in answer.splitlines():
        line = _NUMBERING.sub("", line)
        for part in re.split(r"[;,]|\.\s+", line):
            item = part.strip().strip(_EDGE_PUNCTUATION).strip()
            if item and item.lower() not in NONE_ANSWERS and has_word(item):
                items.append(item)
    seen, out = set(), []
    for item in items:
        if item.lower() not in seen:
            seen.add(item.lower())
            out.append(item)
    return out


def has_word(text: str) -> bool:
    """Whether ``text`` holds a letter or digit (of any script)."""
    return any(ch.isalnum() for ch in text)


@dataclass(frozen=True)
class Located:
    """Proposals found in a text: their ``[start, end)`` spans in text order, and the proposals
    that were not found verbatim (on word boundaries, clear of spans already claimed)."""

    spans: list[tuple[int, int]]
    missing: list[str]


def locate(text: str, proposals: list[str]) -> Located:
    """Each proposal's first occurrence in ``text`` (case-insensitive, on word boundaries) that
    overlaps no span claimed by an earlier proposal; spans returned in text order. A combining
    mark (``in_word``) next to an occurrence continues a word: no boundary there."""
    claimed: list[tuple[int, int]] = []
    missing = []
    for proposal in proposals:
        pattern = re.compile(r"(?<!\w)" + re.escape(proposal) + r"(?!\w)", re.IGNORECASE)
        for match in pattern.finditer(text):
            span = match.span()
            if _joins_marks(text, *span):
                continue
            if not any(span[0] < end and span[1] > start for start, end in claimed):
                claimed.append(span)
                break
        else:
            missing.append(proposal)
    return Located(sorted(claimed), missing)


def _joins_marks(text: str, start: int, end: int) -> bool:
    """Whether ``text[start:end]`` is part of a longer word through a combining mark at either
    end (``\\w`` matches no mark: "पढ़" in "पढ़ो", "cafe" in NFD "café")."""
    before = start > 0 and _is_mark(text[start - 1])
    return before or (end < len(text) and _is_mark(text[end]))


def _is_mark(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "M"


def in_word(ch: str) -> bool:
    """Whether ``ch`` is part of a word: a letter or digit of any script, or a combining mark
    (Unicode category M: an accent, a vowel sign, which ``isalnum`` is not)."""
    return ch.isalnum() or _is_mark(ch)


def listed_text(items: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Listed items as one text, laid out as F-LMM lays out given phrases (``"p1. p2."``), and
    each item's span in it."""
    text, spans = "", []
    for item in items:
        if text:
            text += " "
        spans.append((len(text), len(text) + len(item)))
        text += item + "."
    return text, spans


def whole_words(text: str, start: int, end: int) -> tuple[int, int]:
    """``[start, end)`` widened to whole words (a span that cuts a word takes all of it), then
    trimmed to start on a letter or digit and end on one or on its combining marks (``in_word``;
    whitespace, punctuation, quotes and brackets at either end dropped); ``(start, start)``,
    empty, if no letter or digit is left."""
    while 0 < start < len(text) and in_word(text[start - 1]) and in_word(text[start]):
        start -= 1
    while 0 < end < len(text) and in_word(text[end - 1]) and in_word(text[end]):
        end += 1
    while start < end and not text[start].isalnum():
        start += 1
    while end > start and not in_word(text[end - 1]):
        end -= 1
    return start, end
