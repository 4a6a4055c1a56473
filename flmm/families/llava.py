"""LLaVA-1.5 (``model_type`` ``llava``): one square grid of (S/patch)² tokens.

The image is padded to a centred square with the processor's mean colour (LLaVA-1.5's "pad"
aspect mode), then resized to the vision tower's S×S input; the grid covers the square.
"""

from __future__ import annotations

import torch

from flmm.families import Family, ImageInputs, View, require_default_feature_strategy
from flmm.geometry import ImageGeometry, fit_longest


class Llava(Family):
    name = "LLaVA-1.5"
    model_types = ("llava",)

    def check(self, model, processor) -> None:
        require_default_feature_strategy(model)

    def image_inputs(self, model, processor, image: torch.Tensor) -> ImageInputs:
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        pixels, geometry = llava_pixels(processor.image_processor, image)
        return ImageInputs(
            {"pixel_values": pixels[None]},
            side * side,
            (View(0, side, side),),
            (side, side),
            geometry,
            fit_longest(image.shape[0], image.shape[1], vision.image_size),
        )


def llava_pixels(image_processor, image: torch.Tensor) -> tuple[torch.Tensor, ImageGeometry]:
    """LLaVA-1.5 preprocessing of ``[H, W, 3]`` uint8 RGB → pixel_values ``[3, S, S]``, geometry.

    Pads to the centred square (padding split floor-first) with the processor's mean colour as
    transformers' ``LlavaImageProcessor`` (``do_pad``) does, ``int(255 · mean)`` per channel
    ((122, 116, 104) for CLIP's mean), then the processor's own resize / rescale / normalise.
    """
    geometry = ImageGeometry.square(image.shape[0], image.shape[1])
    mean = torch.tensor([int(255 * m) for m in image_processor.image_mean], dtype=torch.uint8)
    square = mean.view(1, 1, 3).expand(geometry.frame_height, geometry.frame_width, 3).clone()
    top, left = geometry.top, geometry.left
    square[top : top + geometry.height, left : left + geometry.width] = image
    pixels = image_processor(images=square.permute(2, 0, 1), return_tensors="pt")["pixel_values"]
    return pixels[0], geometry
