"""Entry points run as a user runs them."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_ground_job_runs_end_to_end_on_its_defaults(tmp_path):
    out = tmp_path / "masks.png"
    run = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "ground.py"), "--output", str(out)],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "RANDOM weights" in run.stdout
    assert "'the red square':" in run.stdout and "'the blue circle':" in run.stdout
    assert Image.open(out).size == (160, 96)


def test_ground_job_refuses_a_missing_phrase(tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 24)).save(image)
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "ground.py"),
            "--lmm",
            "unused",
            "--image",
            str(image),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0 and "at least one --phrase" in run.stderr
    no_image = [
        sys.executable,
        str(ROOT / "jobs" / "ground.py"),
        "--lmm",
        "unused",
        "--phrase",
        "x",
    ]
    run = subprocess.run(no_image, check=False, capture_output=True, text=True)
    assert run.returncode != 0 and "give --image" in run.stderr
