"""Benchmark: F-LMM grounding at LLaVA-1.5-7B + SAM ViT-L shapes on one GPU, against the FLOP bound.

    python bench/gpu.py [--batch 8] [--phrases 3] [--repeats 5] [--json PATH]
    python bench/gpu.py --tiny [--json PATH]    # the same code path at test sizes (CPU is fine)

Random weights, built from configs in ``flmm/build.py`` (``TINY_LLAVA_VARIANTS["llava-1.5-7b"]``,
``SAM_VARIANTS["vit_l"]``; the tokenizer is trained in process, nothing is downloaded). On the GPU
the LMM's weights are bf16 and SAM + heads run under bf16 autocast (``FLMM.autocast_dtype``, the
annotation job's ``--sam-heads-dtype bfloat16``); ``--tiny`` uses the ``tiny``
variants in float32 on CPU (or bf16 on a GPU if one is there). Measured:

- images/s of the full grounding forward (``FLMM.forward``: LMM prefill with attention capture,
  SAM image encoder once per image, U-Net + refiner), inputs prepared beforehand; median over
  ``--repeats`` batches after two warm-up batches;
- FLOPs per image of the LMM prefill and the SAM image encoder (``torch.utils.flop_counter``;
  the heads' FLOPs are reported apart and left out of the bound);
- the matmul rate: bf16 8192×8192 products on the GPU (float32 512×512 on CPU);
- the fraction of the FLOP bound: (LMM + SAM FLOPs per image) × images/s ÷ matmul rate.

Without CUDA (and without ``--tiny``) it says so, writes ``{"skipped": "no CUDA device"}`` to
``--json`` if given, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from flmm.build import TINY_LLAVA_VARIANTS, build_flmm, build_sam, sam_config
from flmm.lmm import FrozenLlava, collate
from flmm.prompt import PromptConfig
from flmm.tiny_llava import build_processor, llava_config

PHRASES = ["the dog on the left", "the red ball", "the man in a blue shirt", "the grass"]
CORPUS = [*PHRASES, "Please briefly describe this image.", "the small white cat"] * 20


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    """The whole F-LMM with random weights: LMM built directly on ``device`` in ``dtype``."""
    from transformers import LlavaForConditionalGeneration

    variant = TINY_LLAVA_VARIANTS["tiny" if tiny else "llava-1.5-7b"]
    processor = build_processor(variant, CORPUS)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(
            llava_config(variant, processor.tokenizer), dtype=dtype
        )
    lmm = FrozenLlava(model.eval(), processor, PromptConfig())
    sam = build_sam(sam_config("tiny" if tiny else "vit_l"))
    reduced = torch.bfloat16 if device.type == "cuda" else None  # ModelSpec.sam_heads_dtype
    model = build_flmm(lmm, sam, autocast_dtype=reduced).to(device).eval()
    model.heads.mask_decoder.to(memory_format=torch.channels_last)  # as GroundingActor does
    return model


def make_inputs(model, batch: int, phrases: int, size=(480, 640)):
    """``batch`` random COCO-sized images with ``phrases`` phrases each, prepared (CPU)."""
    g = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=g) for _ in range(batch)
    ]
    return [model.prepare(image, PHRASES[:phrases]) for image in images]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model, inputs, device: torch.device, repeats: int) -> list[float]:
    """Seconds per batch of ``FLMM.forward`` (two warm-up batches first)."""
    times = []
    for i in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model(inputs)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return times


def count_flops(model, inputs, device: torch.device) -> dict[str, float]:
    """FLOPs per image of the LMM prefill, the SAM image encoder and the heads."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            lmm_out = model.lmm([x.lmm for x in inputs])
        counts["lmm"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            embeddings = model.encode_images(inputs)
        counts["sam"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.decode(inputs, lmm_out.attention, lmm_out.hidden, embeddings)
        counts["heads"] = counter.get_total_flops()
    return {k: v / len(inputs) for k, v in counts.items()}


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """FLOP/s of ``n×n @ n×n`` products in ``dtype`` (median of 3 timed runs of ``iters``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    rates = []
    for _ in range(4):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        rates.append(2 * n**3 * iters / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def shapes(model, inputs) -> dict:
    """What an independent FLOP estimate needs: sizes of the three networks and of the batch."""
    cfg = model.lmm.model.config
    text, vision = cfg.text_config, cfg.vision_config
    encoder = model.image_encoder.image_encoder
    tok = model.lmm.processor.tokenizer
    batch = collate([x.lmm for x in inputs], tok.pad_token_id, tok.padding_side, cfg.image_token_id)
    return {
        "seq_len": int(batch["input_ids"].shape[1]),
        "image_tokens": int(batch["image_index"].shape[1]),
        "text": {
            "hidden": text.hidden_size,
            "layers": text.num_hidden_layers,
            "heads": text.num_attention_heads,
            "kv_heads": text.num_key_value_heads,
            "intermediate": text.intermediate_size,
        },
        "vision": {
            "hidden": vision.hidden_size,
            "layers": vision.num_hidden_layers,
            "intermediate": vision.intermediate_size,
            "patch": vision.patch_size,
            "image_size": vision.image_size,
        },
        "sam": {
            "embed_dim": encoder.patch_embed.proj.out_channels,
            "depth": len(encoder.blocks),
            "img_size": encoder.img_size,
            "patch": encoder.patch_embed.proj.kernel_size[0],
            "mlp_ratio": encoder.blocks[0].mlp.lin1.out_features
            / encoder.patch_embed.proj.out_channels,
            "out_chans": encoder.neck[0].out_channels,
        },
    }


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    model = build(args.tiny, device, dtype)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    inputs = make_inputs(model, args.batch, args.phrases)
    prepare_s = (time.perf_counter() - start) / args.batch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_forward(model, inputs, device, args.repeats)
    flops = count_flops(model, inputs, device)
    n, iters = (8192, 50) if device.type == "cuda" else (512, 10)
    rate = matmul_rate(device, dtype, n, iters)
    images_per_s = args.batch / statistics.median(times)
    bound_flops = flops["lmm"] + flops["sam"]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tiny": args.tiny,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch,
        "phrases": args.phrases,
        "repeats": args.repeats,
        "build_s": build_s,
        "prepare_s_per_image": prepare_s,
        "seconds_per_batch": statistics.median(times),
        "images_per_s": images_per_s,
        "flops_per_image": flops,
        "matmul": {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": rate},
        "flop_bound_images_per_s": rate / bound_flops,
        "fraction_of_flop_bound": bound_flops * images_per_s / rate,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "shapes": shapes(model, inputs),
    }


def report(res: dict) -> None:
    f = res["flops_per_image"]
    print(
        f"{res['device']}, {res['dtype']}, {'tiny' if res['tiny'] else 'LLaVA-1.5-7B + SAM ViT-L'}"
        f" shapes, batch {res['batch']} × {res['phrases']} phrases, seq {res['shapes']['seq_len']}"
    )
    print(
        "| images/s | LMM GFLOP/img | SAM GFLOP/img | heads GFLOP/img | matmul TFLOP/s | "
        "bound images/s | fraction of bound |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {res['images_per_s']:.2f} | {f['lmm'] / 1e9:.1f} | {f['sam'] / 1e9:.1f} | "
        f"{f['heads'] / 1e9:.2f} | {res['matmul']['flops_per_s'] / 1e12:.2f} | "
        f"{res['flop_bound_images_per_s']:.2f} | {res['fraction_of_flop_bound']:.1%} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models: the code path, on CPU too")
    p.add_argument("--batch", type=int, default=8, help="images per forward")
    p.add_argument("--phrases", type=int, default=3, choices=range(1, len(PHRASES) + 1))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.tiny and not torch.cuda.is_available():
        print(
            "no GPU here: bench/gpu.py measures LLaVA-1.5-7B + SAM ViT-L on a CUDA device; "
            "--tiny runs the same code path at test sizes"
        )
        res = {"skipped": "no CUDA device"}
    else:
        res = run(args)
        report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
