"""The frozen LMM and its family adapters: loading, preprocessing, prompt layout, phrase tokens."""

import pytest
import torch
from conftest import random_image

from flmm.families import family_for
from flmm.geometry import ImageGeometry
from flmm.lmm import FrozenLMM
from flmm.prompt import PromptConfig, answer_text
from flmm.tiny_lmms import MODEL_TYPES


def test_loaded_frozen_in_eval_with_capture_only_on_the_language_model(tiny_llava_dir):
    lmm = FrozenLMM.from_pretrained(str(tiny_llava_dir), dtype=torch.bfloat16)
    assert not lmm.model.training
    assert not any(p.requires_grad for p in lmm.model.parameters())
    assert lmm.model.dtype == torch.bfloat16
    assert lmm.model.config.text_config._attn_implementation == "flmm_capture"
    assert lmm.model.config.vision_config._attn_implementation != "flmm_capture"
    assert lmm.family.name == "LLaVA-1.5"
    assert lmm.prepare(random_image(30, 50), ["a"]).grid == (4, 4)
    assert lmm.in_channels == lmm.num_layers * lmm.num_heads
    # transformers' default would fetch Hub kernels while loading (fails offline on a GPU)
    assert lmm.model.use_kernels is False


def test_phrase_tokens_decode_back_to_the_phrases_in_the_assistant_turn(tiny_llava_dir):
    lmm = FrozenLMM.from_pretrained(str(tiny_llava_dir))
    phrases = ["the red circle", "a small blue square", "the yellow star"]
    sample = lmm.prepare(random_image(30, 50), phrases)
    tok = lmm.processor.tokenizer
    image_id = lmm.model.config.image_token_id
    assert int((sample.input_ids == image_id).sum()) == 16
    text = tok.decode(sample.input_ids, skip_special_tokens=False)
    assert text.index("ASSISTANT:") < text.index("the red circle. a small blue square.")
    for phrase, tokens in zip(phrases, sample.phrase_tokens):
        assert tok.decode(sample.input_ids[tokens]).strip() == phrase
    assert all(
        int(a[-1]) < int(b[0]) for a, b in zip(sample.phrase_tokens, sample.phrase_tokens[1:])
    )


def test_bad_phrases_are_rejected():
    with pytest.raises(ValueError, match="no phrases"):
        answer_text([])
    with pytest.raises(ValueError, match="empty phrase"):
        answer_text(["the cat", "  "])
    with pytest.raises(ValueError, match="merge"):
        PromptConfig(merge="median")


def test_pixels_are_the_mean_padded_centred_square(tiny_llava_dir):
    lmm = FrozenLMM.from_pretrained(str(tiny_llava_dir))
    ip = lmm.processor.image_processor
    image = torch.full(
        (20, 56, 3), 255, dtype=torch.uint8
    )  # white band, mean-colour bars above/below
    pixels = lmm.prepare(image, ["the red circle"]).image.tensors["pixel_values"][0]
    assert pixels.shape == (3, 56, 56)
    mean = torch.tensor([int(255 * m) / 255 for m in ip.image_mean])  # the processor's rule
    pad_value = (mean - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)
    white = (1 - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)
    torch.testing.assert_close(pixels[:, 2, 28], pad_value, atol=0.05, rtol=0)  # top bar
    torch.testing.assert_close(pixels[:, 28, 28], white, atol=0.05, rtol=0)  # the image
    torch.testing.assert_close(pixels[:, 53, 28], pad_value, atol=0.05, rtol=0)  # bottom bar


def test_geometry_maps_square_frame_logits_back_to_the_original_image():
    geometry = ImageGeometry.square(height=30, width=60)  # square side 60, image rows 15..45
    assert (geometry.frame_height, geometry.frame_width, geometry.left, geometry.top) == (
        60,
        60,
        0,
        15,
    )
    logits = torch.full((1, 1, 60, 60), -5.0)
    logits[..., 15:30, 30:60] = 5.0  # the image's top-right quarter
    back = geometry.to_original(logits)
    assert back.shape == (1, 1, 30, 60)
    assert (back[0, 0, 2:13, 32:58] > 0).all() and (back[0, 0, 17:, :] < 0).all()
    assert (back[0, 0, :, :28] < 0).all()


def test_max_merge_takes_the_largest_token_row(tiny_llava_dir):
    lmm = FrozenLMM.from_pretrained(str(tiny_llava_dir), prompt=PromptConfig(merge="max"))
    sample = lmm.prepare(random_image(40, 40), ["a small blue square below the big green triangle"])
    with torch.inference_mode():
        out = lmm([sample])
    n = len(sample.phrase_tokens[0])
    rows = out.token_maps[0, :, :, :n].amax(dim=2)
    expected = (rows / rows.sum(-1, keepdim=True)).flatten(0, 1).unflatten(-1, sample.grid)
    torch.testing.assert_close(out.attention[0][0], expected)


def test_an_unsupported_model_type_is_a_clear_error_naming_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match="'blip_2'.*supported: .*llava_next.*qwen2_5_vl"):
        family_for("blip_2")
    (tmp_path / "config.json").write_text('{"model_type": "blip_2"}')
    with pytest.raises(ValueError, match="no adapter for LMMs of model_type 'blip_2'"):
        FrozenLMM.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_family_maps_its_grid_back_onto_the_original_image(model_type, tiny_lmm_dir):
    """A wide image: square-padding families' frame is the centred square; dynamic ones' is the
    image itself, with a grid as wide as the image is; the token count is the views' total."""
    lmm = FrozenLMM.from_pretrained(str(tiny_lmm_dir(model_type)))
    assert lmm.family is family_for(model_type)
    image = lmm.prepare(random_image(40, 80), ["the red circle"]).image
    assert sum(v.length for v in image.views) == image.n_tokens
    g = image.geometry
    if model_type in ("llava", "deepseek_vl", "deepseek_vl_hybrid"):
        assert (g.frame_height, g.frame_width, g.top, g.left) == (80, 80, 20, 0)
        assert image.grid[0] == image.grid[1]
    else:
        assert (g.frame_height, g.frame_width, g.top, g.left) == (40, 80, 0, 0)
        assert image.grid[1] > image.grid[0]
    logits = torch.zeros((1, 1, *image.grid))
    assert g.to_original(logits).shape == (1, 1, 40, 80)
