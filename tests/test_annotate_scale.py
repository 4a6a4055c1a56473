"""The annotation job at cluster scale (issue 19): 40 shards through 8 model actors on a 4-node
local ``ray.cluster_utils.Cluster`` (``bench/scale.py``, in a process of its own: it needs a Ray
of its own), with a model actor killed or its node removed a quarter of the way through; every
input key must land in exactly one committed shard, read back here from the output files."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_annotate_cluster import ray_env

from pipeline.sources import iter_tar_samples

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 4 nodes, 8 actors of the toy models on this machine's 2 cores: ~2 min each
@pytest.mark.parametrize("fault", ["actor", "node"])
def test_forty_shards_through_eight_actors_with_a_fault_commit_every_key_once(fault, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, str(ROOT / "bench" / "scale.py"), "--shards", "40", "--per-shard", "1",
        "--actors", "8", "--fault", fault, "--keep", str(out),
    ]  # fmt: skip
    run = subprocess.run(
        command, check=False, env=ray_env(), capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    (result,) = json.loads(line.removeprefix("RESULT "))
    assert result["fault"]["kind"] == fault and 10 <= result["fault"]["after_shards"] < 40
    assert not result["failed"] and result["images"] == 40
    inputs = sorted((out / "_inputs").glob("*.tar"))
    assert len(inputs) == 40
    expected = Counter(key for p in inputs for key, _, _ in iter_tar_samples(str(p)))
    done = sorted(p.stem for p in (out / "_done").glob("*.json"))
    assert done == sorted(p.stem for p in inputs)
    keys = Counter(
        k
        for name in done
        for k in pq.read_table(out / "samples" / f"{name}.parquet")["key"].to_pylist()
    )
    assert keys == expected and set(keys.values()) == {1}
    assert result["driver_bytes"] < result["result_bytes"]
