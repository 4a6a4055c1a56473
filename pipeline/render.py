"""Drawing annotations on images: one palette and one way to draw a mask, for ``preview.png``
and the HTML gallery (``pipeline/export.py``).

The palette is Kelly's colours of maximum contrast (K. L. Kelly, "Twenty-two colors of maximum
contrast", Color Engineering 3(6), 1965) without white, black and the greys, in his order:
consecutive colours are as far apart as the list allows, so neighbouring masks of one image are
told apart. Each mask is a translucent fill with an opaque outline in its colour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PALETTE = (
    (243, 195, 0),  # vivid yellow
    (135, 86, 146),  # strong purple
    (243, 132, 0),  # vivid orange
    (161, 202, 241),  # very light blue
    (190, 0, 50),  # vivid red
    (194, 178, 128),  # greyish yellow
    (0, 136, 86),  # vivid green
    (230, 143, 172),  # strong purplish pink
    (0, 103, 165),  # strong blue
    (249, 147, 121),  # strong yellowish pink
    (96, 78, 151),  # strong violet
    (246, 166, 0),  # vivid orange yellow
    (179, 68, 108),  # strong purplish red
    (220, 211, 0),  # vivid greenish yellow
    (136, 45, 23),  # strong reddish brown
    (141, 182, 0),  # vivid yellowish green
    (101, 69, 34),  # deep yellowish brown
    (226, 88, 34),  # vivid reddish orange
    (43, 61, 38),  # dark olive green
)
FILL_ALPHA = 0.45


def colour(i: int) -> tuple[int, int, int]:
    """The ``i``-th annotation's colour (the palette repeats after 19)."""
    return PALETTE[i % len(PALETTE)]


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The pixels of bool ``[H, W]`` ``mask`` within ``width`` pixels of its border (inside)."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def draw_masks(image: np.ndarray, masks: list[np.ndarray], first_colour: int = 0) -> np.ndarray:
    """image uint8 ``[H, W, 3]`` with each bool ``[H, W]`` mask filled translucently and
    outlined in ``colour(first_colour + i)``."""
    blend = image.astype(np.float32)
    for i, mask in enumerate(masks):
        rgb = np.array(colour(first_colour + i), np.float32)
        blend[mask] = (1 - FILL_ALPHA) * blend[mask] + FILL_ALPHA * rgb
        blend[outline(mask, max(1, min(image.shape[:2]) // 160))] = rgb
    return blend.astype(np.uint8)


def mask_layer(mask: np.ndarray, size: tuple[int, int], i: int) -> Image.Image:
    """An RGBA layer of ``size`` (width, height) showing bool ``mask`` in ``colour(i)``: the
    translucent fill and the opaque outline, transparent elsewhere (for the gallery's layers)."""
    small = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    layer = np.zeros((*small.shape, 4), np.uint8)
    layer[small] = (*colour(i), round(255 * FILL_ALPHA))
    layer[outline(small)] = (*colour(i), 255)
    return Image.fromarray(layer, "RGBA")
