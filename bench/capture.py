"""Benchmark: our attention capture vs eager ``output_attentions`` (the F-LMM way), same inputs.

    python bench/capture.py [--family llava] [--variant bench-576] [--batch 4] [--repeats 3]
                            [--caption-words W] [--dtype bfloat16] [--json PATH]

Builds a checkpoint of the given family (random weights): for ``llava`` the tiny variant
(576 image tokens for ``bench-576``); for the other families (``flmm.tiny_lmms``) the same text
decoder as ``bench-576`` behind the family's own vision tower and processor at 336 px (DeepSeek-VL:
576 tokens; Qwen-VL and LLaVA-NeXT: as many as the 300×400 images give). Then it measures each
side in its own process: median forward time, peak resident memory above the loaded model (VmHWM
reset through /proc/self/clear_refs), and the attention bytes each side holds per sample (eager:
every layer's [H, S, S]; capture: [L, H, Q, N]). ``--caption-words W``: each sample is a caption
of W words prefilled as caption mode prefills it (every text token captured, ``prepare_text``)
instead of three phrases; ``--dtype``: the LMM's dtype (captured rows are kept in it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flmm.build import TINY_LLAVA_VARIANTS
from flmm.lmm import FrozenLMM
from flmm.prompt import FLMM_INSTRUCTION
from flmm.tiny_llava import write_tiny_llava
from flmm.tiny_lmms import MODEL_TYPES, TinyLMMConfig, write_tiny_lmm

# bench-576's decoder (Llama-like, 8 layers × 16 heads, width 1024) for the other families
BENCH_DECODER = TinyLMMConfig(
    text_hidden=1024,
    text_layers=8,
    text_heads=16,
    text_kv_heads=16,
    text_intermediate=2816,
    image_size=336,
)

PHRASES = ["the small red circle on the left", "the big blue square", "the green triangle"]
CORPUS = [*PHRASES, FLMM_INSTRUCTION] * 10


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def caption(words: int) -> str:
    """A caption of ``words`` words made of the phrases' words."""
    vocab = " ".join(PHRASES).split()
    return " ".join(vocab[i % len(vocab)] for i in range(words))


def run_side(
    side: str, path: str, batch: int, repeats: int, caption_words: int = 0, dtype: str = "float32"
) -> dict:
    """Time one side's forward over a batch of ``batch`` samples; returns measurements."""
    torch.set_num_threads(os.cpu_count() or 1)
    lmm = FrozenLMM.from_pretrained(path, dtype=getattr(torch, dtype))
    if side == "eager":
        lmm.model.set_attn_implementation("eager")
    images = [torch.randint(0, 256, (300, 400, 3), dtype=torch.uint8) for _ in range(batch)]
    if caption_words:
        samples = [lmm.prepare_text(img, caption(caption_words))[0] for img in images]
    else:
        samples = [lmm.prepare(img, PHRASES) for img in images]
    batch_index, inputs = lmm.model_inputs(samples)

    def forward() -> int:
        with torch.inference_mode():
            if side == "capture":
                return lmm(samples).token_maps.nbytes
            out = lmm.model.model(**inputs, output_attentions=True, use_cache=False)
            return sum(a.nbytes for a in out.attentions)

    forward()  # warm-up
    times, kept = [], 0
    base = _status_kib("VmRSS")
    _reset_peak()
    for _ in range(repeats):
        start = time.perf_counter()
        kept = forward()
        times.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM") - base
    return {
        "time_s": statistics.median(times),
        "peak_above_model_mib": peak / 1024,
        "attn_bytes_per_sample": kept / batch,
        "seq_len": int(inputs["input_ids"].shape[1]),
        "image_tokens": int(batch_index["image_index"].shape[1]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--family", default="llava", choices=MODEL_TYPES, help="LMM model_type")
    p.add_argument("--variant", default="bench-576", choices=sorted(TINY_LLAVA_VARIANTS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--caption-words", type=int, default=0, help="caption mode (0: phrases)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--side", choices=["capture", "eager"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:  # worker process
        run = run_side(
            args.side, args.model, args.batch, args.repeats, args.caption_words, args.dtype
        )
        print(json.dumps(run))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.family == "llava":
            model = write_tiny_llava(TINY_LLAVA_VARIANTS[args.variant], CORPUS, Path(tmp) / "m")
        else:
            model = write_tiny_lmm(args.family, CORPUS, Path(tmp) / "m", BENCH_DECODER)
        res = {side: _worker(side, model, args) for side in ("capture", "eager")}
    cap, eager = res["capture"], res["eager"]
    summary = {
        "time_ratio_eager_over_capture": eager["time_s"] / cap["time_s"],
        "peak_mem_ratio_eager_over_capture": eager["peak_above_model_mib"]
        / max(cap["peak_above_model_mib"], 1e-9),
        "attn_bytes_ratio_eager_over_capture": eager["attn_bytes_per_sample"]
        / cap["attn_bytes_per_sample"],
        "image_tokens": cap["image_tokens"],
        "batch": args.batch,
        "family": args.family,
        "caption_words": args.caption_words,
        "dtype": args.dtype,
        "variant": args.variant if args.family == "llava" else "bench decoder, 336 px",
        "capture": cap,
        "eager": eager,
    }
    print(
        f"{args.family} ({summary['variant']}, {args.dtype}), batch {args.batch}, seq "
        f"{cap['seq_len']}, {cap['image_tokens']} image tokens, "
        f"{f'captions of {args.caption_words} words' if args.caption_words else 'phrases'}, "
        f"median of {args.repeats}"
    )
    print("| side | time s | peak above model MiB | attention kept per sample MB |")
    print("|---|---|---|---|")
    for side in ("capture", "eager"):
        r = res[side]
        print(
            f"| {side} | {r['time_s']:.2f} | {r['peak_above_model_mib']:.0f} | "
            f"{r['attn_bytes_per_sample'] / 1e6:.1f} |"
        )
    print(
        f"eager/capture: time {summary['time_ratio_eager_over_capture']:.2f}×, peak memory "
        f"{summary['peak_mem_ratio_eager_over_capture']:.2f}×, attention bytes "
        f"{summary['attn_bytes_ratio_eager_over_capture']:.1f}×"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


def _worker(side: str, model: Path, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--side",
        side,
        "--model",
        str(model),
        "--batch",
        str(args.batch),
        "--repeats",
        str(args.repeats),
        "--caption-words",
        str(args.caption_words),
        "--dtype",
        args.dtype,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
