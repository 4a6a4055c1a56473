"""Convert F-LMM's released head checkpoint (``.pth``) to a heads ``.safetensors`` file.

    python jobs/convert.py flmm_heads.pth heads.safetensors --sam vit_l \\
        [--sam-checkpoint sam_vit_l_0b3195.pth] [--lmm LMM | --family llava_next]

Every key goes through ``flmm.convert``'s table; the result is checked, key by key and shape by
shape, against heads built (on the meta device: no memory) for the dimensions the checkpoint
implies. SAM's image-encoder keys are dropped (the SAM checkpoint provides them) and counted; SAM's
positional-encoding buffer, which a release of trainable parameters only lacks, is filled from
``--sam-checkpoint``. F-LMM's releases for LLaVA-1.5, LLaVA-NeXT and DeepSeek-VL share one key
layout; the U-Net's input channels stack views x layers x heads attention maps (two views for
LLaVA-NeXT). ``--lmm`` (a local directory or a cached hub id; only its config is read) gives all
three and the family; ``--family`` (the LMM's ``model_type``) the views; with neither, the heads
are D / 128 (the head dim of F-LMM's LMMs) and the views follow from the channels: two is
LLaVA-NeXT, one fits LLaVA-1.5 and DeepSeek-VL alike and records no family.
"""

from __future__ import annotations

import argparse
import sys

import torch

from flmm.build import HeadsConfig, build_heads, build_sam, sam_config
from flmm.checkpoint import check_state_dict, read_state_dict, read_tensors, save_tensors
from flmm.convert import (
    ReleaseShape,
    convert_flmm_checkpoint,
    fill_sam_buffers,
    missing_sam_buffers,
    read_lmm_config,
    release_shape,
    releases_of,
)
from flmm.families import supported_model_types
from flmm.heads import heads_dims
from flmm.prompt import FLMM_INSTRUCTION, PROMPT_KEY


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("src", help="F-LMM head checkpoint (.pth)")
    parser.add_argument("dst", help="output .safetensors")
    parser.add_argument("--sam", default="vit_l", help="SAM variant the heads were trained with")
    parser.add_argument(
        "--sam-checkpoint",
        help="SAM checkpoint (.pth or .safetensors) to fill SAM buffers the release lacks from",
    )
    lmm = parser.add_mutually_exclusive_group()
    lmm.add_argument("--lmm", help="the LMM (local dir or cached hub id): its config is read")
    lmm.add_argument(
        "--family",
        choices=supported_model_types(),
        help="model_type of the LMM the heads were trained on (default: inferred)",
    )
    parser.add_argument("--lmm-heads", type=int, help="attention heads per layer (not with --lmm)")
    args = parser.parse_args(argv)
    if args.lmm and args.lmm_heads:
        parser.error("--lmm gives the heads per layer: drop --lmm-heads")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result = convert_flmm_checkpoint(read_state_dict(args.src))
        dims = heads_dims(result.state_dict)
        lmm_config = read_lmm_config(args.lmm) if args.lmm else None
        shape = infer_shape(dims, args, lmm_config)
        filled = fill_buffers(result.state_dict, args.sam_checkpoint)
        config = HeadsConfig(
            shape.num_layers, shape.num_heads, shape.hidden_size, num_views=shape.num_views
        )
        with torch.device("meta"):
            heads = build_heads(config, build_sam(sam_config(args.sam)))
        check_state_dict(heads, result.state_dict)
    except (ValueError, KeyError, OSError) as error:
        sys.exit(f"error: {error}")
    print(describe(shape))
    for key in filled:
        print(f"filled {key} (not in the release) from {args.sam_checkpoint}")
    metadata = {"source": str(args.src), "format": "flmm-heads", "num_views": str(shape.num_views)}
    if shape.family is not None:
        metadata["family"] = shape.family
    if filled:
        metadata["sam_buffers_from"] = str(args.sam_checkpoint)
    metadata[PROMPT_KEY] = FLMM_INSTRUCTION  # every F-LMM release config's instruction
    save_tensors(result.state_dict, args.dst, metadata)
    print(
        f"converted {len(result.state_dict)} tensors ({shape.family or 'family unknown'}: "
        f"{shape.num_views} view(s), L={shape.num_layers}, H={shape.num_heads}, "
        f"D={shape.hidden_size}); dropped {len(result.dropped)} SAM image-encoder keys → {args.dst}"
    )


def infer_shape(dims: dict[str, int], args: argparse.Namespace, lmm_config) -> ReleaseShape:
    """``release_shape`` from the flags; its error says what --lmm would add."""
    try:
        return release_shape(
            dims, model_type=args.family, lmm_config=lmm_config, num_heads=args.lmm_heads
        )
    except ValueError as error:
        hint = "" if args.lmm else ": --lmm reads the LMM's layers and heads from its config"
        raise ValueError(f"{error}{hint}") from error


def fill_buffers(state_dict: dict[str, torch.Tensor], sam_checkpoint: str | None) -> list[str]:
    """Fill the SAM buffers the release lacks from the SAM checkpoint; ValueError without one."""
    missing = missing_sam_buffers(state_dict)
    if missing and sam_checkpoint is None:
        raise ValueError(
            f"the release lacks SAM's buffer {', '.join(missing)} (saved with trainable "
            "parameters only): give --sam-checkpoint, the SAM checkpoint the heads were trained "
            "with (sam_vit_l_0b3195.pth), to fill it from"
        )
    if not missing:
        return []
    return fill_sam_buffers(state_dict, read_tensors(sam_checkpoint, list(missing.values())))


def describe(shape: ReleaseShape) -> str:
    """What the LMM's shape was found from; for one view, which families share it."""
    line = (
        f"LMM shape from {shape.how}: V={shape.num_views}, L={shape.num_layers}, "
        f"H={shape.num_heads}, D={shape.hidden_size}"
    )
    if shape.family is not None:
        return f"{line}; family {shape.family}"
    releases = releases_of(shape.num_views)
    shared = ", ".join(sorted({r[1] for r in releases}))
    line += f"; family not recorded: {shared} share this layout (--family or --lmm settles it)"
    key = (shape.num_views, shape.num_layers, shape.num_heads, shape.hidden_size)
    like = [f"{r[0]} ({r[1]})" for r in releases if r[2:] == key]
    return line + (f"; F-LMM's {like[0]} release has this shape" if like else "")


if __name__ == "__main__":
    main()
