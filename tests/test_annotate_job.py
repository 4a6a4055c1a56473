"""jobs/annotate.py as a user runs it: its embedded default and its errors. (Full runs of the
job: tests/test_annotate_cluster.py submits it to a Ray head.)"""

import os
import subprocess
import sys
import time
from pathlib import Path

import toyworld.models
from jobs import annotate as job

ROOT = Path(__file__).resolve().parents[1]


def test_no_arguments_mean_the_toy_world_sample_shards_and_toy_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = job.config_of(job.parse_args([]))
    assert config.inputs == ("out/toy/sample",)
    assert sorted(p.name for p in (tmp_path / "out/toy/sample").iterdir()) == [
        "VERSION", "sample-000000.tar", "sample-000001.tar", "sample-000002.tar"
    ]  # fmt: skip
    from toyworld.shards import TOY_SHARDS_VERSION

    assert (tmp_path / "out/toy/sample/VERSION").read_text().strip() == str(TOY_SHARDS_VERSION)
    model = config.model
    assert model.lmm == str(ROOT / "models/toy/llava") and Path(model.lmm, "config.json").is_file()
    assert (model.sam_variant, model.sam_checkpoint) == (
        "toy", str(ROOT / "models/toy/sam.safetensors")
    )  # fmt: skip
    assert model.heads == str(ROOT / "models/toy/heads.safetensors")  # shipped with the repo
    assert config.output == "out/annotate"


def test_without_heads_the_job_says_they_are_random(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(toyworld.models, "TOY_MODELS", tmp_path / "no_models")
    config = job.config_of(job.parse_args(["--input", "unused"]))
    assert config.model.heads is None and config.inputs == ("unused",)
    assert "RANDOMLY INITIALISED" in capsys.readouterr().err


def test_missing_inputs_fail_fast_with_a_clear_error(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "jobs/annotate.py"), "--input", str(tmp_path / "nope")],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode != 0 and "error: input not found" in run.stderr
    assert not (tmp_path / "out").exists()


def test_phrase_flags_reach_the_config_and_a_prompt_without_its_slot_fails_fast(tmp_path):
    args = ["--input", "unused", "--phrases", "lmm", "--list-prompt", "What is there?"]
    config = job.config_of(job.parse_args([*args, "--propose-prompt", "Phrases of: {caption}"]))
    assert (config.phrases, config.list_prompt) == ("lmm", "What is there?")
    assert config.propose_prompt == "Phrases of: {caption}"
    assert job.config_of(job.parse_args(["--input", "unused"])).phrases == "auto"
    run = subprocess.run(
        [sys.executable, str(ROOT / "jobs/annotate.py"), "--input", str(tmp_path),
         "--propose-prompt", "Which phrases name things?"],
        check=False, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode != 0 and "--propose-prompt must hold {caption} once" in run.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_actors_a_local_ray_cannot_hold_fail_at_once(tmp_path):
    """A Ray the job starts has all it will ever have: actors asking for GPUs it lacks would wait
    for ever, so the job ends at once with the reason, before any model loads."""
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, str(ROOT / "jobs/annotate.py"), "--gpus-per-actor", "1", "--num-cpus", "2"],
        check=False, capture_output=True, text=True, cwd=tmp_path,
        env={**env, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode != 0, run.stdout
    assert "need 1 GPUs and this Ray has 0" in run.stderr
    assert time.perf_counter() - start < 90
    assert not (tmp_path / "out/annotate/annotations").exists()
