"""The F-LMM checkpoint converter: every key of the release layout maps through the table, the
result loads strictly into our modules, the mapping round-trips, and nothing is silently lost."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flmm.build import HeadsConfig, build_heads, build_sam, load_heads, sam_config
from flmm.checkpoint import read_metadata, read_state_dict, save_tensors
from flmm.convert import (
    FLMM_RELEASES,
    convert_flmm_checkpoint,
    convert_flmm_state_dict,
    release_shape,
    to_flmm_state_dict,
    unwrap_checkpoint,
)
from flmm.mask_decoder import MaskDecoder
from jobs.convert import main

IN_CHANNELS = 12
BASE = 8


def mask_head_key_pairs(num_stages: int = 4) -> list[tuple[str, str]]:
    """(F-LMM key, our key) for the U-Net, written out from the release layout by hand."""
    pairs = []
    for i in range(num_stages):
        theirs_stage = "mask_head.encoder.0.0" if i == 0 else f"mask_head.encoder.{i}.1"
        for j in range(2):
            pairs += _unit_pairs(f"{theirs_stage}.convs.{j}", f"mask_decoder.encoder.{i}.convs.{j}")
    for i in range(num_stages - 1):
        pairs += _unit_pairs(
            f"mask_head.decoder.{i}.upsample.interp_upsample.1", f"mask_decoder.decoder.{i}.up"
        )
        for j in range(2):
            pairs += _unit_pairs(
                f"mask_head.decoder.{i}.conv_block.convs.{j}", f"mask_decoder.decoder.{i}.convs.{j}"
            )
    pairs += [
        ("mask_head.conv_seg.weight", "mask_decoder.conv_seg.weight"),
        ("mask_head.conv_seg.bias", "mask_decoder.conv_seg.bias"),
    ]
    return pairs


def _unit_pairs(theirs: str, ours: str) -> list[tuple[str, str]]:
    """An mmcv ConvModule (conv + gn) against our ConvUnit (conv + norm)."""
    return [
        (f"{theirs}.conv.weight", f"{ours}.conv.weight"),
        (f"{theirs}.gn.weight", f"{ours}.norm.weight"),
        (f"{theirs}.gn.bias", f"{ours}.norm.bias"),
    ]


REFINER_PAIRS = [
    ("text_layer_weights", "refiner.text_layer_weights"),
    ("text_proj.weight", "refiner.text_proj.weight"),
    ("text_proj.bias", "refiner.text_proj.bias"),
    (
        "sam.model.prompt_encoder.point_embeddings.0.weight",
        "refiner.prompt_encoder.point_embeddings.0.weight",
    ),
    (
        "sam.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "refiner.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    ),
    ("sam.model.mask_decoder.iou_token.weight", "refiner.mask_decoder.iou_token.weight"),
    (
        "sam.model.mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
        "refiner.mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
    ),
]
IMAGE_ENCODER_KEYS = [
    "sam.model.image_encoder.patch_embed.proj.weight",
    "sam.model.image_encoder.blocks.0.attn.qkv.bias",
]


@pytest.fixture(scope="module")
def decoder_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return MaskDecoder(in_channels=IN_CHANNELS, base_channels=BASE).state_dict()


@pytest.fixture()
def flmm_sd(decoder_sd) -> dict[str, torch.Tensor]:
    """A release-layout state dict: U-Net tensors shaped like ours, plus refiner and SAM keys."""
    sd = {
        theirs: torch.randn_like(decoder_sd[ours.removeprefix("mask_decoder.")])
        for theirs, ours in mask_head_key_pairs()
    }
    sd.update({theirs: torch.randn(3, 2) for theirs, _ in REFINER_PAIRS})
    sd.update({key: torch.randn(4) for key in IMAGE_ENCODER_KEYS})
    return sd


def strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}


def test_hand_written_pairs_cover_every_decoder_parameter(decoder_sd) -> None:
    ours = {o.removeprefix("mask_decoder.") for _, o in mask_head_key_pairs()}
    assert ours == set(decoder_sd)


def test_converts_every_release_key_by_the_hand_written_pairs(flmm_sd) -> None:
    converted = convert_flmm_state_dict(flmm_sd)
    expected = dict(mask_head_key_pairs() + REFINER_PAIRS)
    assert set(converted) == set(expected.values())
    for theirs, ours in expected.items():
        assert converted[ours] is flmm_sd[theirs]


def test_converted_mask_head_loads_strictly(flmm_sd) -> None:
    converted = convert_flmm_state_dict(flmm_sd)
    model = MaskDecoder(in_channels=IN_CHANNELS, base_channels=BASE)
    model.load_state_dict(strip(converted, "mask_decoder."), strict=True)
    torch.testing.assert_close(model.conv_seg.bias, flmm_sd["mask_head.conv_seg.bias"])
    torch.testing.assert_close(
        model.encoder[2].convs[1].norm.weight, flmm_sd["mask_head.encoder.2.1.convs.1.gn.weight"]
    )


def test_to_flmm_names_match_the_release_layout(decoder_sd) -> None:
    theirs = to_flmm_state_dict({f"mask_decoder.{k}": v for k, v in decoder_sd.items()})
    assert set(theirs) == {t for t, _ in mask_head_key_pairs()}


def test_round_trip_ours_theirs_ours(decoder_sd) -> None:
    ours = {f"mask_decoder.{k}": v for k, v in decoder_sd.items()}
    ours.update({o: torch.randn(2) for _, o in REFINER_PAIRS})
    back = convert_flmm_state_dict(to_flmm_state_dict(ours))
    assert back.keys() == ours.keys()
    assert all(back[k] is ours[k] for k in ours)


def test_round_trip_theirs_ours_theirs_loses_only_image_encoder(flmm_sd) -> None:
    back = to_flmm_state_dict(convert_flmm_state_dict(flmm_sd))
    assert set(flmm_sd) - set(back) == set(IMAGE_ENCODER_KEYS)
    assert all(back[k] is flmm_sd[k] for k in back)


def test_image_encoder_keys_are_dropped_and_reported(flmm_sd) -> None:
    result = convert_flmm_checkpoint(flmm_sd)
    assert sorted(result.dropped) == sorted(IMAGE_ENCODER_KEYS)
    assert not any("image_encoder" in k for k in result.state_dict)


@pytest.mark.parametrize(
    "bad_key",
    [
        "mask_head.encoder.0.1.convs.0.conv.weight",
        "mask_head.conv_seg.running_mean",
        "llava.lm_head.weight",
    ],
)
def test_unknown_key_raises_naming_it(flmm_sd, bad_key) -> None:
    flmm_sd[bad_key] = torch.zeros(1)
    with pytest.raises(ValueError, match=bad_key.replace(".", r"\.")):
        convert_flmm_state_dict(flmm_sd)


def test_unknown_key_raises_in_inverse_direction() -> None:
    with pytest.raises(ValueError, match=r"refiner\.image_encoder\.x"):
        to_flmm_state_dict({"refiner.image_encoder.x": torch.zeros(1)})


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_checkpoint_is_unwrapped(flmm_sd, wrapper) -> None:
    wrapped = {wrapper: flmm_sd, "meta": {"epoch": 3}}
    assert convert_flmm_state_dict(wrapped).keys() == convert_flmm_state_dict(flmm_sd).keys()
    assert unwrap_checkpoint(wrapped) == flmm_sd


def test_unwrap_rejects_non_tensor_entries() -> None:
    with pytest.raises(ValueError, match="meta"):
        unwrap_checkpoint({"meta": {"epoch": 3}, "w": torch.zeros(1)})


# --------------------------------------------------------------------------------------------
# The release layout of the LLaVA-1.5-7B + SAM ViT-L heads, written out below as facts (names and
# shapes) read from F-LMM's published code, github.com/wusize/F-LMM:
#   configs/llava/frozen_llava_1_5_vicuna_7b_unet_sam_l_refcoco_png.py: the U-Net (UNetHead, base
#     64, 4 stages, 2 convs per encoder and decoder stage, MaxPool downsampling, GroupNorm with one
#     group, InterpConv upsampling), SAM "vit_l", LMM llava-hf/llava-1.5-7b-hf (Llama-2-7B text:
#     32 layers x 32 heads, hidden 4096);
#   flmm/models/frozen_llava.py: FrozenLlava's attributes ``mask_head`` (in_channels set to
#     heads x layers = 1024, overriding the config's 2048) and ``text_layer_weights`` [layers];
#     FrozenLlavaSAM's ``sam`` and ``text_proj`` (Linear from the hidden size to SAM's prompt dim);
#   flmm/models/mask_head/mask_decoder.py: UNetHead = mmseg's UNet + ``conv_seg`` (base -> 1, 1x1);
#   flmm/models/mask_head/mask_refiner.py: SAMWrapper's ``model`` (sam_model_registry), image
#     encoder frozen and filtered out of its state dict;
#   segment_anything/build_sam.py and segment_anything/modeling/{prompt_encoder,mask_decoder,
#     transformer,common}.py (F-LMM's copy of SAM): prompt dim 256, 64x64 embedding grid,
#     mask_in_chans 16, TwoWayTransformer depth 2 / mlp 2048 / attention downsample 2, 3 + 1 mask
#     tokens, IoU head depth 3 and width 256;
#   scripts/deepspeed2torch_state_dict.py: the released .pth is the flat state dict, torch.save'd.
# Below ``mask_head`` the names are mmseg's UNet's (mmseg/models/backbones/unet.py: encoder.{i} =
# Sequential of [MaxPool2d for i > 0, BasicConvBlock], BasicConvBlock.convs.{j}, decoder.{i} =
# UpConvBlock with ``conv_block`` and ``upsample`` = InterpConv, whose ``interp_upsample`` is
# [Upsample, 1x1 ConvModule]) and mmcv's ConvModule's (``conv``, bias-free beside a norm, and
# ``gn`` for a GroupNorm). The release holds what training updates (and SAM's one persistent
# buffer): no LLaVA weights, no SAM image encoder.
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
Layout = dict[str, tuple[int, ...]]
C = 256  # SAM's prompt / transformer dim


def release_unet_layout(in_channels: int = 1024, layers: int = 32, hidden: int = 4096) -> Layout:
    """``mask_head.*`` (the U-Net over ``in_channels`` attention maps: 32 x 32 for LLaVA-1.5-7B)
    and the text-prompt path of an LMM of ``layers`` layers and width ``hidden``."""
    layout = {}
    stages = [(in_channels, 64), (64, 128), (128, 256), (256, 512)]  # (in, out) per stage
    for i, (c_in, c_out) in enumerate(stages):
        block = "mask_head.encoder.0.0" if i == 0 else f"mask_head.encoder.{i}.1"
        for j, c in enumerate((c_in, c_out)):
            layout |= _conv_module(f"{block}.convs.{j}", c_out, c, 3)
    for i, (skip, c_in) in enumerate([(64, 128), (128, 256), (256, 512)]):
        layout |= _conv_module(f"mask_head.decoder.{i}.upsample.interp_upsample.1", skip, c_in, 1)
        for j, c in enumerate((2 * skip, skip)):
            layout |= _conv_module(f"mask_head.decoder.{i}.conv_block.convs.{j}", skip, c, 3)
    layout |= {"mask_head.conv_seg.weight": (1, 64, 1, 1), "mask_head.conv_seg.bias": (1,)}
    layout["text_layer_weights"] = (layers,)
    return layout | _linear("text_proj", C, hidden)


def release_sam_layout() -> Layout:
    """``sam.model.prompt_encoder.*`` and ``sam.model.mask_decoder.*`` of SAM ViT-L."""
    pe, md = "sam.model.prompt_encoder", "sam.model.mask_decoder"
    layout = {f"{pe}.pe_layer.positional_encoding_gaussian_matrix": (2, C // 2)}
    names = [f"point_embeddings.{i}" for i in range(4)] + ["not_a_point_embed", "no_mask_embed"]
    layout |= {f"{pe}.{name}.weight": (1, C) for name in names}
    # mask_downscaling: conv 1->4 (2x2), LayerNorm2d, GELU, conv 4->16 (2x2), LayerNorm2d, GELU,
    # conv 16->256 (1x1).
    layout |= _conv(f"{pe}.mask_downscaling.0", 4, 1, 2) | _norm(f"{pe}.mask_downscaling.1", 4)
    layout |= _conv(f"{pe}.mask_downscaling.3", 16, 4, 2) | _norm(f"{pe}.mask_downscaling.4", 16)
    layout |= _conv(f"{pe}.mask_downscaling.6", C, 16, 1)
    for i in range(2):
        layer = f"{md}.transformer.layers.{i}"
        layout |= _attention(f"{layer}.self_attn", C)
        layout |= _attention(f"{layer}.cross_attn_token_to_image", C // 2)
        layout |= _attention(f"{layer}.cross_attn_image_to_token", C // 2)
        layout |= _linear(f"{layer}.mlp.lin1", 2048, C) | _linear(f"{layer}.mlp.lin2", C, 2048)
        for n in range(1, 5):
            layout |= _norm(f"{layer}.norm{n}", C)
    layout |= _attention(f"{md}.transformer.final_attn_token_to_image", C // 2)
    layout |= _norm(f"{md}.transformer.norm_final_attn", C)
    layout |= {f"{md}.iou_token.weight": (1, C), f"{md}.mask_tokens.weight": (4, C)}
    # output_upscaling: transposed conv 256->64 (2x2), LayerNorm2d, GELU, transposed conv 64->32.
    layout |= {f"{md}.output_upscaling.0.weight": (C, C // 4, 2, 2)}
    layout |= {f"{md}.output_upscaling.0.bias": (C // 4,)} | _norm(f"{md}.output_upscaling.1", 64)
    layout |= {f"{md}.output_upscaling.3.weight": (C // 4, C // 8, 2, 2)}
    layout |= {f"{md}.output_upscaling.3.bias": (C // 8,)}
    heads = [(f"output_hypernetworks_mlps.{i}", C // 8) for i in range(4)]
    for head, out in [*heads, ("iou_prediction_head", 4)]:
        for n, (o, i) in enumerate([(C, C), (C, C), (out, C)]):
            layout |= _linear(f"{md}.{head}.layers.{n}", o, i)
    return layout


def _linear(prefix: str, out: int, inp: int) -> Layout:
    return {f"{prefix}.weight": (out, inp), f"{prefix}.bias": (out,)}


def _conv(prefix: str, out: int, inp: int, k: int) -> Layout:
    return {f"{prefix}.weight": (out, inp, k, k), f"{prefix}.bias": (out,)}


def _attention(prefix: str, inner: int) -> Layout:
    """SAM's Attention: q/k/v projections C -> inner (C / downsample rate), output inner -> C."""
    qkv = [_linear(f"{prefix}.{p}_proj", inner, C) for p in "qkv"]
    return qkv[0] | qkv[1] | qkv[2] | _linear(f"{prefix}.out_proj", C, inner)


def _norm(prefix: str, channels: int) -> Layout:
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,)}


def _conv_module(prefix: str, out: int, inp: int, k: int) -> Layout:
    """mmcv ConvModule with a GroupNorm: a bias-free conv and ``gn``."""
    return {f"{prefix}.conv.weight": (out, inp, k, k)} | _norm(f"{prefix}.gn", out)


RELEASE_7B: Layout = release_unet_layout() | release_sam_layout()


def test_the_release_layout_has_the_counts_of_its_modules() -> None:
    # U-Net: 4 encoder stages x 2 convs x 3 tensors, 3 decoder stages x (1 + 2) x 3, conv_seg 2;
    # text path 3. SAM prompt encoder 17; mask decoder: 2 layers x 36 + 8 + 2 (transformer),
    # 2 tokens, 6 upscaling, 4 hypernetwork MLPs x 6, IoU head 6.
    assert len(release_unet_layout()) == 4 * 6 + 3 * 9 + 2 + 3
    assert len(release_sam_layout()) == 17 + (2 * 36 + 8 + 2) + 2 + 6 + 4 * 6 + 6


def test_the_hand_written_unet_pairs_spell_the_release_names() -> None:
    assert {t for t, _ in mask_head_key_pairs()} == {
        k for k in RELEASE_7B if k.startswith("mask_head.")
    }


@pytest.fixture(scope="module")
def release_7b(tmp_path_factory) -> tuple[dict[str, torch.Tensor], object]:
    """Random tensors in the 7B release layout, and the flat ``.pth`` they were saved to."""
    generator = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(shape, generator=generator) for k, shape in RELEASE_7B.items()}
    path = tmp_path_factory.mktemp("release") / "frozen_llava_1_5_vicuna_7b_unet_sam_l.pth"
    torch.save(tensors, path)
    return tensors, path


def test_the_7b_release_converts_key_for_key(release_7b) -> None:
    tensors, _ = release_7b
    result = convert_flmm_checkpoint(tensors)
    assert result.dropped == []
    assert len(result.state_dict) == len(tensors)
    assert {id(v) for v in result.state_dict.values()} == {id(v) for v in tensors.values()}


def test_the_7b_release_loads_strictly_into_heads_for_llava_7b_and_sam_vit_l(release_7b) -> None:
    tensors, path = release_7b
    with torch.device("meta"):  # SAM ViT-L's image encoder is never allocated
        heads = build_heads(HeadsConfig(32, 32, 4096), build_sam(sam_config("vit_l")))
    heads.to_empty(device="cpu")
    assert load_heads(heads, path) is None  # every key, every shape, strict=True
    unet, refiner = heads.mask_decoder, heads.refiner
    up = "mask_head.decoder.2.upsample.interp_upsample.1"
    by_attribute = {
        "mask_head.encoder.0.0.convs.0.conv.weight": unet.encoder[0].convs[0].conv.weight,
        "mask_head.encoder.3.1.convs.1.gn.bias": unet.encoder[3].convs[1].norm.bias,
        f"{up}.conv.weight": unet.decoder[2].up.conv.weight,
        "mask_head.decoder.0.conv_block.convs.1.gn.weight": unet.decoder[0].convs[1].norm.weight,
        "mask_head.conv_seg.bias": unet.conv_seg.bias,
        "text_layer_weights": refiner.text_layer_weights,
        "text_proj.weight": refiner.text_proj.weight,
        "sam.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (
            refiner.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        ),
        "sam.model.mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight": (
            refiner.mask_decoder.transformer.layers[1].cross_attn_image_to_token.out_proj.weight
        ),
    }
    for key, loaded in by_attribute.items():
        assert torch.equal(loaded, tensors[key]), key
    converted = convert_flmm_state_dict(tensors)
    for key, value in heads.state_dict().items():
        assert torch.equal(value, converted[key]), key


# F-LMM's other releases (flmm/models/frozen_deepseek_vl.py, frozen_llava_next.py): the same
# attribute names; the U-Net reads heads x layers channels (DeepSeek-VL's language_config) or,
# for LLaVA-NeXT, heads x layers x 2 (the base image's maps and the anyres tiles' maps stacked).
# Shapes of the LMMs: DeepSeek-VL-1.3B 24 layers x 16 heads, width 2048; DeepSeek-VL-7B 30 x 32,
# 4096; LLaVA-NeXT Vicuna-7B / Mistral-7B 32 x 32, 4096.
OTHER_RELEASES = {
    "deepseek_vl_1_3b": ("deepseek_vl", 24, 16, 2048),
    "deepseek_vl_7b": ("deepseek_vl_hybrid", 30, 32, 4096),
    "llava_next_7b": ("llava_next", 32, 32, 4096),
}


@pytest.mark.parametrize("release", sorted(OTHER_RELEASES))
def test_other_families_releases_convert_and_load_strictly(release, tmp_path) -> None:
    family, layers, heads_per_layer, hidden = OTHER_RELEASES[release]
    views = 2 if family == "llava_next" else 1
    layout = release_unet_layout(views * layers * heads_per_layer, layers, hidden)
    layout |= release_sam_layout()
    generator = torch.Generator().manual_seed(1)
    tensors = {k: torch.randn(shape, generator=generator) for k, shape in layout.items()}
    src, dst = tmp_path / f"{release}.pth", tmp_path / "heads.safetensors"
    torch.save(tensors, src)
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "convert.py"),
        str(src),
        str(dst),
        "--family",
        family,
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert f"{views} view(s), L={layers}, H={heads_per_layer}, D={hidden}" in run.stdout
    assert read_metadata(dst)["family"] == family
    assert read_metadata(dst)["prompt"] == "Please give me a description of the image."
    config = HeadsConfig(layers, heads_per_layer, hidden, num_views=views)
    with torch.device("meta"):
        built = build_heads(config, build_sam(sam_config("vit_l")))
    built.to_empty(device="cpu")
    assert load_heads(built, dst) is None  # strict: every key, every shape
    first = "mask_head.encoder.0.0.convs.0.conv.weight"
    assert torch.equal(built.mask_decoder.encoder[0].convs[0].conv.weight, tensors[first])


# --------------------------------------------------------------------------------------------
# What a release does not carry. F-LMM may save trainable parameters only, so a release can lack
# SAM's positional-encoding buffer; the converter fills it from the SAM checkpoint. And a release
# does not name its LMM: the views (and the family, where one has that many) follow from the
# U-Net's input channels, the LMM's config, or --family.
# --------------------------------------------------------------------------------------------

BUFFER = "refiner.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
SAM_BUFFER = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"  # segment-anything's
TINY_HEADS = HeadsConfig(num_layers=2, num_heads=2, hidden_size=256)


def convert(argv: list, capsys) -> str:
    """Run the converter's ``main`` in this process; its stdout."""
    main([str(a) for a in argv])
    return capsys.readouterr().out


@pytest.fixture()
def tiny_release(tmp_path) -> tuple[dict[str, torch.Tensor], Path]:
    """Heads on the tiny SAM in the release layout, saved without SAM's buffer, as a release of
    trainable parameters only is; with the buffer the heads had (for the negative control)."""
    torch.manual_seed(0)
    heads = build_heads(TINY_HEADS, build_sam(sam_config("tiny")))
    release = to_flmm_state_dict(heads.state_dict())
    path = tmp_path / "release.pth"
    torch.save({k: v for k, v in release.items() if "pe_layer" not in k}, path)
    return release, path


@pytest.fixture(params=["pth", "safetensors"])
def tiny_sam_checkpoint(request, tmp_path) -> tuple[dict[str, torch.Tensor], Path]:
    """A whole tiny SAM in segment-anything's layout (an official ``.pth``'s keys), as torch.save
    or safetensors; another seed than the heads', so its buffer differs from theirs."""
    torch.manual_seed(1)
    state = build_sam(sam_config("tiny")).state_dict()
    path = tmp_path / f"sam_tiny.{request.param}"
    if request.param == "pth":
        torch.save(state, path)
    else:
        save_tensors(state, path)
    return state, path


def test_a_missing_sam_buffer_is_filled_from_the_sam_checkpoint(
    tiny_release, tiny_sam_checkpoint, tmp_path, capsys
) -> None:
    release, src = tiny_release
    sam_state, sam_path = tiny_sam_checkpoint
    dst = tmp_path / "heads.safetensors"
    argv = [src, dst, "--sam", "tiny", "--family", "llava", "--sam-checkpoint", sam_path]
    out = convert(argv, capsys)
    assert f"filled {BUFFER} (not in the release) from {sam_path}" in out
    filled = read_state_dict(dst)[BUFFER]
    assert torch.equal(filled, sam_state[SAM_BUFFER])
    assert not torch.equal(filled, release[f"sam.model.{SAM_BUFFER}"])  # negative control
    assert read_metadata(dst)["sam_buffers_from"] == str(sam_path)
    heads = build_heads(TINY_HEADS, build_sam(sam_config("tiny")))
    assert load_heads(heads, dst) is None  # strict: every key, every shape


def test_a_missing_sam_buffer_without_a_sam_checkpoint_fails_naming_it(
    tiny_release, tmp_path, capsys
) -> None:
    _, src = tiny_release
    dst = tmp_path / "heads.safetensors"
    with pytest.raises(SystemExit, match=rf"lacks SAM's buffer {BUFFER}.*give --sam-checkpoint"):
        convert([src, dst, "--sam", "tiny", "--family", "llava"], capsys)
    assert not dst.exists()


def test_a_sam_checkpoint_without_the_buffer_fails_naming_it(
    tiny_release, tmp_path, capsys
) -> None:
    _, src = tiny_release
    sam_path = tmp_path / "not_sam.pth"
    torch.save({"image_encoder.neck.0.weight": torch.zeros(1)}, sam_path)
    argv = [src, tmp_path / "h.safetensors", "--sam", "tiny", "--sam-checkpoint", sam_path]
    with pytest.raises(SystemExit, match=rf"{sam_path} has no {SAM_BUFFER}"):
        convert(argv, capsys)


def test_a_release_with_the_buffer_keeps_its_own(tiny_sam_checkpoint, tmp_path, capsys) -> None:
    torch.manual_seed(0)
    release = to_flmm_state_dict(
        build_heads(TINY_HEADS, build_sam(sam_config("tiny"))).state_dict()
    )
    src, dst = tmp_path / "release.pth", tmp_path / "heads.safetensors"
    torch.save(release, src)
    _, sam_path = tiny_sam_checkpoint
    out = convert(
        [src, dst, "--sam", "tiny", "--family", "llava", "--sam-checkpoint", sam_path], capsys
    )
    assert "filled" not in out and "sam_buffers_from" not in read_metadata(dst)
    assert torch.equal(read_state_dict(dst)[BUFFER], release[f"sam.model.{SAM_BUFFER}"])


def release_file(path: Path, views: int, layers: int, heads: int, hidden: int) -> Path:
    """A release of the hand-written layout for an LMM of that shape, random tensors, saved."""
    layout = release_unet_layout(views * layers * heads, layers, hidden) | release_sam_layout()
    generator = torch.Generator().manual_seed(2)
    torch.save({k: torch.randn(s, generator=generator) for k, s in layout.items()}, path)
    return path


@pytest.fixture(scope="module")
def llava_next_release(tmp_path_factory) -> Path:
    """F-LMM's LLaVA-NeXT-7B release layout: 2 views x 32 layers x 32 heads, width 4096."""
    return release_file(tmp_path_factory.mktemp("next") / "llava_next.pth", 2, 32, 32, 4096)


def lmm_dir(path: Path, model_type: str, layers: int, heads: int, hidden: int) -> Path:
    """An LMM directory as the hub has it, its config.json only (all the converter reads)."""
    path.mkdir()
    text = {
        "model_type": "llama",
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_size": hidden,
    }
    config = {"model_type": model_type, "text_config": text}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_llava_next_release_converts_without_family(llava_next_release, tmp_path, capsys) -> None:
    dst = tmp_path / "heads.safetensors"
    out = convert([llava_next_release, dst], capsys)
    assert "H = D 4096 / head dim 128, V = channels 2048 / (L 32 x H 32)" in out
    assert "V=2, L=32, H=32, D=4096; family llava_next" in out
    assert read_metadata(dst)["family"] == "llava_next"
    assert read_metadata(dst)["num_views"] == "2"
    with torch.device("meta"):
        heads = build_heads(HeadsConfig(32, 32, 4096, num_views=2), build_sam(sam_config("vit_l")))
    heads.to_empty(device="cpu")
    assert load_heads(heads, dst) is None  # strict: the U-Net reads 2 x 32 x 32 channels
    assert heads.mask_decoder.encoder[0].convs[0].conv.in_channels == 2048


def test_a_llava_1_5_release_infers_one_view_and_records_no_family(
    release_7b, tmp_path, capsys
) -> None:
    _, src = release_7b
    dst = tmp_path / "heads.safetensors"
    out = convert([src, dst], capsys)
    assert "V=1, L=32, H=32, D=4096; family not recorded" in out
    assert "deepseek_vl, deepseek_vl_hybrid, llava share this layout" in out
    assert "F-LMM's LLaVA-1.5-7B (llava) release has this shape" in out
    assert "family" not in read_metadata(dst)
    assert read_metadata(dst)["num_views"] == "1"


def test_the_lmm_config_gives_the_family(llava_next_release, tmp_path, capsys) -> None:
    lmm = lmm_dir(tmp_path / "llava-next", "llava_next", 32, 32, 4096)
    dst = tmp_path / "heads.safetensors"
    out = convert([llava_next_release, dst, "--lmm", lmm], capsys)
    assert "from the LMM's config (llava_next: 2 view(s)): V=2, L=32, H=32" in out
    assert read_metadata(dst)["family"] == "llava_next"


@pytest.mark.parametrize(
    ("model_type", "layers", "hidden", "message"),
    [
        ("llava", 32, 4096, "reads 2048 channels, not 1 view(s) x 32 layers x 32 heads = 1024"),
        ("llava_next", 24, 2048, "32 layers of width 4096; the llava_next LMM has 24 layers of"),
    ],
)
def test_an_lmm_of_another_shape_fails_naming_the_numbers(
    llava_next_release, tmp_path, capsys, model_type, layers, hidden, message
) -> None:
    lmm = lmm_dir(tmp_path / "lmm", model_type, layers, 32, hidden)
    with pytest.raises(SystemExit, match=re.escape(message)):
        convert([llava_next_release, tmp_path / "h.safetensors", "--lmm", lmm], capsys)


def test_an_lmm_not_here_fails_without_downloading(llava_next_release, tmp_path, capsys) -> None:
    argv = [llava_next_release, tmp_path / "h.safetensors", "--lmm", tmp_path / "absent"]
    with pytest.raises(SystemExit, match=r"not a local directory nor in the Hugging Face cache"):
        convert(argv, capsys)


@pytest.mark.parametrize("release", FLMM_RELEASES, ids=[r[0] for r in FLMM_RELEASES])
def test_each_flmm_release_shape_is_inferred_from_its_channels(release) -> None:
    _, model_type, views, layers, heads, hidden = release
    dims = {"in_channels": views * layers * heads, "num_layers": layers, "hidden_size": hidden}
    shape = release_shape(dims)
    assert (shape.num_views, shape.num_heads) == (views, heads)
    assert shape.family == (model_type if views == 2 else None)


@pytest.mark.parametrize(
    ("channels", "flags", "message"),
    [
        (3 * 2 * 2, {}, "V = channels 12 / (L 2 x H 2) = 3: F-LMM's heads read 1 or 2 views"),
        (6, {}, "reads 6 channels, not 2 view(s) x 2 layers x 2 heads = 8"),
        (6, {"model_type": "llava_next"}, "reads 6 channels, not 2 view(s) x 2 layers x 1 heads"),
        (8, {"num_heads": 3}, "reads 8 channels, not 1 view(s) x 2 layers x 3 heads = 6"),
        (8, {"hidden_size": 64}, "hidden size D 64 is not a multiple of 128"),
    ],
)
def test_an_inconsistent_shape_fails_naming_the_numbers(channels, flags, message) -> None:
    dims = {"in_channels": channels, "num_layers": 2, "hidden_size": flags.pop("hidden_size", 256)}
    with pytest.raises(ValueError, match=re.escape(message)):
        release_shape(dims, **flags)
