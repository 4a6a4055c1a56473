"""What the frozen stage hands the head trainer: one image's encoder outputs as one bytes value.

The frozen LMM and SAM image encoder run in Ray Data actors; the trainer's workers only run the
heads. Between them travels, per image, a safetensors blob (ragged per-phrase tensors need no
Arrow tensor extension, and the bytes are the same on every node):

    attention  [P, L·H, h, w]   phrase→image attention maps (float16)
    hidden_<i> [n_tok_i, L, D]  hidden states of phrase i's tokens, every layer (float16)
    embedding  [C, He, We]      SAM image embedding (float16)
    masks      [P, H, W]        ground-truth masks, original frame (uint8 0/1)
    sam_input  [2]              (h1, w1): the image's size inside SAM's input frame (int64)
    geometry   [6]              the image inside the LMM frame (int64, ``ImageGeometry``)
    lmm_pixels [2]              (h0, w0): the image's size in the LMM's input pixels (int64,
                                ``flmm.families.ImageInputs.pixels``; F-LMM's loss targets)
    text_hidden [T, L, D]       hidden states of a text's tokens (float16), and
    text_tags  [T]              their gold keyword tags (int64, ``flmm.selector.TAGS``): only
                                for samples with a text and its groundable spans

When the keyword selector trains alone (``jobs/train.py --train selector``) only the last two
travel (``TextFeatures``, the same keys).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load, save

from flmm.geometry import ImageGeometry


@dataclass
class ImageFeatures:
    """One image's frozen-encoder outputs and targets (CPU tensors; shapes in the module doc)."""

    attention: torch.Tensor
    hidden: list[torch.Tensor]
    embedding: torch.Tensor
    masks: torch.Tensor
    sam_input_size: tuple[int, int]
    geometry: ImageGeometry
    lmm_pixels: tuple[int, int]
    text_hidden: torch.Tensor | None = None
    text_tags: torch.Tensor | None = None

    def to_bytes(self) -> bytes:
        tensors = {
            "attention": self.attention.to(torch.float16),
            "embedding": self.embedding.to(torch.float16),
            "masks": self.masks.to(torch.uint8),
            "sam_input": torch.tensor(self.sam_input_size, dtype=torch.int64),
            "geometry": self.geometry.to_tensor(),
            "lmm_pixels": torch.tensor(self.lmm_pixels, dtype=torch.int64),
        }
        for i, h in enumerate(self.hidden):
            tensors[f"hidden_{i}"] = h.to(torch.float16)
        if self.text_hidden is not None:
            tensors["text_hidden"] = self.text_hidden.to(torch.float16)
            tensors["text_tags"] = self.text_tags.to(torch.int64)
        return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})

    @classmethod
    def from_bytes(cls, blob: bytes) -> ImageFeatures:
        tensors = load(blob)
        n = tensors["attention"].shape[0]
        h1, w1 = tensors["sam_input"].tolist()
        return cls(
            attention=tensors["attention"],
            hidden=[tensors[f"hidden_{i}"] for i in range(n)],
            embedding=tensors["embedding"],
            masks=tensors["masks"],
            sam_input_size=(h1, w1),
            geometry=ImageGeometry.from_tensor(tensors["geometry"]),
            lmm_pixels=tuple(tensors["lmm_pixels"].tolist()),
            text_hidden=tensors.get("text_hidden"),
            text_tags=tensors.get("text_tags"),
        )


@dataclass
class TextFeatures:
    """One caption's selector inputs and targets alone, what training the keyword selector by
    itself needs: hidden ``[T, L, D]`` (float16 on the wire), tags ``[T]`` (int64). Stored under
    ``ImageFeatures``' keys, so ``from_bytes`` also reads them out of an ``ImageFeatures`` blob."""

    hidden: torch.Tensor
    tags: torch.Tensor

    def to_bytes(self) -> bytes:
        hidden = self.hidden.detach().to(torch.float16).contiguous().cpu()
        return save({"text_hidden": hidden, "text_tags": self.tags.to(torch.int64).cpu()})

    @classmethod
    def from_bytes(cls, blob: bytes) -> TextFeatures:
        tensors = load(blob)
        return cls(hidden=tensors["text_hidden"], tags=tensors["text_tags"])
