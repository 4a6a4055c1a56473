"""Frames of an image: where the original image sits in the frame an LMM's token grids cover.

The *original* frame is the input image (height×width pixels). A family's preprocessing decides
what its image-token grids cover, the *LMM frame*, given here in original pixels:

- LLaVA-1.5 and DeepSeek-VL pad the image to a centred square of side max(H, W) (``square``);
- Qwen2.5-VL / Qwen3-VL resize the whole image to a multiple of their patch grid, and LLaVA-NeXT's
  grids (base image, unpadded tiles) cover the whole image (``whole``).

The U-Net's logits are in the LMM frame; ``crop`` cuts the image's region out of them and
``to_original`` resamples that to the image's own size.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ImageGeometry:
    """The image (``height``×``width``) at (``top``, ``left``) inside a frame of
    ``frame_height``×``frame_width``, all in original pixels."""

    height: int
    width: int
    frame_height: int
    frame_width: int
    top: int = 0
    left: int = 0

    @classmethod
    def square(cls, height: int, width: int) -> ImageGeometry:
        """The centred square of side max(height, width) (padding split floor-first)."""
        side = max(height, width)
        return cls(height, width, side, side, (side - height) // 2, (side - width) // 2)

    @classmethod
    def whole(cls, height: int, width: int) -> ImageGeometry:
        """A frame that is the image itself."""
        return cls(height, width, height, width)

    def to_tensor(self) -> torch.Tensor:
        """``[6]`` int64 (height, width, frame_height, frame_width, top, left)."""
        return torch.tensor(astuple(self), dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> ImageGeometry:
        return cls(*(int(v) for v in t.tolist()))

    def crop(self, logits: torch.Tensor) -> torch.Tensor:
        """``[P, 1, h', w']`` logits in the LMM frame → the original image's region, same scale.

        Offsets round down and extents to nearest (F-LMM's unpadding); at least one pixel is kept.
        """
        hs, ws = logits.shape[-2:]
        y0, x0 = int(self.top * hs / self.frame_height), int(self.left * ws / self.frame_width)
        h = max(1, int(self.height * hs / self.frame_height + 0.5))
        w = max(1, int(self.width * ws / self.frame_width + 0.5))
        return logits[..., y0 : y0 + h, x0 : x0 + w]

    def to_original(self, logits: torch.Tensor) -> torch.Tensor:
        """``[P, 1, h', w']`` logits in the LMM frame → ``[P, 1, height, width]`` (original)."""
        crop = self.crop(logits).float()
        return F.interpolate(crop, size=(self.height, self.width), mode="bilinear")

    def paste(self, mask: torch.Tensor) -> torch.Tensor:
        """``[..., height, width]`` (original frame) → ``[..., frame_height, frame_width]``, zero
        outside the image."""
        out = mask.new_zeros((*mask.shape[:-2], self.frame_height, self.frame_width))
        out[..., self.top : self.top + self.height, self.left : self.left + self.width] = mask
        return out


def fit_longest(height: int, width: int, side: int) -> tuple[int, int]:
    """(h, w) of a ``height × width`` image resized so that its longer side is ``side``, the
    shorter truncated (F-LMM's ``CustomLlavaImageProcessor.resize``,
    flmm/datasets/llava_processors.py; its ``image_shape``)."""
    if height > width:
        return side, int(width * side / height)
    return int(height * side / width), side
