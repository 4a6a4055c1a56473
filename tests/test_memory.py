"""The memory plan: the estimate (``flmm.memory``) against measured peaks (``flmm.peak``), and
``--batch-size auto`` / its check (``pipeline.plan``) against the estimate.

Measured on CPU: live tensor bytes of the model stage's own run, every family's tiny checkpoint
(``bench/memory.py``), and SAM / the heads at real sizes on the meta device (shapes only, no
memory). On a GPU the same bench reads ``torch.cuda.max_memory_allocated`` beside them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flmm.build import HeadsConfig, build_heads, build_sam, sam_config
from flmm.geometry import ImageGeometry
from flmm.memory import (
    MARGIN,
    MAX_BATCH,
    RESERVE,
    Budget,
    Workload,
    estimate,
    free_bytes,
    heads_terms,
    sam_encoder_bytes,
)
from flmm.peak import LiveTensorBytes
from flmm.shapes import HeadsShape, LMMShape, model_shapes
from flmm.tiny_lmms import MODEL_TYPES
from jobs import annotate as job
from pipeline.plan import checked_batch_size

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.2


def test_live_tensor_bytes_counts_new_storages_while_they_live():
    before = torch.ones(1000)  # made before the mode: never counted, nor its views
    with LiveTensorBytes() as tracked:
        a = torch.empty(256)  # 1024 bytes
        view = a.view(16, 16)
        before[:10].add_(1)
        b = a * 2  # 1024 more
        tracked.mark("both")
        del a
        assert tracked.current == 2048  # the view keeps a's storage alive
        del view
        tracked.mark("one")
    assert (tracked.peak, tracked.current) == (2048, 1024)
    assert tracked.stages == {"both": 2048, "one": 2048}
    del b
    assert tracked.current == 0


def test_estimate_is_within_20_percent_of_the_measured_peak_for_every_family(tmp_path):
    """Every family, given phrases (B 1 and 3), a caption grounded in place and a generated
    description grounded listed: the whole peak and every stage that ran, within 20%; the
    weights exactly (the LMM built on meta from its config)."""
    out = tmp_path / "memory.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ROOT / "bench" / "memory.py"), "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    assert {r["family"] for r in rows} == set(MODEL_TYPES)
    for r in rows:
        assert r["weights_estimate"] == r["weights"], r
        assert abs(r["peak_estimate"] / r["peak"] - 1) <= TOLERANCE, r
        assert set(r["stages"]) >= {"lmm", "sam", "heads"}, r
        for stage, measured in r["stages"].items():
            assert abs(r["stages_estimate"][stage] / measured - 1) <= TOLERANCE, (stage, r)
    assert {r["mode"] for r in rows if "generate" in r["stages"]} == {"describe"}
    assert all(r["phrases"] for r in rows)  # (the tiny ones describe something to ground)


def lmm_like(layers: int, heads: int, views: int, grid: tuple[int, int]) -> LMMShape:
    """The LMM fields the heads' terms read (7B-like: 32 × 32 heads over a 24 × 24 grid)."""
    captured = layers * heads
    return LMMShape(0, 2, layers, heads, heads, 4096, 11008, 128, captured, views, grid, 0, 0, 0,
                    (), 32000)  # fmt: skip


@pytest.mark.parametrize(
    "variant, batch, phrases, views, grid, image",
    [
        ("vit_h", 1, 8, 1, (24, 24), (480, 640)),  # LLaVA-1.5-7B's grid
        ("vit_l", 2, 8, 1, (24, 24), (480, 640)),
        ("vit_l", 1, 8, 2, (24, 36), (640, 960)),  # LLaVA-NeXT: two views, padded U-Net input
        ("vit_b", 2, 4, 1, (30, 40), (1024, 1024)),
        ("vit_h", 1, 1, 1, (24, 24), (2000, 3000)),  # one phrase on a large photo
    ],
)
def test_sam_and_heads_at_real_sizes_are_within_20_percent(
    variant, batch, phrases, views, grid, image
):
    """SAM's encoder and the heads at their real sizes, run on the meta device (shapes only)
    under the same tracker: the estimate's ``sam_encoder`` and U-Net / refiner terms."""
    sam = sam_config(variant)
    lmm = lmm_like(32, 32, views, grid)
    with torch.device("meta"):
        model = build_sam(sam)
        heads = build_heads(HeadsConfig(32, 32, 4096, num_views=views), model)
    side = sam.img_size
    with torch.inference_mode(), LiveTensorBytes() as tracked:
        embeddings = model.image_encoder(torch.empty(batch, 3, side, side, device="meta"))
        tracked.mark("sam")
        maps = [torch.empty(phrases, views * 32 * 32, *grid, device="meta") for _ in range(batch)]
        hidden = [[torch.empty(3, 32, 4096, device="meta")] * phrases for _ in range(batch)]
        tracked.mark("inputs")
        held = tracked.current
        frame = (side * image[0] // max(image), side * image[1] // max(image))
        heads(maps, hidden, embeddings, [ImageGeometry.whole(*image)] * batch, [frame] * batch)
        tracked.mark("heads")
    work = heads_terms(lmm, HeadsShape(sam, 0, 0), batch, phrases, image)["unet_or_refiner"]
    measured_heads = tracked.stages["heads"] - held
    inputs = batch * 3 * side * side * 4  # the pixels, made inside the mode here
    sam_estimate = sam_encoder_bytes(sam, batch) + inputs
    assert abs(sam_estimate / tracked.stages["sam"] - 1) <= TOLERANCE
    assert abs(work / measured_heads - 1) <= TOLERANCE


@pytest.fixture(scope="module")
def toy_shapes():
    """The toy model's shapes (``models/toy``, as the job's default) and a workload."""
    spec = job.model_spec(job.parse_args([]), job.toy_model_spec())
    shapes = model_shapes(
        spec.lmm, sam_config(spec.sam_variant), spec.heads, torch.float32, image_size=(256, 256)
    )
    return shapes, Workload(phrases=4, text_tokens=32, new_tokens=16, image_size=(256, 256))


def budget_for(usable: int) -> Budget:
    """A budget whose usable bytes are ``usable`` (within a byte or so)."""
    return Budget("cpu", int((usable + RESERVE) / (1 - MARGIN)) + 2, "test")


def test_auto_never_picks_a_batch_the_estimate_says_does_not_fit(toy_shapes):
    """For budgets from one image's estimate to past the cap: the pick fits, and the next
    batch size up does not (or the pick is the cap)."""
    shapes, work = toy_shapes
    one = estimate(*shapes, work, 1).peak
    for scale in (1.0, 1.3, 2.0, 3.7, 8.0, 20.0, 100.0):
        budget = budget_for(int(one * scale))
        batch = checked_batch_size("auto", shapes, work, budget)
        assert estimate(*shapes, work, batch).peak <= budget.usable
        assert batch == MAX_BATCH or estimate(*shapes, work, batch + 1).peak > budget.usable
    assert batch == MAX_BATCH


def test_auto_picks_exactly_between_two_estimates(toy_shapes):
    shapes, work = toy_shapes
    for target in (1, 5, 17):
        low, high = (estimate(*shapes, work, b).peak for b in (target, target + 1))
        assert high > low  # the estimate grows with the batch
        budget = budget_for((low + high) // 2)
        assert checked_batch_size("auto", shapes, work, budget) == target


def test_a_batch_size_that_does_not_fit_is_refused_with_the_largest_that_does(toy_shapes):
    shapes, work = toy_shapes
    six, seven = (estimate(*shapes, work, b).peak for b in (6, 7))
    budget = budget_for((six + seven) // 2)
    assert checked_batch_size(6, shapes, work, budget) == 6
    with pytest.raises(ValueError, match=r"--batch-size 12 does not fit: .*use --batch-size 6 or"):
        checked_batch_size(12, shapes, work, budget)
    huge = budget_for(estimate(*shapes, work, 100).peak)
    assert checked_batch_size(100, shapes, work, huge) == 100  # the cap binds auto only
    small = budget_for(estimate(*shapes, work, 1).peak // 2)
    for requested in ("auto", 3):
        with pytest.raises(ValueError, match="not even one image fits"):
            checked_batch_size(requested, shapes, work, small)


def test_the_job_plans_before_loading(tmp_path, monkeypatch, capsys):
    """--batch-size auto and --device-memory reach the job's config; a size that does not fit
    fails in the config (before Ray or any model); GPU actors with no GPU here and no
    --device-memory: auto asks for it, a number goes unchecked."""
    monkeypatch.chdir(tmp_path)
    base = ["--input", "unused", "--plan-image-side", "256", "--device-memory", "2"]
    auto = job.config_of(job.parse_args([*base, "--batch-size", "auto"])).batch_size
    assert 1 <= auto < MAX_BATCH
    assert f"memory plan: batch {auto}: " in capsys.readouterr().out
    with pytest.raises(ValueError, match=f"use --batch-size {auto} or less"):
        job.config_of(job.parse_args([*base, "--batch-size", str(auto + 1)]))
    # a number for CPU actors goes unplanned (no model libraries on the driver: its start),
    # and silently
    assert job.config_of(job.parse_args(["--input", "unused", "--batch-size", "3"])).batch_size == 3
    assert "memory plan" not in capsys.readouterr().out
    if torch.cuda.is_available():
        return
    gpu = ["--input", "unused", "--gpus-per-actor", "1"]
    with pytest.raises(ValueError, match="give --device-memory"):
        job.config_of(job.parse_args([*gpu, "--batch-size", "auto"]))
    assert job.config_of(job.parse_args([*gpu, "--batch-size", "2"])).batch_size == 2
    assert "unchecked" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        job.parse_args([*base, "--batch-size", "0"])
    assert "0: at least 1" in capsys.readouterr().err


def test_free_cpu_memory_is_read():
    total = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    assert 0 < free_bytes("cpu") <= total
