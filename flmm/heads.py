"""The trainable part of F-LMM (§3.2–3.3): the U-Net mask head and the SAM-based refiner.

``FLMMHeads`` is only a container, so that one state dict holds everything that is trained:

    mask_decoder.*                 U-Net over the stacked attention maps
    refiner.text_layer_weights     [L] mixing weights over the LMM layers' hidden states
    refiner.text_proj.{weight,bias}  hidden size D → SAM prompt dim
    refiner.prompt_encoder.*       SAM prompt encoder
    refiner.mask_decoder.*         SAM mask decoder

Checkpoints are safetensors with exactly these keys (checked with their shapes on load); F-LMM's
released ``.pth`` head checkpoints are converted on the fly (``flmm.build.read_heads_file``, with
the key table of ``flmm.convert``). Heads may also hold a keyword selector (``selector.*``,
``flmm.selector``: it picks the spans of free text to ground), trained beside them by the
training job; its describe instruction is kept in the file's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flmm.checkpoint import save_tensors
from flmm.geometry import ImageGeometry
from flmm.mask_decoder import MaskDecoder
from flmm.refiner import SamRefiner
from flmm.selector import KeywordSelector, selector_metadata


@dataclass
class Grounding:
    """Mask logits of one image's P phrases.

    unet ``[P, 1, hc, wc]``: U-Net logits cropped to the image region (U-Net scale);
    coarse ``[P, 1, H, W]``: the same, resized to the original frame;
    refined ``[P, 1, H, W]``: SAM-refined logits, original frame;
    tags ``[T, 3]``: the keyword selector's tag logits of the image's text tokens, when the heads
    were given their hidden states (training the selector), else None.
    """

    unet: torch.Tensor
    coarse: torch.Tensor
    refined: torch.Tensor
    tags: torch.Tensor | None = None


class FLMMHeads(nn.Module):
    """U-Net mask decoder + SAM refiner, the parameters F-LMM trains; and an optional keyword
    selector, which tags text tokens (at inference ``flmm.model.FLMM.select``; in training
    ``forward``'s ``text_hidden``, scored by ``flmm.selector.tag_loss``)."""

    def __init__(
        self,
        mask_decoder: MaskDecoder,
        refiner: SamRefiner,
        selector: KeywordSelector | None = None,
    ):
        super().__init__()
        self.mask_decoder = mask_decoder
        self.refiner = refiner
        self.selector = selector

    def forward(
        self,
        attention: list[torch.Tensor],
        hidden: list[list[torch.Tensor]],
        embeddings: torch.Tensor,
        geometries: list[ImageGeometry],
        sam_input_sizes: list[tuple[int, int]],
        text_hidden: list[torch.Tensor | None] | None = None,
    ) -> list[Grounding]:
        """Everything trainable, from the frozen encoders' outputs for B images.

        attention: per image ``[P, V·L·H, h, w]`` (grids may differ between images: the U-Net
        runs once per distinct grid); hidden: per image, per phrase ``[n_tok, L, D]``;
        embeddings ``[B, C, He, We]`` (SAM image embeddings); geometries: where each image sits
        in its LMM frame; sam_input_sizes: (h1, w1) of each image in SAM's input frame;
        text_hidden: per image, the hidden states ``[T, L, D]`` of a text's tokens (or None)
        for the selector to tag (``Grounding.tags``). Being the module's ``forward``, it is what
        DDP wraps when the heads are trained.
        """
        device = embeddings.device
        by_grid: dict[tuple[int, ...], list[int]] = {}
        for b, maps in enumerate(attention):
            by_grid.setdefault(tuple(maps.shape[-2:]), []).append(b)
        unet_of: dict[int, torch.Tensor] = {}
        for members in by_grid.values():
            out = self.mask_decoder(torch.cat([attention[b] for b in members]).to(device))
            unet_of.update(zip(members, out.split([attention[b].shape[0] for b in members])))
        results = []
        for b in range(len(attention)):
            unet = unet_of[b]
            geometry = geometries[b]
            coarse = geometry.to_original(unet)
            refined = self.refiner(
                embeddings[b : b + 1],
                coarse,
                [h.to(device, torch.float32) for h in hidden[b]],
                sam_input_sizes[b],
                (geometry.height, geometry.width),
            )
            tags = None
            if text_hidden is not None and text_hidden[b] is not None:
                if self.selector is None:
                    raise ValueError("text hidden states given to heads without a selector")
                tags = self.selector(text_hidden[b].to(device))
            results.append(Grounding(geometry.crop(unet), coarse, refined, tags))
        return results


def save_heads(heads: FLMMHeads, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the heads' state dict as safetensors (with the selector's metadata if it has one)."""
    if heads.selector is not None:
        metadata = {**(metadata or {}), **selector_metadata(heads.selector)}
    return save_tensors(heads.state_dict(), path, metadata)


def heads_dims(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """The dimensions a heads state dict was trained for: in_channels (L·H), L, D, prompt dim, and
    the U-Net's level-0 width (``unet_base_channels``)."""
    conv = state_dict["mask_decoder.encoder.0.convs.0.conv.weight"]  # [base, L·H, 3, 3]
    proj = state_dict["refiner.text_proj.weight"]
    return {
        "in_channels": conv.shape[1],
        "unet_base_channels": conv.shape[0],
        "num_layers": state_dict["refiner.text_layer_weights"].shape[0],
        "hidden_size": proj.shape[1],
        "prompt_dim": proj.shape[0],
    }
