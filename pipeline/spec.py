"""Which F-LMM to build: a small, picklable description that every job and actor shares.

A ``ModelSpec`` travels to Ray actors instead of the model itself; each actor calls ``build()``
once. ``model_id()`` names the model in the outputs: the LMM id plus a hash of the heads file.
This module imports no model code (``build()`` does): a driver that only describes the model
starts without transformers and segment-anything.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flmm.prompt import FLMM_INSTRUCTION, PromptConfig
from flmm.sam_variants import SAM_VARIANTS, sam_config

if TYPE_CHECKING:
    from flmm.lmm import FrozenLMM
    from flmm.model import FLMM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_args(
    parser,
    heads: str | None = "--heads",
    sam_heads_dtype: bool = True,
    default: str = "toy",
    sam: bool = True,
) -> None:
    """Every job's model flags, defined once: ``--lmm``, ``--sam``, ``--sam-checkpoint`` (with
    ``sam``), the heads flag (``heads``, e.g. ``--init-heads`` for training; stored as
    ``args.heads``; None: no heads flag), ``--dtype``, ``--sam-heads-dtype`` (with
    ``sam_heads_dtype``), ``--device`` and ``--prompt``. ``default`` names, in the help, what
    the job uses without ``--lmm``. ``model_spec(args)`` reads them."""
    parser.add_argument(
        "--lmm",
        help="hub id or local directory of an LMM of a supported family (LLaVA-1.5, LLaVA-NeXT, "
        f"DeepSeek-VL, Qwen2.5-VL / Qwen3-VL; default: {default} LMM)",
    )
    if sam:
        parser.add_argument(
            "--sam",
            help=f"SAM variant: {', '.join(SAM_VARIANTS)} (default: {default}; vit_l with --lmm)",
        )
        parser.add_argument("--sam-checkpoint", help="SAM weights, .pth or .safetensors")
    if heads is not None:
        parser.add_argument(
            heads,
            dest="heads",
            help="heads: trained .safetensors, an F-LMM release .pth (converted), or a "
            "localization-heads .json (training-free, jobs/find_heads.py)",
        )
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="the LMM's dtype"
    )
    if sam_heads_dtype:
        parser.add_argument(
            "--sam-heads-dtype",
            default="float32",
            choices=sorted(DTYPES),
            help="SAM + heads compute dtype (bfloat16: autocast, faster; masks change a little)",
        )
    parser.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda")
    parser.add_argument(
        "--prompt",
        help=f"the instruction beside the image (default: F-LMM's, {FLMM_INSTRUCTION!r}; "
        f"{default}: its own); heads trained under another one are warned about",
    )


def model_spec(args, default: ModelSpec | None = None) -> ModelSpec:
    """The ``ModelSpec`` of ``add_model_args``' flags. Without ``--lmm``, ``default``'s LMM, and
    its SAM variant and heads where not given (its SAM checkpoint only with its SAM variant);
    without ``--lmm`` and without ``default``: ValueError."""
    lmm, heads = args.lmm, getattr(args, "heads", None)
    sam, checkpoint = getattr(args, "sam", None), getattr(args, "sam_checkpoint", None)
    prompt = args.prompt
    if lmm is None:
        if default is None:
            raise ValueError("give --lmm (a hub id or local directory of a supported LMM)")
        lmm, sam = default.lmm, sam or default.sam_variant
        if checkpoint is None and sam == default.sam_variant:
            checkpoint = default.sam_checkpoint
        heads = heads or default.heads
        prompt = prompt or default.prompt
    return ModelSpec(
        lmm,
        sam or "vit_l",
        checkpoint,
        heads,
        args.dtype,
        args.device,
        getattr(args, "sam_heads_dtype", "float32"),
        prompt,
    )


@dataclass(frozen=True)
class ModelSpec:
    """lmm: hub id or local directory of an LMM of a supported family; sam_variant: a ``flmm.sam_variants.SAM_VARIANTS``
    name, sam_checkpoint its weights (None: random, for tests); heads: our ``.safetensors``, an
    F-LMM release ``.pth``, or a localization-heads ``.json`` (training-free,
    ``flmm.localization``) (None: randomly initialised heads); dtype: the LMM's dtype; device:
    ``"auto"`` (CUDA when visible, else CPU), ``"cpu"``, ``"cuda"``; sam_heads_dtype: what the
    SAM encoder and the heads compute in: ``"float32"``, or ``"bfloat16"`` / ``"float16"`` under
    autocast (their weights stay float32; masks change slightly: bench/NOTES.md); prompt: the
    instruction beside the image (None: F-LMM's, ``flmm.prompt.FLMM_INSTRUCTION``).
    Paths that exist here are made absolute: actors and workers run in other directories.
    """

    lmm: str
    sam_variant: str
    sam_checkpoint: str | None = None
    heads: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    sam_heads_dtype: str = "float32"
    prompt: str | None = None

    def __post_init__(self) -> None:
        for name in ("dtype", "sam_heads_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} {getattr(self, name)!r}: choose from {sorted(DTYPES)}")
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
        from flmm.build import build_flmm, build_sam

        device = self.resolved_device()
        lmm = self.build_lmm()
        sam = build_sam(sam_config(self.sam_variant), self.sam_checkpoint)
        reduced = None if self.sam_heads_dtype == "float32" else DTYPES[self.sam_heads_dtype]
        return build_flmm(lmm, sam, self.heads, reduced).to(device).eval()

    def build_lmm(self) -> FrozenLMM:
        """The frozen LMM alone, on ``resolved_device()``, prompted with ``prompt``."""
        from flmm.lmm import FrozenLMM

        return FrozenLMM.from_pretrained(
            self.lmm,
            dtype=DTYPES[self.dtype],
            device=self.resolved_device(),
            prompt=self.prompt_config(),
        )

    def prompt_config(self) -> PromptConfig:
        return PromptConfig() if self.prompt is None else PromptConfig(instruction=self.prompt)

    def model_id(self) -> str:
        """``"<lmm> + heads:<sha256[:12]>"`` (``heads:random`` without a heads file), with
        ``" @<sam_heads_dtype>"`` appended when SAM and the heads do not compute in float32."""
        heads = file_hash(self.heads) if self.heads else "random"
        precision = "" if self.sam_heads_dtype == "float32" else f" @{self.sam_heads_dtype}"
        return f"{self.lmm} + heads:{heads}{precision}"


def file_hash(path: str | Path, length: int = 12) -> str:
    """The first ``length`` hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:length]
