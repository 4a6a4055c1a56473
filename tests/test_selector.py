"""The keyword selector (flmm/selector.py): BIO tags from character spans, spans read back,
its loss, and the selector saved in a heads file (with its describe instruction) and built with
the model. Its training beside the heads: tests/test_train_steps.py; the shipped toy selector:
tests/test_toy_heads.py."""

from dataclasses import MISSING, fields

import pytest
import torch

from flmm.build import build_flmm, build_sam, load_heads, sam_config
from flmm.lmm import FrozenLMM
from flmm.selector import (
    BEGIN,
    INSIDE,
    OUTSIDE,
    KeywordSelector,
    SelectorConfig,
    bio_tags,
    char_span,
    read_spans,
    selector_metadata,
    selector_state,
    span_f1,
    split_selector,
    tag_loss,
    tagging_every_token,
)


def one_hot(tags: list[int], p: float = 0.9) -> torch.Tensor:
    probs = torch.full((len(tags), 3), (1 - p) / 2)
    probs[torch.arange(len(tags)), torch.tensor(tags)] = p
    return probs


def test_tags_of_character_spans_and_spans_read_back():
    text = "a picture of the red circle and the star."
    offsets = [(0, 1), (1, 9), (9, 12), (12, 16), (16, 20), (20, 27), (27, 31), (31, 35),
               (35, 40), (40, 41)]  # fmt: skip
    gold = [(13, 27), (32, 40)]
    tags = bio_tags(offsets, gold)
    assert tags.tolist() == [0, 0, 0, BEGIN, INSIDE, INSIDE, 0, BEGIN, INSIDE, 0]
    spans = read_spans(one_hot(tags.tolist()))
    assert [(s.start, s.end) for s in spans] == [(3, 6), (7, 9)]
    assert [char_span(offsets, s, text) for s in spans] == gold
    assert all(s.confidence == pytest.approx(0.9) for s in spans)
    # an I after O starts a span (a missed B loses no span); low confidence drops it
    assert [(s.start, s.end) for s in read_spans(one_hot([OUTSIDE, INSIDE, INSIDE]))] == [(1, 3)]
    assert read_spans(one_hot([INSIDE, INSIDE], p=0.4), min_confidence=0.5) == []


def test_span_f1_counts_exact_matches_only():
    assert span_f1([{(0, 4), (5, 9)}], [{(0, 4), (5, 9)}]) == 1.0
    assert span_f1([{(0, 4), (5, 8)}], [{(0, 4), (5, 9)}]) == pytest.approx(0.5)
    assert span_f1([set()], [{(0, 4)}]) == 0.0
    assert span_f1([set()], [set()]) == 1.0


def test_the_convolution_sees_the_right_context_and_padding_reads_as_zeros():
    torch.manual_seed(0)
    selector = KeywordSelector(SelectorConfig(num_layers=2, hidden_size=8, context=1))
    hidden = torch.randn(5, 2, 8)
    alone = selector(hidden)
    changed = hidden.clone()
    changed[3] = torch.randn(2, 8)  # token 3 is new: tags 2-4 may change, 0-1 may not
    after = selector(changed)
    assert torch.equal(alone[:2], after[:2]) and not torch.allclose(alone[2], after[2])
    padded = torch.cat([hidden, torch.randn(3, 2, 8)])[None]
    mask = torch.tensor([[True] * 5 + [False] * 3])
    torch.testing.assert_close(selector(padded, mask)[0, :5], alone)


def test_the_tag_loss_weights_each_tag_by_its_inverse_frequency():
    logits = [torch.randn(5, 3), torch.randn(3, 3)]
    tags = [torch.tensor([0, 0, 1, 2, 0]), torch.tensor([0, 1, 0])]
    # by hand: 5 O, 2 B, 1 I over 8 tokens -> weights 8/15, 8/6, 8/3; weighted mean of the NLLs
    weight = torch.tensor([8 / 15, 8 / 6, 8 / 3])
    gold = torch.cat(tags)
    nll = -torch.log_softmax(torch.cat(logits), -1)[torch.arange(8), gold]
    expected = (weight[gold] * nll).sum() / weight[gold].sum()
    torch.testing.assert_close(tag_loss(logits, tags), expected)


def test_a_selector_saved_in_the_heads_file_comes_back_with_the_model(tiny_llava_dir, tmp_path):
    from flmm.checkpoint import read_metadata
    from flmm.heads import save_heads

    lmm = FrozenLMM.from_pretrained(str(tiny_llava_dir))
    sam = build_sam(sam_config("tiny"))
    model = build_flmm(lmm, sam)
    path = save_heads(model.heads, tmp_path / "heads.safetensors", {"note": "kept"})
    assert build_flmm(lmm, sam, path).selector is None
    torch.manual_seed(1)
    config = SelectorConfig(lmm.num_layers, lmm.hidden_size, 3, describe_instruction="List.")
    model.heads.selector = KeywordSelector(config)
    save_heads(model.heads, path, {"note": "kept"})
    loaded = build_flmm(lmm, sam, path).selector
    assert loaded is not None and loaded.config == config
    for k, v in model.heads.selector.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    fresh = build_flmm(lmm, sam).heads
    load_heads(fresh, path)  # the heads load strictly, and the file's selector comes with them
    assert fresh.selector.config == config
    assert read_metadata(path) == {"note": "kept", **selector_metadata(model.heads.selector)}
    assert read_metadata(path)["selector.describe_instruction"] == "List."


# A value other than the default for every SelectorConfig field (a new field must be added here).
NON_DEFAULT = {
    "num_layers": 3,
    "hidden_size": 8,
    "context": 1,
    "min_confidence": 0.3,
    "describe_instruction": "List the objects.",
}


def test_every_selector_setting_survives_the_heads_file(tmp_path):
    from flmm.checkpoint import read_metadata, read_state_dict, save_tensors

    assert sorted(NON_DEFAULT) == sorted(f.name for f in fields(SelectorConfig))
    config = SelectorConfig(**NON_DEFAULT)
    for f in fields(SelectorConfig):
        assert f.default is MISSING or getattr(config, f.name) != f.default, f.name
    selector = KeywordSelector(config)
    path = tmp_path / "heads.safetensors"
    save_tensors(selector_state(selector), path, selector_metadata(selector))
    _, loaded = split_selector(read_state_dict(path), read_metadata(path))
    for f in fields(SelectorConfig):
        assert getattr(loaded.config, f.name) == getattr(config, f.name), f.name
    assert loaded.config == config


def test_a_selector_file_whose_settings_disagree_with_its_tensors_is_refused():
    selector = KeywordSelector(SelectorConfig(num_layers=2, hidden_size=8, context=1))
    state, metadata = selector_state(selector), selector_metadata(selector)
    with pytest.raises(ValueError, match="context"):
        split_selector(state, {**metadata, "selector.context": "2"})
    with pytest.raises(ValueError, match="selector.temperature"):
        split_selector(state, {**metadata, "selector.temperature": "2.0"})
    # a file written before every setting was saved (the shipped toy's): the shapes and defaults
    _, old = split_selector(state, {"selector.describe_instruction": "List."})
    assert old.config == SelectorConfig(2, 8, 1, describe_instruction="List.")


def test_spans_of_punctuation_only_never_become_phrases(tiny_llava_dir):
    """A selector that tags every token B (every token its own span): the tokens of punctuation
    (and spaces) only are selected too, and no phrase comes of them."""
    lmm = FrozenLMM.from_pretrained(str(tiny_llava_dir))
    model = build_flmm(lmm, build_sam(sam_config("tiny")))
    model.heads.selector = tagging_every_token(SelectorConfig(lmm.num_layers, lmm.hidden_size))
    text = 'the red circle , "a star" ... and (the square) !'
    x = model.prepare_text(torch.zeros(32, 32, 3, dtype=torch.uint8), text)
    pieces = [text[s:e] for s, e in x.text_offsets]
    assert sum(not any(c.isalnum() for c in p) for p in pieces) >= 4, pieces
    with torch.inference_mode():
        (selection,) = model.select([x], lmm([x.lmm]))
    phrases = [text[a:b] for a, b in selection.spans]
    assert phrases == ["the", "red", "circle", "a", "star", "and", "square"], phrases
    assert len(selection.hidden) == len(phrases)
