"""bench/gpu_suite.py: its --tiny path runs every part of the GPU suite on CPU and records real
figures (slow: ``pytest -m slow tests/test_gpu_suite.py``, ~3 minutes on 2 cores); its budget
cuts a step that runs over its share and goes on (fast)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import gpu_suite

FAMILIES = ("llava", "deepseek_vl_hybrid", "qwen2_5_vl")
SOURCES = {"given": ["given"], "caption": ["caption"], "image": ["generated"]}


@pytest.mark.slow
def test_the_tiny_suite_runs_every_part_and_records_real_figures(ray_session, tmp_path, capsys):
    out = tmp_path / "suite.json"
    args = ["--tiny", "--images", "16", "--batches", "1,2", "--repeats", "1", "--steps", "4"]
    returned = gpu_suite.main([*args, "--json", str(out)])
    results = json.loads(out.read_text())
    assert results["parts"].keys() == returned["parts"].keys()
    parts = results["parts"]
    steps = ["setup", *(f"bench/{f}" for f in FAMILIES), *(f"annotate/{m}" for m in SOURCES)]
    # no "ray" step: Ray was running already (the session's), the suite neither started nor
    # stopped it
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(
        [*steps, "train"], "ok"
    )
    for family in FAMILIES:
        bench = parts[f"bench/{family}"]
        assert bench["flops_per_image"]["lmm"] > 0 and bench["flops_per_image"]["sam"] > 0
        assert bench["batches"].keys() == {"1", "2"}
        for batch in bench["batches"].values():
            assert batch["images_per_s"] > 0 and batch["fraction_of_flop_bound"] > 0
    for mode, sources in SOURCES.items():
        run = parts[f"annotate/{mode}"]
        assert (run["images"], run["errors"]) == (16, 0)
        assert run["images_per_s"] > 0 and run["model_images_per_s"] > run["images_per_s"]
        assert run["stage_ms_per_image"]["lmm_s"] > 0 and run["stage_ms_per_image"]["heads_s"] > 0
        assert run["annotations"] > 0 and run["sources"] == sources  # masks written, by mode
    assert parts["annotate/image"]["stage_ms_per_image"]["describe_s"] > 0
    train = parts["train"]
    assert train["steps"] == train["total_steps"] == 4
    assert math.isfinite(train["loss"]) and train["loss"] > 0
    table = capsys.readouterr().out.split("| step |", 1)[1]
    for row in ("bench llava | batch 2", "annotate image | 16 images", "train | 4 steps"):
        assert row in table


def test_a_step_over_its_share_is_cut_and_the_next_steps_still_run(tmp_path):
    out = tmp_path / "suite.json"
    # --budget 4.55 s: a hundredth of PLAN_S's 455, so setup's share is 0.3 s
    suite = gpu_suite.Suite(
        gpu_suite.parse_args(["--tiny", "--budget", "4.55", "--json", str(out)])
    )
    restarts = []
    suite.on_failure = lambda: restarts.append(True)
    began = time.perf_counter()
    cut = suite.step("setup", lambda s, record: (record.update(half="done"), time.sleep(5)))
    assert time.perf_counter() - began < 2
    assert cut["status"].startswith("cut") and cut["half"] == "done"  # what it measured is kept
    ok = suite.step("train", lambda s, record: record.update(figure=1.0))
    failed = suite.step("annotate/image", lambda s, record: 1 / 0)
    assert (ok["status"], failed["status"]) == ("ok", "error: ZeroDivisionError: division by zero")
    assert restarts == [True, True]  # after the cut and after the error, not after the ok step
    saved = json.loads(out.read_text())["parts"]
    statuses = [saved[n]["status"].split(":")[0] for n in ("setup", "train", "annotate/image")]
    assert statuses == ["cut", "ok", "error"]
