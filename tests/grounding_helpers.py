"""Shared by the model-stage tests: a tiny model spec whose keyword selector tags every token
(a real selector with a known answer), and the language model's calls counted."""

import contextlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from flmm.build import build_flmm, build_sam, sam_config
from flmm.heads import save_heads
from flmm.lmm import FrozenLMM
from flmm.selector import SelectorConfig, tagging_every_token
from pipeline.spec import ModelSpec


def every_token_selector_spec(lmm_dir: Path, out: Path) -> ModelSpec:
    """The LMM at ``lmm_dir`` + tiny SAM + random heads, and a selector set by hand to tag every
    token B (every token of a text is its own span), saved under ``out``."""
    torch.manual_seed(0)
    sam = build_sam(sam_config("tiny"))
    save_file(sam.state_dict(), str(out / "sam.safetensors"))
    lmm = FrozenLMM.from_pretrained(str(lmm_dir))
    heads = build_flmm(lmm, sam).heads
    heads.selector = tagging_every_token(SelectorConfig(lmm.num_layers, lmm.hidden_size))
    heads = save_heads(heads, out / "heads.safetensors")
    return ModelSpec(str(lmm_dir), "tiny", str(out / "sam.safetensors"), str(heads))


@contextlib.contextmanager
def lm_calls(actor):
    """Counts the actor's language-model calls while open: ``{"prefill": [...], "generate":
    [...]}``, each call's batch size; prefills capture attention, a generation's first step runs
    over the whole prompt without capture (its later steps take one token and are not counted)."""
    calls = {"prefill": [], "generate": []}

    def hook(_module, _args, kwargs):
        length = kwargs["inputs_embeds"].shape[:2]
        if "flmm_capture" in kwargs:
            calls["prefill"].append(length[0])
        elif length[1] > 1:
            calls["generate"].append(length[0])

    language_model = actor.model.lmm.model.model.language_model
    handle = language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()
