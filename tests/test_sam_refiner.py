"""SAM variants, checkpoint loading, the frozen image encoder and the trainable refiner.

Everything runs on the real segment-anything classes at the ``tiny`` size (128 px input,
8x8 embedding grid) on CPU; the real variants are only constructed on the meta device.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from segment_anything import sam_model_registry

from flmm.build import (
    SAM_VARIANTS,
    build_image_encoder,
    build_refiner,
    build_sam,
    sam_config,
)
from flmm.refiner import mask_logits_to_boxes, pad_to_input_frame

NUM_LAYERS, HIDDEN = 3, 8  # L, D of the fake LMM hidden states
H, W = 50, 80  # a non-square original frame; the tiny SAM input frame is 128 -> (80, 128)


@pytest.fixture
def sam():
    torch.manual_seed(0)
    return build_sam(sam_config("tiny"))


@pytest.fixture
def image():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (H, W, 3), dtype=torch.uint8, generator=gen)


def coarse_with_rect(p: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    """[p, 1, H, W] logits: -4 outside, +4 on rows y0:y1 and columns x0:x1."""
    logits = torch.full((p, 1, H, W), -4.0)
    logits[:, :, y0:y1, x0:x1] = 4.0
    return logits


def phrase_hidden(token_counts: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(n, NUM_LAYERS, HIDDEN, generator=gen) for n in token_counts]


# --- variants and checkpoints -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_real_variants_match_segment_anything(name):
    with torch.device("meta"):
        ours, theirs = build_sam(SAM_VARIANTS[name]), sam_model_registry[name]()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    ours_blocks, theirs_blocks = ours.image_encoder.blocks, theirs.image_encoder.blocks
    assert [(b.attn.num_heads, b.window_size) for b in ours_blocks] == [
        (b.attn.num_heads, b.window_size) for b in theirs_blocks
    ]


def test_unknown_variant_lists_known_ones():
    with pytest.raises(KeyError) as error:
        sam_config("vit_x")
    assert all(name in str(error.value) for name in ["vit_h", "vit_l", "vit_b", "tiny"])


def sam_outputs(sam) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-res logits and IoU of segment-anything's own end-to-end forward on a fixed input."""
    gen = torch.Generator().manual_seed(3)
    record = {
        "image": torch.rand(3, 128, 128, generator=gen) * 255,
        "original_size": (128, 128),
        "boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0]]),
    }
    out = sam([record], multimask_output=False)[0]
    return out["low_res_logits"], out["iou_predictions"]


def save_checkpoint(state_dict: dict, path) -> None:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_roundtrip_gives_identical_outputs(sam, tmp_path, suffix):
    path = tmp_path / f"sam{suffix}"
    save_checkpoint(sam.state_dict(), path)
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    loaded = build_sam(sam_config("tiny"), checkpoint=path)
    for ours, theirs in zip(sam_outputs(sam), sam_outputs(loaded)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize(
    "edit",
    ["wrong_shape", "missing", "unexpected"],
)
def test_checkpoint_mismatch_names_the_key(sam, tmp_path, edit):
    state = sam.state_dict()
    key = "mask_decoder.iou_token.weight"
    if edit == "wrong_shape":
        state[key] = torch.zeros(1, 7)
    elif edit == "missing":
        del state[key]
    else:
        key = "mask_decoder.extra.weight"
        state[key] = torch.zeros(2)
    path = tmp_path / "bad.pth"
    save_checkpoint(state, path)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_sam(sam_config("tiny"), checkpoint=path)


# --- frozen image encoder ---------------------------------------------------------------------


def test_preprocess_resizes_long_side_and_pads_bottom_right(sam):
    encoder = build_image_encoder(sam)
    flat = torch.full((H, W, 3), 200, dtype=torch.uint8)
    x, input_size = encoder.preprocess(flat)
    assert x.shape == (1, 3, 128, 128) and x.dtype == torch.float32
    assert input_size == (80, 128)  # long side W=80 -> 128, H scaled by the same 1.6
    expected = (200 - sam.pixel_mean) / sam.pixel_std  # [3, 1, 1]
    torch.testing.assert_close(x[0, :, :80, :128], expected.expand(3, 80, 128))
    assert torch.all(x[0, :, 80:, :] == 0)


def test_preprocess_rejects_non_uint8(sam):
    with pytest.raises(ValueError, match="uint8"):
        build_image_encoder(sam).preprocess(torch.zeros(H, W, 3))


def test_image_encoder_embedding_shape_and_frozen(sam, image):
    encoder = build_image_encoder(sam)
    encoder.train()
    x, _ = encoder.preprocess(image)
    embedding = encoder(x)
    assert embedding.shape == (1, 32, 8, 8)
    assert not encoder.training and not embedding.requires_grad
    assert all(not p.requires_grad for p in encoder.parameters())


# --- refiner prompts --------------------------------------------------------------------------


def test_box_is_tight_xyxy_with_exclusive_max_and_empty_is_full_image():
    logits = coarse_with_rect(2, y0=10, y1=20, x0=30, x1=45)
    logits[1] = -4.0  # phrase 1: empty mask
    logits.requires_grad_(True)
    boxes = mask_logits_to_boxes(logits)
    torch.testing.assert_close(boxes, torch.tensor([[30.0, 10, 45, 20], [0, 0, W, H]]))
    assert not boxes.requires_grad


def test_single_pixel_box():
    logits = torch.full((1, 1, H, W), -1.0)
    logits[0, 0, H - 1, W - 1] = 1.0
    torch.testing.assert_close(mask_logits_to_boxes(logits), torch.tensor([[W - 1.0, H - 1, W, H]]))


def test_dense_prompt_padding_is_min_of_minus_one_and_min_logit_per_phrase():
    logits = torch.empty(2, 1, H, W)
    logits[0].uniform_(-0.5, 2.0)  # min > -1 -> pad -1
    logits[1].uniform_(-3.0, 2.0)  # min < -1 -> pad min
    logits[1, 0, 0, 0] = -3.0
    padded = pad_to_input_frame(logits, (80, 128), 128)
    assert padded.shape == (2, 1, 128, 128)
    assert torch.all(padded[0, :, 80:] == -1.0) and torch.all(padded[1, :, 80:] == -3.0)
    assert padded[0, :, :80].min() >= -0.5  # the resized logits, not padding


def test_prompts_reach_sam_in_its_input_frame(sam):
    refiner = build_refiner(sam, NUM_LAYERS, HIDDEN)
    seen = {}
    refiner.prompt_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    coarse = coarse_with_rect(1, y0=10, y1=20, x0=30, x1=45)
    embedding = torch.randn(1, 32, 8, 8)
    refiner(embedding, coarse, phrase_hidden((2,)), (80, 128), (H, W))
    # the original-frame box (30, 10, 45, 20) scaled by 128 / 80 = 1.6
    torch.testing.assert_close(seen["boxes"], torch.tensor([[48.0, 16.0, 72.0, 32.0]]))
    assert seen["masks"].shape == (1, 1, 32, 32)  # 4x the 8x8 embedding grid


# --- refiner forward and training -------------------------------------------------------------


def test_refiner_state_dict_keys_are_the_converter_contract(sam):
    refiner = build_refiner(sam, NUM_LAYERS, HIDDEN)
    expected = {"text_layer_weights", "text_proj.weight", "text_proj.bias"}
    expected |= {f"prompt_encoder.{k}" for k in sam.prompt_encoder.state_dict()}
    expected |= {f"mask_decoder.{k}" for k in sam.mask_decoder.state_dict()}
    assert set(refiner.state_dict()) == expected


def test_refiner_output_shape_and_grouping_matches_per_phrase_loop(sam, image):
    encoder, refiner = build_image_encoder(sam), build_refiner(sam, NUM_LAYERS, HIDDEN)
    x, input_size = encoder.preprocess(image)
    embedding = encoder(x)
    coarse = torch.randn(3, 1, H, W) + coarse_with_rect(3, y0=5, y1=30, x0=10, x1=60)
    hidden = phrase_hidden((2, 3, 2))
    with torch.no_grad():
        batched = refiner(embedding, coarse, hidden, input_size, (H, W))
        looped = torch.cat(
            [
                refiner(embedding, coarse[i : i + 1], [hidden[i]], input_size, (H, W))
                for i in range(3)
            ]
        )
    assert batched.shape == (3, 1, H, W)
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-5)


def test_refiner_rejects_hidden_states_of_the_wrong_shape(sam):
    refiner = build_refiner(sam, NUM_LAYERS, HIDDEN)
    with pytest.raises(ValueError, match="phrase hidden states"):
        refiner(
            torch.randn(1, 32, 8, 8),
            coarse_with_rect(1, 0, 5, 0, 5),
            [torch.randn(2, NUM_LAYERS + 1, HIDDEN)],
            (80, 128),
            (H, W),
        )


def test_gradients_reach_refiner_heads_but_not_the_frozen_encoder(sam, image):
    encoder, refiner = build_image_encoder(sam), build_refiner(sam, NUM_LAYERS, HIDDEN)
    x, input_size = encoder.preprocess(image)
    coarse = coarse_with_rect(2, y0=5, y1=30, x0=10, x1=60)
    out = refiner(encoder(x), coarse, phrase_hidden((2, 3)), input_size, (H, W))
    torch.nn.functional.binary_cross_entropy_with_logits(out, (coarse > 0).float()).backward()

    trained = {
        "text_layer_weights": refiner.text_layer_weights,
        "text_proj": refiner.text_proj.weight,
        "prompt_encoder.mask_downscaling": refiner.prompt_encoder.mask_downscaling[0].weight,
        "prompt_encoder.box_corner": refiner.prompt_encoder.point_embeddings[2].weight,
        "mask_decoder.transformer": refiner.mask_decoder.transformer.layers[0].mlp.lin1.weight,
        "mask_decoder.hypernetwork": refiner.mask_decoder.output_hypernetworks_mlps[0]
        .layers[0]
        .weight,
    }
    for name, param in trained.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in encoder.parameters())
