"""LLaVA-NeXT (``llava_next``): a base view of the whole image and "anyres" tiles.

The processor picks the best tiling resolution for the image, and the model lays the image's
tokens out as: the base image's ``s × s`` grid (the whole image squeezed to the tower's square
input), then the tiles' features with the padding cropped away (``rows × cols``, the image's own
aspect) and a newline token after every row. As F-LMM's LLaVA-NeXT heads do, both views are read,
the base maps resized to the tiles' grid, and stacked as channels (base first): the U-Net has
2 × layers × heads input channels. Both views cover the whole image.
"""

from __future__ import annotations

import torch
from transformers.image_processing_utils import select_best_resolution

from flmm.families import (
    Family,
    ImageInputs,
    View,
    processor_image_inputs,
    require_default_feature_strategy,
)
from flmm.geometry import ImageGeometry


class LlavaNext(Family):
    name = "LLaVA-NeXT"
    model_types = ("llava_next",)
    num_views = 2

    def check(self, model, processor) -> None:
        require_default_feature_strategy(model)

    def image_inputs(self, model, processor, image: torch.Tensor) -> ImageInputs:
        tensors, n_tokens = processor_image_inputs(processor, image)
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        rows, cols = unpadded_grid(
            image.shape[0],
            image.shape[1],
            model.config.image_grid_pinpoints,
            vision.image_size,
            side,
        )
        base, tiles = View(0, side, side), View(side * side, rows, cols, row_pad=1)
        if base.length + tiles.length != n_tokens:
            raise ValueError(
                f"{n_tokens} image tokens, expected {side}² + {rows}×({cols}+1) for LLaVA-NeXT"
            )
        geometry = ImageGeometry.whole(image.shape[0], image.shape[1])
        pixels = (rows * vision.patch_size, cols * vision.patch_size)  # the image on the tiles
        return ImageInputs(tensors, n_tokens, (base, tiles), (rows, cols), geometry, pixels)


def unpadded_grid(
    height: int, width: int, pinpoints: list, tile_size: int, side: int
) -> tuple[int, int]:
    """The tiles' token grid (rows, cols) after LLaVA-NeXT removes the padding of an image of
    ``height × width`` resized into its best tiling resolution (as transformers' model does)."""
    best_h, best_w = select_best_resolution((height, width), pinpoints)
    rows, cols = side * (best_h // tile_size), side * (best_w // tile_size)
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_rows) // 2)
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_cols) // 2)
    return rows, cols
