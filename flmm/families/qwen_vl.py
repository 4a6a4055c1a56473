"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution, one grid per image, M-RoPE.

The processor resizes each image (aspect kept, sides rounded to patch × merge) and cuts it into
patches; ``image_grid_thw`` gives its patch grid, and every ``merge × merge`` patches become one
token, so the image's tokens lie on a ``(h / merge) × (w / merge)`` grid that covers the whole
image. Grids differ between images of one batch. Positions are three-axis (M-RoPE) and computed
by the model itself from the token types and grids.
"""

from __future__ import annotations

import torch

from flmm.families import Family, ImageInputs, View, processor_image_inputs
from flmm.geometry import ImageGeometry


class QwenVL(Family):
    name = "Qwen-VL"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    mrope = True

    def image_inputs(self, model, processor, image: torch.Tensor) -> ImageInputs:
        tensors, n_tokens = processor_image_inputs(processor, image)
        merge = processor.image_processor.merge_size
        t, h, w = (int(v) for v in tensors["image_grid_thw"][0])
        rows, cols = h // merge, w // merge
        if t * rows * cols != n_tokens:
            raise ValueError(f"{n_tokens} image tokens do not fill a {t}×{rows}×{cols} grid")
        geometry = ImageGeometry.whole(image.shape[0], image.shape[1])
        pixels = (
            h * processor.image_processor.patch_size,
            w * processor.image_processor.patch_size,
        )
        view = View(0, rows, cols)
        return ImageInputs(tensors, n_tokens, (view,), (rows, cols), geometry, pixels)
