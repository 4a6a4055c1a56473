"""Benchmark: training-free grounding (localization heads + SAM) vs trained heads, same images.

    python bench/localization.py [--images 48] [--batch 8] [--repeats 5] [--json PATH]

Two measurements, each side timed in the same process, sides alternating per repeat:

1. **Toy, end to end.** The shipped toy LMM + toy SAM with the shipped trained heads
   (``models/toy/heads.safetensors``) and with the shipped localization heads
   (``models/toy/localization_heads.json``), on the first ``--images`` held-out toy scenes (each
   object's first expression, all of an image's phrases in one sequence), batches of
   ``--batch`` images: seconds per image of the model (LMM prefill, SAM encoder, heads), and the
   split by stage.
2. **Capture at LLaVA-1.5's sequence shape.** ``bench-576`` (random weights: 8 layers × 16 heads,
   width 1024, 576 image tokens): the prefill capturing every layer × head against capturing 3
   heads (the toy's count), batch 4, 3 phrases per image.

Printed: medians and the spread (min–max) of the repeats, and the ratios trained / training-free.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flmm.build import TINY_LLAVA_VARIANTS
from flmm.lmm import FrozenLMM
from flmm.model import GroundingInput
from flmm.prompt import FLMM_INSTRUCTION
from flmm.tiny_llava import write_tiny_llava
from toyworld.models import toy_localization_heads, toy_model_spec
from toyworld.scenes import EVAL_START, make_scene, scene_seed

PHRASES = ["the small red circle on the left", "the big blue square", "the green triangle"]


def toy_batches(n_images: int, batch: int):
    scenes = [make_scene(scene_seed(0, EVAL_START + i)) for i in range(n_images)]
    items = [(torch.from_numpy(s.image), [obj.expressions[0] for obj in s.objects]) for s in scenes]
    return [items[i : i + batch] for i in range(0, len(items), batch)]


def run_model(model, batches) -> dict[str, float]:
    """Seconds per stage over all batches: prepare, lmm, sam, heads."""
    seconds = dict.fromkeys(("prepare", "lmm", "sam", "heads"), 0.0)
    with torch.inference_mode():
        for batch in batches:
            t0 = time.perf_counter()
            inputs: list[GroundingInput] = [
                model.prepare(image, phrases) for image, phrases in batch
            ]
            t1 = time.perf_counter()
            lmm_out = model.lmm([x.lmm for x in inputs])
            t2 = time.perf_counter()
            embeddings = model.encode_images(inputs)
            t3 = time.perf_counter()
            model.decode(inputs, lmm_out.attention, lmm_out.hidden, embeddings)
            t4 = time.perf_counter()
            for stage, dt in zip(seconds, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                seconds[stage] += dt
    return seconds


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def toy_end_to_end(n_images: int, batch: int, repeats: int) -> dict:
    trained_spec = toy_model_spec()
    free_spec = dataclasses.replace(trained_spec, heads=str(toy_localization_heads()))
    models = {"trained": trained_spec.build(), "training-free": free_spec.build()}
    batches = toy_batches(n_images, batch)
    for model in models.values():  # warm-up
        run_model(model, batches[:1])
    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(run_model(model, batches))
    out = {}
    for name, seconds in runs.items():
        total = [sum(s.values()) / n_images for s in seconds]
        stages = {k: statistics.median(s[k] / n_images for s in seconds) for k in seconds[0]}
        out[name] = {"s_per_image": summary(total), "stages_s_per_image": stages}
    out["ratio_trained_over_free"] = (
        out["trained"]["s_per_image"]["median"] / out["training-free"]["s_per_image"]["median"]
    )
    return out


def capture_cost(repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_llava(
            TINY_LLAVA_VARIANTS["bench-576"], [*PHRASES, FLMM_INSTRUCTION] * 10, Path(tmp) / "m"
        )
        lmm = FrozenLMM.from_pretrained(str(path))
    images = [torch.randint(0, 256, (300, 400, 3), dtype=torch.uint8) for _ in range(4)]
    samples = [lmm.prepare(image, PHRASES) for image in images]
    heads = {"all": None, "3 heads": ((7, 3), (5, 10), (6, 1))}
    runs = {name: [] for name in heads}
    with torch.inference_mode():
        lmm(samples)  # warm-up
        for _ in range(repeats):
            for name, chosen in heads.items():
                lmm.capture_heads = chosen
                start = time.perf_counter()
                out = lmm(samples)
                runs[name].append(time.perf_counter() - start)
                runs.setdefault(f"{name} bytes", []).append(out.token_maps.nbytes / len(samples))
    return {
        "prefill_s": {name: summary(runs[name]) for name in heads},
        "maps_bytes_per_image": {name: runs[f"{name} bytes"][0] for name in heads},
        "ratio_all_over_3": statistics.median(runs["all"]) / statistics.median(runs["3 heads"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.manual_seed(0)
    result = {
        "toy": toy_end_to_end(args.images, args.batch, args.repeats),
        "capture": capture_cost(args.repeats),
        "torch_threads": torch.get_num_threads(),
    }
    toy, cap = result["toy"], result["capture"]
    for name in ("trained", "training-free"):
        s = toy[name]["s_per_image"]
        stages = ", ".join(
            f"{k} {v * 1000:.1f}" for k, v in toy[name]["stages_s_per_image"].items()
        )
        print(
            f"toy {name}: {s['median'] * 1000:.1f} ms/image (spread {s['min'] * 1000:.1f}–"
            f"{s['max'] * 1000:.1f}); stages ms/image: {stages}"
        )
    print(f"toy trained / training-free time: {toy['ratio_trained_over_free']:.2f}x")
    for name, s in cap["prefill_s"].items():
        mb = cap["maps_bytes_per_image"][name] / 1e6
        print(
            f"bench-576 prefill capturing {name}: {s['median']:.3f} s (spread {s['min']:.3f}–"
            f"{s['max']:.3f}), maps {mb:.2f} MB/image"
        )
    print(f"bench-576 prefill all / 3 heads: {cap['ratio_all_over_3']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
