"""``python -m toyworld``: both recipes run side by side into one folder, each line tagged with its
model, and a failing recipe fails the command by name (here with tiny step counts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--sam-args",
    "--steps 2 --eval-objects 4",
    "--lmm-args",
    (
        "--vision-steps 2 --steps 2 --batch 4 --list-steps 2 --referent-steps 2 "
        "--proposal-steps 2 --look-steps 2 --eval-questions 2"
    ),
]


def rebuild(out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "toyworld", "--out", str(out), *args]
    return subprocess.run(
        command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # both recipes for 2 steps each: ~10 s idle, ~20 s on a loaded machine
def test_rebuild_writes_both_models_with_their_records_and_tags_their_output(tmp_path):
    done = rebuild(tmp_path, *TINY)
    assert done.returncode == 0, done.stdout + done.stderr
    with safe_open(str(tmp_path / "sam.safetensors"), "pt") as f:
        names = f.keys()
    assert any(name.startswith("image_encoder.") for name in names)
    assert json.loads((tmp_path / "sam.json").read_text())["recipe"]["steps"] == 2
    record = json.loads((tmp_path / "llava" / "toy_world.json").read_text())
    recipe = record["recipe"]
    steps = ("vision_steps", "steps", "list_steps", "referent_steps", "proposal_steps")
    assert [recipe[name] for name in (*steps, "look_steps")] == [2, 2, 2, 2, 2, 2]
    assert (tmp_path / "llava" / "model.safetensors").is_file()
    lines = done.stdout.splitlines()
    assert any(line.startswith("[sam] trained 2 steps") for line in lines)
    assert any(line.startswith("[lmm] vision step") for line in lines)
    assert lines[-1].startswith(f"toy models rebuilt in {tmp_path}/")


def test_a_failing_recipe_fails_the_command_and_names_it(tmp_path):
    done = rebuild(tmp_path, "--only", "sam", "--sam-args", "--steps not-a-number")
    assert done.returncode != 0
    assert "[sam]" in done.stdout and "invalid int value" in done.stdout
    assert "recipe(s) failed: sam" in done.stderr
    assert not (tmp_path / "llava").exists()


@pytest.mark.slow  # the LMM recipe for 2 steps: ~11 s idle
def test_the_other_recipe_still_finishes_when_one_fails(tmp_path):
    done = rebuild(tmp_path, "--sam-args", "--steps not-a-number", *TINY[2:])
    assert done.returncode != 0
    assert "recipe(s) failed: sam (" in done.stderr
    assert (tmp_path / "llava" / "model.safetensors").is_file()
    assert not (tmp_path / "sam.safetensors").exists()
