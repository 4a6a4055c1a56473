"""LMM families behind one adapter interface (one file per family).

A family knows what is particular to its checkpoints: the transformers class, how one image
becomes model inputs, how many image tokens stand for it in the sequence and on which grids they
lie, and which extra inputs a batched prefill needs (e.g. Qwen's M-RoPE token types). Everything
else (prompt layout, attention capture, hidden-state recording, merging, heads, refiner) is
shared in ``flmm.lmm`` and knows nothing of families.

A family is picked from the checkpoint's ``config.model_type`` (``family_for``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from flmm.geometry import ImageGeometry


@dataclass(frozen=True)
class View:
    """One grid of an image's tokens: ``rows × cols`` tokens in row-major order, starting at token
    ``start`` of the image's run of image tokens, each row followed by ``row_pad`` tokens that are
    not on the grid (LLaVA-NeXT's newline)."""

    start: int
    rows: int
    cols: int
    row_pad: int = 0

    @property
    def length(self) -> int:
        return self.rows * (self.cols + self.row_pad)

    def grid(self, rows: torch.Tensor) -> torch.Tensor:
        """rows ``[..., N]`` over the image's tokens → ``[..., rows, cols]`` on this view."""
        part = rows[..., self.start : self.start + self.length]
        return part.unflatten(-1, (self.rows, self.cols + self.row_pad))[..., : self.cols]


@dataclass
class ImageInputs:
    """One image prepared for a family's model.

    tensors: the processor's image inputs, each with a leading dimension that concatenates over a
    batch (e.g. ``pixel_values [1, 3, S, S]``, or Qwen's ``[patches, D]`` with ``image_grid_thw
    [1, 3]``); n_tokens: image tokens standing for it in the sequence; views: the grids those
    tokens lie on (the attention maps of all views are resized to ``grid`` and stacked as
    channels, view-major); grid: (h, w) of the maps handed to the U-Net; geometry: the LMM frame;
    pixels: (h, w) of the image itself (its frame's padding left out) in the model's input pixels,
    F-LMM's ``image_shape`` (the frame its head-training loss targets are resized to,
    ``flmm.losses.mask_losses``).
    """

    tensors: dict[str, torch.Tensor]
    n_tokens: int
    views: tuple[View, ...]
    grid: tuple[int, int]
    geometry: ImageGeometry
    pixels: tuple[int, int]


class Family:
    """The adapter interface; one subclass per family, registered in ``FAMILIES``."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    num_views: int = 1  # attention channels = num_views × layers × heads
    mrope: bool = False  # the model derives its own (multi-axis) positions from token types

    def check(self, model: nn.Module, processor) -> None:
        """Raise ValueError for a checkpoint this adapter cannot read correctly."""

    def image_inputs(self, model: nn.Module, processor, image: torch.Tensor) -> ImageInputs:
        """image ``[H, W, 3]`` uint8 RGB (original frame) → its model inputs."""
        raise NotImplementedError


def require_default_feature_strategy(model: nn.Module) -> None:
    """LLaVA-style checkpoints: only the ``default`` vision-feature strategy (CLS dropped) lays
    out the grids the adapters read."""
    strategy = model.config.vision_feature_select_strategy
    if strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r}: only 'default' (CLS dropped)"
        )


def processor_image_inputs(processor, image: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """The processor's own image inputs for ``image`` ``[H, W, 3]`` uint8 and the number of image
    tokens it expands one image placeholder to."""
    enc = processor(
        images=[image.permute(2, 0, 1).contiguous()],
        text=[processor.image_token],
        return_tensors="pt",
    )
    n_tokens = int((enc["input_ids"][0] == processor.image_token_id).sum())
    skip = {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"}
    return {k: v for k, v in enc.items() if k not in skip}, n_tokens


@functools.cache
def _registry() -> dict[str, Family]:
    from flmm.families.deepseek_vl import DeepseekVL
    from flmm.families.llava import Llava
    from flmm.families.llava_next import LlavaNext
    from flmm.families.qwen_vl import QwenVL

    families = [Llava(), LlavaNext(), QwenVL(), DeepseekVL()]
    return {t: f for f in families for t in f.model_types}


def family_for(model_type: str) -> Family:
    """The adapter of a checkpoint's ``config.model_type`` (ValueError naming the supported ones)."""
    families = _registry()
    if model_type not in families:
        raise ValueError(
            f"no adapter for LMMs of model_type {model_type!r}; supported: {', '.join(sorted(families))}"
        )
    return families[model_type]


def supported_model_types() -> list[str]:
    return sorted(_registry())
