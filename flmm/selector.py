"""Keyword selector: which words of a free text name something visible, to be grounded.

F-LMM grounds phrases it is given. For a caption or a generated description the phrases must be
picked from the text first; F-LMM's follow-up does it with a small head over the frozen LMM's
hidden states of the text tokens (re-implemented here from that description). The same prefill
that gives the attention maps gives its input, so selecting costs no extra LMM pass.

Per text token (T tokens, L layers, width D):

    hidden [T, L, D] → layer norm per layer → softmax-weighted sum over layers → [T, D]
      → LayerNorm → 1-D convolution over tokens (C tokens of context each side) → logits [T, 3]
        over the tags O (outside), B (begins a span), I (inside a span)

The context on the right matters: a causal LMM's state at "on" cannot know whether "on the left"
(part of the expression) or "on a plain background" (not) follows.

Spans are read greedily: a span starts at a token whose most likely tag is B (or I right after
an O: a missed B does not drop the span) and runs over the following I tokens. Its confidence is
the mean probability of the tags it was read with. A span of punctuation or spaces only becomes
no phrase (``char_span`` is empty; ``flmm.model.FLMM.select`` drops it).

Character positions here (tokens' ``offsets``, gold and output character spans) are Unicode code
points of the text: Python ``str`` indices, as a fast tokenizer's offset mapping gives them, not
bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import get_args, get_type_hints

import torch
import torch.nn.functional as F
from torch import nn

from flmm.prompt import tokens_in_span
from flmm.proposals import whole_words

TAGS = ("O", "B", "I")
OUTSIDE, BEGIN, INSIDE = range(3)


@dataclass(frozen=True)
class SelectorConfig:
    """num_layers, hidden_size: the LMM's text layers and width (as ``FrozenLMM``'s);
    context: tokens seen on each side of the one tagged; min_confidence: spans read with a lower
    mean tag probability are dropped; describe_instruction: the instruction whose answers the
    selector was trained to read (asked for image-only samples; None: the grounding prompt's)."""

    num_layers: int
    hidden_size: int
    context: int = 2
    min_confidence: float = 0.5
    describe_instruction: str | None = None


@dataclass(frozen=True)
class Span:
    """Tokens ``[start, end)`` of the text's token sequence, with the selector's confidence."""

    start: int
    end: int
    confidence: float


class KeywordSelector(nn.Module):
    """BIO span tagger over the frozen LMM's per-token hidden states of every layer."""

    def __init__(self, config: SelectorConfig):
        super().__init__()
        self.config = config
        self.layer_logits = nn.Parameter(torch.zeros(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        width = 2 * config.context + 1
        self.classify = nn.Conv1d(config.hidden_size, len(TAGS), width, padding=config.context)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden ``[..., T, L, D]`` (any float dtype; T a text's tokens in order) → tag logits
        ``[..., T, 3]`` float32. mask ``[..., T]`` bool marks real tokens of padded texts: padding
        reads as zeros, as the convolution's own padding past a text's ends does."""
        per_layer = F.layer_norm(hidden.float(), (hidden.shape[-1],))
        weights = torch.softmax(self.layer_logits, dim=0)
        mixed = self.norm((per_layer * weights[:, None]).sum(dim=-2))  # [..., T, D]
        if mask is not None:
            mixed = mixed * mask[..., None]
        flat = mixed.reshape(-1, *mixed.shape[-2:]).transpose(1, 2)  # [N, D, T]
        return self.classify(flat).transpose(1, 2).reshape(*mixed.shape[:-1], len(TAGS))

    @torch.no_grad()
    def select(self, hidden: torch.Tensor) -> list[Span]:
        """The spans of one text: hidden ``[T, L, D]`` → spans in token order."""
        return read_spans(torch.softmax(self(hidden), dim=-1), self.config.min_confidence)


def tagging_every_token(config: SelectorConfig) -> KeywordSelector:
    """A selector set by hand, for tests and benches: every token tagged B, so that each token of
    a text is a span of its own (the weights read nothing; the bias picks B)."""
    selector = KeywordSelector(config)
    with torch.no_grad():
        selector.classify.weight.zero_()
        selector.classify.bias.copy_(torch.tensor([5.0 if t == "B" else 0.0 for t in TAGS]))
    return selector


def tag_loss(logits: list[torch.Tensor], tags: list[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of tag logits (per text ``[T, 3]``) against gold tags (``[T]`` long) over
    every token of the texts, each tag weighted by its inverse frequency among them (tokens
    inside spans are the minority)."""
    gold = torch.cat(tags).to(logits[0].device)
    counts = torch.bincount(gold, minlength=len(TAGS)).float().clamp(min=1)
    weight = counts.sum() / (len(TAGS) * counts)
    return F.cross_entropy(torch.cat(logits).float(), gold, weight=weight)


def read_spans(probs: torch.Tensor, min_confidence: float = 0.0) -> list[Span]:
    """probs ``[T, 3]`` tag probabilities → spans (greedy BIO reading, see the module)."""
    tags = probs.argmax(dim=-1).tolist()
    spans, t = [], 0
    while t < len(tags):
        if tags[t] == OUTSIDE:
            t += 1
            continue
        start = t
        t += 1
        while t < len(tags) and tags[t] == INSIDE:
            t += 1
        confidence = float(probs[torch.arange(start, t), torch.tensor(tags[start:t])].mean())
        if confidence >= min_confidence:
            spans.append(Span(start, t, confidence))
    return spans


def bio_tags(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> torch.Tensor:
    """Gold tags ``[T]`` (long) of tokens with character ``offsets`` (in the text) for gold
    character ``spans`` ``[start, end)`` (both in code points): a token overlapping a span
    (``flmm.prompt.tokens_in_span``) is B if it is the span's first such token, else I; every
    other token is O."""
    tags = torch.full((len(offsets),), OUTSIDE, dtype=torch.long)
    for start, end in spans:
        inside = tokens_in_span(offsets, start, end)
        if len(inside):
            tags[inside[0]] = BEGIN
            tags[inside[1:]] = INSIDE
    return tags


def char_span(offsets: list[tuple[int, int]], span: Span, text: str) -> tuple[int, int]:
    """The ``[start, end)`` characters (code points) of ``text`` that a token span covers, as
    whole words starting and ending on a letter or digit (``flmm.proposals.whole_words``: a
    token that ends inside a word takes the word; empty when the tokens cover punctuation or
    spaces only)."""
    return whole_words(text, offsets[span.start][0], offsets[span.end - 1][1])


def span_f1(predicted: list[set], gold: list[set]) -> float:
    """Micro F1 over texts: ``predicted[i]`` and ``gold[i]`` are the sets of spans (any hashable
    form, e.g. character ``(start, end)``) of text i; a hit is an exact match."""
    hits = sum(len(p & g) for p, g in zip(predicted, gold))
    n_pred, n_gold = sum(map(len, predicted)), sum(map(len, gold))
    if n_pred == 0 or n_gold == 0:
        return float(n_pred == n_gold)
    precision, recall = hits / n_pred, hits / n_gold
    return 0.0 if hits == 0 else 2 * precision * recall / (precision + recall)


PREFIX = "selector."  # the selector's tensors in a heads file, beside the heads' own
DESCRIBE_KEY = PREFIX + "describe_instruction"  # heads-file metadata: the config's instruction


def selector_state(selector: KeywordSelector) -> dict[str, torch.Tensor]:
    """The selector's tensors under ``PREFIX``, to be saved in the heads file."""
    return {PREFIX + k: v for k, v in selector.state_dict().items()}


def _is_text(name: str) -> bool:
    """Whether config field ``name`` holds a string (saved as it is, not as JSON)."""
    hint = get_type_hints(SelectorConfig)[name]
    return hint is str or str in get_args(hint)


def selector_metadata(selector: KeywordSelector) -> dict[str, str]:
    """Every field of the selector's config as heads-file metadata ``selector.<field>``: a
    string as it is, any other value as JSON; a field that is None is left out."""
    out = {}
    for f in fields(SelectorConfig):
        value = getattr(selector.config, f.name)
        if value is not None:
            out[PREFIX + f.name] = value if _is_text(f.name) else json.dumps(value)
    return out


def _read_config(own: dict[str, torch.Tensor], metadata: dict[str, str]) -> SelectorConfig:
    """The config of a selector with tensors ``own`` (``PREFIX`` removed) and heads-file
    ``metadata``. Layers, width and context are read from the tensors' shapes (``layer_logits``,
    ``norm``, the convolution's width) and must agree with the metadata; a field missing from
    the metadata (a file written before it was saved) takes its default; a ``selector.*`` key
    that names no field is refused."""
    shapes = {
        "num_layers": own["layer_logits"].shape[0],
        "hidden_size": own["norm.weight"].shape[0],
        "context": (own["classify.weight"].shape[-1] - 1) // 2,
    }
    names = {f.name for f in fields(SelectorConfig)}
    unknown = sorted(k for k in metadata if k.startswith(PREFIX) and k[len(PREFIX) :] not in names)
    if unknown:
        raise ValueError(f"keyword selector settings this code does not know: {unknown}")
    saved = {
        name: text if _is_text(name) else json.loads(text)
        for name in names
        if (text := metadata.get(PREFIX + name)) is not None
    }
    wrong = {k: (saved[k], v) for k, v in shapes.items() if k in saved and saved[k] != v}
    if wrong:
        raise ValueError(f"keyword selector settings (saved, from its tensors) disagree: {wrong}")
    return SelectorConfig(**{**saved, **shapes})


def split_selector(
    state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], KeywordSelector | None]:
    """A heads file's tensors (and string metadata) → (the heads' own, the keyword selector or
    None); the selector's config as ``_read_config`` reads it."""
    own = {k[len(PREFIX) :]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    heads = {k: v for k, v in state_dict.items() if not k.startswith(PREFIX)}
    if not own:
        return heads, None
    selector = KeywordSelector(_read_config(own, metadata or {}))
    selector.load_state_dict(own, strict=True)
    return heads, selector.eval()
