"""Where an image token's attention lands, for every family (issue 35, item 7).

Which token sees which part of the image is found from the processor and the model, not from the
adapter: a small bright marker is drawn on a grey image, the processor's pixel tensors of the two
images are compared, and the token whose input patch changed most is the token that sees the
marker (in the model's own token order: row-major ViT patches; LLaVA-NeXT's packing by
``pack_image_features``; Qwen's merge windows of consecutive patches). One-hot attention on that
token is then merged by ``FrozenLMM.merge_slots`` onto the U-Net input grid and, upsampled as
the U-Net does, taken to the original frame by the image's ``ImageGeometry``: it must land on
the marker, on both.

Also: DeepSeek-VL hybrid's high-resolution (SAM) tower reaches the LMM in the tiny checkpoint.
"""

import dataclasses

import pytest
import torch
from conftest import CORPUS, random_image

from flmm.lmm import FrozenLMM
from flmm.mask_decoder import MaskDecoder
from flmm.tiny_lmms import MODEL_TYPES, TinyLMMConfig, write_tiny_lmm

# 112 px towers (8 × 8 tokens; Qwen: up to 112² pixels, 4 × 4 merged tokens) so that a marker
# and its neighbours are told apart; one layer each (no forward pass is run here).
GEOMETRY_LMM = TinyLMMConfig(image_size=112, text_layers=1, vision_layers=1)
MARKERS = ((0.2, 0.15), (0.5, 0.55), (0.8, 0.85))  # (y, x) as fractions of the image
UNET = MaskDecoder(1, base_channels=4, num_stages=1)  # only its input upsampling is used


@pytest.fixture(scope="module")
def geometry_lmm(tmp_path_factory):
    cache = {}

    def get(model_type):
        if model_type not in cache:
            out = tmp_path_factory.mktemp(f"geometry_{model_type}")
            path = write_tiny_lmm(model_type, CORPUS, out, GEOMETRY_LMM)
            cache[model_type] = FrozenLMM.from_pretrained(str(path))
        return cache[model_type]

    return get


def _grey_with_marker(height, width, y, x, side=4):
    image = torch.full((height, width, 3), 128, dtype=torch.uint8)
    if y is not None:
        image[max(0, y - side // 2) : y + side // 2, max(0, x - side // 2) : x + side // 2] = 255
    return image


def _token_change(lmm, image, plain, marked) -> torch.Tensor:
    """``[n_tokens]``: how much each image token's input patch changed between the two
    images' pixel tensors, in the model's token order."""
    family = lmm.model.config.model_type
    a, b = plain.tensors["pixel_values"], marked.tensors["pixel_values"]
    if family.startswith("qwen"):  # [patches, D], merge × merge consecutive patches per token
        merge = lmm.processor.image_processor.merge_size
        return (a - b).abs().sum(-1).view(-1, merge * merge).sum(-1)
    vision = lmm.model.config.vision_config
    side, patch = vision.image_size // vision.patch_size, vision.patch_size
    per_patch = (a - b).abs().sum(-3).unflatten(-2, (side, patch)).unflatten(-1, (side, patch))
    per_patch = per_patch.sum((-3, -1)).flatten(-2)  # [..., side²] row-major
    if family != "llava_next":
        return per_patch[0]
    per_patch = per_patch[0]  # [tiles + 1, side²]: the base image, then the tiles
    ids = torch.arange(per_patch.numel(), dtype=torch.float32).view(*per_patch.shape, 1)
    packed, _ = lmm.model.model.pack_image_features(
        [ids],
        torch.tensor([image.shape[:2]]),
        "default",
        image_newline=torch.tensor([-1.0]),
    )
    order = packed[0][:, 0].long()  # [n_tokens]: the patch each token holds (-1: newline)
    flat = torch.cat([per_patch.flatten(), torch.zeros(1)])
    return flat[order]  # order -1 → the appended zero


def _one_hot_maps(lmm, image, token):
    """One-hot attention on image token ``token`` → U-Net input ``[V, h, w]`` (layer 0, head 0
    of every view)."""
    maps = torch.zeros(lmm.num_layers, lmm.num_heads, 1, image.n_tokens)
    maps[..., token] = 1.0
    merged = lmm.merge_slots(maps, [slice(0, 1)], image)[0]  # [V·L·H, h, w]
    return merged.unflatten(0, (len(image.views), -1))[:, 0]


@pytest.mark.parametrize("size", [(60, 120), (130, 70)])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_one_hot_attention_on_an_image_token_lands_on_the_part_of_the_image_it_sees(
    model_type, size, geometry_lmm
):
    lmm = geometry_lmm(model_type)
    height, width = size
    plain = lmm.prepare(_grey_with_marker(height, width, None, None), ["x"]).image
    g, (h, w) = plain.geometry, plain.grid
    heats, centres = [], []
    for fy, fx in MARKERS:
        y, x = int(fy * height), int(fx * width)
        marked = lmm.prepare(_grey_with_marker(height, width, y, x), ["x"]).image
        change = _token_change(lmm, _grey_with_marker(height, width, y, x), plain, marked)
        # On the U-Net input: the marker's cell of the LMM frame (frame pixels → grid cells).
        cy, cx = (y + g.top) * h / g.frame_height, (x + g.left) * w / g.frame_width
        for v, view in enumerate(plain.views):
            token = view.start + int(change[view.start : view.start + view.length].argmax())
            unet = _one_hot_maps(lmm, plain, token)[v]  # [h, w], sums to 1
            ys, xs = torch.arange(h).view(-1, 1) + 0.5, torch.arange(w).view(1, -1) + 0.5
            my, mx = float((unet * ys).sum()), float((unet * xs).sum())
            resized = (view.rows, view.cols) != (h, w)
            reach = 1.0 + 0.5 * max(view.rows / h, view.cols / w, h / view.rows, w / view.cols)
            reach = reach if resized else 1.0  # one cell: the marker may straddle two
            assert abs(my - cy) <= reach and abs(mx - cx) <= reach, (v, (my, mx), (cy, cx))
            if not resized:
                assert torch.isclose(unet.max(), torch.tensor(1.0)), "one cell, all the mass"
            # In the original frame: the U-Net's resolution (its own upsampling) through the
            # geometry puts the heat on the marker.
            heat = g.to_original(UNET.prepare(unet[None, None]))[0, 0]  # [height, width]
            assert heat.shape == (height, width)
            assert heat[min(y, height - 1), min(x, width - 1)] >= 0.2 * heat.max(), (v, y, x)
            if v == 0:
                heats.append(heat)
                centres.append((min(y, height - 1), min(x, width - 1)))
    # Negative control: the first and last markers' tokens do not light each other's marker.
    (y0, x0), (y1, x1) = centres[0], centres[-1]
    assert heats[0][y1, x1] < 0.05 * heats[0].max() and heats[-1][y0, x0] < 0.05 * heats[-1].max()


def test_deepseek_hybrid_high_res_tower_reaches_the_lmm(tiny_lmm_dir):
    """The hybrid's image tokens mix the low-res (SigLIP) tower with the high-res (SAM) tower,
    the latter's global features weighted by ``high_res_vision_alpha``: the captured maps change
    when only ``high_res_pixel_values`` change, and when only that weight does."""
    lmm = FrozenLMM.from_pretrained(str(tiny_lmm_dir("deepseek_vl_hybrid")))
    alpha = lmm.model.model.high_res_vision_alpha
    assert float(alpha) == 1.0  # as written (transformers would initialise it to 0)
    phrases = ["the red circle"]
    sample = lmm.prepare(random_image(40, 70, seed=1), phrases)
    other = lmm.prepare(random_image(40, 70, seed=2), phrases).image.tensors
    tensors = {**sample.image.tensors, "high_res_pixel_values": other["high_res_pixel_values"]}
    swapped = dataclasses.replace(sample, image=dataclasses.replace(sample.image, tensors=tensors))
    with torch.inference_mode():
        base = lmm([sample]).token_maps
        high_res_only = lmm([swapped]).token_maps
        alpha.data.zero_()
        try:
            no_global = lmm([sample]).token_maps
        finally:
            alpha.data.fill_(1.0)
    scale = float(base.abs().max())  # live tower: both ≈ 6% of it; dead (transformers' init): 0.06%
    assert float((base - high_res_only).abs().max()) > 1e-2 * scale
    assert float((base - no_global).abs().max()) > 1e-2 * scale
