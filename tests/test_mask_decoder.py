"""Behaviour of the U-Net mask decoder (F-LMM "Mask Decoder"): shapes, input normalisation,
padding/cropping and the state-dict key contract shared with flmm.convert and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from flmm.mask_decoder import MaskDecoder

NUM_STAGES = 4
UPSAMPLE_TO = 64


def upsampled_size(h: int, w: int, upsample_to: int = UPSAMPLE_TO) -> tuple[int, int]:
    """The rule from the spec: scale s = max(1, upsample_to / max(h, w)); size = floor(h·s)."""
    scale = max(1.0, upsample_to / max(h, w))
    return math.floor(h * scale), math.floor(w * scale)


def attention_maps(batch: int, channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Non-negative maps like softmax attention weights: [batch, channels, h, w]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, h, w, generator=gen)


@pytest.fixture(scope="module")
def decoder() -> MaskDecoder:
    torch.manual_seed(0)
    return MaskDecoder(in_channels=32, base_channels=16).eval()


@pytest.mark.parametrize(
    "h, w",
    [(24, 24), (16, 24), (10, 13), (80, 80), (49, 49), (7, 100)],
    ids=["square-24", "non-square-16x24", "odd-10x13", "large-80-no-upsample", "49", "wide"],
)
def test_output_shape_follows_upsample_rule(decoder: MaskDecoder, h: int, w: int) -> None:
    out = decoder(attention_maps(2, 32, h, w))
    assert out.shape == (2, 1, *upsampled_size(h, w))
    assert torch.isfinite(out).all()


def test_square_24_grid_gives_64x64_logits(decoder: MaskDecoder) -> None:
    assert decoder(attention_maps(3, 32, 24, 24)).shape == (3, 1, 64, 64)


def test_large_grid_is_not_downsampled(decoder: MaskDecoder) -> None:
    assert decoder(attention_maps(1, 32, 80, 80)).shape == (1, 1, 80, 80)


@pytest.mark.parametrize("h, w", [(10, 13), (16, 24), (80, 80)])
def test_unet_runs_on_padded_grid_and_crops_top_left(decoder: MaskDecoder, h, w) -> None:
    captured = {}
    hook = decoder.conv_seg.register_forward_hook(lambda m, i, o: captured.update(seg=o))
    try:
        out = decoder(attention_maps(2, 32, h, w))
    finally:
        hook.remove()
    height, width = upsampled_size(h, w)
    multiple = 2 ** (NUM_STAGES - 1)
    padded = captured["seg"]
    assert padded.shape[-2:] == (
        math.ceil(height / multiple) * multiple,
        math.ceil(width / multiple) * multiple,
    )
    torch.testing.assert_close(out, padded[..., :height, :width])


def test_channel_scale_does_not_change_output(decoder: MaskDecoder) -> None:
    x = attention_maps(2, 32, 16, 24)
    scaled = x.clone()
    scaled[:, 5] *= 7.3
    scaled[1, 20] *= 0.01
    torch.testing.assert_close(decoder(scaled), decoder(x), rtol=1e-4, atol=1e-5)


def test_all_zero_channel_gives_finite_output(decoder: MaskDecoder) -> None:
    x = attention_maps(2, 32, 24, 24)
    x[:, 3] = 0.0
    x[1] = 0.0
    assert torch.isfinite(decoder(x)).all()


def test_output_keeps_input_dtype() -> None:
    torch.manual_seed(0)
    model = MaskDecoder(in_channels=4, base_channels=8).to(torch.bfloat16)
    out = model(attention_maps(1, 4, 12, 12).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert out.shape == (1, 1, 64, 64)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = MaskDecoder(in_channels=4, base_channels=8)
    model(attention_maps(2, 4, 10, 13)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []


def expected_state_dict_keys(num_stages: int = NUM_STAGES) -> set[str]:
    """Key contract, written out from the spec independently of the module code."""
    keys = set()
    for i in range(num_stages):
        for j in range(2):
            keys |= {
                f"encoder.{i}.convs.{j}.conv.weight",
                f"encoder.{i}.convs.{j}.norm.weight",
                f"encoder.{i}.convs.{j}.norm.bias",
            }
    for i in range(num_stages - 1):
        keys |= {
            f"decoder.{i}.up.conv.weight",
            f"decoder.{i}.up.norm.weight",
            f"decoder.{i}.up.norm.bias",
        }
        for j in range(2):
            keys |= {
                f"decoder.{i}.convs.{j}.conv.weight",
                f"decoder.{i}.convs.{j}.norm.weight",
                f"decoder.{i}.convs.{j}.norm.bias",
            }
    return keys | {"conv_seg.weight", "conv_seg.bias"}


def test_up_block_matches_mmseg_order_upsample_then_conv() -> None:
    """UpBlock runs its 1×1 conv before the ×2 upsampling (cheaper); the result must equal
    mmseg's order (upsample, then conv → norm → ReLU) up to float rounding."""
    import torch.nn.functional as F

    from flmm.mask_decoder import UpBlock

    torch.manual_seed(0)
    block = UpBlock(in_channels=32, out_channels=16).eval()
    skip, deep = torch.randn(3, 16, 14, 10), torch.randn(3, 32, 7, 5)
    with torch.no_grad():
        up = F.interpolate(deep, scale_factor=2.0, mode="bilinear", align_corners=False)
        unit = block.up
        reference = block.convs(torch.cat([skip, F.relu(unit.norm(unit.conv(up)))], dim=1))
        assert torch.allclose(block(skip, deep), reference, atol=1e-5, rtol=1e-5)


def test_state_dict_keys_match_contract() -> None:
    keys = set(MaskDecoder(in_channels=32).state_dict())
    assert keys == expected_state_dict_keys()
    assert len(keys) == 4 * 2 * 3 + 3 * (2 + 1) * 3 + 2


def test_state_dict_shapes_follow_channel_doubling() -> None:
    sd = MaskDecoder(in_channels=32, base_channels=64).state_dict()
    assert sd["encoder.0.convs.0.conv.weight"].shape == (64, 32, 3, 3)
    assert sd["encoder.3.convs.0.conv.weight"].shape == (512, 256, 3, 3)
    assert sd["decoder.2.up.conv.weight"].shape == (256, 512, 1, 1)
    assert sd["decoder.0.convs.0.conv.weight"].shape == (64, 128, 3, 3)
    assert sd["decoder.0.convs.1.conv.weight"].shape == (64, 64, 3, 3)
    assert sd["conv_seg.weight"].shape == (1, 64, 1, 1)
