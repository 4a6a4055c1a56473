"""F-LMM: pixel grounding from a frozen LMM's word→image attention (pure torch + transformers)."""

from flmm.build import load_heads
from flmm.convert import convert_flmm_state_dict
from flmm.heads import FLMMHeads, save_heads
from flmm.lmm import FrozenLMM
from flmm.mask_decoder import MaskDecoder
from flmm.model import FLMM, Grounding, grounding_loss
from flmm.prompt import PromptConfig

__all__ = [
    "FLMM",
    "FLMMHeads",
    "FrozenLMM",
    "Grounding",
    "MaskDecoder",
    "PromptConfig",
    "convert_flmm_state_dict",
    "grounding_loss",
    "load_heads",
    "save_heads",
]
