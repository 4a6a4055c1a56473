"""Benchmark: the annotation job on a local multi-node Ray cluster at 1, 2, 4, 8 model actors.

    python bench/scale.py [--shards 40] [--per-shard 4] [--nodes 4] [--actors 1 2 4 8]
                          [--fault none|actor|node] [--keep DIR] [--json PATH]

A ``ray.cluster_utils.Cluster``: a head that only runs the driver (0 CPUs) and ``--nodes`` worker
nodes of 2 logical CPUs each (all on this machine's real cores). Inputs: ``--shards`` shards of
``--per-shard`` held-out toy scenes each (one phrase per object). Models: the shipped toy LMM,
toy SAM and toy heads. For each actor count, the same shards are annotated into a fresh output
(actors of 0.5 CPU, one torch thread, batch 4), and reported: images/s (end to end, the Ray
cluster's start excluded), where the time went (summed over the done markers: read, decode,
model, write, commit; the model split by stage), the driver's CPU seconds, the bytes the driver
received against the result rows' bytes, and whether every input key is in exactly one committed
shard.

``--fault actor`` kills one model actor (SIGKILL) and ``--fault node`` removes the node of one
model actor (``Cluster.remove_node``), each after a quarter of the shards are committed; the run
must still commit every key once. ``--keep DIR`` leaves the last run's output in DIR.
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
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow.parquet as pq

from pipeline.annotate import AnnotateConfig, run_annotation
from pipeline.shards import write_shards
from pipeline.sources import iter_tar_samples
from toyworld.models import toy_model_spec
from toyworld.scenes import EVAL_START, make_scene, scene_seed
from toyworld.shards import scene_metadata, scene_sample

TIMINGS = ("read_s", "decode_s", "model_s", "write_s", "commit_s")
STAGES = ("prepare_s", "lmm_s", "sam_s", "heads_s", "post_s")


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
            if "GroundingActor" in a["ActorClassName"] and a["State"] == "ALIVE"
        ]
        if not actors:
            return
        if self.kind == "actor":
            os.kill(actors[0]["Pid"], signal.SIGKILL)
        else:
            node = next(n for n in self.workers if n.node_id == actors[0]["Address"]["NodeID"])
            self.cluster.remove_node(node, allow_graceful=False)
        self.done = {"kind": self.kind, "after_shards": len(summary.done)}


def run_once(shards, out: Path, actors: int, fault: Fault) -> dict:
    config = AnnotateConfig(
        (str(Path(shards[0]).parent),),
        str(out),
        toy_model_spec(),
        batch_size=4,
        actors=actors,
        cpus_per_actor=0.5,
        preview_images=0,
    )
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    summary = run_annotation(config, on_shard=fault)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    markers = [json.loads(p.read_text()) for p in (out / "_done").glob("*.json")]
    timings = {t: sum(m["timings"][t] for m in markers) for t in (*TIMINGS, *STAGES)}
    expected = Counter(key for s in shards for key, _, _ in iter_tar_samples(s))
    keys = committed_keys(out)
    return {
        "actors": actors,
        "images": summary.samples,
        "seconds": seconds,
        "images_per_s": summary.samples / seconds,
        "failed": summary.failed,
        "retried": dict(summary.retried),
        "fault": fault.done,
        "timings_s": timings,
        "driver_cpu_s": (after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime),
        "driver_bytes": summary.driver_bytes,
        "result_bytes": summary.result_bytes,
        "annotations": summary.annotations,
        "every_key_once": keys == expected and set(keys.values()) == {1},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", type=int, default=40)
    p.add_argument("--per-shard", type=int, default=4)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--fault", choices=("none", "actor", "node"), default="none")
    p.add_argument("--keep", help="leave the last run's output here")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="scale-"))
    cluster = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    results = []
    try:
        workers = [cluster.add_node(num_cpus=2) for _ in range(args.nodes)]
        cluster.wait_for_nodes()
        shards = write_inputs(tmp / "in", args.shards, args.per_shard)
        for actors in args.actors:
            out = tmp / f"out-{actors}"
            fault = Fault(args.fault, args.shards // 4, cluster, workers)
            result = run_once(shards, out, actors, fault)
            results.append(result)
            t = result["timings_s"]
            split = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in t.items())
            print(
                f"actors {actors}: {result['images']} images in {result['seconds']:.1f} s = "
                f"{result['images_per_s']:.2f} images/s | summed s: {split} | driver CPU "
                f"{result['driver_cpu_s']:.1f} s, received {result['driver_bytes']} B for "
                f"{result['result_bytes']} B of results | every key once: "
                f"{result['every_key_once']} | failed {len(result['failed'])} | fault "
                f"{result['fault'] or '-'} | retried {result['retried']}",
                flush=True,
            )
        if args.keep:
            shutil.copytree(tmp / f"out-{args.actors[-1]}", args.keep, dirs_exist_ok=True)
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
    print("RESULT " + json.dumps(results), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    sys.exit(0 if all(r["every_key_once"] and not r["failed"] for r in results) else 1)


if __name__ == "__main__":
    main()
