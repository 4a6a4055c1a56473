"""Every LMM family end to end, on tiny random checkpoints of the real classes: the ground
job, one annotated shard, one Ray Train run, and image descriptions; the jobs take the family
through ``--lmm`` / ``ModelSpec.lmm`` with nothing else changed."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from annotate_inputs import PHRASES, write_good_shards
from conftest import random_image
from PIL import Image

from flmm.build import load_heads
from flmm.checkpoint import read_metadata
from flmm.geometry import fit_longest
from flmm.lmm import FrozenLMM
from flmm.optim import OptimConfig
from flmm.prompt import FLMM_INSTRUCTION
from flmm.tiny_lmms import MODEL_TYPES
from pipeline.annotate import AnnotateConfig, run_annotation
from pipeline.spec import ModelSpec
from pipeline.train import TrainConfig, TrainJob, build_trainable_heads, fit_heads, lmm_dims
from toyworld.shards import write_toy_shards

ROOT = Path(__file__).resolve().parents[1]
OTHERS = [t for t in MODEL_TYPES if t != "llava"]  # LLaVA-1.5 has its own job tests


@pytest.mark.parametrize("model_type", OTHERS)
def test_ground_job_takes_any_family_through_lmm(model_type, tiny_lmm_dir, tmp_path):
    image, out = tmp_path / "x.png", tmp_path / "masks.png"
    Image.fromarray(random_image(50, 90).numpy()).save(image)
    cmd = [sys.executable, str(ROOT / "jobs" / "ground.py"), "--lmm", str(tiny_lmm_dir(model_type))]
    cmd += ["--sam", "tiny", "--image", str(image), "--output", str(out)]
    cmd += ["--phrase", "the red circle", "--phrase", "a small blue square"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "'the red circle':" in run.stdout and "'a small blue square':" in run.stdout
    assert Image.open(out).size == (90, 50)


@pytest.mark.parametrize("model_type", OTHERS)
def test_annotate_writes_one_shard_with_any_family(model_type, ray_session, tiny_lmm_dir, tmp_path):
    write_good_shards(tmp_path / "in", 1, 3)
    spec = ModelSpec(str(tiny_lmm_dir(model_type)), "tiny")
    summary = run_annotation(AnnotateConfig((str(tmp_path / "in"),), str(tmp_path / "out"), spec))
    samples = pq.read_table(tmp_path / "out" / "samples" / "good-000000.parquet").to_pylist()
    assert [s["status"] for s in samples] == ["ok"] * 3, samples
    annotations = pq.read_table(tmp_path / "out" / "annotations" / "good-000000.parquet")
    # sample i has phrases PHRASES[: 1 + i % 2]: 1 + 2 + 1
    assert Counter(annotations.column("phrase").to_pylist()) == {PHRASES[0]: 3, PHRASES[1]: 1}
    assert (summary.samples, summary.errors, summary.annotations) == (3, 0, 4)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_family_describes_a_batch_of_differently_sized_images(model_type, tiny_lmm_dir):
    lmm = FrozenLMM.from_pretrained(str(tiny_lmm_dir(model_type)))
    images = [random_image(40, 70, seed=1), random_image(64, 30, seed=2)]
    batched = lmm.describe(images, max_new_tokens=4)
    alone = [lmm.describe([image], max_new_tokens=4)[0] for image in images]
    assert batched == alone and all(isinstance(t, str) for t in batched)


def test_fit_longest_is_flmm_resize_rule_by_hand():
    """F-LMM's ``CustomLlavaImageProcessor.resize``: the longer side to 336, the other truncated."""
    assert fit_longest(480, 640, 336) == (252, 336)
    assert fit_longest(641, 427, 336) == (336, 223)  # 427 * 336 / 641 = 223.8
    assert fit_longest(300, 300, 336) == (336, 336)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_family_gives_the_image_size_in_its_input_pixels(model_type, tiny_lmm_dir):
    """``ImageInputs.pixels``, the frame F-LMM's loss targets go through: the image's own aspect,
    inside the model's input (LLaVA-1.5: the tower's S×S square, the longer side S)."""
    lmm = FrozenLMM.from_pretrained(str(tiny_lmm_dir(model_type)))
    height, width = 40, 70
    image = lmm.prepare(random_image(height, width), ["the red circle"]).image
    h, w = image.pixels
    assert 0 < h < w and abs(h / w - height / width) < 0.15, image.pixels
    if model_type == "llava":
        side = lmm.model.config.vision_config.image_size
        assert image.pixels == (int(height * side / width), side)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", OTHERS)
def test_ray_train_fits_heads_for_any_family(model_type, ray_session, tiny_lmm_dir, tmp_path):
    write_toy_shards(tmp_path / "shards", 4, 4, seed=0)
    lmm = str(tiny_lmm_dir(model_type))
    job = TrainJob(
        shards=(str(tmp_path / "shards"),),
        spec=ModelSpec(lmm, "tiny", device="cpu"),
        output=str(tmp_path / "heads.safetensors"),
        storage=str(tmp_path / "runs"),
        epochs=1,
        batch_size=2,
        encode_cpus=0.5,
        encode_batch=4,
        log_every=100,
        unet_channels=8,
        optim=OptimConfig(lr=1e-3),
    )
    summary = fit_heads(job)
    assert summary["steps"] == 2 and summary["samples"] == 4
    assert read_metadata(job.output)["prompt"] == FLMM_INSTRUCTION  # recorded with the heads
    config = lmm_dims(lmm, 8)
    views = FrozenLMM.from_pretrained(lmm).num_views
    assert config.num_views == views
    heads = build_trainable_heads(TrainConfig(config, "tiny", None, 1, 1, 2))
    load_heads(heads, job.output)  # the file has the family's V·L·H input channels
    conv = heads.mask_decoder.encoder[0].convs[0].conv.weight
    assert conv.shape[1] == views * config.num_layers * config.num_heads
    assert torch.isfinite(conv).all()


@pytest.mark.parametrize("model_type", ["llava_next", "qwen2_5_vl"])
def test_a_batch_of_images_on_different_grids_grounds_each_as_alone(model_type, tiny_lmm_dir):
    """Dynamic-resolution families give each image its own grid: the heads run the U-Net once
    per distinct grid, and each image's masks are those it gets alone."""
    from flmm.build import build_flmm, build_sam, sam_config

    torch.manual_seed(0)
    lmm = FrozenLMM.from_pretrained(str(tiny_lmm_dir(model_type)))
    model = build_flmm(lmm, build_sam(sam_config("tiny"))).eval()
    images = [random_image(40, 160, seed=1), random_image(150, 50, seed=2)]
    inputs = [model.prepare(image, ["the red circle", "a blue square"]) for image in images]
    assert inputs[0].lmm.grid != inputs[1].lmm.grid
    with torch.inference_mode():
        together = model(inputs)
        alone = [model([x])[0] for x in inputs]
    for t, a in zip(together, alone):
        torch.testing.assert_close(t.coarse, a.coarse, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(t.refined, a.refined, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["llava_next", "qwen2_5_vl"])
def test_evaluate_job_takes_any_family_through_lmm(model_type, tiny_lmm_dir, tmp_path):
    """``jobs/evaluate.py --lmm <dir>`` on toy eval shards, random heads built for the family."""
    import json

    from jobs import evaluate as job
    from toyworld.scenes import SceneConfig

    shards = write_toy_shards(
        tmp_path / "val",
        2,
        2,
        seed=1,
        split_name="val",
        config=SceneConfig(min_side=64, max_side=96, max_objects=2),
    )
    from flmm.build import build_flmm, build_sam, sam_config
    from flmm.heads import save_heads

    lmm = str(tiny_lmm_dir(model_type))
    heads = build_flmm(FrozenLMM.from_pretrained(lmm), build_sam(sam_config("tiny"))).heads
    saved = save_heads(heads, tmp_path / "heads.safetensors")
    output = tmp_path / "metrics.json"
    argv = ["--lmm", lmm, "--sam", "tiny", "--heads", str(saved), "--device", "cpu"]
    job.main([*argv, "--shards", f"toy={shards[0].parent}", "--output", str(output)])
    metrics = json.loads(output.read_text())
    assert set(metrics) == {"toy/standard", "toy/flmm", "toy/flmm-separate"}
    assert all(0.0 <= m["refined"]["giou"] <= 1.0 for m in metrics.values())
    assert metrics["toy/flmm"]["unet"]["n"] > 0
