"""F-LMM: pixel grounding from a frozen LMM's word→image attention (pure torch + transformers).

The names below load their modules on first use (PEP 562): importing a light part of the package
(``flmm.cot``, ``flmm.prompt``, ``flmm.sam_variants``) does not import transformers and
segment-anything, so a job's driver, which builds no model, starts in a fraction of the time.
"""

from importlib import import_module

_EXPORTS = {
    "FLMM": "flmm.model",
    "FLMMHeads": "flmm.heads",
    "FrozenLMM": "flmm.lmm",
    "Grounding": "flmm.model",
    "MaskDecoder": "flmm.mask_decoder",
    "PromptConfig": "flmm.prompt",
    "convert_flmm_state_dict": "flmm.convert",
    "grounding_loss": "flmm.model",
    "load_heads": "flmm.build",
    "save_heads": "flmm.heads",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flmm' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
