"""jobs/train.py's two named recipes: without --lmm the toy heads' recipe exactly as it was when
the shipped heads (models/toy/heads.safetensors) were trained, with --lmm F-LMM's (their
configs/*/frozen_*_refcoco_png.py, loss of flmm/models/frozen_llava.py)."""

from __future__ import annotations

from safetensors import safe_open

from flmm.optim import OptimConfig
from flmm.selector import SelectorConfig
from jobs import train as job
from pipeline.train import TrainConfig, lmm_dims
from toyworld.models import toy_heads, toy_model_spec
from toyworld.shards import TOY_SPLITS
from toyworld.vqa import LIST_INSTRUCTION

STEPS = 250  # steps per epoch given to train_config
CAPTIONED = TOY_SPLITS["train"].n_scenes  # every toy training scene has a caption


def test_without_lmm_the_job_trains_with_the_toy_heads_recipe(tmp_path):
    run = job.job_of(job.parse_args(["--shards", str(tmp_path)]))
    toy = toy_model_spec(heads=False)
    heads = lmm_dims(toy.lmm, 32)
    steps_per_epoch = CAPTIONED // 4
    assert run.train_config(steps_per_epoch, CAPTIONED) == TrainConfig(
        heads=heads,
        sam_variant=toy.sam_variant,
        sam_checkpoint=toy.sam_checkpoint,
        epochs=4,
        steps_per_epoch=steps_per_epoch,
        batch_size=4,
        optim=OptimConfig(lr=5e-4),
        selector=SelectorConfig(
            heads.num_layers, heads.hidden_size, describe_instruction=LIST_INSTRUCTION
        ),
        loss_weighting="images",
        loss_target="original",
    )
    assert run.redraw_expressions and run.workers == 1 and run.spec.lmm == toy.lmm
    # the shipped heads were trained for as many steps as this recipe takes on the toy split
    with safe_open(str(toy_heads()), "pt") as shipped:
        assert int(shipped.metadata()["steps"]) == run.epochs * steps_per_epoch


def test_with_lmm_the_job_trains_with_flmm_recipe(tmp_path, tiny_llava_dir):
    argv = ["--shards", str(tmp_path), "--lmm", str(tiny_llava_dir), "--sam", "tiny"]
    run = job.job_of(job.parse_args(argv))
    heads = lmm_dims(str(tiny_llava_dir), 64)
    assert run.train_config(STEPS, 0) == TrainConfig(
        heads=heads,
        sam_variant="tiny",
        sam_checkpoint=None,
        epochs=8,
        steps_per_epoch=STEPS,
        batch_size=1,
        optim=OptimConfig(lr=1e-4),
        loss_weighting="masks",
        loss_target="lmm",
    )
    assert not run.redraw_expressions and run.describe_prompt is None


def test_recipe_flag_picks_either_and_flags_override_it(tmp_path, tiny_llava_dir):
    toy = job.job_of(job.parse_args(["--shards", str(tmp_path), "--recipe", "flmm"]))
    assert (toy.epochs, toy.batch_size, toy.optim.lr, toy.unet_channels) == (8, 1, 1e-4, 64)
    assert (toy.loss_weighting, toy.loss_target, toy.redraw_expressions) == ("masks", "lmm", False)
    argv = ["--shards", str(tmp_path), "--lmm", str(tiny_llava_dir), "--recipe", "toy"]
    real = job.job_of(job.parse_args([*argv, "--epochs", "2", "--batch-size", "3"]))
    assert (real.epochs, real.batch_size, real.optim.lr, real.unet_channels) == (2, 3, 5e-4, 32)
    assert (real.loss_weighting, real.loss_target, real.redraw_expressions) == (
        "images", "original", True
    )  # fmt: skip
