"""Benchmark: the annotation job on a local multi-node Ray cluster at 1, 2, 4, 8 model actors, or
(``--stand-in``) at 1 → 32 stand-in actors that sleep a GPU's time per batch.

    python bench/scale.py [--shards 40] [--per-shard 4] [--nodes 4] [--actors 1 2 4 8]
                          [--fault none|actor|node] [--keep DIR] [--json PATH]
    python bench/scale.py --stand-in [--stand-in-s S] [--batch-size 8] [--shards 128]
                          [--per-shard 32] [--nodes 2] [--actors 1 2 4 8 16 32]

A ``ray.cluster_utils.Cluster``: a head that only runs the driver (0 CPUs) and ``--nodes`` worker
nodes of ``--node-cpus`` (2) logical CPUs each (all on this machine's real cores). Inputs:
``--shards`` shards of ``--per-shard`` held-out toy scenes each (one phrase per object).
Models: the shipped toy LMM, toy SAM and toy heads. For each actor count, the same shards are
annotated into a fresh output (actors of 0.5 CPU, one torch thread, batch 4), and reported:
images/s (end to end, the Ray cluster's start excluded), where the time went (summed over the
done markers: read, decode, model, write, commit; the model split by stage), the driver's CPU
seconds, the bytes the driver received against the result rows' bytes, and whether every input
key is in exactly one committed shard.

``--fault actor`` kills one model actor (SIGKILL) and ``--fault node`` removes the node of one
model actor (``Cluster.remove_node``), each after a quarter of the shards are committed; the run
must still commit every key once. ``--keep DIR`` leaves the last run's output in DIR.

``--stand-in`` (scale by simulation: this box's 2 cores can run 32 GPU actors' worth of job only
if the actors hold no CPU): the model actors are ``pipeline.stand_in.StandInActor``, 0 CPUs each,
sleeping ``--stand-in-s`` seconds per batch (default: ``seven_b_batch_s``, the 7B-shape estimate
for an H100, until the GPU suite measures it) and returning a plausible RLE, box and score per
given phrase; reading, decoding, the writers, the commits and the driver are the real job's, on
2 worker nodes of 4 logical CPUs (``--node-cpus``: enough that the 1-CPU repartition tasks and
the 0.25-CPU read, write and commit tasks are not held back by a logical count below the real
cores' worth; 1 GiB of object store each). Ray's ``num_workers_soft_limit`` is raised to
``--worker-soft-limit`` (64): by default it is the node's CPUs, and the 0-CPU actors count
against it, so idle task workers would be stopped and restarted all along (a GPU node's many
CPUs keep its limit far above its actors). The actor pool is started before anything is read
(Ray Data's ``wait_for_min_actors_s``): 32 actor processes take tens of seconds to start on 2
cores, and the job would meanwhile read the whole input ahead, leaving no steady state to
measure. Each point reports its ideal rate (actors × batch ÷ stand-in seconds); the steady rate
(``stand_in_figures``); the commits' rate; and, per image in the steady window, the CPU of the
driver (and its busiest thread), the task workers (read, decode, write, commit; and how many
were started), the actors, Ray's own processes (raylets, GCS, agents, Ray Data's actors) and the
rest of the box (other users of a shared machine), from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow.parquet as pq
import ray

from pipeline.annotate import AnnotateConfig, run_annotation
from pipeline.shards import write_shards
from pipeline.sources import iter_tar_samples
from toyworld.models import toy_model_spec
from toyworld.scenes import EVAL_START, make_scene, scene_seed
from toyworld.shards import scene_metadata, scene_sample

TIMINGS = ("read_s", "decode_s", "model_s", "write_s", "commit_s")
STAGES = ("prepare_s", "lmm_s", "sam_s", "heads_s", "post_s")
POINTS = {False: [1, 2, 4, 8], True: [1, 2, 4, 8, 16, 32]}  # actor counts: real, stand-in

# The stand-in's default time per batch: the 7B-shape estimate of one image's GPU time (until
# bench/gpu_suite.py measures it), at H100_BF16 × UTILISATION. FLOPs of LLaVA-1.5-7B's prefill
# (Vicuna-7B over 576 image + ~24 text tokens; CLIP ViT-L/14-336 over 577), SAM ViT-L's encoder
# at 1024 (64×64 tokens; 20 blocks in 14×14 windows, 4 global) and the U-Net + refiner
# (≈ 10 GFLOP per phrase, bench/NOTES.md) for 3 phrases.
H100_BF16 = 989e12  # FLOP/s, dense bf16 tensor-core peak of an H100 SXM
UTILISATION = 0.4  # assumed: batched prefill + SAM encoder in bf16, no fused serving kernels
HEADS_FLOPS, PHRASES = 10e9, 3


def transformer_flops(layers: int, width: int, mlp: int, tokens: int, keys: int = 0) -> float:
    """Forward FLOPs of ``layers`` transformer blocks over ``tokens`` tokens: 2 per weight per
    token (attention projections 4·width², ``mlp`` MLP weights) plus attention's scores and
    weighted sum, 4·tokens·keys·width (``keys``: tokens each one attends to; 0: all)."""
    return layers * (2 * (4 * width * width + mlp) * tokens + 4 * tokens * (keys or tokens) * width)


def seven_b_flops() -> dict[str, float]:
    """FLOPs per image at LLaVA-1.5-7B + SAM ViT-L shapes, by network."""
    vit_mlp = 2 * 1024 * 4096
    sam_tokens = 64 * 64
    sam_rest = 2 * sam_tokens * (16 * 16 * 3 * 1024 + 1024 * 256 + 9 * 256 * 256)  # patch, neck
    return {
        "lmm": transformer_flops(32, 4096, 3 * 4096 * 11008, 600),
        "clip": transformer_flops(24, 1024, vit_mlp, 577),
        "sam": transformer_flops(20, 1024, vit_mlp, sam_tokens, keys=14 * 14)
        + transformer_flops(4, 1024, vit_mlp, sam_tokens)
        + sam_rest,
        "heads": HEADS_FLOPS * PHRASES,
    }


def seven_b_batch_s(batch_size: int) -> tuple[float, str]:
    """Seconds per batch of the 7B-shape estimate, and how it was reached."""
    flops = seven_b_flops()
    per_image = sum(flops.values()) / (H100_BF16 * UTILISATION)
    split = " + ".join(f"{k} {v / 1e12:.2f}" for k, v in flops.items())
    how = (
        f"7B-shape estimate: {sum(flops.values()) / 1e12:.2f} TFLOP per image ({split}) at "
        f"{UTILISATION:.0%} of an H100's {H100_BF16 / 1e12:.0f} TFLOP/s bf16 = "
        f"{per_image * 1e3:.1f} ms per image × batch {batch_size}"
    )
    return per_image * batch_size, how


def write_inputs(directory: Path, n_shards: int, per_shard: int) -> list[str]:
    def samples():
        for i in range(n_shards * per_shard):
            scene = make_scene(scene_seed(0, EVAL_START + i))
            meta = scene_metadata(scene)
            meta["phrases"] = [obj.expressions[0] for obj in scene.objects]
            yield scene_sample(f"s{i:06d}", scene, meta)

    return [str(p) for p in write_shards(directory, "scale", samples(), per_shard)]


def committed_keys(out: Path) -> Counter:
    keys: Counter = Counter()
    for done in (out / "_done").glob("*.json"):
        keys.update(pq.read_table(out / "samples" / f"{done.stem}.parquet")["key"].to_pylist())
    return keys


MODEL_ACTORS = ("ModelStage", "StandInActor")


class Fault:
    """Kill one model actor, or remove its node, once ``after`` shards are committed."""

    def __init__(self, kind: str, after: int, cluster, workers):
        self.kind, self.after, self.cluster, self.workers = kind, after, cluster, workers
        self.done: dict = {}

    def __call__(self, name: str, done: dict, summary) -> None:
        if self.kind == "none" or self.done or len(summary.done) < self.after:
            return
        from ray._private import state

        actors = [
            a
            for a in state.actors().values()
            if any(c in a["ActorClassName"] for c in MODEL_ACTORS) and a["State"] == "ALIVE"
        ]
        if not actors:
            return
        if self.kind == "actor":
            os.kill(actors[0]["Pid"], signal.SIGKILL)
        else:
            node = next(n for n in self.workers if n.node_id == actors[0]["Address"]["NodeID"])
            self.cluster.remove_node(node, allow_graceful=False)
        self.done = {"kind": self.kind, "after_shards": len(summary.done)}


class CommitClock:
    """``on_shard``: notes when each shard was committed (the samples committed by then), then
    calls ``then`` (the fault)."""

    def __init__(self, then):
        self.then, self.marks = then, []

    def __call__(self, name: str, done: dict, summary) -> None:
        self.marks.append((time.time(), summary.samples))
        self.then(name, done, summary)

    def steady_rate(self, total: int, after: float = 0.0, low=0.1, high=0.9) -> tuple:
        """Images/s between the first commit to reach ``low`` of ``total`` images at or after
        the time ``after``, and the first to reach ``high``; and those two times."""
        a = next((m for m in self.marks if m[1] >= low * total and m[0] >= after), None)
        b = next((m for m in self.marks if m[1] >= high * total), None)
        if a is None or b is None or b[0] <= a[0]:
            return 0.0, after, after
        return (b[1] - a[1]) / (b[0] - a[0]), a[0], b[0]


TICK = os.sysconf("SC_CLK_TCK")


def _stat(path: Path) -> tuple[int, float]:
    """Parent pid and CPU seconds (user + system) from a /proc ``stat`` file."""
    fields = path.read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def process_cpu(root: int) -> dict[int, tuple[str, float]]:
    """pid → (group, CPU seconds so far) of ``root`` and every process below it. Groups:
    ``driver`` (root), ``actors`` (model actors), ``tasks`` (Ray's other workers: read, decode,
    write, commit), ``ray`` (raylets, GCS, agents, ...); and, keyed by -tid, each thread of
    the driver (``driver thread``, a part of ``driver``; its main thread runs the collector)."""
    parent, cpu, title = {}, {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            parent[pid], cpu[pid] = _stat(stat)
            title[pid] = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
    found = {}
    for pid, seconds in cpu.items():
        up = pid
        while up != root and up in parent and up > 1:
            up = parent[up]
        if up == root:
            found[pid] = (_group(pid, root, title.get(pid, b"")), seconds)
    for task in Path(f"/proc/{root}/task").glob("[0-9]*/stat"):
        try:
            found[-int(task.parent.name)] = ("driver thread", _stat(task)[1])
        except (OSError, IndexError):
            continue
    return found


RAY_SERVICES = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent", b"ray::_", b"ray::ActorLocation")


def _group(pid: int, root: int, cmdline: bytes) -> str:
    if pid == root:
        return "driver"
    if any(c.encode() in cmdline for c in MODEL_ACTORS):
        return "actors"
    if cmdline.startswith(b"ray::") and not cmdline.startswith(RAY_SERVICES):
        return "tasks"
    return "ray"  # raylets, GCS, agents, Ray Data's own actors (stats, autoscaling)


class CpuSampler(threading.Thread):
    """CPU seconds by group (``process_cpu``) since it was made, sampled every ``period`` seconds
    (so that processes which exit during the run, the model actors at its end, still count up to
    their last sample) into ``samples``: (time, CPU by group, the box's busy CPU). Its own CPU is
    taken off the driver's. ``actors_up``: when ``actors`` model actor processes were first
    alive at once."""

    def __init__(self, root: int, actors: int = 0, period: float = 1.0):
        super().__init__(daemon=True)
        self.root, self.actors, self.period = root, actors, period
        self.own, self.tid, self.actors_up = 0.0, 0, None
        self.first = process_cpu(root)
        self.last = dict(self.first)
        self.samples: list[tuple[float, dict, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        self.tid = threading.get_native_id()
        while not self.halt.wait(self.period):
            started = time.thread_time()
            self._sample()
            self.own += time.thread_time() - started

    def stop(self) -> dict:
        """Stops sampling; the CPU by group of the whole run."""
        self.halt.set()
        self.join()
        self._sample()
        return self.samples[-1][1]

    def between(self, a: float, b: float) -> tuple[dict, float, float]:
        """CPU by group, the box's busy CPU and the seconds between the samples nearest to the
        times ``a`` and ``b``."""
        first = min(self.samples, key=lambda x: abs(x[0] - a))
        last = min(self.samples, key=lambda x: abs(x[0] - b))
        cpu = {k: v - first[1].get(k, 0.0) for k, v in last[1].items() if k != "threads"}
        threads = last[1]["threads"]
        cpu["driver busiest thread"] = max(
            (v - first[1]["threads"].get(t, 0.0) for t, v in threads.items()), default=0.0
        )
        return cpu, last[2] - first[2], last[0] - first[0]

    def _sample(self) -> None:
        now = process_cpu(self.root)
        alive = sum(group == "actors" for group, _ in now.values())
        if self.actors_up is None and self.actors and alive >= self.actors:
            self.actors_up = time.time()
        self.last.update(now)
        self.samples.append((time.time(), self._totals(), box_cpu()))

    def _totals(self) -> dict:
        groups = dict.fromkeys(("driver", "actors", "tasks", "ray"), 0.0)
        threads = {}
        for pid, (group, seconds) in self.last.items():
            seconds -= self.first.get(pid, (group, 0.0))[1]
            if group == "driver thread":
                threads[-pid] = seconds
            else:
                groups[group] += seconds
        groups["driver"] -= self.own
        threads.pop(self.tid, None)
        groups["driver main thread"] = threads.get(self.root, 0.0)
        groups["driver busiest thread"] = max(threads.values(), default=0.0)
        groups["task workers started"] = sum(
            group == "tasks" and pid not in self.first for pid, (group, _) in self.last.items()
        )
        groups["threads"] = threads
        return groups


def box_cpu() -> float:
    """Busy CPU seconds of the whole machine so far (/proc/stat: all but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK


def run_once(shards, out: Path, actors: int, fault: Fault, args) -> dict:
    config = AnnotateConfig(
        (str(Path(shards[0]).parent),),
        str(out),
        toy_model_spec(),
        batch_size=args.batch_size,
        actors=actors,
        cpus_per_actor=0.0 if args.stand_in_s else 0.5,
        preview_images=0,
        stand_in_s=args.stand_in_s or 0.0,
    )
    if args.stand_in_s:  # the actors start before anything is read (see the module's doc)
        ray.data.DataContext.get_current().wait_for_min_actors_s = 600
    clock, sampler = CommitClock(fault), CpuSampler(os.getpid(), actors)
    cpu, box = resource.getrusage(resource.RUSAGE_SELF), box_cpu()
    sampler.start()
    start = time.time()
    summary = run_annotation(config, on_shard=clock)
    seconds = time.time() - start
    procs, box = sampler.stop(), box_cpu() - box
    after = resource.getrusage(resource.RUSAGE_SELF)
    markers = [json.loads(p.read_text()) for p in (out / "_done").glob("*.json")]
    timings = {t: sum(m["timings"][t] for m in markers) for t in (*TIMINGS, *STAGES)}
    expected = Counter(key for s in shards for key, _, _ in iter_tar_samples(s))
    keys = committed_keys(out)
    result = {
        "actors": actors,
        "images": summary.samples,
        "seconds": seconds,
        "images_per_s": summary.samples / seconds,
        "failed": summary.failed,
        "retried": dict(summary.retried),
        "fault": fault.done,
        "timings_s": timings,
        "driver_cpu_s": (after.ru_utime + after.ru_stime)
        - (cpu.ru_utime + cpu.ru_stime)
        - sampler.own,
        "driver_bytes": summary.driver_bytes,
        "result_bytes": summary.result_bytes,
        "annotations": summary.annotations,
        "every_key_once": keys == expected and set(keys.values()) == {1},
    }
    if args.stand_in_s:
        result.update(stand_in_figures(clock, sampler, start, summary.samples, actors, args))
        result.update(cpu_s=_rounded(procs), box_cpu_s=round(box, 2))
    return result


def stand_in_figures(clock, sampler, start: float, images: int, actors: int, args) -> dict:
    """The ideal rate (actors × batch ÷ stand-in seconds) and the steady one: the model stage's
    rate (batches done × batch size, from Ray's task events) in the window from
    when every actor was up and the first batch began to the end of the batch at 90% of them
    (the tail, where the input runs out, left out); the CPU per image in that window, by group;
    the commits' rate (from 10% of the images committed, or the window's start if later, to
    90%). ``read_ahead``: reading had ended before the window began (it only drained what was
    read ahead: more images are needed for a steady rate)."""
    ideal = actors * args.batch_size / args.stand_in_s
    spans = task_spans(start)
    model = sorted(spans["model"], key=lambda span: span[1])
    a = max(sampler.actors_up or start, min((begin for begin, _ in model), default=start))
    b = max(a, model[int(0.9 * (len(model) - 1))][1] if model else a)
    through = args.batch_size * batches_in(model, a, b)  # images through the model stage
    steady = through / (b - a) if b > a else 0.0
    cpu, box, sampled = sampler.between(a, b)
    through = max(1.0, through)
    per_image = {k: round(1e3 * v / through, 2) for k, v in cpu.items()
                 if k not in ("task workers started", "driver main thread")}  # fmt: skip
    ours = sum(cpu[k] for k in ("driver", "actors", "tasks", "ray"))
    per_image["others"] = round(1e3 * (box - ours) / through, 2)
    return {
        "ideal_images_per_s": ideal,
        "steady_images_per_s": steady,
        "efficiency": steady / ideal,
        "read_ahead": max((end for _, end in spans["read"]), default=start) <= a,
        "committed_images_per_s": clock.steady_rate(images, after=a)[0],
        "first_commit_s": clock.marks[0][0] - start if clock.marks else 0.0,
        "actors_up_s": sampler.actors_up - start if sampler.actors_up else None,
        "steady_window_s": [round(a - start, 1), round(b - start, 1)],
        "steady_busy_s": {k: round(busy_s(v, a, b), 1) for k, v in spans.items()},
        "steady_cpu_ms_per_image": per_image,
        "steady_box_cores": box / sampled if sampled > 0 else 0.0,
        "steady_task_workers_started": cpu["task workers started"],
    }


STAGE_TASKS = {
    "model": tuple(f"{name})).submit" for name in MODEL_ACTORS),
    "read": ("read_shard",),
    "repartition": ("StreamingRepartition",),
    "write": ("write_parts",),
    "commit": ("guarded_commit",),
}


def task_spans(since: float) -> dict[str, list[tuple[float, float]]]:
    """(start, end) wall-clock times of the tasks that started after ``since``, by stage, from
    Ray's task events (``ray.timeline``; a model actor's call is one ``submit`` task; workers
    send their events every second)."""
    time.sleep(2.0)
    spans: dict[str, list] = {stage: [] for stage in STAGE_TASKS}
    for event in ray.timeline():
        kind = event.get("cat", "")
        if event.get("ph") != "X" or not kind.startswith("task::") or event["ts"] / 1e6 < since:
            continue
        for stage, names in STAGE_TASKS.items():
            if any(name in kind for name in names):
                spans[stage].append((event["ts"] / 1e6, (event["ts"] + event["dur"]) / 1e6))
    return spans


def batches_in(spans: list[tuple[float, float]], a: float, b: float) -> float:
    """How many of ``spans`` lie in [a, b], each counted by the share of it inside."""
    return sum(
        max(0.0, min(end, b) - max(start, a)) / max(end - start, 1e-9) for start, end in spans
    )


def busy_s(spans: list[tuple[float, float]], a: float, b: float) -> float:
    """Seconds of ``spans`` inside [a, b], summed (overlapping spans each count)."""
    return sum(max(0.0, min(end, b) - max(start, a)) for start, end in spans)


def _rounded(cpu: dict) -> dict:
    return {k: round(v, 2) for k, v in cpu.items() if k != "threads"}


def report(result: dict) -> str:
    t = result["timings_s"]
    split = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in t.items())
    line = (
        f"actors {result['actors']}: {result['images']} images in {result['seconds']:.1f} s = "
        f"{result['images_per_s']:.2f} images/s | summed s: {split} | driver CPU "
        f"{result['driver_cpu_s']:.1f} s, received {result['driver_bytes']} B for "
        f"{result['result_bytes']} B of results | every key once: "
        f"{result['every_key_once']} | failed {len(result['failed'])} | fault "
        f"{result['fault'] or '-'} | retried {result['retried']}"
    )
    if "steady_images_per_s" in result:
        line += (
            f" | steady {result['steady_images_per_s']:.1f} of ideal "
            f"{result['ideal_images_per_s']:.1f} images/s ({result['efficiency']:.0%}, read "
            f"ahead {result['read_ahead']}), "
            f"committed {result['committed_images_per_s']:.1f}/s, busy s "
            f"{result['steady_busy_s']}, first commit after {result['first_commit_s']:.1f} s "
            f"| CPU s {result['cpu_s']}, whole box {result['box_cpu_s']} | steady window "
            f"{result['steady_window_s']} s: CPU ms per image {result['steady_cpu_ms_per_image']}"
        )
    return line


def stand_in_table(results: list[dict]) -> str:
    """The sweep as two Markdown tables (bench/NOTES.md): the rates, with the run's totals; the
    CPU per image committed in the steady window, by group (``process_cpu``; ``others``: the
    rest of the box's busy CPU, other users of a shared machine)."""
    rates = [
        (
            "| actors | ideal images/s | steady images/s | efficiency | committed images/s "
            "| end-to-end images/s | wall s | actors up at s | steady window s | box cores busy "
            "| driver CPU s | read + decode s | write s | commit s | every key once |"
        ),
        "|---:" * 14 + "|---|",
    ]
    cpu = [
        (
            "| actors | driver (busiest thread) | tasks (workers started) | actors | Ray | others "
            "| all | read, write, commit tasks busy s |"
        ),
        "|---:" * 7 + "|---|",
    ]
    for r in results:
        t, c, b = r["timings_s"], r["steady_cpu_ms_per_image"], r["steady_busy_s"]
        up = f"{r['actors_up_s']:.1f}" if r["actors_up_s"] is not None else "-"
        rates.append(
            f"| {r['actors']} | {r['ideal_images_per_s']:.0f} | {r['steady_images_per_s']:.1f} "
            f"{' (read ahead)' if r['read_ahead'] else ''} | {r['efficiency']:.0%} "
            f"| {r['committed_images_per_s']:.1f} | {r['images_per_s']:.1f} | {r['seconds']:.1f} "
            f"| {up} | {r['steady_window_s'][0]}–{r['steady_window_s'][1]} "
            f"| {r['steady_box_cores']:.2f} | {r['cpu_s']['driver']:.1f} "
            f"| {t['read_s'] + t['decode_s']:.1f} | {t['write_s']:.1f} | {t['commit_s']:.1f} "
            f"| {'yes' if r['every_key_once'] else 'NO'} |"
        )
        cpu.append(
            f"| {r['actors']} | {c['driver']:.1f} ({c['driver busiest thread']:.1f}) "
            f"| {c['tasks']:.1f} ({r['steady_task_workers_started']:.0f}) | {c['actors']:.1f} "
            f"| {c['ray']:.1f} | {c['others']:.1f} "
            f"| {sum(c[k] for k in ('driver', 'tasks', 'actors', 'ray', 'others')):.1f} "
            f"| {b['read']}, {b['write']}, {b['commit']} |"
        )
    return "\n".join([*rates, "", "CPU ms per image in the steady window:", "", *cpu])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stand-in", action="store_true", help="stand-in actors (see above)")
    p.add_argument("--stand-in-s", type=float, help="seconds per batch (implies --stand-in)")
    p.add_argument("--batch-size", type=int, help="default: 4, or 8 with --stand-in")
    p.add_argument("--shards", type=int, help="default: 40, or 128 with --stand-in")
    p.add_argument("--per-shard", type=int, help="default: 4, or 32 with --stand-in")
    p.add_argument("--nodes", type=int, help="worker nodes (default 4; 2 stand-in)")
    p.add_argument("--node-cpus", type=int, help="logical CPUs per worker node (2; 4 stand-in)")
    p.add_argument("--object-store-mb", type=int, help="per node (default 150; 1024 stand-in)")
    p.add_argument("--actors", type=int, nargs="+")
    p.add_argument("--worker-soft-limit", type=int, help="Ray's num_workers_soft_limit per node")
    p.add_argument("--fault", choices=("none", "actor", "node"), default="none")
    p.add_argument("--keep", help="leave the last run's output here")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    sim = args.stand_in or args.stand_in_s is not None
    defaults = {"batch_size": (4, 8), "shards": (40, 128), "per_shard": (4, 32), "nodes": (4, 2),
                "node_cpus": (2, 4), "object_store_mb": (150, 1024),
                "worker_soft_limit": (0, 64), "actors": (POINTS[False], POINTS[True])}  # fmt: skip
    for name, (real, stand_in) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, stand_in if sim else real)
    if sim and args.stand_in_s is None:
        args.stand_in_s, args.stand_in_how = seven_b_batch_s(args.batch_size)
    elif sim:
        args.stand_in_how = "given (--stand-in-s)"
    return args


def main() -> None:
    args = parse_args()
    if args.stand_in_s:
        print(f"stand-in: {args.stand_in_s:.3f} s per batch of {args.batch_size} "
              f"({args.stand_in_how})", flush=True)  # fmt: skip

    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="scale-"))
    store = {"object_store_memory": args.object_store_mb << 20}
    head = {"num_cpus": 0, "include_dashboard": False, **store}
    if args.worker_soft_limit:  # (Ray's default: the node's CPUs; idle workers past it exit)
        head["_system_config"] = {"num_workers_soft_limit": args.worker_soft_limit}
    cluster = Cluster(initialize_head=True, connect=True, head_node_args=head)
    results = []
    try:
        workers = [cluster.add_node(num_cpus=args.node_cpus, **store) for _ in range(args.nodes)]
        cluster.wait_for_nodes()
        shards = write_inputs(tmp / "in", args.shards, args.per_shard)
        sweep = time.perf_counter()
        for i, actors in enumerate(args.actors):
            out = tmp / f"out-{i}"
            fault = Fault(args.fault, args.shards // 4, cluster, workers)
            results.append(run_once(shards, out, actors, fault, args))
            print(report(results[-1]), flush=True)
        sweep = time.perf_counter() - sweep
        if args.keep:
            shutil.copytree(tmp / f"out-{len(args.actors) - 1}", args.keep, dirs_exist_ok=True)
            shutil.copytree(tmp / "in", Path(args.keep) / "_inputs", dirs_exist_ok=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    base = results[0]["images_per_s"]
    for r in results:
        r["speedup_vs_first"] = r["images_per_s"] / base
    print("images/s relative to", args.actors[0], "actor(s):",
          ", ".join(f"{r['actors']}: {r['speedup_vs_first']:.2f}x" for r in results))  # fmt: skip
    if args.stand_in_s:
        print(stand_in_table(results))
        print(f"sweep: {sweep:.0f} s wall ({args.shards} shards × {args.per_shard} images per "
              f"point, {args.nodes} nodes × {args.node_cpus} CPUs, head 0 CPUs)")  # fmt: skip
    print("RESULT " + json.dumps(results), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    sys.exit(0 if all(r["every_key_once"] and not r["failed"] for r in results) else 1)


if __name__ == "__main__":
    main()
