"""F-LMM end to end (§3): frozen LMM → attention maps → U-Net → SAM refiner, and its training loss.

Data path for a batch of B images with P_b phrases each:

    LMM prefill (batched)        → attention [P_b, L·H, h, w], hidden [n_tok, L, D] per phrase
    SAM image encoder (batched)  → embedding [1, C, He, We] per image, shared by its phrases
    U-Net (all ΣP_b at once)     → logits [P_b, 1, h', w'] in the square frame
      crop to the image region   → ``unet`` [P_b, 1, hc, wc]; resized → ``coarse`` [P_b, 1, H, W]
    SAM refiner (per image)      → ``refined`` [P_b, 1, H, W] in the original frame
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch import nn

from flmm.heads import FLMMHeads, Grounding
from flmm.lmm import FrozenLlava, LMMSample
from flmm.losses import mask_losses
from flmm.sam import SamImageEncoder


@dataclass
class GroundingInput:
    """One image prepared for both frozen encoders (CPU tensors).

    lmm: the LMM's sample (pixels, prompt ids, phrase tokens, geometry);
    sam_pixels ``[1, 3, S, S]`` in SAM's input frame; sam_input_size (h1, w1) before padding.
    """

    lmm: LMMSample
    sam_pixels: torch.Tensor
    sam_input_size: tuple[int, int]


class FLMM(nn.Module):
    """Frozen LMM + frozen SAM image encoder + trainable heads.

    autocast_dtype: None (SAM and the heads compute in their weights' dtype, float32), or a
    reduced dtype (``torch.bfloat16``) that the SAM encoder and the heads compute in under
    ``torch.autocast``; their weights stay float32 and the heads' outputs are float32 either way.
    """

    def __init__(
        self,
        lmm: FrozenLlava,
        image_encoder: SamImageEncoder,
        heads: FLMMHeads,
        autocast_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.lmm = lmm
        self.image_encoder = image_encoder
        self.heads = heads
        self.autocast_dtype = autocast_dtype

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


def grounding_loss(outputs: list[Grounding], masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """F-LMM's loss over a batch: BCE + Dice on U-Net and refined logits, averaged over images.

    masks: per image ``[P, H, W]`` ground truth in {0, 1}, original frame. The U-Net terms compare
    the cropped U-Net logits with the ground truth resized (nearest) to their size.
    """
    parts = [mask_losses(o.unet, o.refined, m.to(o.refined.device)) for o, m in zip(outputs, masks)]
    return {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}
