"""Prompt layout and phrase → token positions (F-LMM §3.1, grounding the words of a response).

F-LMM places the phrases to ground in the assistant's turn, after the user's turn with the image and
an instruction:  ``<chat template: image + instruction> {p1}. {p2}. …``. Each phrase's tokens are
found from its character span with the tokenizer's offset mapping, so any fast tokenizer works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MERGES = ("mean", "max")
# The instruction of every config F-LMM released heads for (LLaVA-1.5, LLaVA-NeXT, DeepSeek-VL):
# their heads read attention under it, so it is the default here.
FLMM_INSTRUCTION = "Please give me a description of the image."
PROMPT_KEY = "prompt"  # heads files' metadata: the instruction the heads were trained under


@dataclass(frozen=True)
class PromptConfig:
    """instruction: the user's text beside the image (default F-LMM's); merge: how a phrase's
    token rows combine."""

    instruction: str = FLMM_INSTRUCTION
    merge: str = "mean"

    def __post_init__(self):
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")


class PromptLayout:
    """The fixed prefix of every prompt (chat template up to the assistant's turn), built once."""

    def __init__(self, processor, config: PromptConfig):
        if not getattr(processor, "chat_template", None):
            raise ValueError("the processor has no chat template; save one with the checkpoint")
        conversation = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": config.instruction}],
            }
        ]
        self.prefix = processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
        self.image_token = processor.image_token
        if self.prefix.count(self.image_token) != 1:
            raise ValueError(f"chat template must place one {self.image_token!r}: {self.prefix!r}")
        self.tokenizer = processor.tokenizer

    def expanded_prefix(self, n_image_tokens: int) -> str:
        """The prefix with its one image placeholder repeated for the image's tokens."""
        return self.prefix.replace(self.image_token, self.image_token * n_image_tokens)


@dataclass
class Prompt:
    """text: the full prompt with image tokens expanded; input_ids ``[T]``;
    phrase_tokens: per phrase, LongTensor of its token positions in input_ids."""

    text: str
    input_ids: torch.Tensor
    phrase_tokens: list[torch.Tensor]


def answer_text(phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """``" p1. p2."`` and each phrase's [start, end) character span (code points) in it."""
    if not phrases:
        raise ValueError("no phrases to ground")
    text, spans = "", []
    for phrase in phrases:
        phrase = phrase.strip()
        if not phrase:
            raise ValueError("empty phrase")
        text += " "
        spans.append((len(text), len(text) + len(phrase)))
        text += phrase + "."
    return text, spans


def tokens_in_span(offsets: list[tuple[int, int]], start: int, end: int) -> torch.Tensor:
    """Positions (long ``[n]``) of the tokens whose character range overlaps [start, end):
    ``s < end and e > start`` for a token's ``(s, e)``; a token with no characters (``s == e``,
    a special token) overlaps nothing. Offsets and span in the same frame, in Unicode code points
    (Python ``str`` indices, as a fast tokenizer's offset mapping gives them)."""
    hits = [i for i, (s, e) in enumerate(offsets) if s < end and e > start and e > s]
    return torch.tensor(hits, dtype=torch.long)


def span_slots(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[slice | None]:
    """Per ``[start, end)`` character span of a text whose tokens have ``offsets``, the range of
    its tokens (first to last overlapping one; a text prompt's query slot i is its token i,
    ``build_text_prompt``), or None for a span that no token overlaps."""
    slots = []
    for start, end in spans:
        tokens = tokens_in_span(offsets, start, end)
        slots.append(slice(int(tokens[0]), int(tokens[-1]) + 1) if len(tokens) else None)
    return slots


def build_prompt(layout: PromptLayout, phrases: list[str], n_image_tokens: int) -> Prompt:
    """Tokenise ``prefix + answer`` with the image placeholder expanded to ``n_image_tokens``."""
    answer, spans = answer_text(phrases)
    prefix = layout.expanded_prefix(n_image_tokens)
    text = prefix + answer
    enc = layout.tokenizer(text, return_offsets_mapping=True)
    phrase_tokens = []
    for phrase, (start, end) in zip(phrases, spans):
        positions = tokens_in_span(enc["offset_mapping"], len(prefix) + start, len(prefix) + end)
        if len(positions) == 0:
            raise ValueError(f"phrase {phrase!r} maps to no token")
        phrase_tokens.append(positions)
    return Prompt(text, torch.tensor(enc["input_ids"], dtype=torch.long), phrase_tokens)


def build_text_prompt(
    layout: PromptLayout, text: str, n_image_tokens: int
) -> tuple[Prompt, list[tuple[int, int]]]:
    """The prompt whose answer is ``" " + text`` (a caption or a generated description) with
    every token of the text as one query group (``phrase_tokens == [positions]``, so that one
    prefill captures them all), and each of those tokens' ``[start, end)`` characters in
    ``text`` (a token's range may include the space before it)."""
    if not text.strip():
        raise ValueError("empty text")
    prefix = layout.expanded_prefix(n_image_tokens)
    start = len(prefix) + 1
    enc = layout.tokenizer(prefix + " " + text, return_offsets_mapping=True)
    positions = tokens_in_span(enc["offset_mapping"], start, start + len(text))
    if len(positions) == 0:
        raise ValueError(f"text {text[:40]!r} maps to no token")
    offsets = [
        (max(0, s - start), max(0, e - start))
        for s, e in (enc["offset_mapping"][i] for i in positions.tolist())
    ]
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    return Prompt(prefix + " " + text, ids, [positions]), offsets
