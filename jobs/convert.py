"""Convert F-LMM's released head checkpoint (``.pth``) to a heads ``.safetensors`` file.

    python jobs/convert.py flmm_heads.pth heads.safetensors --sam vit_l [--family llava_next]

Every key goes through ``flmm.convert``'s table; the result is checked, key by key and shape by
shape, against heads built (on the meta device: no memory) for the dimensions the checkpoint
implies. SAM's image-encoder keys are dropped (the SAM checkpoint provides them) and counted.
F-LMM's releases for LLaVA-1.5, LLaVA-NeXT and DeepSeek-VL share one key layout; ``--family`` (the
LMM's ``model_type``) says how many views of the image the U-Net's input channels stack (two for
LLaVA-NeXT), so that the LMM's attention heads per layer follow from the channel count.
"""

from __future__ import annotations

import argparse
import sys

import torch

from flmm.build import HeadsConfig, build_heads, build_sam, sam_config
from flmm.checkpoint import check_state_dict, read_state_dict, save_tensors
from flmm.convert import convert_flmm_checkpoint
from flmm.families import family_for, supported_model_types
from flmm.heads import heads_dims
from flmm.prompt import FLMM_INSTRUCTION, PROMPT_KEY


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("src", help="F-LMM head checkpoint (.pth)")
    parser.add_argument("dst", help="output .safetensors")
    parser.add_argument("--sam", default="vit_l", help="SAM variant the heads were trained with")
    parser.add_argument(
        "--family",
        default="llava",
        choices=supported_model_types(),
        help="model_type of the LMM the heads were trained on (default %(default)s)",
    )
    parser.add_argument("--lmm-heads", type=int, default=None, help="attention heads per layer")
    args = parser.parse_args(argv)
    try:
        result = convert_flmm_checkpoint(read_state_dict(args.src))
        dims = heads_dims(result.state_dict)
        views = family_for(args.family).num_views
        per_head = views * dims["num_layers"]
        if args.lmm_heads is None and dims["in_channels"] % per_head:
            raise ValueError(
                f"{dims['in_channels']} U-Net input channels are not {views} view(s) x "
                f"{dims['num_layers']} layers x some heads: is --family {args.family} right?"
            )
        num_heads = args.lmm_heads or dims["in_channels"] // per_head
        config = HeadsConfig(dims["num_layers"], num_heads, dims["hidden_size"], num_views=views)
        with torch.device("meta"):
            heads = build_heads(config, build_sam(sam_config(args.sam)))
        check_state_dict(heads, result.state_dict)
    except (ValueError, KeyError, OSError) as error:
        sys.exit(f"error: {error}")
    metadata = {"source": str(args.src), "format": "flmm-heads", "family": args.family}
    metadata[PROMPT_KEY] = FLMM_INSTRUCTION  # every F-LMM release config's instruction
    save_tensors(result.state_dict, args.dst, metadata)
    print(
        f"converted {len(result.state_dict)} tensors ({args.family}: {views} view(s), "
        f"L={config.num_layers}, H={num_heads}, "
        f"D={config.hidden_size}); dropped {len(result.dropped)} SAM image-encoder keys → {args.dst}"
    )


if __name__ == "__main__":
    main()
