"""Benchmark: the annotation job end to end against a plain single-process script, same images.

    python bench/annotate.py [--images 400] [--per-shard 48] [--batch-size 4] [--actors 1]
                             [--repeats 3] [--script-batch-sizes B 1] [--json PATH]
                             [--job-args FLAG ...]

Inputs: toy-world scenes (``toyworld.scenes``) written as shards of the input format with one
phrase per object (the first expression of each), so every image has 2-4 phrases. Models: the
shipped toy LMM + toy SAM + toy heads (``toyworld.models.toy_model_spec``).

Sides, each a fresh process timed from its launch to its exit (interpreter start, imports,
Ray's start and model loading included: what a user waits for):

- **job**: ``python jobs/annotate.py --input DIR --output OUT --batch-size B --actors A``
  (local Ray started by the job, all of the machine's CPUs, no preview);
- **script B** (``--script-batch-sizes``, default the job's batch and 1): what a user writes
  without the pipeline, the strong baseline: one process, all the machine's torch threads,
  webdataset reads the tars, PIL decodes, ``ModelSpec.build()``, ``model([model.prepare(image,
  phrases), ...])`` for B images at a time, sigmoid > 0.5, pycocotools RLE, one Parquet file per
  shard.

The entries of bench/NOTES.md before 2026-12-08 compared the job with F-LMM's naive loop (batch 1,
eager ``output_attentions``, SAM's image encoder re-run per phrase), a baseline that flattered
it; that side is gone (git history has it).

Reported: seconds and images/s per side (median and spread of ``--repeats``; the sides
alternate so that load drifts hit all), the job's end-to-end ratio over each script, where the
job's time went (its own clock from the output's lock to the last commit, Ray's start included,
against the process's wall: the rest is interpreter start and imports), the job's stage split (summed
over its done markers), and the masks' agreement of every side with the job (IoU per phrase).
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STAGES = ("decode_s", "prepare_s", "lmm_s", "sam_s", "heads_s", "post_s", "write_s")
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled"}


# --------------------------------------------------------------------------------------------
# Inputs
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


# --------------------------------------------------------------------------------------------
# Each side in a fresh process, timed from launch to exit
# --------------------------------------------------------------------------------------------


def timed(cmd: list[str]) -> tuple[float, str]:
    """Run ``cmd`` (cwd: the repo); its wall seconds and stdout. Raises with its stderr."""
    start = time.perf_counter()
    done = subprocess.run(
        cmd, check=False, cwd=REPO, capture_output=True, text=True, env={**os.environ, **ENV}
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} … failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def run_job(shards: Path, out: Path, batch_size: int, actors: int, extra: list[str]) -> dict:
    """``jobs/annotate.py`` on ``shards``; wall seconds, its own clock, its stage split."""
    from pipeline.writer import DONE, OutputDir

    cmd = [sys.executable, "jobs/annotate.py", "--input", str(shards), "--output", str(out)]
    cmd += ["--batch-size", str(batch_size), "--actors", str(actors), "--preview-images", "0"]
    seconds, stdout = timed(cmd + extra)
    line = stdout.strip().splitlines()[-1]  # "annotate: … | 12.3 images/s over 45.6 s | …"
    own = float(line.split(" over ")[1].split(" s")[0])
    output = OutputDir(str(out))
    names = [n.removesuffix(".json") for n in output.names(DONE, suffix=".json")]
    timings = [output.read_done(n)["timings"] for n in names]
    split = {s: sum(t.get(s, 0.0) for t in timings) for s in STAGES}
    return {"seconds": seconds, "own_s": own, "stages_s": split,
            "model_s": sum(t["model_s"] for t in timings)}  # fmt: skip


def run_script(shards: Path, out: Path, batch_size: int) -> dict:
    seconds, _ = timed([sys.executable, __file__, "--script-worker", str(shards), str(out),
                        "--batch-size", str(batch_size)])  # fmt: skip
    return {"seconds": seconds}


def script_worker(shards: Path, out: Path, batch_size: int) -> None:
    """The strong baseline, as a user would write it: the whole process is one loop."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import webdataset as wds
    from PIL import Image
    from pycocotools import mask as mask_utils

    from toyworld.models import toy_model_spec

    model = toy_model_spec().build()
    out.mkdir(parents=True)

    def ground(batch: list[tuple[str, np.ndarray, list[str]]], rows: dict) -> None:
        with torch.inference_mode():
            inputs = [model.prepare(torch.from_numpy(px), phrases) for _, px, phrases in batch]
            groundings = model(inputs)
        for (key, _, phrases), grounding in zip(batch, groundings):
            masks = (grounding.refined[:, 0].float().sigmoid() > 0.5).numpy()  # [P, H, W]
            for phrase, m in zip(phrases, masks):
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                rows["key"].append(key)
                rows["phrase"].append(phrase)
                rows["counts"].append(rle["counts"].decode("ascii"))
                rows["size"].append([int(v) for v in rle["size"]])

    for tar in sorted(shards.glob("*.tar")):
        rows, batch = {"key": [], "phrase": [], "counts": [], "size": []}, []
        for sample in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
            batch.append((sample["__key__"], image, json.loads(sample["json"])["phrases"]))
            if len(batch) == batch_size:
                ground(batch, rows)
                batch = []
        if batch:
            ground(batch, rows)
        pq.write_table(pa.table(rows), out / f"{tar.stem}.parquet")


# --------------------------------------------------------------------------------------------
# Agreement of the masks, and the report
# --------------------------------------------------------------------------------------------


def masks_by_phrase(out: Path) -> dict:
    """``(key, phrase) → RLE`` of a job's output (``annotations/``) or of the
    script's Parquet files."""
    import pyarrow.parquet as pq

    if (out / "annotations").is_dir():
        rows = pq.read_table(out / "annotations", columns=["key", "phrase", "mask"]).to_pylist()
        return {(r["key"], r["phrase"]): r["mask"] for r in rows}
    rows = pq.read_table(out).to_pylist()
    return {(r["key"], r["phrase"]): {"size": r["size"], "counts": r["counts"]} for r in rows}


def mask_agreement(a: Path, b: Path) -> dict:
    """Per phrase of ``a``, IoU with ``b``'s mask (1 for two empty masks; a phrase ``b`` lacks
    counts as 0)."""
    from pipeline.formats import decode_rle

    ma, mb = masks_by_phrase(a), masks_by_phrase(b)
    ious = []
    for k, rle in ma.items():
        if k not in mb:
            ious.append(0.0)
            continue
        x, y = decode_rle(rle), decode_rle(mb[k])
        union = np.logical_or(x, y).sum()
        ious.append(1.0 if union == 0 else float(np.logical_and(x, y).sum() / union))
    return {
        "phrases": len(ious),
        "missing": len(set(ma) ^ set(mb)),
        "mean_iou": float(np.mean(ious)),
        "min_iou": float(np.min(ious)),
        "identical": float(np.mean([i == 1.0 for i in ious])),
    }


def summary_of(runs: list[dict], images: int) -> dict:
    """Median and spread (min, max) of the repeats' seconds; images/s of the median."""
    seconds = [r["seconds"] for r in runs]
    median = statistics.median(seconds)
    return {"seconds": median, "min_s": min(seconds), "max_s": max(seconds),
            "images_per_s": images / median, "runs_s": seconds}  # fmt: skip


def print_report(res: dict) -> None:
    per_image = res["phrases_per_image"]
    print(
        f"{res['images']} images ({per_image['min']}-{per_image['max']} phrases, mean "
        f"{per_image['mean']:.2f}), job batch {res['batch_size']} × {res['actors']} actor(s), "
        f"{os.cpu_count()} CPUs, median (min-max) of {res['repeats']}"
    )
    print("| side | s | images/s | job ÷ side (images/s) | masks vs job |")
    print("|---|---:|---:|---:|---|")
    job = res["sides"]["job"]
    for side, r in res["sides"].items():
        a = res["agreement"].get(side)
        agree = f"mean IoU {a['mean_iou']:.4f}, {a['identical']:.1%} identical" if a else "—"
        print(
            f"| {side} | {r['seconds']:.1f} ({r['min_s']:.1f}-{r['max_s']:.1f}) | "
            f"{r['images_per_s']:.2f} | {r['images_per_s'] and job['images_per_s'] / r['images_per_s']:.2f}× "
            f"| {agree} |"
        )
    own = res["job_own_s"]
    print(
        f"job: its own clock (from its lock, Ray's start included) {own:.1f} s of "
        f"{job['seconds']:.1f} s wall (the rest: interpreter start, imports); actor busy "
        f"{res['job_model_s']:.1f} s"
    )
    print("| job stage (s, summed) | " + " | ".join(s.removesuffix("_s") for s in STAGES) + " |")
    print("|---|" + "---:|" * len(STAGES))
    print("| job | " + " | ".join(f"{res['job_stages_s'][s]:.2f}" for s in STAGES) + " |")


def sides_of(args) -> list[str]:
    return ["job", *(f"script {b}" for b in args.script_batch_sizes or (args.batch_size, 1))]


def run_side(side: str, shards: Path, out: Path, args) -> dict:
    if side == "job":
        return run_job(shards, out, args.batch_size, args.actors, args.job_args)
    return run_script(shards, out, int(side.split()[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--per-shard", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--script-batch-sizes",
        type=int,
        nargs="+",
        help="the scripts' batch sizes (default: the job's, and 1)",
    )
    p.add_argument("--job-args", nargs=argparse.REMAINDER, default=[],
                   help="more flags for jobs/annotate.py (last on the line)")  # fmt: skip
    p.add_argument("--json", help="write the results here")
    p.add_argument("--script-worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.script_worker:
        script_worker(*map(Path, args.script_worker), args.batch_size)
        return
    sides = sides_of(args)
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        phrases = write_shards(tmp / "in", args.images, args.per_shard)
        for i in range(args.repeats):
            for side in sides if i % 2 == 0 else sides[::-1]:
                out = tmp / f"{side.replace(' ', '')}-{i}"
                runs[side].append(run_side(side, tmp / "in", out, args))
                print(f"repeat {i}: {side} {runs[side][-1]['seconds']:.1f} s", flush=True)
        job_out = tmp / "job-0"
        agreement = {
            side: mask_agreement(job_out, tmp / f"{side.replace(' ', '')}-0")
            for side in sides
            if side != "job"
        }
    res = {
        "images": args.images,
        "phrases_per_image": {
            "min": min(phrases),
            "max": max(phrases),
            "mean": statistics.mean(phrases),
        },
        "batch_size": args.batch_size,
        "actors": args.actors,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "sides": {side: summary_of(r, args.images) for side, r in runs.items()},
        "job_own_s": statistics.median(r["own_s"] for r in runs["job"]),
        "job_model_s": statistics.median(r["model_s"] for r in runs["job"]),
        "job_stages_s": {
            s: statistics.median(r["stages_s"][s] for r in runs["job"]) for s in STAGES
        },
        "agreement": agreement,
    }
    print_report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
