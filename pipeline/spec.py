"""Which F-LMM to build: a small, picklable description that every job and actor shares.

A ``ModelSpec`` travels to Ray actors instead of the model itself; each actor calls ``build()``
once. ``model_id()`` names the model in the outputs: the LMM id plus a hash of the heads file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from flmm.build import build_flmm, build_sam, sam_config
from flmm.lmm import FrozenLlava
from flmm.model import FLMM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """lmm: llava-hf hub id or local LLaVA directory; sam_variant: a ``flmm.build.SAM_VARIANTS``
    name, sam_checkpoint its weights (None: random, for tests); heads: our ``.safetensors`` or an
    F-LMM release ``.pth`` (None: randomly initialised heads); dtype: the LMM's dtype (SAM and
    heads stay float32); device: ``"auto"`` (CUDA when visible, else CPU), ``"cpu"``, ``"cuda"``.
    Paths that exist here are made absolute: actors and workers run in other directories.
    """

    lmm: str
    sam_variant: str
    sam_checkpoint: str | None = None
    heads: str | None = None
    dtype: str = "float32"
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose from {sorted(DTYPES)}")
        sam_config(self.sam_variant)  # KeyError listing the variants
        for name in ("lmm", "sam_checkpoint", "heads"):
            value = getattr(self, name)
            if value is not None and Path(value).exists():
                object.__setattr__(self, name, str(Path(value).resolve()))

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def build(self) -> FLMM:
        """The whole model in eval mode on ``resolved_device()``, frozen parts frozen."""
        device = self.resolved_device()
        lmm = FrozenLlava.from_pretrained(self.lmm, dtype=DTYPES[self.dtype], device=device)
        sam = build_sam(sam_config(self.sam_variant), self.sam_checkpoint)
        return build_flmm(lmm, sam, self.heads).to(device).eval()

    def model_id(self) -> str:
        """``"<lmm> + heads:<sha256[:12]>"`` (``heads:random`` without a heads file)."""
        return f"{self.lmm} + heads:{file_hash(self.heads) if self.heads else 'random'}"


def file_hash(path: str | Path, length: int = 12) -> str:
    """The first ``length`` hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:length]
