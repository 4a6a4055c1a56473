"""DeepSeek-VL (``deepseek_vl``) and its hybrid (``deepseek_vl_hybrid``, the 7B's high- and
low-resolution towers): a fixed square grid (24×24 = 576 tokens for the released models).

The processor resizes the longer side to the tower's input and pads to a centred square with its
background colour; the grid covers the square (as F-LMM's DeepSeek-VL heads read it).
"""

from __future__ import annotations

import math

import torch

from flmm.families import Family, ImageInputs, View, processor_image_inputs
from flmm.geometry import ImageGeometry, fit_longest


class DeepseekVL(Family):
    name = "DeepSeek-VL"
    model_types = ("deepseek_vl", "deepseek_vl_hybrid")

    def image_inputs(self, model, processor, image: torch.Tensor) -> ImageInputs:
        tensors, n_tokens = processor_image_inputs(processor, image)
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(f"{n_tokens} image tokens are not a square grid")
        geometry = ImageGeometry.square(image.shape[0], image.shape[1])
        pixels = fit_longest(image.shape[0], image.shape[1], tensors["pixel_values"].shape[-1])
        return ImageInputs(
            tensors, n_tokens, (View(0, side, side),), (side, side), geometry, pixels
        )
