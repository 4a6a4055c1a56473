"""The head-training job on real Ray Train: it learns, checkpoints, resumes, runs DDP on two
workers, and survives a killed worker — tiny real models, real toy-world shards."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from flmm.build import load_heads
from flmm.optim import OptimConfig
from pipeline.encode import EncodeActor, training_samples
from pipeline.features import ImageFeatures
from pipeline.sources import read_shard
from pipeline.spec import ModelSpec
from pipeline.train import (
    HEADS_FILE,
    STATE_FILE,
    TrainConfig,
    TrainJob,
    build_trainable_heads,
    fit_heads,
    lmm_dims,
    train_on_batch,
)
from toyworld.shards import write_toy_shards

pytestmark = pytest.mark.slow  # Ray Train runs: ~7 minutes on 2 cores

N_SCENES, BATCH = 12, 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_shards")
    write_toy_shards(out, N_SCENES, 6, seed=0)
    return out


@pytest.fixture(scope="module")
def spec(tiny_llava_dir):
    return ModelSpec(str(tiny_llava_dir), "tiny", device="cpu")


@pytest.fixture(scope="module")
def features(shards, spec) -> list[ImageFeatures]:
    """The frozen stage's output for every training scene, computed outside Ray."""
    torch.manual_seed(0)
    raw = read_shard(
        pa.table({"uri": [str(p) for p in sorted(shards.glob("*.tar"))], "shard": ["a", "b"]})
    )
    encoded = EncodeActor(spec)(training_samples(raw))
    return [ImageFeatures.from_bytes(b) for b in encoded["features"].to_pylist()]


def job(shards, spec, tmp_path, **overrides) -> TrainJob:
    defaults = TrainJob(
        shards=(str(shards),),
        spec=spec,
        output=str(tmp_path / "heads.safetensors"),
        storage=str(tmp_path / "runs"),
        epochs=4,
        batch_size=BATCH,
        encode_cpus=0.5,
        encode_batch=4,
        checkpoint_every=3,
        log_every=100,
        optim=OptimConfig(lr=2e-3),  # 24 steps must show learning
    )
    return dataclasses.replace(defaults, **overrides)


def mean_loss(heads, features) -> float:
    """F-LMM's mask loss of ``heads`` over every training image (eval mode, no grad; the
    keyword selector's part, which only trained heads have, left out)."""
    heads.eval()
    with torch.no_grad():
        parts = train_on_batch(heads, features, torch.device("cpu"))
    return float(parts["total"] - parts.get("selector", 0.0))


def trained_loss(path: Path, config: TrainConfig, features) -> float:
    heads = build_trainable_heads(config)
    load_heads(heads, path)
    return mean_loss(heads, features)


def config_of(train_job: TrainJob) -> TrainConfig:
    return TrainConfig(
        heads=lmm_dims(train_job.spec.lmm),
        sam_variant=train_job.spec.sam_variant,
        sam_checkpoint=None,
        epochs=train_job.epochs,
        steps_per_epoch=1,
        batch_size=train_job.batch_size,
    )


@pytest.fixture(scope="module")
def one_worker(ray_session, shards, spec, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one_worker")
    train_job = job(shards, spec, tmp)
    return train_job, fit_heads(train_job)


def test_one_worker_trains_the_heads_and_lowers_the_loss(one_worker, features):
    train_job, summary = one_worker
    assert summary["samples"] == N_SCENES and summary["unusable_samples"] == 0
    assert summary["steps"] == summary["total_steps"] == 4 * (N_SCENES // BATCH)
    assert summary["metrics"]["world_size"] == 1
    # the toy shards carry captions with spans: a keyword selector was trained and saved too
    assert summary["captioned_samples"] == N_SCENES and "selector" in summary["metrics"]
    config = config_of(train_job)
    before = mean_loss(build_trainable_heads(config), features)
    after = trained_loss(Path(train_job.output), config, features)
    assert after < 0.9 * before, (before, after)


def test_rerunning_a_finished_run_resumes_and_only_exports(one_worker, tmp_path):
    train_job, first = one_worker
    again = dataclasses.replace(train_job, output=str(tmp_path / "again.safetensors"))
    summary = fit_heads(again)
    assert summary["steps"] == first["steps"]
    assert summary["checkpoint"] == first["checkpoint"]  # no new checkpoint: nothing retrained
    from safetensors.torch import load_file

    a, b = load_file(train_job.output), load_file(again.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_workers_train_with_ddp_and_converge_like_one(
    one_worker, ray_session, shards, spec, features, tmp_path
):
    one_job, _ = one_worker
    two_job = job(shards, spec, tmp_path, workers=2, epochs=8)
    summary = fit_heads(two_job)
    metrics = summary["metrics"]
    assert metrics["world_size"] == 2 and metrics["ddp"] is True
    # same number of images seen as one worker for 4 epochs: half the steps per epoch, twice
    # the epochs
    assert summary["total_steps"] == 8 * (N_SCENES // (BATCH * 2))
    config = config_of(one_job)
    before = mean_loss(build_trainable_heads(config), features)
    after_one = trained_loss(Path(one_job.output), config, features)
    after_two = trained_loss(Path(two_job.output), config, features)
    assert after_two < 0.9 * before
    assert abs(after_two - after_one) < 0.5 * (before - after_one), (before, after_one, after_two)


def _train_worker_pids() -> list[int]:
    """Pids of this Ray's live training workers (the GCS actor table: no dashboard needed)."""
    from ray._private import state

    return [
        a["Pid"]
        for a in state.actors().values()
        if "RayTrainWorker" in a["ActorClassName"] and a["State"] == "ALIVE" and a["Pid"]
    ]


def test_a_killed_worker_restarts_from_the_last_checkpoint(ray_session, shards, spec, tmp_path):
    train_job = job(shards, spec, tmp_path, epochs=6, checkpoint_every=2, log_every=1)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(fit_heads(train_job)))
    thread.start()
    run_dir = Path(train_job.storage) / train_job.name
    deadline = time.monotonic() + 300
    # two on disk: the first has surely been registered by the controller
    while len(list(run_dir.glob("checkpoint_*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(list(run_dir.glob("checkpoint_*"))) >= 2, "no checkpoints were written"
    pids = _train_worker_pids()
    assert pids
    os.kill(pids[0], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert result["steps"] == result["total_steps"]
    assert result["metrics"]["resumed_from"] > 0  # continued, not started over


def test_training_streams_shards_from_s3_and_checkpoints_to_it(
    ray_session, shards, spec, tmp_path, s3_server, s3_bucket
):
    """Shards read from ``s3://`` and Ray Train's storage on ``s3://`` (the session's moto
    server), both named with a query of filesystem options (``pipeline.uri``): the run trains,
    its checkpoints land in the bucket, the heads come out."""
    from urllib.parse import urlsplit

    import pyarrow.fs as pafs

    s3 = pafs.FileSystem.from_uri(f"s3://{s3_bucket}")[0]
    pafs.copy_files(str(shards), f"{s3_bucket}/shards", pafs.LocalFileSystem(), s3)
    query = f"?endpoint_override={urlsplit(s3_server).netloc}&scheme=http"
    train_job = job(f"s3://{s3_bucket}/shards{query}", spec, tmp_path, epochs=1)
    train_job = dataclasses.replace(train_job, storage=f"s3://{s3_bucket}/runs{query}")
    summary = fit_heads(train_job)
    assert summary["samples"] == N_SCENES and summary["steps"] == N_SCENES // BATCH
    assert summary["checkpoint"].startswith(f"{s3_bucket}/runs/")
    stored = s3.get_file_info(pafs.FileSelector(summary["checkpoint"]))
    assert {HEADS_FILE, STATE_FILE} <= {info.base_name for info in stored}
    load_heads(build_trainable_heads(config_of(train_job)), train_job.output)
