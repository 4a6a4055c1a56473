"""F-LMM end to end (§3): frozen LMM → attention maps → U-Net → SAM refiner, and its training loss.

Data path for a batch of B images with P_b phrases each:

    LMM prefill (batched)        → attention [P_b, L·H, h, w], hidden [n_tok, L, D] per phrase
    SAM image encoder (batched)  → embedding [1, C, He, We] per image, shared by its phrases
    U-Net (all ΣP_b at once)     → logits [P_b, 1, h', w'] in the square frame
      crop to the image region   → ``unet`` [P_b, 1, hc, wc]; resized → ``coarse`` [P_b, 1, H, W]
    SAM refiner (per image)      → ``refined`` [P_b, 1, H, W] in the original frame

Free text (a caption, a generated description) instead of phrases: the prefill captures every
token of the text; the keyword selector reads the tokens' hidden states and picks the spans to
ground; each span's attention maps and hidden states are taken from that same prefill
(``select``), so the text costs one prefill however many spans it holds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch import nn

from flmm.heads import FLMMHeads, Grounding
from flmm.lmm import FrozenLMM, LMMSample
from flmm.losses import mask_losses
from flmm.prompt import span_slots
from flmm.sam import SamImageEncoder
from flmm.selector import KeywordSelector, char_span, tag_loss


@dataclass
class GroundingInput:
    """One image prepared for both frozen encoders (CPU tensors).

    lmm: the LMM's sample (pixels, prompt ids, phrase tokens, geometry);
    sam_pixels ``[1, 3, S, S]`` in SAM's input frame; sam_input_size (h1, w1) before padding;
    text: the free text of a text input (phrases to be selected), None for given phrases;
    text_offsets: each text token's ``[start, end)`` characters in ``text`` (None when the
    spans were prepared listed, as given phrases: ``prepare_text``);
    spans: the ``[start, end)`` characters of ``text`` to ground, when proposed before the
    prefill (``flmm.proposals``); None: the keyword selector picks them from the prefill.
    """

    lmm: LMMSample
    sam_pixels: torch.Tensor
    sam_input_size: tuple[int, int]
    text: str | None = None
    text_offsets: list[tuple[int, int]] | None = None
    spans: list[tuple[int, int]] | None = None


@dataclass
class Selection:
    """What one input grounds: attention ``[P, L·H, h, w]``, hidden per phrase ``[n_tok, L, D]``;
    for a text input, the selected phrases' ``[start, end)`` characters in the text and the
    selector's confidences (empty lists for given phrases; None per proposed span)."""

    attention: torch.Tensor
    hidden: list[torch.Tensor]
    spans: list[tuple[int, int]]
    confidences: list[float | None]


class FLMM(nn.Module):
    """Frozen LMM + frozen SAM image encoder + trainable heads.

    autocast_dtype: None (SAM and the heads compute in their weights' dtype, float32), or a
    reduced dtype (``torch.bfloat16``) that the SAM encoder and the heads compute in under
    ``torch.autocast``; their weights stay float32 and the heads' outputs are float32 either way.
    """

    def __init__(
        self,
        lmm: FrozenLMM,
        image_encoder: SamImageEncoder,
        heads: FLMMHeads,
        autocast_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.lmm = lmm
        self.image_encoder = image_encoder
        self.heads = heads
        self.autocast_dtype = autocast_dtype

    @property
    def selector(self) -> KeywordSelector | None:
        """The heads' keyword selector (None: the heads ground given phrases only)."""
        return self.heads.selector

    def reduced_precision(self):
        """The autocast context of the SAM encoder and heads (a no-op without autocast_dtype, so
        that a caller's own autocast, e.g. training's, stays in force)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = self.image_encoder.pixel_mean.device
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def prepare(self, image: torch.Tensor, phrases: list[str]) -> GroundingInput:
        """image ``[H, W, 3]`` uint8 RGB; phrases to ground in it."""
        sam_pixels, input_size = self.image_encoder.preprocess(image.cpu())
        return GroundingInput(self.lmm.prepare(image, phrases), sam_pixels.cpu(), input_size)

    def prepare_text(
        self,
        image: torch.Tensor,
        text: str,
        spans: list[tuple[int, int]] | None = None,
        listed: bool = False,
        instruction: str | None = None,
    ) -> GroundingInput:
        """image ``[H, W, 3]`` uint8 RGB; a free text whose ``spans`` (``[start, end)``
        characters) are grounded in place, or, with ``listed``, laid out as given phrases
        (``prepare``; the text then only names them); with ``spans`` None, the spans the keyword
        selector picks (a heads file without a selector cannot: ValueError). ``instruction``:
        the user's turn the text answers (a question), prefilled with it as one conversation
        (``FrozenLMM.prepare_text``); None: the grounding prompt's."""
        if spans is None and self.selector is None:
            raise ValueError(
                "these heads have no keyword selector: give the spans to ground (phrase "
                "proposals, flmm.proposals) or heads trained with a selector"
            )
        sam_pixels, input_size = self.image_encoder.preprocess(image.cpu())
        if listed and spans is not None:
            lmm = self.lmm.prepare(image, [text[a:b] for a, b in spans])
            return GroundingInput(lmm, sam_pixels.cpu(), input_size, text, None, spans)
        lmm, offsets = self.lmm.prepare_text(image, text, instruction=instruction)
        return GroundingInput(lmm, sam_pixels.cpu(), input_size, text, offsets, spans)

    def select(self, inputs: list[GroundingInput], lmm_out) -> list[Selection]:
        """Per input, what to ground: given phrases as prepared; for a text input its proposed
        spans, or the selector's (possibly none; a phrase repeated in the text is grounded
        once, at its first span; a span of punctuation only, never), their maps merged from
        the prefill's captured token rows."""
        out = []
        for b, x in enumerate(inputs):
            if x.text is None:
                out.append(Selection(lmm_out.attention[b], lmm_out.hidden[b], [], []))
            elif x.text_offsets is None:  # its spans prepared listed, as given phrases
                spans, attention, hidden = x.spans, lmm_out.attention[b], lmm_out.hidden[b]
                out.append(Selection(attention, hidden, list(spans), [None] * len(spans)))
            elif x.spans is not None:
                slots = span_slots(x.text_offsets, x.spans)
                kept = [(span, s) for span, s in zip(x.spans, slots) if s is not None]
                attention, hiddens = self.lmm.in_place(
                    lmm_out, b, x.lmm.image, [s for _, s in kept]
                )
                spans = [span for span, _ in kept]
                out.append(Selection(attention, hiddens, spans, [None] * len(spans)))
            else:
                out.append(self._selected(x, b, lmm_out))
        return out

    def listed(self, inputs: list[GroundingInput], selections: list[Selection]) -> list[Selection]:
        """The text inputs' selected spans grounded as given phrases instead of in place: one more
        batched prefill of each such image with the spans' text laid out as F-LMM lays out given
        phrases (``" p1. p2."``); its maps and hidden states replace the in-place ones, spans and
        confidences are kept. (Where the heads ground an expression better from its listed
        tokens than from inside a text: the toy's, whose tokenizer merges a phrase's last word
        with the period after it, bench/NOTES.md.)"""
        picks = [
            b for b, x in enumerate(inputs) if x.text_offsets is not None and selections[b].spans
        ]
        if not picks:
            return selections
        samples = []
        for b in picks:
            x, spans = inputs[b], selections[b].spans
            samples.append(self.lmm.prepare(None, [x.text[s:e] for s, e in spans], x.lmm.image))
        out = self.lmm(samples)
        relisted = list(selections)
        for k, b in enumerate(picks):
            relisted[b] = replace(selections[b], attention=out.attention[k], hidden=out.hidden[k])
        return relisted

    def _selected(self, x: GroundingInput, b: int, lmm_out) -> Selection:
        """The keyword selector's spans of text input ``x`` (sample ``b`` of the prefill)."""
        hidden = lmm_out.token_hidden[b, : len(x.text_offsets)]  # [T, L, D]
        chars: dict[str, tuple[int, int]] = {}  # a phrase → its first span's characters
        confidences = []
        for span in self.selector.select(hidden):
            start, end = char_span(x.text_offsets, span, x.text)
            if end > start and x.text[start:end] not in chars:
                chars[x.text[start:end]] = (start, end)
                confidences.append(span.confidence)
        # the tokens of the whole words the spans were widened to
        slots = span_slots(x.text_offsets, list(chars.values()))
        attention, hiddens = self.lmm.in_place(lmm_out, b, x.lmm.image, slots)
        return Selection(attention, hiddens, list(chars.values()), confidences)

    def decode_selected(
        self, inputs: list[GroundingInput], selections: list[Selection], embeddings: torch.Tensor
    ) -> list[Grounding | None]:
        """``decode`` over the inputs that have something to ground; None for the others."""
        keep = [b for b, s in enumerate(selections) if len(s.hidden)]
        if not keep:
            return [None] * len(inputs)
        decoded = self.decode(
            [inputs[b] for b in keep],
            [selections[b].attention for b in keep],
            [selections[b].hidden for b in keep],
            embeddings[keep],
        )
        out: list[Grounding | None] = [None] * len(inputs)
        for b, grounding in zip(keep, decoded):
            out[b] = grounding
        return out

    def encode(self, inputs: list[GroundingInput]):
        """The frozen part: one LMM prefill and one SAM encoding for the whole batch."""
        return self.lmm([x.lmm for x in inputs]), self.encode_images(inputs)

    def encode_images(self, inputs: list[GroundingInput]) -> torch.Tensor:
        """One batched SAM encoding → embeddings ``[B, C, He, We]``, one per image (shared by
        all of its phrases)."""
        return self.embed(torch.cat([x.sam_pixels for x in inputs]))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """SAM encoding of preprocessed pixels ``[B, 3, S, S]`` → ``[B, C, He, We]`` (in
        autocast_dtype when set)."""
        with self.reduced_precision():
            return self.image_encoder(pixels.to(self.image_encoder.pixel_mean.device))

    def forward(self, inputs: list[GroundingInput]) -> list[Grounding]:
        lmm_out, embeddings = self.encode(inputs)
        return self.decode(inputs, lmm_out.attention, lmm_out.hidden, embeddings)

    def decode(self, inputs, attention, hidden, embeddings) -> list[Grounding]:
        """The trainable part, from the frozen encoders' outputs.

        attention: per image ``[P, L·H, h, w]``; hidden: per image, per phrase ``[n_tok, L, D]``;
        embeddings ``[B, C, He, We]``.
        """
        geometries = [x.lmm.geometry for x in inputs]
        sizes = [x.sam_input_size for x in inputs]
        with self.reduced_precision():
            outputs = self.heads(attention, hidden, embeddings, geometries, sizes)
        if self.autocast_dtype is None:
            return outputs
        return [
            replace(o, unet=o.unet.float(), coarse=o.coarse.float(), refined=o.refined.float())
            for o in outputs
        ]


MASK_WEIGHTINGS = ("masks", "images")


def grounding_loss(
    outputs: list[Grounding],
    masks: list[torch.Tensor],
    tags: list[torch.Tensor | None] | None = None,
    weighting: str = "masks",
    target_sizes: list[tuple[int, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """F-LMM's loss over a batch: per image BCE + Dice on U-Net and refined logits
    (``flmm.losses.mask_losses``), then the images' mean; with gold ``tags`` (per image ``[T]``
    or None) and the outputs' tag logits, the keyword selector's loss
    (``flmm.selector.tag_loss``) is added to the total as ``selector``.

    masks: per image ``[P, H, W]`` ground truth in {0, 1}, original frame.
    weighting: ``"masks"``: each image's losses weighted by its number of masks (Σ P_b·L_b / Σ P_b,
    F-LMM's ``FrozenLlavaSAM.compute_loss`` in flmm/models/frozen_llava.py); ``"images"``: every
    image alike (the two agree at one image per batch, F-LMM's recipe).
    target_sizes: per image the size its ground truth is first resized to (F-LMM's LMM frame,
    see ``mask_losses``); None: the ground truth's own resolution.
    """
    if weighting not in MASK_WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r}: one of {MASK_WEIGHTINGS}")
    sizes = target_sizes or [None] * len(outputs)
    parts = [
        mask_losses(o.unet, o.refined, m.to(o.refined.device), size)
        for o, m, size in zip(outputs, masks, sizes)
    ]
    stacked = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
    if weighting == "images":
        loss = {k: v.mean() for k, v in stacked.items()}
    else:
        counts = torch.tensor([float(len(m)) for m in masks], device=stacked["total"].device)
        loss = {k: (v * counts).sum() / counts.sum() for k, v in stacked.items()}
    tagged = [(o.tags, t) for o, t in zip(outputs, tags or []) if t is not None]
    if tagged:
        loss["selector"] = tag_loss([o for o, _ in tagged], [t for _, t in tagged])
        loss["total"] = loss["total"] + loss["selector"]
    return loss
