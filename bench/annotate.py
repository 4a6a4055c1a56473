"""Benchmark: the annotation job (Ray Data, batched) vs a naive F-LMM loop, same shards and models.

    python bench/annotate.py [--images 96] [--per-shard 6] [--batch-size 4] [--actors 1]
                             [--repeats 3] [--json PATH]

Inputs: toy-world scenes (``toyworld.scenes``) written as shards of the input format with one
phrase per object (the first expression of each), so every image has 2-4 phrases. Models: the
shipped toy LMM + toy SAM + toy heads (``models/toy/``), copied to a temp folder first so that a
change to them mid-run cannot mix two models.
``--sam-heads-dtype bfloat16`` runs SAM and the heads under bf16 autocast on both sides.

- **ours**: ``pipeline.annotate.run_annotation`` on a local Ray (``ray.init(address="local")``),
  ``--actors`` model actors of one CPU (one torch thread) each, ``--batch-size`` images per call.
- **naive**: one process, one torch thread, batch 1, eager attention with ``output_attentions``
  (every layer's S×S materialised, as F-LMM reads its attention maps), and per phrase the SAM
  image encoder re-run and the heads run on that phrase alone. Same read, decode, prepare,
  postprocess and writer code as the job.

Both sides' time runs from the start of the run (model build included; Ray's start, reported
apart, and interpreter start-up excluded) to the last shard written. Each side runs on the first
half of the images and on all of them; reported: end-to-end images/s over all images, the
marginal images/s (the second half's images over the extra time: the rate once started, without
the fixed costs of starting actors and building models), the per-stage split of the full run
(decode, prepare, LMM, SAM encoder, heads, postprocess, write; summed over images, so stages that
run in parallel can sum past the wall time), actor utilisation (the actors' busy time over their
share of the wall time) and how far the two sides' masks agree (they compute the same thing).
Medians over ``--repeats``; the two sides alternate so that load drifts hit both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STAGES = ("decode_s", "prepare_s", "lmm_s", "sam_s", "heads_s", "post_s", "write_s")


# --------------------------------------------------------------------------------------------
# Inputs and models
# --------------------------------------------------------------------------------------------


def write_shards(out_dir: Path, n_images: int, per_shard: int, seed: int = 1) -> list[int]:
    """Toy scenes as ``bench-{000000..}.tar``, one phrase per object; returns phrases per image."""
    from pipeline.shards import write_shards as write
    from toyworld.scenes import make_scene, scene_seed
    from toyworld.shards import scene_metadata, scene_sample

    counts = []

    def samples():
        for index in range(n_images):
            scene = make_scene(scene_seed(seed, index))
            meta = scene_metadata(scene)
            meta["phrases"] = [obj.expressions[0] for obj in scene.objects]
            counts.append(len(meta["phrases"]))
            yield scene_sample(f"bench_{index:08d}", scene, meta)

    write(out_dir, "bench", samples(), per_shard)
    return counts


def snapshot_toy_models(out_dir: Path) -> dict:
    """Copy the toy LMM, SAM and heads; the ``ModelSpec`` fields that name the copies."""
    toy = REPO / "models" / "toy"
    shutil.copytree(toy / "llava", out_dir / "llava")
    for name in ("sam.safetensors", "heads.safetensors"):
        shutil.copy(toy / name, out_dir / name)
    return {
        "lmm": str(out_dir / "llava"),
        "sam_variant": "toy",
        "sam_checkpoint": str(out_dir / "sam.safetensors"),
        "heads": str(out_dir / "heads.safetensors"),
    }


# --------------------------------------------------------------------------------------------
# Ours: the annotation job on a local Ray
# --------------------------------------------------------------------------------------------


def run_ours(shards: Path, spec: dict, out: Path, batch_size: int, actors: int) -> dict:
    """One ``run_annotation`` over ``shards`` into ``out``; times, stage split, utilisation."""
    from pipeline.annotate import AnnotateConfig, run_annotation
    from pipeline.spec import ModelSpec
    from pipeline.writer import OutputDir

    config = AnnotateConfig(
        inputs=(str(shards),),
        output=str(out),
        model=ModelSpec(**spec),
        batch_size=batch_size,
        actors=actors,
        preview_images=0,
    )
    summary = run_annotation(config)
    if summary.failed or summary.errors:
        raise RuntimeError(f"annotation run failed: {summary.line()}")
    timings = [OutputDir(str(out)).read_done(name)["timings"] for name in summary.done]
    split = {s: sum(t[s] for t in timings) for s in STAGES if s != "write_s"}
    split["write_s"] = summary.write_s
    busy = sum(t["model_s"] for t in timings)
    return {
        "images": summary.samples,
        "seconds": summary.seconds,
        "stages_s": split,
        "read_s": sum(t["read_s"] for t in timings),
        "actor_busy_s": busy,
        "actor_utilisation": busy / (actors * summary.seconds),
    }


# --------------------------------------------------------------------------------------------
# Naive: one process, batch 1, eager attention, SAM encoder per phrase (run in a subprocess)
# --------------------------------------------------------------------------------------------


def run_naive(shards: Path, spec: dict, out: Path, threads: int) -> dict:
    """The naive loop in a process of its own (no Ray, ``threads`` torch threads)."""
    cmd = [sys.executable, __file__, "--naive-worker", str(shards), str(out), json.dumps(spec)]
    cmd += ["--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(result.strip().splitlines()[-1])


def naive_worker(shards: Path, out: Path, spec: dict, threads: int) -> dict:
    import torch

    from pipeline.decode import decode_sample, phrases_of
    from pipeline.grounding import annotate_logits
    from pipeline.sources import iter_tar_samples, resolve_shards, sample_files, shard_name
    from pipeline.spec import ModelSpec
    from pipeline.writer import OutputDir, shard_tables

    torch.set_num_threads(threads)
    start = time.perf_counter()
    spec = ModelSpec(**spec)
    model = spec.build()
    model.lmm.model.set_attn_implementation("eager")
    split = dict.fromkeys(STAGES, 0.0)
    output, images = OutputDir(str(out)), 0
    for uri in resolve_shards([str(shards)]):
        rows = []
        for key, files, exts in iter_tar_samples(uri):
            t = time.perf_counter()
            pixels, meta = decode_sample(sample_files(files, exts))
            phrases = phrases_of(meta)
            split["decode_s"] += time.perf_counter() - t
            with torch.inference_mode():
                refined = naive_ground(model, torch.from_numpy(pixels), phrases, split)
            t = time.perf_counter()
            counts, bboxes, scores = annotate_logits(refined)
            split["post_s"] += time.perf_counter() - t
            rows.append(
                {
                    "key": key,
                    "status": "ok",
                    "phrases": phrases,
                    "counts": counts,
                    "bboxes": bboxes.tolist(),
                    "scores": scores.tolist(),
                    "height": pixels.shape[0],
                    "width": pixels.shape[1],
                    "source": "given",
                    "text": "",
                    "warning": "",
                }
            )
        t = time.perf_counter()
        name = shard_name(uri)
        annotations, samples = shard_tables(name, rows, spec.model_id())
        output.write_shard(name, annotations, samples, {"samples": len(rows)}, len(rows))
        split["write_s"] += time.perf_counter() - t
        images += len(rows)
    return {"images": images, "seconds": time.perf_counter() - start, "stages_s": split}


def naive_ground(model, image, phrases: list[str], split: dict):
    """F-LMM's way for one image: eager prefill at batch 1 with ``output_attentions`` (phrase
    rows of every layer's ``[H, S, S]`` read afterwards), then per phrase a SAM image encoding
    and the heads on that phrase. → refined logits ``[P, 1, H, W]``."""
    import torch

    from flmm.lmm import collate, phrase_slots

    lmm, clock = model.lmm, time.perf_counter()
    x = model.prepare(image, phrases)
    tok = lmm.processor.tokenizer
    batch = collate([x.lmm], tok.pad_token_id, tok.padding_side, lmm.model.config.image_token_id)
    split["prepare_s"] += time.perf_counter() - clock
    clock = time.perf_counter()
    out = lmm.model.model(
        **{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")},
        pixel_values=batch["pixel_values"].to(lmm.model.dtype),
        output_attentions=True,
        output_hidden_states=True,
        use_cache=False,
    )
    q, n = batch["query_index"][0], batch["image_index"][0]
    maps = torch.stack([a[0][:, q][:, :, n].float() for a in out.attentions])  # [L, H, Q, N]
    slots = phrase_slots(x.lmm.phrase_tokens)
    attention = lmm.merge_slots(maps, slots)  # [P, L·H, h, w]
    hidden = torch.stack(out.hidden_states[1:], dim=1)[0][:, q].transpose(0, 1)  # [Q, L, D]
    split["lmm_s"] += time.perf_counter() - clock
    refined = []
    for p, s in enumerate(slots):
        clock = time.perf_counter()
        embedding = model.encode_images([x])  # re-run for every phrase
        split["sam_s"] += time.perf_counter() - clock
        clock = time.perf_counter()
        grounding = model.decode([x], [attention[p : p + 1]], [[hidden[s]]], embedding)[0]
        refined.append(grounding.refined)
        split["heads_s"] += time.perf_counter() - clock
    return torch.cat(refined)


# --------------------------------------------------------------------------------------------
# Agreement of the two sides' masks, and the report
# --------------------------------------------------------------------------------------------


def mask_agreement(a: Path, b: Path) -> dict:
    """Per phrase, IoU of the two outputs' masks (1 for two empty masks)."""
    import pyarrow.parquet as pq

    from pipeline.formats import decode_rle

    ta = pq.read_table(a / "annotations").sort_by([("key", "ascending")]).to_pylist()
    tb = {(r["key"], r["phrase"]): r for r in pq.read_table(b / "annotations").to_pylist()}
    ious = []
    for row in ta:
        ma, mb = decode_rle(row["mask"]), decode_rle(tb[(row["key"], row["phrase"])]["mask"])
        union = np.logical_or(ma, mb).sum()
        ious.append(1.0 if union == 0 else np.logical_and(ma, mb).sum() / union)
    return {
        "phrases": len(ious),
        "mean_iou": float(np.mean(ious)),
        "min_iou": float(np.min(ious)),
        "identical": float(np.mean([i == 1.0 for i in ious])),
    }


def median_of(runs: list[dict]) -> dict:
    """Field-wise median of the runs' numbers (nested dicts too)."""
    out = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            out[key] = median_of([r[key] for r in runs])
        else:
            out[key] = statistics.median(r[key] for r in runs)
    return out


def with_rates(half: dict, full: dict) -> dict:
    """One repeat of one side: the full run's numbers, its images/s, and the marginal images/s
    between the half and the full run."""
    extra = full["seconds"] - half["seconds"]
    return {
        **full,
        "half_seconds": half["seconds"],
        "images_per_s": full["images"] / full["seconds"],
        "marginal_images_per_s": (full["images"] - half["images"]) / extra,
    }


def print_report(res: dict) -> None:
    ours, naive = res["ours"], res["naive"]
    per_image = res["phrases_per_image"]
    print(
        f"{res['images']} images ({per_image['min']}-{per_image['max']} phrases, mean "
        f"{per_image['mean']:.2f}), batch {res['batch_size']}, {res['actors']} actor(s), "
        f"SAM + heads in {res['sam_heads_dtype']}, median of {res['repeats']}"
    )
    print(f"| side | s for {res['images'] // 2} | s for {res['images']} | images/s | marginal |")
    print("|---|---|---|---|---|")
    for side, r in (("ours", ours), ("naive", naive)):
        print(
            f"| {side} | {r['half_seconds']:.1f} | {r['seconds']:.1f} | "
            f"{r['images_per_s']:.2f} | {r['marginal_images_per_s']:.2f} |"
        )
    print(
        f"ours/naive: images/s {res['ratio_images_per_s_ours_over_naive']:.2f}×, "
        f"marginal images/s {res['ratio_marginal_ours_over_naive']:.2f}×"
    )
    print("| stage (s, summed) | " + " | ".join(s.removesuffix("_s") for s in STAGES) + " |")
    print("|---|" + "---|" * len(STAGES))
    for side, r in (("ours", ours), ("naive", naive)):
        print(f"| {side} | " + " | ".join(f"{r['stages_s'][s]:.2f}" for s in STAGES) + " |")
    print(
        f"actor utilisation {ours['actor_utilisation']:.0%} (busy {ours['actor_busy_s']:.1f} s "
        f"of {ours['seconds']:.1f} s × {res['actors']}); ray.init {res['ray_init_s']:.1f} s"
    )
    a = res["agreement"]
    print(
        f"masks ours vs naive: mean IoU {a['mean_iou']:.4f}, min {a['min_iou']:.4f}, "
        f"identical {a['identical']:.0%} of {a['phrases']} phrases"
    )


def measure(args, tmp: Path, spec: dict) -> dict:
    """``args.repeats`` × (naive, ours) on the half and the full shard set, alternating."""
    runs = {"ours": [], "naive": []}
    for i in range(args.repeats):
        for side in ("naive", "ours"):
            sizes = {}
            for size in ("half", "full"):
                out = tmp / f"{side}-{size}-{i}"
                if side == "naive":
                    sizes[size] = run_naive(tmp / size, spec, out, args.threads)
                else:
                    sizes[size] = run_ours(tmp / size, spec, out, args.batch_size, args.actors)
            runs[side].append(with_rates(sizes["half"], sizes["full"]))
        print(
            f"repeat {i}: naive {runs['naive'][-1]['seconds']:.1f} s, "
            f"ours {runs['ours'][-1]['seconds']:.1f} s",
            flush=True,
        )
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=96, help="images of the full run (half: N/2)")
    p.add_argument("--per-shard", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the naive loop")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--sam-heads-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="what SAM and the heads compute in, on both sides (ModelSpec.sam_heads_dtype)",
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument("--naive-worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.naive_worker:
        shards, out, spec = args.naive_worker
        print(json.dumps(naive_worker(Path(shards), Path(out), json.loads(spec), args.threads)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_shards(tmp / "half", args.images // 2, args.per_shard)
        phrases = write_shards(tmp / "full", args.images, args.per_shard)
        spec = {**snapshot_toy_models(tmp / "models"), "sam_heads_dtype": args.sam_heads_dtype}
        start = time.perf_counter()
        ray.init(
            address="local",
            num_cpus=args.ray_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        ray_init_s = time.perf_counter() - start
        runs = measure(args, tmp, spec)
        agreement = mask_agreement(tmp / "ours-full-0", tmp / "naive-full-0")
        ray.shutdown()
    ours, naive = median_of(runs["ours"]), median_of(runs["naive"])
    res = {
        "ratio_images_per_s_ours_over_naive": ours["images_per_s"] / naive["images_per_s"],
        "ratio_marginal_ours_over_naive": ours["marginal_images_per_s"]
        / naive["marginal_images_per_s"],
        "images": args.images,
        "phrases_per_image": {
            "min": min(phrases),
            "max": max(phrases),
            "mean": statistics.mean(phrases),
        },
        "batch_size": args.batch_size,
        "actors": args.actors,
        "sam_heads_dtype": args.sam_heads_dtype,
        "repeats": args.repeats,
        "ray_init_s": ray_init_s,
        "ours": ours,
        "naive": naive,
        "agreement": agreement,
        "runs": runs,
    }
    print_report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
