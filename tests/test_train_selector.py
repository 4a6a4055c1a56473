"""`jobs/train.py --init-heads H --train selector`: the keyword selector alone, trained on top of
given heads (tiny LLaVA, small toy scenes with captions): only ``selector.*`` changes, every other
tensor of H comes out bit for bit, a selector in H is the starting point, the run resumes like any
training run, and bad inputs fail at once. The recipe's steps, checkpoint and export run here
outside Ray (fast); the same on real Ray Train workers is marked slow (~1 min per run here:
Ray Train's start and one LMM load per epoch dominate; ``pytest -m slow``)."""

from __future__ import annotations

import copy
import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file
from train_resume import straight_and_resumed

from flmm.build import read_heads_file
from flmm.checkpoint import read_metadata, save_tensors
from flmm.heads import save_heads
from flmm.optim import OptimConfig, build_optimizer, step
from flmm.prompt import FLMM_INSTRUCTION
from flmm.selector import DESCRIBE_KEY, PREFIX, KeywordSelector, SelectorConfig, selector_state
from pipeline.encode import CaptionActor, EncodeActor, training_samples
from pipeline.features import ImageFeatures, TextFeatures
from pipeline.shards import write_shards
from pipeline.sources import read_shard
from pipeline.spec import ModelSpec
from pipeline.train import (
    TrainConfig,
    TrainJob,
    build_trainable_heads,
    export_heads,
    fit_heads,
    lmm_dims,
    save_checkpoint,
    train_selector_on_batch,
)
from toyworld.scenes import SceneConfig, make_scene, scene_seed
from toyworld.shards import scene_metadata, scene_sample, write_toy_shards

N_SCENES, BATCH, UNET = 8, 2, 16
SCENES = SceneConfig(min_side=64, max_side=96, max_objects=2)  # small: fast prefills
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("selector_shards")
    write_toy_shards(out, N_SCENES, N_SCENES // 2, seed=0, config=SCENES)
    return out


@pytest.fixture(scope="module")
def init_heads(tiny_llava_dir, tmp_path_factory) -> Path:
    """Heads without a selector, stored in float16 as the shipped toy heads are (a float32
    round trip through the trainer would show), with metadata of their own."""
    config = TrainConfig(lmm_dims(str(tiny_llava_dir), UNET), "tiny", None, 1, 1, 1)
    state = build_trainable_heads(config).state_dict()
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path_factory.mktemp("init_heads") / "heads.safetensors"
    return save_tensors(tensors, path, {"steps": "123", "prompt": FLMM_INSTRUCTION})


@pytest.fixture(scope="module")
def spec(tiny_llava_dir, init_heads) -> ModelSpec:
    return ModelSpec(str(tiny_llava_dir), "tiny", heads=str(init_heads), device="cpu")


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
        unet_channels=UNET,
        checkpoint_every=2,
        log_every=100,
        optim=OptimConfig(lr=2e-3),  # the selector's: x10
        describe_prompt="List.",
        train="selector",
    )
    return dataclasses.replace(defaults, **overrides)


@pytest.fixture(scope="module")
def captions(shards, spec) -> list[TextFeatures]:
    """The selector-only frozen stage's output for every training scene, outside Ray."""
    raw = read_shard(
        pa.table({"uri": [str(p) for p in sorted(shards.glob("*.tar"))], "shard": ["a", "b"]})
    )
    encoded = CaptionActor(spec)(training_samples(raw, captions_only=True))
    return [TextFeatures.from_bytes(b) for b in encoded["features"].to_pylist()]


def tag_loss_of(selector: KeywordSelector, captions: list[TextFeatures]) -> float:
    with torch.no_grad():
        return float(train_selector_on_batch(selector, captions, CPU)["total"])


def assert_heads_unchanged(output: Path, init: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the heads file ``init`` but its selector's is in ``output`` bit for bit
    (dtype too); returns the others of ``output``."""
    out = load_file(output)
    given = {k: v for k, v in load_file(init).items() if not k.startswith(PREFIX)}
    assert set(given) <= set(out)
    for key, value in given.items():
        assert out[key].dtype == value.dtype, key
        assert torch.equal(out[key].view(torch.uint8), value.view(torch.uint8)), key
    return {k: v for k, v in out.items() if k not in given}


def test_the_caption_stage_gives_the_captions_features_of_the_full_stage(shards, spec, captions):
    """Selector-only training reads captions through the LMM alone (no SAM, no heads, no phrase
    prefill); what it hands on is what the full frozen stage hands on for the same captions."""
    raw = read_shard(
        pa.table({"uri": [str(p) for p in sorted(shards.glob("*.tar"))], "shard": ["a", "b"]})
    )
    full = EncodeActor(spec)(training_samples(raw))
    from_full = [TextFeatures.from_bytes(b) for b in full["features"].to_pylist()]
    assert len(captions) == len(from_full) == N_SCENES
    for alone, both in zip(captions, from_full):
        assert torch.equal(alone.tags, both.tags)
        torch.testing.assert_close(alone.hidden, both.hidden, atol=2e-3, rtol=1e-3)
    assert ImageFeatures.from_bytes(full["features"][0].as_py()).text_hidden is not None
    assert set(training_samples(raw, captions_only=True).column("masks").to_pylist()) == {b""}


def selector_config(tiny_llava_dir, init_heads, epochs: int = 10) -> TrainConfig:
    """What a worker of the ``job`` gets (``TrainJob.train_config``), for steps outside Ray."""
    dims = lmm_dims(str(tiny_llava_dir), UNET)
    return TrainConfig(
        heads=dims,
        sam_variant="tiny",
        sam_checkpoint=None,
        epochs=epochs,
        steps_per_epoch=N_SCENES // BATCH,
        batch_size=BATCH,
        init_heads=str(init_heads),
        optim=OptimConfig(lr=2e-3),
        selector=SelectorConfig(dims.num_layers, dims.hidden_size, describe_instruction="List."),
        train="selector",
    )


def train(heads, optim, schedule, config: TrainConfig, captions, first: int, n: int) -> None:
    """Steps ``first .. first + n - 1``: batch ``s % steps_per_epoch`` of the epoch."""
    for s in range(first, first + n):
        i = s % config.steps_per_epoch
        parts = train_selector_on_batch(heads.selector, captions[i * BATCH : (i + 1) * BATCH], CPU)
        step(parts["total"], heads.selector, optim, schedule, config.optim)


def test_only_the_selector_trains_and_its_export_keeps_the_heads_bit_for_bit(
    tiny_llava_dir, init_heads, shards, spec, captions, tmp_path
):
    config = selector_config(tiny_llava_dir, init_heads)
    heads = build_trainable_heads(config)
    trainable = [n for n, p in heads.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(PREFIX) for n in trainable)
    fresh = copy.deepcopy(heads.state_dict())
    before = tag_loss_of(heads.selector, captions)
    optim, schedule = build_optimizer(heads, config.total_steps, config.optim)
    train(heads, optim, schedule, config, captions, 0, config.total_steps)
    after = tag_loss_of(heads.selector, captions)
    assert after < 0.1 * before, (before, after)  # measured 1.22 -> 0.002 in these 40 steps
    for key, value in heads.state_dict().items():  # nothing else moved, not even in float32
        assert torch.equal(value, fresh[key]) != key.startswith(PREFIX), key

    save_checkpoint(tmp_path, heads, optim, schedule, config.total_steps)
    train_job = job(shards, spec, tmp_path)
    assert export_heads(train_job, tmp_path) == config.total_steps
    added = assert_heads_unchanged(Path(train_job.output), init_heads)
    assert sorted(added) == sorted(selector_state(heads.selector))
    metadata = read_metadata(train_job.output)
    assert metadata["steps"] == "123"  # the heads' own, kept
    assert metadata["selector_steps"] == str(config.total_steps)
    assert metadata[DESCRIBE_KEY] == "List." and metadata["prompt"] == FLMM_INSTRUCTION
    _, selector = read_heads_file(train_job.output)
    assert tag_loss_of(selector, captions) == pytest.approx(after, rel=1e-5)


def test_a_selector_in_the_given_heads_is_the_starting_point(
    tiny_llava_dir, init_heads, shards, spec, captions, tmp_path
):
    """Heads that hold a selector already: selector training starts from it (weights and
    describe instruction), not from a fresh one, and its export replaces it."""
    config = selector_config(tiny_llava_dir, init_heads, epochs=2)
    heads = build_trainable_heads(config)
    optim, schedule = build_optimizer(heads, config.total_steps, config.optim)
    train(heads, optim, schedule, config, captions, 0, config.total_steps)
    with_selector = save_heads(heads, tmp_path / "with_selector.safetensors")

    fresh = SelectorConfig(config.heads.num_layers, config.heads.hidden_size)  # no instruction
    resumed = build_trainable_heads(
        dataclasses.replace(config, init_heads=str(with_selector), selector=fresh)
    )
    assert resumed.selector.config.describe_instruction == "List."
    for key, value in selector_state(heads.selector).items():
        assert torch.equal(resumed.state_dict()[key], value), key
    out = tmp_path / "out"
    out.mkdir()
    save_checkpoint(out, resumed, *build_optimizer(resumed, 1, config.optim), 1)
    next_job = job(shards, dataclasses.replace(spec, heads=str(with_selector)), out)
    export_heads(next_job, out)
    assert len(assert_heads_unchanged(Path(next_job.output), with_selector)) == len(
        selector_state(heads.selector)
    )


def test_a_selector_run_resumed_from_its_checkpoint_continues_as_if_never_stopped(
    tiny_llava_dir, init_heads, captions, tmp_path
):
    config = selector_config(tiny_llava_dir, init_heads, epochs=4)
    total, stop = config.total_steps, 6
    straight, resumed = straight_and_resumed(config, train, captions, total, stop, tmp_path)
    expected, got = straight.state_dict(), resumed.state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


# --------------------------------------------------------------------------------------------
# On real Ray Train (slow)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(ray_session, shards, spec, tmp_path_factory):
    train_job = job(shards, spec, tmp_path_factory.mktemp("selector_run"))
    return train_job, fit_heads(train_job)


@pytest.mark.slow
def test_a_ray_train_selector_run_changes_only_the_selector(trained, init_heads, captions):
    train_job, summary = trained
    assert summary["train"] == "selector" and summary["samples"] == N_SCENES
    assert summary["steps"] == summary["total_steps"] == 4 * (N_SCENES // BATCH)
    added = assert_heads_unchanged(Path(train_job.output), init_heads)
    assert added and all(k.startswith(PREFIX) for k in added)
    assert read_metadata(train_job.output)["selector_steps"] == str(summary["steps"])
    fresh = build_trainable_heads(
        selector_config(init_heads=init_heads, tiny_llava_dir=train_job.spec.lmm)
    )
    _, selector = read_heads_file(train_job.output)
    before, after = tag_loss_of(fresh.selector, captions), tag_loss_of(selector, captions)
    assert after < 0.8 * before, (before, after)


@pytest.mark.slow
def test_rerunning_a_finished_selector_run_only_exports(trained, tmp_path):
    train_job, first = trained
    again = dataclasses.replace(train_job, output=str(tmp_path / "again.safetensors"))
    summary = fit_heads(again)
    assert summary["steps"] == first["steps"]
    assert summary["checkpoint"] == first["checkpoint"]  # nothing retrained
    a, b = load_file(train_job.output), load_file(again.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train_worker_pids() -> list[int]:
    from ray._private import state

    return [
        a["Pid"]
        for a in state.actors().values()
        if "RayTrainWorker" in a["ActorClassName"] and a["State"] == "ALIVE" and a["Pid"]
    ]


@pytest.mark.slow
def test_a_selector_run_stopped_part_way_resumes_from_its_checkpoint(
    ray_session, shards, spec, init_heads, tmp_path
):
    """A run whose worker dies with no failures allowed stops; the same command again goes on
    from its last checkpoint to the end. (Each epoch streams its captions anew, ~10 s here: the
    kill lands in the epoch after the second checkpoint.)"""
    train_job = job(shards, spec, tmp_path, epochs=4, log_every=1, max_failures=0)
    outcome: dict = {}

    def run():
        try:
            outcome["summary"] = fit_heads(train_job)
        except Exception as error:  # noqa: BLE001 - the stopped run's error, whatever Ray raises
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    run_dir = Path(train_job.storage) / train_job.name
    deadline = time.monotonic() + 300
    while len(list(run_dir.glob("checkpoint_*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(list(run_dir.glob("checkpoint_*"))) >= 2, "no checkpoints were written"
    os.kill(_train_worker_pids()[0], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" in outcome, outcome
    assert not Path(train_job.output).exists()

    summary = fit_heads(dataclasses.replace(train_job, max_failures=3))
    assert summary["steps"] == summary["total_steps"]
    assert 0 < summary["metrics"]["resumed_from"] < summary["total_steps"]
    assert_heads_unchanged(Path(train_job.output), init_heads)


def test_selector_training_needs_the_heads_it_is_added_to(shards, tiny_llava_dir, tmp_path):
    spec = ModelSpec(str(tiny_llava_dir), "tiny", device="cpu")
    with pytest.raises(ValueError, match="needs the heads it is added to"):
        job(shards, spec, tmp_path)
    from jobs import train as train_job

    started = time.perf_counter()
    with pytest.raises(SystemExit, match="--init-heads"):
        train_job.main(["--train", "selector", "--shards", str(shards)])
    assert time.perf_counter() - started < 5  # at once: no Ray, no model
    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(SystemExit, match="no such file"):
        train_job.main(["--train", "selector", "--init-heads", missing, "--shards", str(shards)])


def test_selector_training_refuses_shards_without_captions(ray_session, spec, tmp_path):
    """Samples with objects but no caption train heads, not a selector: the run stops after
    the counting pass, before any model is built."""
    samples = []
    for index in range(4):
        scene = make_scene(scene_seed(0, index), SCENES)
        meta = {k: v for k, v in scene_metadata(scene).items() if k != "caption"}
        samples.append(scene_sample(f"s_{index:04d}", scene, meta=meta))
    write_shards(tmp_path / "shards", "plain", samples, 4)
    with pytest.raises(ValueError, match="none of the 4 usable samples .* has a caption"):
        fit_heads(job(tmp_path / "shards", spec, tmp_path))
    assert not (tmp_path / "runs").exists()


def test_the_job_builds_the_unet_as_wide_as_the_given_heads(shards, init_heads):
    from jobs import train as train_job

    args = ["--train", "selector", "--init-heads", str(init_heads), "--shards", str(shards)]
    built = train_job.job_of(train_job.parse_args(args))
    assert built.unet_channels == UNET and built.train == "selector"  # the toy recipe's is 32
    assert built.shards == (str(shards),)
