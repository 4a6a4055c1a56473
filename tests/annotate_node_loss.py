"""Run the annotation job on a 3-node ``ray.cluster_utils.Cluster`` and remove the node that
holds the model actor after the first shard is written. Run as a script (its own Ray, separate
from the test session's): ``python tests/annotate_node_loss.py SHARDS_DIR OUT_DIR LLAVA_DIR``.
Prints one JSON line: the summary and what was removed when."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray
from ray._private import state
from ray.cluster_utils import Cluster

from pipeline.annotate import AnnotateConfig, run_annotation
from pipeline.spec import ModelSpec


def main(shards: str, out: str, llava: str) -> None:
    # The head only runs the driver (0 CPUs); two 2-CPU worker nodes run reading and the model.
    cluster = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    try:
        workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        removed: dict = {}

        def remove_actor_node(name: str, done: dict, summary) -> None:
            if removed:
                return
            actors = [
                a
                for a in state.actors().values()
                if "ModelStage" in a["ActorClassName"] and a["State"] == "ALIVE"
            ]
            node_id = actors[0]["Address"]["NodeID"]
            node = next(n for n in workers if n.node_id == node_id)
            cluster.remove_node(node, allow_graceful=False)
            removed.update(node=node_id, done_before=len(list(Path(out, "_done").glob("*"))))

        # one row per block: many model tasks, so that the node's loss lands mid-run
        config = AnnotateConfig((shards,), out, ModelSpec(llava, "tiny"), batch_size=1,
                                block_rows=1)  # fmt: skip
        summary = run_annotation(config, on_shard=remove_actor_node)
        result = {"done": summary.done, "failed": summary.failed, "removed": removed}
        print("RESULT " + json.dumps(result), flush=True)  # Ray may log to stdout after it
    finally:
        ray.shutdown()  # the driver first: the cluster refuses to remove the node it is on
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
