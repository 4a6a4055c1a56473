"""Attention capture equals eager attention for every family, without S×S matrices."""

import pytest
import torch
from conftest import random_image
from transformers import AutoModelForImageTextToText

from flmm.capture import AttentionCapture
from flmm.lmm import FrozenLMM
from flmm.tiny_lmms import MODEL_TYPES

PHRASES = [
    ["the red circle", "a small blue square below the big green triangle"],
    ["the yellow star"],
]


def _samples(lmm, sizes=((40, 70), (60, 30))):
    images = [random_image(h, w, seed=i + 1) for i, (h, w) in enumerate(sizes)]
    return [lmm.prepare(img, ph) for img, ph in zip(images, PHRASES)]


def _loaded(model_type, tiny_lmm_dir):
    """(checkpoint path, the frozen LMM, two prepared samples, their batch and model inputs)."""
    path = tiny_lmm_dir(model_type)
    lmm = FrozenLMM.from_pretrained(str(path))
    samples = _samples(lmm)
    return (path, lmm, samples, *lmm.model_inputs(samples))


def _stock(path, attn):
    return AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn).eval()


def _assert_maps_equal_eager(lmm, samples, path):
    batch, inputs = lmm.model_inputs(samples)
    with torch.inference_mode():
        out = lmm(samples)
        eager = _stock(path, "eager")(**inputs, output_attentions=True)
    assert len(eager.attentions) == lmm.num_layers
    for b, sample in enumerate(samples):
        n_q = sum(len(t) for t in sample.phrase_tokens)
        n_img = sample.image.n_tokens
        q_pos, k_pos = batch["query_index"][b, :n_q], batch["image_index"][b, :n_img]
        for layer, attn in enumerate(eager.attentions):
            expected = attn[b][:, q_pos][:, :, k_pos]  # [H, Q, N]
            got = out.token_maps[b, layer, :, :n_q, :n_img]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    return batch


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_captured_maps_equal_eager_attention_slice(model_type, tiny_lmm_dir):
    path = tiny_lmm_dir(model_type)
    lmm = FrozenLMM.from_pretrained(str(path))
    batch = _assert_maps_equal_eager(lmm, _samples(lmm), path)
    assert (batch["attention_mask"] == 0).any(), "the batch must be padded"


def test_captured_maps_equal_eager_attention_slice_right_padded(tiny_llava_right_dir):
    lmm = FrozenLMM.from_pretrained(str(tiny_llava_right_dir))
    assert lmm.processor.tokenizer.padding_side == "right"
    batch = _assert_maps_equal_eager(lmm, _samples(lmm), tiny_llava_right_dir)
    assert (batch["attention_mask"] == 0).any(), "the batch must be padded"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_capture_leaves_logits_equal_to_stock_sdpa(model_type, tiny_lmm_dir):
    path, lmm, _, batch, inputs = _loaded(model_type, tiny_lmm_dir)
    cap = AttentionCapture(batch["query_index"], batch["image_index"])
    with torch.inference_mode():
        ours = lmm.model(**inputs, flmm_capture=cap).logits
        stock = _stock(path, "sdpa")(**inputs).logits
    assert len(cap.maps) == lmm.num_layers
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], stock[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_phrase_hidden_states_equal_transformers_hidden_states(model_type, tiny_lmm_dir):
    path, lmm, samples, batch, inputs = _loaded(model_type, tiny_lmm_dir)
    with torch.inference_mode():
        out = lmm(samples)
        stock = _stock(path, "sdpa")(**inputs, output_hidden_states=True)
    layers = torch.stack(stock.hidden_states[-lmm.num_layers :], dim=2)  # [B, T, L, D]
    for b, sample in enumerate(samples):
        offset = int(batch["query_index"][b, 0] - sample.phrase_tokens[0][0])
        for p, tokens in enumerate(sample.phrase_tokens):
            expected = layers[b, tokens + offset]
            torch.testing.assert_close(out.hidden[b][p], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_merged_maps_are_view_and_layer_major_normalised_and_merged_per_phrase(
    model_type, tiny_lmm_dir
):
    lmm = FrozenLMM.from_pretrained(str(tiny_lmm_dir(model_type)))
    samples = _samples(lmm)
    with torch.inference_mode():
        out = lmm(samples)
    image, first = samples[0].image, samples[0].phrase_tokens[0]
    maps = out.attention[0]
    assert maps.shape == (2, lmm.in_channels, *image.grid)
    assert lmm.in_channels == len(image.views) * lmm.num_layers * lmm.num_heads
    rows = out.token_maps[0, :, :, : len(first), : image.n_tokens].mean(dim=2)  # [L, H, N]
    layer, head = lmm.num_layers - 1, 1
    last = image.views[-1]  # on the output grid itself: no resize
    assert (last.rows, last.cols) == image.grid
    on_grid = last.grid(rows[layer, head])
    expected = on_grid / on_grid.sum()
    channel = ((len(image.views) - 1) * lmm.num_layers + layer) * lmm.num_heads + head
    torch.testing.assert_close(maps[0, channel], expected)
    per_view = maps.unflatten(1, (len(image.views), -1)).sum((-2, -1))  # [P, V, L·H]
    torch.testing.assert_close(per_view, torch.ones_like(per_view), atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_each_phrase_is_grounded_on_its_own_image_whatever_the_batch_order(
    model_type, tiny_lmm_dir
):
    """Images of different sizes and aspect ratios in one batch: swapping them between rows
    moves each one's maps with it (and the grids follow the images)."""
    lmm = FrozenLMM.from_pretrained(str(tiny_lmm_dir(model_type)))
    a, b = random_image(40, 70, seed=1), random_image(70, 30, seed=2)
    phrases = ["the red circle"]
    with torch.inference_mode():
        ab = lmm([lmm.prepare(a, phrases), lmm.prepare(b, phrases)])
        ba = lmm([lmm.prepare(b, phrases), lmm.prepare(a, phrases)])
    torch.testing.assert_close(ab.attention[0], ba.attention[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ab.attention[1], ba.attention[0], atol=1e-5, rtol=1e-4)
    first, second = ab.attention
    assert first.shape != second.shape or not torch.allclose(first, second, atol=1e-3)
    wide, tall = (lmm.prepare(x, phrases).image for x in (a, b))
    if (wide.geometry.frame_height, wide.geometry.frame_width) == (40, 70):  # frame = image
        assert wide.grid[1] > wide.grid[0] and tall.grid[0] > tall.grid[1]


def test_unpadded_single_sample_uses_the_causal_path(tiny_llava_dir):
    """Batch of one: sdpa gets no mask at all; captured rows must still be causal."""
    lmm = FrozenLMM.from_pretrained(str(tiny_llava_dir))
    samples = _samples(lmm)[:1]
    batch, inputs = lmm.model_inputs(samples)
    assert bool(batch["attention_mask"].all())
    with torch.inference_mode():
        out = lmm(samples)
        eager = _stock(tiny_llava_dir, "eager")(**inputs, output_attentions=True)
    q_pos, k_pos = batch["query_index"][0], batch["image_index"][0]
    for layer, attn in enumerate(eager.attentions):
        torch.testing.assert_close(
            out.token_maps[0, layer], attn[0][:, q_pos][:, :, k_pos], atol=1e-5, rtol=0
        )


def test_a_bf16_lmm_keeps_its_captured_rows_in_bf16_and_merges_them_in_float32(tiny_llava_dir):
    """Caption mode captures every text token's rows (at 7B shapes ~0.6 GB a caption in
    float32): a bf16 LMM keeps them in bf16, half of that, computed in float32 and rounded once
    (within bf16's resolution of eager bf16 attention, which rounds its own way); the merged
    per-phrase maps the heads read are float32. ``stacked()`` moves the layers out of ``maps``."""
    lmm = FrozenLMM.from_pretrained(str(tiny_llava_dir), dtype=torch.bfloat16)
    samples = _samples(lmm)
    batch, inputs = lmm.model_inputs(samples)
    with torch.inference_mode():
        out = lmm(samples)
        eager = AutoModelForImageTextToText.from_pretrained(
            tiny_llava_dir, attn_implementation="eager", dtype=torch.bfloat16
        ).eval()(**inputs, output_attentions=True)
    assert out.token_maps.dtype == torch.bfloat16
    assert all(a.dtype == torch.float32 for a in out.attention)
    n_q, n_img = sum(len(t) for t in samples[0].phrase_tokens), samples[0].image.n_tokens
    q_pos, k_pos = batch["query_index"][0, :n_q], batch["image_index"][0, :n_img]
    for layer, attn in enumerate(eager.attentions):
        expected = attn[0][:, q_pos][:, :, k_pos].float()
        got = out.token_maps[0, layer, :, :n_q, :n_img].float()
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-2)
    cap = AttentionCapture(batch["query_index"], batch["image_index"])
    with torch.inference_mode():
        lmm.model(**inputs, flmm_capture=cap)
    kept = {layer: maps.clone() for layer, maps in cap.maps.items()}
    stacked = cap.stacked()
    assert not cap.maps and stacked.shape[1] == lmm.num_layers
    for layer, maps in kept.items():  # padded slots' rows may be NaN (fully masked)
        torch.testing.assert_close(stacked[:, layer], maps, atol=0, rtol=0, equal_nan=True)
