"""Benchmark: F-LMM grounding at 7B LMM + SAM ViT-L shapes on one GPU, against the FLOP bound.

    python bench/gpu.py [--family llava] [--batch 8] [--phrases 3] [--repeats 5] [--json PATH]
    python bench/gpu.py --tiny [--family F] [--json PATH]  # the same code path at test sizes

Random weights, built from configs: LLaVA-1.5-7B (``TINY_LLAVA_VARIANTS["llava-1.5-7b"]`` in
``flmm/build.py``), DeepSeek-VL-7B (``--family deepseek_vl_hybrid``: Llama 30 × 32 heads, width
4096; SigLIP-L/16 at 384 px, 576 tokens; SAM-B high-resolution tower at 1024 px) or
Qwen2.5-VL-7B (``--family qwen2_5_vl``: 28 layers × 28 heads (4 kv), width 3584; 32-block
vision tower, width 1280; a 480×640 image is 391 tokens), with ``SAM_VARIANTS["vit_l"]``; the
processors come from ``flmm.tiny_lmms`` (tokenizer trained in process, nothing is downloaded). On the GPU
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
from flmm.families import family_for
from flmm.lmm import FrozenLMM
from flmm.prompt import FLMM_INSTRUCTION, PromptConfig
from flmm.tiny_llava import build_processor, llava_config
from flmm.tiny_lmms import TinyLMMConfig, build_tiny_lmm

FAMILIES = ("llava", "deepseek_vl_hybrid", "qwen2_5_vl")
# the processors' image sizes, and the 7B models' shapes (published configs) over the tiny ones
PROCESSORS = {
    "deepseek_vl_hybrid": TinyLMMConfig(image_size=384, patch_size=16, high_res_size=1024),
    "qwen2_5_vl": TinyLMMConfig(image_size=1024, patch_size=14),
}
SEVEN_B = {
    "deepseek_vl_hybrid": {
        "text": {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 30,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "head_dim": 128,
            "vocab_size": 102400,
        },
        "vision": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
        },
        "high_res_vision": {
            "hidden_size": 768,
            "output_channels": 256,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "mlp_dim": 3072,
            "global_attn_indexes": [2, 5, 8, 11],
            "window_size": 14,
        },
    },
    "qwen2_5_vl": {
        "text": {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [16, 24, 24],
                "rope_theta": 1000000.0,
            },
        },
        "vision": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
    },
}

PHRASES = ["the dog on the left", "the red ball", "the man in a blue shirt", "the grass"]
CORPUS = [*PHRASES, FLMM_INSTRUCTION, "the small white cat"] * 20


def lmm_config(family: str, tiny: bool, corpus: list[str] = CORPUS):
    """The LMM's transformers config (7B shapes unless ``tiny``), its processor (tokenizer
    trained on ``corpus``) and class."""
    from transformers import LlavaForConditionalGeneration

    if family == "llava":
        variant = TINY_LLAVA_VARIANTS["tiny" if tiny else "llava-1.5-7b"]
        processor = build_processor(variant, corpus)
        return llava_config(variant, processor.tokenizer), processor, LlavaForConditionalGeneration
    if tiny:
        return build_tiny_lmm(family, corpus)
    config, processor, model_class = build_tiny_lmm(family, corpus, PROCESSORS[family])
    values = config.to_dict()
    for sub, shapes in SEVEN_B[family].items():
        values[f"{sub}_config"].pop("layer_types", None)  # derived from the layer count
        values[f"{sub}_config"].update(shapes)
    return type(config).from_dict(values), processor, model_class


def build(tiny: bool, device: torch.device, dtype: torch.dtype, family: str = "llava"):
    """The whole F-LMM with random weights: LMM built directly on ``device`` in ``dtype``."""
    config, processor, model_class = lmm_config(family, tiny)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype)
    lmm = FrozenLMM(model.eval(), processor, family_for(family), PromptConfig())
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


def time_forward(model, inputs, device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per batch of ``FLMM.forward`` (``warmup`` untimed batches first)."""
    times = []
    for i in range(repeats + warmup):
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model(inputs)
        sync(device)
        if i >= warmup:
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
    layers = getattr(vision, "num_hidden_layers", None) or vision.depth
    encoder = model.image_encoder.image_encoder
    batch, _ = model.lmm.model_inputs([x.lmm for x in inputs])
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
            "layers": layers,
            "intermediate": vision.intermediate_size,
            "patch": vision.patch_size,
            "image_size": getattr(vision, "image_size", None),  # None: dynamic (Qwen)
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
    model = build(args.tiny, device, dtype, args.family)
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
        "family": args.family,
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
        f"{res['device']}, {res['dtype']}, {'tiny ' + res['family'] if res['tiny'] else res['family'] + ' 7B + SAM ViT-L'}"
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
    p.add_argument("--family", default="llava", choices=FAMILIES, help="the LMM's model_type")
    p.add_argument("--batch", type=int, default=8, help="images per forward")
    p.add_argument("--phrases", type=int, default=3, choices=range(1, len(PHRASES) + 1))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.tiny and not torch.cuda.is_available():
        print(
            "no GPU here: bench/gpu.py measures a 7B LMM + SAM ViT-L on a CUDA device; "
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
