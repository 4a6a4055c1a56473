"""The keyword selector (flmm/selector.py): BIO tags from character spans, spans read back,
its loss, and the selector saved in a heads file (with its describe instruction) and built with
the model. Its training beside the heads: tests/test_train_steps.py; the shipped toy selector:
tests/test_toy_heads.py."""

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
    span_f1,
    tag_loss,
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
    assert read_metadata(path) == {"note": "kept", "selector.describe_instruction": "List."}
