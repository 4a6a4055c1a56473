"""The family adapters against transformers' own preprocessing and token layout (issue 35, item 5):
LLaVA-1.5's mean-padded square pixel for pixel against ``LlavaImageProcessor``; LLaVA-NeXT's
unpadded tile grid against the model's anyres helpers; LLaVA-NeXT's base view keeps every row
when it is shrunk to the tiles' grid (very wide images)."""

import pytest
import torch
import transformers as hf
from conftest import CORPUS, random_image
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from flmm.families.llava import llava_pixels
from flmm.families.llava_next import unpadded_grid
from flmm.lmm import FrozenLMM
from flmm.tiny_lmms import TinyLMMConfig, write_tiny_lmm

# llava-hf/llava-v1.6-*: 336 px tiles of 24 × 24 tokens
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@pytest.mark.parametrize("side", [56, 336])
@pytest.mark.parametrize("size", [(40, 70), (71, 30), (33, 33), (300, 517)])
def test_llava_pixels_equal_llava_image_processor_pixel_for_pixel(side, size):
    """transformers' ``LlavaImageProcessor(do_pad=True)`` pads to the centred square with
    ``int(255 · mean)`` = (122, 116, 104) for CLIP's mean; the adapter's pixels (whatever the
    checkpoint's processor: llava-hf ships ``CLIPImageProcessor``) are the same, exactly."""
    image = random_image(*size, seed=sum(size))
    kwargs = {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
    reference = hf.LlavaImageProcessor(do_pad=True, **kwargs)
    expected = reference(images=image.permute(2, 0, 1), return_tensors="pt")["pixel_values"][0]
    for processor in (hf.CLIPImageProcessor(**kwargs), reference):
        pixels, geometry = llava_pixels(processor, image)
        assert torch.equal(pixels, expected), type(processor).__name__
    assert (geometry.frame_height, geometry.frame_width) == (max(size), max(size))


def test_llava_pad_colour_is_the_processors_truncated_mean():
    """An all-padding corner of a thin image, un-normalised, is (122, 116, 104)/255 exactly
    (``round`` would give 123, 117, 104)."""
    processor = hf.CLIPImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
    )
    pixels, _ = llava_pixels(processor, torch.zeros((8, 56, 3), dtype=torch.uint8))
    mean, std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
    corner = pixels[:, 0, 0] * std + mean
    torch.testing.assert_close(corner * 255, torch.tensor([122.0, 116.0, 104.0]), atol=1e-3, rtol=0)


def _sizes():
    """Image (height, width): square, both orientations, thin strips and odd sizes."""
    sizes = [(336, 336), (1, 1), (2, 1000), (1000, 2), (5, 7)]
    for h in (37, 100, 224, 337, 500, 769, 1024):
        for aspect in (0.1, 0.2, 0.3, 0.5, 0.75, 1.3, 2.0, 3.1, 4.5, 5.0, 8.0, 12.0):
            sizes.append((h, max(1, round(h * aspect))))
    return sizes


@pytest.mark.parametrize(
    "pinpoints, tile, side",
    [
        (LLAVA_NEXT_PINPOINTS, 336, 24),
        ([[56, 112], [112, 56], [112, 112]], 56, 4),  # flmm.tiny_lmms' LLaVA-NeXT
        ([[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]], 384, 27),
    ],
)
def test_unpadded_grid_equals_transformers_anyres_layout(pinpoints, tile, side):
    """(rows, cols) of the tiles' grid is what ``LlavaNextModel.pack_image_features`` lays out:
    the best resolution's tile grid (``get_anyres_image_grid_shape``) of side×side tokens per
    tile, then ``unpad_image``; the token count matches ``image_size_to_num_patches``."""
    for height, width in _sizes():
        tiles_h, tiles_w = get_anyres_image_grid_shape([height, width], pinpoints, tile)
        assert image_size_to_num_patches([height, width], pinpoints, tile) == 1 + tiles_h * tiles_w
        padded = torch.empty((1, tiles_h * side, tiles_w * side))
        expected = tuple(unpad_image(padded, [height, width]).shape[1:])
        assert unpadded_grid(height, width, pinpoints, tile, side) == expected, (height, width)


@pytest.fixture(scope="module")
def wide_llava_next(tmp_path_factory):
    """A tiny LLaVA-NeXT with 8 × 8 token tiles (112 px, patch 14): an 8:1 image's tiles' grid
    has 2 rows, so its base view (8 rows) shrinks 4×."""
    out = tmp_path_factory.mktemp("llava_next_112")
    config = TinyLMMConfig(image_size=112, text_layers=1, vision_layers=1)
    return FrozenLMM.from_pretrained(str(write_tiny_lmm("llava_next", CORPUS, out, config)))


@pytest.mark.parametrize("size", [(20, 160), (24, 200), (160, 20)])
def test_llava_next_base_view_keeps_every_row_when_shrunk_to_the_tiles_grid(wide_llava_next, size):
    """One-hot attention on any base-view token keeps its mass on the U-Net input: a thin line
    of a very wide image (a single base row) must not vanish. Bilinear without antialias samples
    only 2 of every 4 base rows at 4:1 shrink (the lost ones give an all-zero map)."""
    lmm = wide_llava_next
    image = lmm.prepare(random_image(*size), ["the red circle"]).image
    base = image.views[0]
    assert min(r / c for r, c in zip(image.grid, (base.rows, base.cols))) <= 0.25, image.grid
    maps = torch.eye(image.n_tokens)[: base.length]  # query q: one-hot on image token q
    maps = maps.expand(lmm.num_layers, lmm.num_heads, -1, -1)
    merged = lmm.merge_slots(maps, [slice(q, q + 1) for q in range(base.length)], image)
    on_base = merged[:, : lmm.num_layers * lmm.num_heads]  # view-major: base first
    mass = on_base.sum(dim=(-2, -1))  # [tokens, L·H], 1 where the token reached the grid
    lost = sorted({q // base.cols for q in range(base.length) if mass[q].min() < 0.999})
    assert not lost, f"base rows lost on the {image.grid} grid: {lost}"
    # Where it lands: token (r, c)'s mass is centred inside its cell scaled to the grid (give or
    # take half a grid cell).
    rows, cols = image.grid
    sy, sx = rows / base.rows, cols / base.cols
    ys, xs = torch.arange(rows).view(-1, 1) + 0.5, torch.arange(cols).view(1, -1) + 0.5
    for q in (0, base.length - 1, base.cols + 2):
        r, c = divmod(q, base.cols)
        m = on_base[q, 0]
        cy, cx = float((m * ys).sum()), float((m * xs).sum())
        assert r * sy - 0.5 <= cy <= (r + 1) * sy + 0.5, (q, cy)
        assert c * sx - 0.5 <= cx <= (c + 1) * sx + 0.5, (q, cx)
