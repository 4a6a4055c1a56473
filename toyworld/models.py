"""Where the toy world's frozen models and trained heads are shipped (``models/toy/``), as the
``ModelSpec`` the jobs fall back to when no ``--lmm`` is given."""

from __future__ import annotations

from pathlib import Path

from pipeline.spec import ModelSpec
from toyworld.vqa import TOY_INSTRUCTION

TOY_MODELS = Path(__file__).resolve().parents[1] / "models" / "toy"


def toy_heads() -> Path:
    """The shipped toy heads (``jobs/train.py`` trains them; the file may not exist yet)."""
    return TOY_MODELS / "heads.safetensors"


# The toy LMM's localization-head search (jobs/find_heads.py without --lmm): it has 16 heads on 4
# layers, where Kang et al.'s defaults (10 votes per phrase, layers 0-1 left out) are made for
# ~1,000 heads on 32 layers; 3 votes of 16 heads and 1 of 4 layers keep the proportions closer.
def toy_head_search():
    """``flmm.localization.HeadSearchConfig`` of the toy LMM (imported here, on use: the other
    names of this module are read by jobs' drivers, which import no model code)."""
    from flmm.localization import HeadSearchConfig

    return HeadSearchConfig(per_phrase=3, skip_layers=1)


def toy_localization_heads() -> Path:
    """The toy LMM's shipped localization heads (``jobs/find_heads.py`` finds them)."""
    return TOY_MODELS / "localization_heads.json"


def toy_model_spec(heads: bool = True) -> ModelSpec:
    """The toy LMM + toy SAM, with the shipped toy heads when ``heads`` and they exist."""
    return ModelSpec(
        str(TOY_MODELS / "llava"),
        "toy",
        str(TOY_MODELS / "sam.safetensors"),
        str(toy_heads()) if heads and toy_heads().is_file() else None,
        prompt=TOY_INSTRUCTION,
    )
