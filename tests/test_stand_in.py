"""The stand-in model stage (``pipeline.stand_in``, ``AnnotateConfig.stand_in_s``) that
``bench/scale.py --stand-in`` runs 1 → 32 of: it must keep the model stage's contract, so that
the real readers, writers and commits downstream of it are what the benchmark measures."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
from annotate_inputs import MIXED, MIXED_EXPECTED, write_good_shards, write_mixed_shard

from pipeline.annotate import AnnotateConfig, run_annotation
from pipeline.sources import iter_tar_samples
from pipeline.spec import ModelSpec
from pipeline.stand_in import NOT_GROUNDED, plausible_mask
from pipeline.writer import OutputDir

ROOT = Path(__file__).resolve().parents[1]


def test_the_stand_in_module_imports_no_torch():
    """32 stand-in actors share this box's 2 cores: each must stay a light process."""
    code = "import sys, pipeline.stand_in; print('torch' in sys.modules)"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert run.stdout.strip() == "False"


def test_the_plausible_mask_is_an_object_inside_the_image():
    counts, box = plausible_mask(60, 80)
    mask = mask_utils.decode({"size": [60, 80], "counts": counts.encode()})
    assert mask.shape == (60, 80) and 0.1 < mask.mean() < 0.3  # π/4 · 0.5 · 0.45 ≈ 0.18
    x, y, w, h = box
    assert 0 < x < x + w < 80 and 0 < y < y + h < 60


def test_stand_in_actors_commit_every_key_once_through_the_real_writers(ray_session, tmp_path):
    inputs = tmp_path / "in"
    good = write_good_shards(inputs, 6, 5)  # one or two given phrases per sample
    write_mixed_shard(inputs / "mixed-000000.tar")  # error rows, captions, bare images
    config = AnnotateConfig(
        (str(inputs),), str(tmp_path / "out"), ModelSpec("stand-in", "tiny"), batch_size=4,
        actors=3, cpus_per_actor=0.0, preview_images=0, stand_in_s=0.05,
    )  # fmt: skip
    summary = run_annotation(config)
    assert not summary.failed and len(summary.done) == 7
    out = OutputDir(config.output)
    expected = Counter(
        k for p in sorted(inputs.glob("*.tar")) for k, _, _ in iter_tar_samples(str(p))
    )
    keys = Counter()
    for shard in summary.done:
        keys.update(out.read_table("samples", shard).column("key").to_pylist())
        assert out.read_done(shard)["timings"]["model_s"] >= 0.05  # at least one batch slept
    assert keys == expected and set(keys.values()) == {1}

    phrases = sum(1 + i % 2 for i in range(5)) * len(good)  # write_good_shards' phrases
    phrases += sum(len(json.loads(files["json"])["phrases"]) for files, s, _ in MIXED.values()
                   if s == "ok")  # fmt: skip
    annotations = pq.read_table(out.path("annotations", ""))
    assert annotations.num_rows == summary.annotations == phrases
    for row in annotations.slice(0, 5).to_pylist():
        mask = mask_utils.decode({**row["mask"], "counts": row["mask"]["counts"].encode()})
        assert mask.shape == (row["height"], row["width"]) and mask.any()

    mixed = {r["key"]: r for r in out.read_table("samples", "mixed-000000").to_pylist()}
    for key, (status, kind) in MIXED_EXPECTED.items():
        if kind == "no_selector":  # a caption or a bare image: ok, nothing grounded, said so
            assert mixed[key]["status"] == "ok" and NOT_GROUNDED in mixed[key]["warning"]
        else:
            assert (mixed[key]["status"], mixed[key]["error_kind"]) == (status, kind)
