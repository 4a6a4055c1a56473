"""Ground phrases in one image with F-LMM and write the masks over the image as a PNG.

    python jobs/ground.py --lmm llava-hf/llava-1.5-7b-hf --sam vit_l --sam-checkpoint sam_vit_l.pth \
        --heads heads.safetensors --image photo.jpg --phrase "the dog" --phrase "the red ball"

With no arguments it builds a tiny LLaVA and a tiny SAM with *random* weights in a temp directory
and grounds two phrases in a generated image: a check that the install and the whole model path
work, not a demonstration of quality (the masks of random models mean nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flmm.build import TINY_LLAVA_VARIANTS
from flmm.prompt import FLMM_INSTRUCTION
from flmm.tiny_llava import write_tiny_llava
from pipeline.spec import ModelSpec, add_model_args, model_spec

COLOURS = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48]], dtype=np.float32)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p, default="tiny random")
    p.add_argument("--image", help="image file (default: a generated one)")
    p.add_argument("--phrase", action="append", help="phrase to ground (repeatable)")
    p.add_argument("--output", default="out/ground/masks.png")
    return p.parse_args(argv)


def tiny_defaults(args: argparse.Namespace, workdir: Path) -> ModelSpec:
    """A tiny random LLaVA (written to ``workdir``) + tiny random SAM as the default model; a
    generated image and two phrases when no --image is given."""
    print(
        "no --lmm given: tiny LLaVA + tiny SAM with RANDOM weights (a smoke run, masks are noise)"
    )
    corpus = ["the red square", "the blue circle", FLMM_INSTRUCTION]
    llava = write_tiny_llava(TINY_LLAVA_VARIANTS["tiny"], corpus * 10, workdir / "llava")
    if args.image is None:
        image = np.full((96, 160, 3), 200, dtype=np.uint8)
        image[20:60, 20:60] = (220, 30, 30)
        image[40:90, 100:150] = (30, 30, 220)
        args.image = str(workdir / "scene.png")
        Image.fromarray(image).save(args.image)
        args.phrase = args.phrase or ["the red square", "the blue circle"]
    return ModelSpec(str(llava), "tiny")


def overlay(image: np.ndarray, masks: torch.Tensor) -> Image.Image:
    """image [H, W, 3] uint8; masks [P, H, W] bool → blended RGB image."""
    out = image.astype(np.float32)
    for i, mask in enumerate(masks.cpu().numpy()):
        out[mask] = 0.5 * out[mask] + 0.5 * COLOURS[i % len(COLOURS)]
    return Image.fromarray(out.astype(np.uint8))


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        default = tiny_defaults(args, Path(tmp)) if args.lmm is None else None
        if not args.phrase:
            sys.exit("give at least one --phrase")
        if args.image is None:
            sys.exit("give --image (an image file to ground the phrases in)")
        model = model_spec(args, default).build()
        image = np.array(Image.open(args.image).convert("RGB"))
        start = time.perf_counter()
        with torch.inference_mode():
            (result,) = model([model.prepare(torch.from_numpy(image), args.phrase)])
        seconds = time.perf_counter() - start
    masks = result.refined[:, 0] > 0
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    overlay(image, masks).save(args.output)
    for phrase, mask in zip(args.phrase, masks):
        print(f"{phrase!r}: {int(mask.sum())} of {mask.numel()} pixels")
    print(f"grounded {len(args.phrase)} phrases in {seconds:.2f}s → {args.output}")


if __name__ == "__main__":
    main()
