"""The one-shot GPU suite: every GPU measurement the project needs, in one command of ≤ 8 minutes.

    python bench/gpu_suite.py [--json PATH] [--budget 480] [--parts bench,annotate,train]
    python bench/gpu_suite.py --tiny [--json PATH]   # the same path at test sizes, on CPU too

Nothing is downloaded: every model has random weights built from its config (bf16 on the GPU),
every tokenizer is trained in process, every image is a toy-world scene. Parts, in order:

- ``bench``: ``bench/gpu.py``'s measurement at LLaVA-1.5-7B, DeepSeek-VL-7B and Qwen2.5-VL-7B
  shapes (+ SAM ViT-L) at batch 1/4/8/16: images/s of ``FLMM.forward``, peak memory
  (``max_memory_allocated``, weights included), fraction of the FLOP bound (LMM + SAM FLOPs per
  image, counted at batch 1, × images/s ÷ the measured bf16 matmul rate);
- ``annotate``: the annotation job (``pipeline.annotate.run_annotation``, local Ray, one actor
  of one GPU, ``--sam-heads-dtype bfloat16``) end to end on ``--images`` toy scenes in each of
  the ``given``, ``caption`` and ``image`` (image-only) forms, with a LLaVA-1.5-7B-shaped LMM
  (``RandomLMMSpec``: a directory holding the config and processor only, the weights made on
  the actor's device: no 14 GB checkpoint written or read) and random heads with a keyword
  selector sized for it (``write_random_heads``). Per mode: images/s end to end (Ray's start
  excluded, the actor's model build included) and over the model's own time, the done
  markers' per-stage split, phrases per image, and the peak of the device's used memory
  sampled from the driver (the actor is another process: every process's memory counts);
- ``train``: ``--steps`` steps of the head-training job (``pipeline.train.fit_heads``, Ray
  Train: the frozen 7B-shaped LMM + SAM in a Ray Data actor, one DDP worker, half a GPU each,
  batch 1) on toy training scenes: its seconds (Ray Train's start included), the final loss.

It prints a progress line per step (elapsed seconds first), writes the JSON after every step
(``--json``: ``{"suite": {device, versions, ...}, "parts": {"setup", "bench/<family>",
"ray", "annotate/<mode>", "train": {..., "status", "seconds"}}}``; a run killed midway leaves
what it measured) and prints one Markdown table at the end. Each step gets its share of
``--budget`` (``PLAN_S``, scaled; what a step leaves unused goes to the next ones) and is cut
when it runs over it: its status says ``cut``, Ray is restarted, and the suite goes on.
Without CUDA and without ``--tiny`` it says so and writes ``{"skipped": "no CUDA device"}``.

Planned on one H100 (``PLAN_S``; nothing measured there yet): setup ≈ 10 s (matmul rate, a
7B-dims heads file on a random SAM ViT-L, 212 toy scenes); per bench family a 7B build on the
GPU ≈ 15 s and 29 images × (1 + repeats) + warm-ups ≈ 30 s; Ray's start ≈ 10 s; each annotate
mode ≈ 40-70 s (the actor's process, imports and 7B build ≈ 25 s, then 64 images; image-only
adds a 64-token generation per batch); train ≈ 90 s (Ray Train's start, the frozen actor's
build, 20 steps). About 7.5 minutes with Python's start, inside the tool's 10.

How to run it when a GPU is lent. The GPU image lacks Ray (and what ``ray[data,train]`` needs
beyond the image), segment-anything, webdataset, braceexpand and pycocotools;
``bench/gpu_wheels.sh`` fetches them here into ``.whl/site.tar.xz`` (git-ignored; ~31 MB, with
the ~13 MB tree inside the 64 MiB that travels), once, in the checkout the device tool sends
(the session's own, not a helper's worktree). Its transformers (5.17) and torch (2.11) are
used as they are: the ``--tiny`` path passed with transformers 5.17 and exactly the image's
packages plus the carried ones (torch 2.14 here; 2.11 was not tried). Then, as the first use
of the machine (no ``kind``: it fits an H100)::

    run(timeout_s=590, carry=[".whl"], command=
      "tar -xJf .whl/site.tar.xz -C /tmp && export PYTHONPATH=/tmp/site:$PWD "
      "PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled "
      "&& nvidia-smi -L && set -o pipefail && python3 bench/gpu_suite.py --budget 480 "
      "--json $OUT/gpu_suite.json 2>&1 | tee $OUT/gpu_suite.log")

and record the printed table in bench/NOTES.md with the device line. ``--parts`` and
``--families`` rerun a part that was cut or failed, alone.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: ``bench.*`` (and this module) importable
    sys.path.insert(0, str(REPO))

import torch

from bench import gpu
from pipeline.spec import DTYPES, ModelSpec

BATCHES = (1, 4, 8, 16)
MODES = ("given", "caption", "image")
PARTS = ("bench", "annotate", "train")
# seconds planned per step on one H100 (scaled to --budget, 455 in all); setup's is generous:
# cut, it would leave nothing to run
PLAN_S = {
    "setup": 30,
    **{f"bench/{family}": 50 for family in gpu.FAMILIES},
    "ray": 10,
    "annotate/given": 45,
    "annotate/caption": 50,
    "annotate/image": 70,
    "train": 100,
}
MIN_START_S = 10  # a step with less than this left is skipped, not started
SELECTOR_OUTSIDE_BIAS = 1.0  # random selector heads: O wins most tokens (a few spans per text)


class PartTimeout(BaseException):
    """A step ran past its share of the budget (a BaseException, as KeyboardInterrupt is: code
    that catches every Exception, Ray's or ours, must not swallow it)."""


@contextlib.contextmanager
def deadline(seconds: float | None):
    """Raise ``PartTimeout`` in the main thread after ``seconds`` (SIGALRM; None: never)."""
    if seconds is None:
        yield
        return

    def expired(signum, frame):
        raise PartTimeout(f"cut after {seconds:.0f} s (its share of --budget)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Suite:
    """The run's clock, budget and results; ``step`` runs one step under its share."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.start = time.perf_counter()
        self.scale = (args.budget or sum(PLAN_S.values())) / sum(PLAN_S.values())
        self.saved = 0.0  # what earlier steps left of their shares
        self.on_failure = None  # called after a step that did not end ok
        self.results: dict = {"suite": self._about(), "parts": {}}

    def _about(self) -> dict:
        from importlib.metadata import version

        cuda = self.device.type == "cuda"
        return {
            "tiny": self.args.tiny,
            "device": torch.cuda.get_device_name(self.device) if cuda else "cpu",
            "dtype": str(self.dtype).removeprefix("torch."),
            "versions": {p: version(p) for p in ("torch", "transformers", "ray")},
            "budget_s": self.args.budget,
            "images": self.args.images,
            "steps": self.args.steps,
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)

    def save(self) -> None:
        self.results["suite"]["elapsed_s"] = round(self.elapsed(), 1)
        if self.args.json:
            path = Path(self.args.json)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
            tmp.replace(path)

    def step(self, name: str, fn, *args) -> dict:
        """``record = results["parts"][name]`` filled by ``fn(self, record, *args)`` within the
        step's share (``PLAN_S`` × scale + what earlier steps left, at most what the budget
        has left; no limit without a budget); its status ``ok``, ``cut: …``, ``error: …`` or
        ``skipped: …``. A step that does not end ``ok`` calls ``on_failure`` (Ray's restart)."""
        record = self.results["parts"].setdefault(name, {})
        allowed = self.allowance(name)
        began = time.perf_counter()
        if allowed is not None and allowed < MIN_START_S * self.scale:
            record["status"] = f"skipped: {allowed:.0f} s of the budget left"
        else:
            self.log(f"{name}: start" + (f" ({allowed:.0f} s allowed)" if allowed else ""))
            try:
                with deadline(allowed):
                    fn(self, record, *args)
                record["status"] = "ok"
            except PartTimeout as cut:
                record["status"] = f"cut: {cut}"
            except Exception as error:  # noqa: BLE001 - one step failing must not lose the rest
                record["status"] = f"error: {type(error).__name__}: {error}"
                record["traceback"] = traceback.format_exc(limit=-8)
            free_memory()
        record["seconds"] = round(time.perf_counter() - began, 2)
        self.log(f"{name}: {record['status'].splitlines()[0][:200]} ({record['seconds']} s)")
        if allowed is not None:
            self.saved = max(0.0, allowed - record["seconds"]) if record["status"] == "ok" else 0.0
        if not record["status"].startswith(("ok", "skipped")) and self.on_failure is not None:
            self.on_failure()
        self.save()
        return record

    def allowance(self, name: str) -> float | None:
        """Seconds step ``name`` may run: its share of the budget plus what earlier steps left,
        at most what is left of the budget; None without a budget."""
        if not self.args.budget:
            return None
        share = PLAN_S[name] * self.scale + self.saved
        return min(share, self.args.budget - self.elapsed())


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Random 7B-shaped models the jobs can load: a config-only LMM directory and a heads file
# --------------------------------------------------------------------------------------------


def suite_corpus() -> list[str]:
    """The tokenizer's corpus: bench/gpu.py's, and toy-world scene texts (the suite's inputs)."""
    from toyworld.captions import scene_text
    from toyworld.scenes import make_scene, scene_seed

    return [*gpu.CORPUS, *(scene_text(make_scene(scene_seed(7, i))).text for i in range(40))]


def write_random_lmm(out_dir: Path, family: str, tiny: bool) -> Path:
    """``out_dir`` holding an LMM's config (7B shapes unless ``tiny``) and processor, no weights:
    what ``RandomLMMSpec`` builds from, and what ``pipeline.train.lmm_dims`` reads."""
    config, processor, _ = gpu.lmm_config(family, tiny, suite_corpus())
    config.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


class RandomLMMSpec(ModelSpec):
    """A ``ModelSpec`` whose ``lmm`` is a ``write_random_lmm`` directory: the LMM is built from
    its config with random weights (seeded) directly on the device, in ``dtype``. Output rows
    whose ids the tokenizer does not have (LLaVA-1.5 pads 400 to 32064) are zeroed, so that
    generations are text. Everything else is ``ModelSpec``'s: this is what the jobs run."""

    def build_lmm(self):
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        from flmm.families import family_for
        from flmm.lmm import FrozenLMM

        config = AutoConfig.from_pretrained(self.lmm)
        processor = AutoProcessor.from_pretrained(self.lmm)
        torch.manual_seed(0)
        with torch.device(self.resolved_device()):
            model = AutoModelForImageTextToText.from_config(config, dtype=DTYPES[self.dtype])
        with torch.no_grad():
            model.get_output_embeddings().weight[len(processor.tokenizer) :] = 0
        return FrozenLMM(model, processor, family_for(config.model_type), self.prompt_config())


def write_random_heads(path: Path, lmm_dir: Path, sam_variant: str) -> Path:
    """Seeded random heads for the LMM of ``lmm_dir`` (U-Net over V·L·H channels, refiner on a
    random ``sam_variant``) with a keyword selector that keeps every span it reads
    (``min_confidence`` 0) and tags most tokens O, in the repo's heads format."""
    from flmm.build import build_heads, build_sam, sam_config
    from flmm.heads import save_heads
    from flmm.prompt import FLMM_INSTRUCTION, PROMPT_KEY
    from flmm.selector import OUTSIDE, KeywordSelector, SelectorConfig
    from pipeline.train import lmm_dims

    config = lmm_dims(str(lmm_dir))
    torch.manual_seed(0)
    heads = build_heads(config, build_sam(sam_config(sam_variant)))
    selector = KeywordSelector(SelectorConfig(config.num_layers, config.hidden_size, 2, 0.0))
    with torch.no_grad():
        selector.classify.bias[OUTSIDE] += SELECTOR_OUTSIDE_BIAS
    heads.selector = selector
    return save_heads(heads, path, {PROMPT_KEY: FLMM_INSTRUCTION})


# --------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------


def setup(suite: Suite, record: dict) -> None:
    """The matmul rate (the FLOP bound's denominator) and the jobs' models and inputs."""
    from toyworld.shards import write_toy_shards

    args, tmp = suite.args, suite.tmp
    n, iters = (8192, 50) if suite.device.type == "cuda" else (512, 10)
    record["matmul"] = {"n": n, "flops_per_s": gpu.matmul_rate(suite.device, suite.dtype, n, iters)}
    suite.lmm_dir = write_random_lmm(tmp / "lmm", args.annotate_family, args.tiny)
    sam = "tiny" if args.tiny else "vit_l"
    suite.heads = write_random_heads(tmp / "heads.safetensors", suite.lmm_dir, sam)
    for mode in MODES:
        write_toy_inputs(tmp / mode, mode, args.images)
    write_toy_shards(tmp / "train", args.steps, 10, seed=0)
    record.update(lmm=f"{args.annotate_family} ({'tiny' if args.tiny else '7B'} shapes)", sam=sam)


def write_toy_inputs(out: Path, mode: str, n: int) -> None:
    """``n`` held-out toy scenes in ``mode``'s form, 16 per shard; given phrases: each object's
    first expression (the toy's own samples list every expression of every object, ~17)."""
    from pipeline.shards import write_shards
    from toyworld.scenes import EVAL_START, make_scene, scene_seed
    from toyworld.shards import scene_metadata, scene_sample

    def samples():
        for index in range(EVAL_START, EVAL_START + n):
            scene, meta = make_scene(scene_seed(1, index)), None
            if mode == "given":
                meta = scene_metadata(scene)
                meta["phrases"] = [obj.expressions[0] for obj in scene.objects]
            yield scene_sample(f"{mode}_{index:08d}", scene, meta, mode)

    write_shards(out, mode, samples(), 16)


def bench_family(suite: Suite, record: dict, family: str) -> None:
    """bench/gpu.py's measurement of one family at each batch of ``BATCHES``."""
    device, cuda = suite.device, suite.device.type == "cuda"
    rate = suite.results["parts"]["setup"]["matmul"]["flops_per_s"]
    began = time.perf_counter()
    model = gpu.build(suite.args.tiny, device, suite.dtype, family)
    record["build_s"] = round(time.perf_counter() - began, 2)
    record["weights_gib"] = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    inputs = gpu.make_inputs(model, max(suite.args.batches), suite.args.phrases)
    flops = gpu.count_flops(model, inputs[:1], device)
    record.update(flops_per_image=flops, shapes=gpu.shapes(model, inputs[:1]), batches={})
    suite.log(f"bench/{family}: built in {record['build_s']} s, seq {record['shapes']['seq_len']}")
    for i, batch in enumerate(suite.args.batches):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        warmup = 2 if i == 0 else 1  # the first batch also warms up the kernels
        times = gpu.time_forward(model, inputs[:batch], device, suite.args.repeats, warmup)
        images_per_s = batch / statistics.median(times)
        record["batches"][str(batch)] = {
            "seconds_per_batch": statistics.median(times),
            "images_per_s": images_per_s,
            "fraction_of_flop_bound": (flops["lmm"] + flops["sam"]) * images_per_s / rate,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        }
        suite.log(f"bench/{family}: batch {batch}: {images_per_s:.2f} images/s")
        suite.save()


class DevicePeak:
    """The peak of the device's used memory (every process's, the driver's own included),
    sampled from the driver every ``interval`` seconds while in the ``with``; None off CUDA."""

    def __init__(self, device: torch.device, interval: float = 0.05):
        self.device, self.interval = device, interval
        self.peak = self.before = None
        self.stop = threading.Event()

    def used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def __enter__(self):
        if self.device.type == "cuda":
            self.before = self.peak = self.used()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, self.used())

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.device.type == "cuda":
            self.thread.join()

    def gib(self) -> dict:
        if self.peak is None:
            return {"peak_device_used_gib": None, "device_used_before_gib": None}
        return {
            "peak_device_used_gib": self.peak / 2**30,
            "device_used_before_gib": self.before / 2**30,
        }


def model_spec(suite: Suite, heads: Path | None) -> RandomLMMSpec:
    dtype = "bfloat16" if suite.device.type == "cuda" else "float32"
    sam = "tiny" if suite.args.tiny else "vit_l"
    heads = str(heads) if heads else None
    return RandomLMMSpec(str(suite.lmm_dir), sam, None, heads, dtype, "auto", dtype)


def annotate_mode(suite: Suite, record: dict, mode: str) -> None:
    """The annotation job end to end on the toy scenes of ``mode``, one actor."""
    from pipeline.annotate import AnnotateConfig, run_annotation

    gpus = 1.0 if suite.device.type == "cuda" else 0.0
    out = suite.tmp / f"out_{mode}"
    config = AnnotateConfig(
        (str(suite.tmp / mode),),
        str(out),
        model_spec(suite, suite.heads),
        batch_size=suite.args.annotate_batch,
        gpus_per_actor=gpus,
        preview_images=0,
    )
    with DevicePeak(suite.device) as peak:
        summary = run_annotation(config)
    if summary.failed:
        raise RuntimeError(f"shards failed: {summary.failed}")
    record.update(annotation_stats(out, summary), **peak.gib())
    suite.log(f"annotate/{mode}: {summary.line()}")


def annotation_stats(out: Path, summary) -> dict:
    """What one run did and where its time went, from its summary, done markers and Parquet."""
    import pyarrow.parquet as pq

    from schemas.results import STAGES

    done = [json.loads(p.read_text()) for p in sorted((out / "_done").glob("*.json"))]
    images = sum(d["samples"] for d in done)
    model_s = sum(d["timings"]["model_s"] for d in done)
    rows = pq.read_table(out / "annotations", columns=["source", "bbox"]).to_pylist()
    return {
        "images": images,
        "errors": summary.errors,
        "seconds": summary.seconds,
        "images_per_s": images / summary.seconds,
        "model_images_per_s": images / model_s if model_s else None,
        "stage_ms_per_image": {
            s: 1e3 * sum(d["timings"][s] for d in done) / images for s in ("decode_s", *STAGES)
        },
        "annotations": len(rows),
        "phrases_per_image": len(rows) / images,
        "nonempty_masks": sum(r["bbox"][2] * r["bbox"][3] > 0 for r in rows),
        "sources": sorted({r["source"] for r in rows}),
    }


def train_steps(suite: Suite, record: dict) -> None:
    """``--steps`` steps of the head-training job: one worker, batch 1, one epoch."""
    from flmm.optim import OptimConfig
    from pipeline.train import TrainJob, fit_heads

    cuda, steps = suite.device.type == "cuda", suite.args.steps
    job = TrainJob(
        shards=(str(suite.tmp / "train"),),
        spec=model_spec(suite, None),
        output=str(suite.tmp / "trained.safetensors"),
        storage=str(suite.tmp / "runs"),
        name="gpu-suite",
        epochs=1,
        batch_size=1,
        cpus_per_worker=0.5,
        gpus_per_worker=0.5 if cuda else 0.0,
        encode_gpus=0.5 if cuda else 0.0,
        encode_cpus=0.5,
        encode_batch=4,
        checkpoint_every=steps,
        log_every=5,
        optim=OptimConfig(lr=1e-4),
    )
    with DevicePeak(suite.device) as peak:
        summary = fit_heads(job)
    metrics = summary["metrics"] or {}
    record.update(
        steps=summary["steps"],
        total_steps=summary["total_steps"],
        fit_seconds=summary["seconds"],  # Ray Train's start and the frozen actor's build included
        seconds_per_step=summary["seconds"] / max(1, summary["steps"]),
        loss=metrics.get("loss"),
        grad_norm=metrics.get("grad_norm"),
        **peak.gib(),
    )


def start_ray(suite: Suite, record: dict) -> None:
    """A local Ray of every CPU (and the GPU) whose workers import this checkout (``bench``)."""
    import ray

    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), path) if p)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        num_cpus=max(4, os.cpu_count() or 1),  # 4: a model actor, readers and writers side by side
        num_gpus=torch.cuda.device_count(),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one line per step is enough
    record["resources"] = ray.cluster_resources()


# --------------------------------------------------------------------------------------------
# The table, the run
# --------------------------------------------------------------------------------------------


def gib(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def table(results: dict) -> str:
    """One Markdown table of every step's figures."""
    parts = results["parts"]
    head = "| step | case | images/s | peak GiB | of FLOP bound | detail |\n|---|---|---:|---:|---:|---|"
    lines = [head]
    for family in gpu.FAMILIES:
        record = parts.get(f"bench/{family}", {})
        for batch, b in record.get("batches", {}).items():
            gflop = (record["flops_per_image"]["lmm"] + record["flops_per_image"]["sam"]) / 1e9
            lines.append(
                f"| bench {family} | batch {batch} | {b['images_per_s']:.2f} | "
                f"{gib(b['peak_memory_gib'])} | {b['fraction_of_flop_bound']:.1%} | "
                f"{b['seconds_per_batch']:.3f} s/batch, {gflop:.4g} GFLOP/img |"
            )
        if record.get("status", "ok") != "ok":
            lines.append(f"| bench {family} | | | | | {record['status'][:80]} |")
    for mode in MODES:
        r = parts.get(f"annotate/{mode}", {})
        if "images_per_s" in r:
            stages = ", ".join(
                f"{s.removesuffix('_s')} {ms:.0f}"
                for s, ms in r["stage_ms_per_image"].items()
                if ms >= 0.5
            )
            lines.append(
                f"| annotate {mode} | {r['images']} images | {r['images_per_s']:.2f} "
                f"(model {r['model_images_per_s']:.2f}) | {gib(r['peak_device_used_gib'])} | | "
                f"ms/image: {stages}; {r['phrases_per_image']:.1f} phrases/image; {r['seconds']:.0f} s |"
            )
        elif r:
            lines.append(f"| annotate {mode} | | | | | {r['status'][:80]} |")
    r = parts.get("train", {})
    if "loss" in r:
        lines.append(
            f"| train | {r['steps']} steps of 1 image | | {gib(r['peak_device_used_gib'])} | | "
            f"final loss {r['loss']:.4f}; {r['fit_seconds']:.0f} s with Ray Train's start |"
        )
    elif r:
        lines.append(f"| train | | | | | {r['status'][:80]} |")
    return "\n".join(lines)


def run_suite(args) -> dict:
    """Every step of ``args.parts`` in order; Ray is started here unless already running (and
    then restarted after a Ray step that failed or was cut, and shut down at the end)."""
    import ray

    suite = Suite(args)
    owns_ray = not ray.is_initialized()
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        suite.tmp = Path(tmp)
        suite.log(f"{suite.results['suite']['device']}, budget {args.budget} s, parts {args.parts}")
        if suite.step("setup", setup)["status"] == "ok":
            if "bench" in args.parts:
                with torch_threads(args.threads if suite.device.type == "cpu" else None):
                    for family in args.families:
                        suite.step(f"bench/{family}", bench_family, family)
            if {"annotate", "train"} & set(args.parts):
                run_ray_steps(suite, owns_ray)
    print(table(suite.results), flush=True)
    return suite.results


def run_ray_steps(suite: Suite, owns_ray: bool) -> None:
    import ray

    if owns_ray:
        suite.step("ray", start_ray)
        suite.on_failure = lambda: (ray.shutdown(), start_ray(suite, {}))  # a clean slate
    try:
        for mode in MODES if "annotate" in suite.args.parts else ():
            suite.step(f"annotate/{mode}", annotate_mode, mode)
        if "train" in suite.args.parts:
            suite.step("train", train_steps)
    finally:
        suite.on_failure = None
        if owns_ray:
            ray.shutdown()


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` (None: left) inside, restored after."""
    saved = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models: the same path, on CPU too")
    p.add_argument("--json", help="write the results here (after every step)")
    p.add_argument(
        "--budget",
        type=float,
        help="seconds for the whole suite, shared out by PLAN_S (default: 480; --tiny: none)",
    )
    p.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated, of " + ",".join(PARTS)
    )
    p.add_argument("--families", default=",".join(gpu.FAMILIES), help="bench's LMM families")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="bench's batch sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed batches per bench batch size")
    p.add_argument("--phrases", type=int, default=3, help="phrases per image in bench")
    p.add_argument("--threads", type=int, default=2, help="torch threads of bench on CPU")
    p.add_argument("--images", type=int, default=64, help="toy images per annotate mode")
    p.add_argument("--annotate-batch", type=int, default=8, help="the annotate job's batch size")
    p.add_argument("--annotate-family", default="llava", choices=gpu.FAMILIES)
    p.add_argument("--steps", type=int, default=20, help="training steps")
    args = p.parse_args(argv)
    if args.budget is None and not args.tiny:
        args.budget = 480.0
    args.parts = [x for x in args.parts.split(",") if x]
    args.families = [x for x in args.families.split(",") if x]
    args.batches = [int(x) for x in args.batches.split(",") if x]
    unknown = set(args.parts) - set(PARTS) | set(args.families) - set(gpu.FAMILIES)
    if unknown:
        p.error(f"unknown parts or families: {sorted(unknown)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.tiny and not torch.cuda.is_available():
        print(
            "no GPU here: bench/gpu_suite.py measures 7B shapes on a CUDA device; --tiny runs "
            "the same path at test sizes"
        )
        results = {"skipped": "no CUDA device"}
        if args.json:
            Path(args.json).write_text(json.dumps(results) + "\n")
        return results
    return run_suite(args)


if __name__ == "__main__":
    # run as bench.gpu_suite, not __main__: Ray's workers unpickle this module's classes by name
    from bench.gpu_suite import main as suite_main

    suite_main()
