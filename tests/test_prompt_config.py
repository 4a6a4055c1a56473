"""The instruction beside the image: F-LMM's by default, the toy world's own, ``--prompt`` over
both, recorded with trained or converted heads, and a warning when heads meet another one."""

import argparse
import warnings

import pytest
import torch
from conftest import random_image

from flmm.build import build_flmm, build_sam, heads_prompt, sam_config
from flmm.checkpoint import read_metadata, read_state_dict, save_tensors
from flmm.heads import save_heads
from flmm.lmm import FrozenLMM
from flmm.prompt import FLMM_INSTRUCTION, PromptConfig
from pipeline.spec import add_model_args, model_spec
from toyworld.models import toy_model_spec
from toyworld.vqa import TOY_INSTRUCTION


def test_the_default_instruction_is_the_one_f_lmm_trained_every_released_head_under(
    tiny_llava_dir,
):
    assert PromptConfig().instruction == FLMM_INSTRUCTION
    assert FLMM_INSTRUCTION == "Please give me a description of the image."
    lmm = FrozenLMM.from_pretrained(str(tiny_llava_dir))
    sample = lmm.prepare(random_image(20, 30), ["the red circle"])
    text = lmm.processor.tokenizer.decode(sample.input_ids)
    assert FLMM_INSTRUCTION in text and text.index(FLMM_INSTRUCTION) < text.index("the red circle")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    return parser.parse_args(list(argv))


def test_the_toy_world_pins_its_own_instruction_and_prompt_overrides_it():
    default = toy_model_spec(heads=False)
    assert default.prompt == TOY_INSTRUCTION
    assert model_spec(_args(), default).prompt == TOY_INSTRUCTION
    assert model_spec(_args("--prompt", "Describe."), default).prompt == "Describe."
    other = model_spec(_args("--lmm", "some/lmm"), default)  # another LMM: F-LMM's text
    assert other.prompt is None and other.prompt_config().instruction == FLMM_INSTRUCTION


def test_heads_trained_under_another_instruction_are_warned_about(tiny_llava_dir, tmp_path):
    sam = build_sam(sam_config("tiny"))
    heads = build_flmm(FrozenLMM.from_pretrained(str(tiny_llava_dir)), sam).heads
    path = save_heads(heads, tmp_path / "heads.safetensors")
    save_tensors(read_state_dict(path), path, {**read_metadata(path), "prompt": "Describe."})
    assert heads_prompt(path) == "Describe."
    with pytest.warns(UserWarning, match="trained with the instruction 'Describe.'"):
        build_flmm(FrozenLMM.from_pretrained(str(tiny_llava_dir)), sam, path)
    matching = FrozenLMM.from_pretrained(str(tiny_llava_dir), prompt=PromptConfig("Describe."))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_flmm(matching, sam, path)
    release = tmp_path / "release.pth"  # an F-LMM release: trained under F-LMM's instruction
    torch.save({}, release)
    assert heads_prompt(release) == FLMM_INSTRUCTION
