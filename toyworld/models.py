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


def toy_model_spec(heads: bool = True) -> ModelSpec:
    """The toy LMM + toy SAM, with the shipped toy heads when ``heads`` and they exist."""
    return ModelSpec(
        str(TOY_MODELS / "llava"),
        "toy",
        str(TOY_MODELS / "sam.safetensors"),
        str(toy_heads()) if heads and toy_heads().is_file() else None,
        prompt=TOY_INSTRUCTION,
    )
