"""Attention capture equals eager attention, without materialising S×S matrices."""

import pytest
import torch
from conftest import random_image
from transformers import LlavaForConditionalGeneration

from flmm.lmm import FrozenLlava, collate

PHRASES = [
    ["the red circle", "a small blue square below the big green triangle"],
    ["the yellow star"],
]


def _samples(lmm):
    images = [random_image(40, 70, seed=1), random_image(60, 30, seed=2)]
    return [lmm.prepare(img, ph) for img, ph in zip(images, PHRASES)]


def _stock(path, attn):
    return LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn).eval()


def _model_inputs(lmm, samples):
    tok = lmm.processor.tokenizer
    batch = collate(samples, tok.pad_token_id, tok.padding_side, lmm.model.config.image_token_id)
    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values")
    return batch, {k: batch[k] for k in keys}


@pytest.mark.parametrize("padding", ["left", "right"])
def test_captured_maps_equal_eager_attention_slice(padding, tiny_llava_dir, tiny_llava_right_dir):
    path = tiny_llava_dir if padding == "left" else tiny_llava_right_dir
    lmm = FrozenLlava.from_pretrained(str(path))
    assert lmm.processor.tokenizer.padding_side == padding
    samples = _samples(lmm)
    batch, inputs = _model_inputs(lmm, samples)
    assert (batch["attention_mask"] == 0).any(), "the batch must be padded"
    with torch.inference_mode():
        out = lmm(samples)
        eager = _stock(path, "eager")(**inputs, output_attentions=True)
    assert len(eager.attentions) == lmm.num_layers
    for b, sample in enumerate(samples):
        n_q = sum(len(t) for t in sample.phrase_tokens)
        q_pos, k_pos = batch["query_index"][b, :n_q], batch["image_index"][b]
        for layer, attn in enumerate(eager.attentions):
            expected = attn[b][:, q_pos][:, :, k_pos]  # [H, Q, N]
            got = out.token_maps[b, layer, :, :n_q]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_capture_leaves_logits_equal_to_stock_sdpa(tiny_llava_dir):
    lmm = FrozenLlava.from_pretrained(str(tiny_llava_dir))
    samples = _samples(lmm)
    batch, inputs = _model_inputs(lmm, samples)
    from flmm.capture import AttentionCapture

    cap = AttentionCapture(batch["query_index"], batch["image_index"])
    with torch.inference_mode():
        ours = lmm.model(**inputs, flmm_capture=cap).logits
        stock = _stock(tiny_llava_dir, "sdpa")(**inputs).logits
    assert len(cap.maps) == lmm.num_layers
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], stock[valid], atol=1e-5, rtol=1e-5)


def test_phrase_hidden_states_equal_transformers_hidden_states(tiny_llava_dir):
    lmm = FrozenLlava.from_pretrained(str(tiny_llava_dir))
    samples = _samples(lmm)
    batch, inputs = _model_inputs(lmm, samples)
    with torch.inference_mode():
        out = lmm(samples)
        stock = _stock(tiny_llava_dir, "sdpa")(**inputs, output_hidden_states=True)
    layers = torch.stack(stock.hidden_states[1:], dim=2)  # [B, T, L, D]
    for b, sample in enumerate(samples):
        offset = int(batch["query_index"][b, 0] - sample.phrase_tokens[0][0])
        for p, tokens in enumerate(sample.phrase_tokens):
            expected = layers[b, tokens + offset]
            torch.testing.assert_close(out.hidden[b][p], expected, atol=1e-5, rtol=1e-5)


def test_merged_maps_are_layer_major_normalised_and_merged_per_phrase(tiny_llava_dir):
    lmm = FrozenLlava.from_pretrained(str(tiny_llava_dir))
    samples = _samples(lmm)
    with torch.inference_mode():
        out = lmm(samples)
    h, w = lmm.grid
    maps, first = out.attention[0], samples[0].phrase_tokens[0]
    assert maps.shape == (2, lmm.num_layers * lmm.num_heads, h, w)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(maps.shape[:2]))
    rows = out.token_maps[0, :, :, : len(first)].mean(dim=2)  # [L, H, N]
    expected = rows / rows.sum(-1, keepdim=True)
    layer, head = lmm.num_layers - 1, 1
    channel = layer * lmm.num_heads + head
    torch.testing.assert_close(maps[0, channel].flatten(), expected[layer, head])


def test_unpadded_single_sample_uses_the_causal_path(tiny_llava_dir):
    """Batch of one: sdpa gets no mask at all; captured rows must still be causal."""
    lmm = FrozenLlava.from_pretrained(str(tiny_llava_dir))
    samples = _samples(lmm)[:1]
    batch, inputs = _model_inputs(lmm, samples)
    assert bool(batch["attention_mask"].all())
    with torch.inference_mode():
        out = lmm(samples)
        eager = _stock(tiny_llava_dir, "eager")(**inputs, output_attentions=True)
    q_pos, k_pos = batch["query_index"][0], batch["image_index"][0]
    for layer, attn in enumerate(eager.attentions):
        torch.testing.assert_close(
            out.token_maps[0, layer], attn[0][:, q_pos][:, :, k_pos], atol=1e-5, rtol=0
        )
