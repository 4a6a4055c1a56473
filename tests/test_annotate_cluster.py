"""The annotation job on real Ray clusters: submitted with ``ray job submit`` to a head started
with ``ray start``, and on a multi-node ``Cluster`` that loses the model actor's node mid-run.
Both need a Ray of their own, so they run it in child processes (the session's Ray stays the
only one in this process); and ``cluster.yaml`` checked against Ray's own schema."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from annotate_inputs import write_good_shards

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    assert "GPU" not in node_types[config["head_node_type"]]["resources"]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in node_types.values())
    project = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    assert any(f"pip install -e {project}" in c for c in config["setup_commands"])


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def ray_env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    return env


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_tree(head: subprocess.Popen) -> None:
    """End the Ray head this test started, and only it: SIGTERM its process tree, then SIGKILL
    what is left. (``ray stop`` would stop every Ray on the machine, other sessions' too.)"""
    tree = descendants(head.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in filter(alive, tree):
            os.kill(pid, sig)
        deadline = time.time() + 10
        while time.time() < deadline and any(map(alive, tree)):
            time.sleep(0.2)
    head.wait()


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on loopback (``ray start --head --block``) with its dashboard for job
    submission; every port chosen free so that other Rays on the machine are left alone."""
    gcs, dashboard, agent, agent_grpc, env_agent, metrics = free_ports(6)
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: socket paths have a limit
    command = [
        RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", str(gcs), "--num-cpus", "2", "--include-dashboard", "true",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--dashboard-agent-listen-port", str(agent),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port",
        str(env_agent), "--metrics-export-port", str(metrics), "--temp-dir", temp_dir,
        "--disable-usage-stats",
    ]  # fmt: skip
    with open(tmp_path / "ray_head.log", "w") as log:
        head = subprocess.Popen(command, env=ray_env(), stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(address, head, tmp_path / "ray_head.log")
        yield address
    finally:
        stop_tree(head)


def wait_for_dashboard(address: str, head: subprocess.Popen, log: Path, timeout=120) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, log.read_text()[-3000:]
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1)
    raise TimeoutError(log.read_text()[-3000:])


@pytest.mark.slow  # a Ray head of its own (ray start) and a submitted job: ~25 s
def test_ray_job_submit_runs_the_job_on_a_running_head(ray_head, tiny_llava_dir, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    write_good_shards(tmp_path / "in", 2, 2)
    out = tmp_path / "out"
    entrypoint = [
        sys.executable, "jobs/annotate.py", "--input", str(tmp_path / "in"), "--output",
        str(out), "--lmm", str(tiny_llava_dir), "--sam", "tiny", "--preview-images", "1",
    ]  # fmt: skip
    job_id = f"annotate-test-{uuid.uuid4().hex[:8]}"
    submit_command = [RAY, "job", "submit", "--address", ray_head, "--working-dir", "."]
    submit = subprocess.run(
        [*submit_command, "--submission-id", job_id, "--no-wait", "--", *entrypoint],
        check=False,
        cwd=ROOT,
        env=ray_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submit.returncode == 0, submit.stderr
    client = JobSubmissionClient(ray_head)
    deadline = time.time() + 240
    while not client.get_job_status(job_id).is_terminal():
        assert time.time() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
    assert "annotate: shards 2 done, 0 skipped, 0 failed | samples 4 (0 errors)" in logs
    keys = pq.read_table(out / "samples").column("key").to_pylist()
    assert sorted(keys) == ["good0_000", "good0_001", "good1_000", "good1_001"]
    assert pq.read_table(out / "annotations").num_rows == 6  # 1 + 2 phrases per shard
    assert (out / "preview.png").is_file()


@pytest.mark.slow  # a three-node Ray Cluster in a child process: ~50 s
def test_losing_the_model_actors_node_mid_run_loses_no_sample(tiny_llava_dir, tmp_path):
    paths = write_good_shards(tmp_path / "in", 4, 3)
    out = tmp_path / "out"
    script = ROOT / "tests" / "annotate_node_loss.py"
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "in"), str(out), str(tiny_llava_dir)],
        check=False,
        env=ray_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, run.stdout[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["removed"]["done_before"] < 4  # removed mid-run, with shards still to do
    assert sorted(result["done"]) == [p.stem for p in paths] and not result["failed"]
    keys = Counter(pq.read_table(out / "samples").column("key").to_pylist())
    assert len(keys) == 12 and set(keys.values()) == {1}
