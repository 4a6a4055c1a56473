"""The F-LMM checkpoint converter: every key of the release layout maps through the table, the
result loads strictly into our modules, the mapping round-trips, and nothing is silently lost."""

from __future__ import annotations

import pytest
import torch

from flmm.convert import (
    convert_flmm_checkpoint,
    convert_flmm_state_dict,
    to_flmm_state_dict,
    unwrap_checkpoint,
)
from flmm.mask_decoder import MaskDecoder

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
# The release layout of LLaVA-1.5-7B + SAM ViT-L heads, written out from F-LMM's published code
# (github.com/wusize/F-LMM): configs/llava/frozen_llava_1_5_vicuna_7b_unet_sam_l_refcoco_png.py
# (UNetHead: base 64, 4 stages, 2 convs per stage, GroupNorm(1), InterpConv upsampling);
# flmm/models/frozen_llava.py (FrozenLlava: ``mask_head`` with in_channels = heads × layers =
# 32 × 32, ``text_layer_weights`` [32]; FrozenLlavaSAM: ``sam`` = SAMWrapper, ``text_proj`` =
# Linear(4096, 256)); flmm/models/mask_head/mask_decoder.py (UNetHead = mmseg's UNet +
# ``conv_seg``); flmm/models/mask_head/mask_refiner.py (SAMWrapper: ``self.model`` = the SAM,
# image encoder frozen). mmseg's UNet names: ``encoder.{i}`` = Sequential([MaxPool2d (i > 0),
# BasicConvBlock]), BasicConvBlock.convs.{j} = mmcv ConvModule (``conv`` without bias, ``gn``),
# ``decoder.{i}`` = UpConvBlock(conv_block, upsample = InterpConv(interp_upsample =
# Sequential([Upsample, ConvModule 1×1]))). The trainable parameters are what the release holds.
# --------------------------------------------------------------------------------------------


def release_unet_layout() -> dict[str, tuple[int, ...]]:
    """The ``mask_head.*`` keys and shapes of the 7B release."""
    layout = {}
    stages = [(1024, 64), (64, 128), (128, 256), (256, 512)]  # (in, out) per encoder stage
    for i, (c_in, c_out) in enumerate(stages):
        block = "mask_head.encoder.0.0" if i == 0 else f"mask_head.encoder.{i}.1"
        for j, c in enumerate((c_in, c_out)):
            layout[f"{block}.convs.{j}.conv.weight"] = (c_out, c, 3, 3)
            layout[f"{block}.convs.{j}.gn.weight"] = (c_out,)
            layout[f"{block}.convs.{j}.gn.bias"] = (c_out,)
    for i, (skip, c_in) in enumerate([(64, 128), (128, 256), (256, 512)]):
        up = f"mask_head.decoder.{i}.upsample.interp_upsample.1"
        layout[f"{up}.conv.weight"] = (skip, c_in, 1, 1)
        layout[f"{up}.gn.weight"] = layout[f"{up}.gn.bias"] = (skip,)
        for j, c in enumerate((2 * skip, skip)):
            conv = f"mask_head.decoder.{i}.conv_block.convs.{j}"
            layout[f"{conv}.conv.weight"] = (skip, c, 3, 3)
            layout[f"{conv}.gn.weight"] = layout[f"{conv}.gn.bias"] = (skip,)
    layout["mask_head.conv_seg.weight"] = (1, 64, 1, 1)
    layout["mask_head.conv_seg.bias"] = (1,)
    layout["text_layer_weights"] = (32,)
    layout["text_proj.weight"] = (256, 4096)
    layout["text_proj.bias"] = (256,)
    return layout


def release_sam_layout() -> dict[str, tuple[int, ...]]:
    """``sam.model.prompt_encoder.*`` / ``sam.model.mask_decoder.*``: segment-anything's own
    module names (the release's SAM is that library's ``Sam``), at SAM's sizes (every variant
    shares them: prompt dim 256, 64×64 embeddings of a 1024 px input)."""
    from segment_anything.modeling import MaskDecoder as SamMaskDecoder
    from segment_anything.modeling import PromptEncoder, TwoWayTransformer

    with torch.device("meta"):
        prompt = PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
            mask_in_chans=16,
        )  # fmt: skip
        transformer = TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)
        decoder = SamMaskDecoder(transformer_dim=256, transformer=transformer)
    layout = {
        f"sam.model.prompt_encoder.{k}": tuple(v.shape) for k, v in prompt.state_dict().items()
    }
    layout.update(
        {f"sam.model.mask_decoder.{k}": tuple(v.shape) for k, v in decoder.state_dict().items()}
    )
    return layout


def test_the_7b_release_layout_converts_and_fits_heads_built_for_llava_7b_and_sam_vit_l():
    from flmm.build import HeadsConfig, build_heads, build_sam, sam_config
    from flmm.checkpoint import check_state_dict

    layout = {**release_unet_layout(), **release_sam_layout()}
    assert len(release_unet_layout()) == 4 * 6 + 3 * 9 + 2 + 3
    release = {key: torch.zeros(shape) for key, shape in layout.items()}
    release["sam.model.image_encoder.neck.0.weight"] = torch.zeros(256, 1024, 1, 1)
    result = convert_flmm_checkpoint({"state_dict": release})
    assert result.dropped == ["sam.model.image_encoder.neck.0.weight"]
    assert len(result.state_dict) == len(layout)
    with torch.device("meta"):
        heads = build_heads(HeadsConfig(32, 32, 4096), build_sam(sam_config("vit_l")))
    check_state_dict(heads, result.state_dict)  # every key, every shape
