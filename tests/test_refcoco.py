"""RefCOCO conversion (pipeline/refcoco.py, jobs/prepare_refcoco.py) on tiny fixtures written
here: real images, instances.json with polygon and RLE segmentations, a refs(unc).p. The PNG
converter's tests: test_png.py."""

import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline.decode import read_samples
from pipeline.formats import decode_rle
from pipeline.refcoco import RefcocoConfig, convert_refcoco, load_refs
from pipeline.sources import resolve_shards

ROOT = Path(__file__).resolve().parents[1]
# image id → (file name, width, height); image 4 is in instances.json but its file is missing.
IMAGES = {
    1: ("COCO_train2014_000000000001.jpg", 40, 30),
    2: ("COCO_train2014_000000000002.png", 32, 24),
    3: ("COCO_train2014_000000000003.jpg", 20, 20),
    4: ("COCO_train2014_000000000004.jpg", 16, 16),
    5: ("COCO_train2014_000000000005.png", 24, 16),
}
# split → image id → [(ref_id, ann_id, sentences)]; ann 999 does not exist.
REFS = {
    "train": {1: [(101, 11, ["man on the left", "left guy"]), (102, 12, ["the dog"])]},
    "val": {
        2: [(201, 21, ["crowd in back"]), (202, 22, ["white blob"])],
        5: [(501, 51, ["lonely triangle"])],
    },
    "testA": {
        3: [(301, 31, ["small box"]), (302, 999, ["ghost"])],
        4: [(401, 41, ["missing picture"])],
    },
}


def _crowd_mask(height, width):
    mask = np.zeros((height, width), np.uint8)
    mask[3:10, 5:20] = 1
    return mask


def _annotations():
    uncompressed = {"size": [24, 32], "counts": _uncompressed_counts(_crowd_mask(24, 32))}
    compressed = mask_utils.encode(np.asfortranarray(_crowd_mask(24, 32)[::-1].copy()))
    return [
        {
            "id": 11,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": [[2, 2, 20, 2, 20, 15, 2, 15]],
        },
        {
            "id": 12,
            "image_id": 1,
            "category_id": 2,
            "iscrowd": 0,
            "segmentation": [[25, 5, 35, 5, 35, 25], [22, 20, 30, 28, 22, 28]],
        },
        {"id": 21, "image_id": 2, "category_id": 1, "iscrowd": 1, "segmentation": uncompressed},
        {
            "id": 22,
            "image_id": 2,
            "category_id": 2,
            "iscrowd": 1,
            "segmentation": {"size": [24, 32], "counts": compressed["counts"].decode("ascii")},
        },
        {
            "id": 31,
            "image_id": 3,
            "category_id": 2,
            "iscrowd": 0,
            "segmentation": [[4, 4, 15, 4, 15, 12, 4, 12]],
        },
        {
            "id": 41,
            "image_id": 4,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": [[1, 1, 10, 1, 10, 10]],
        },
        {
            "id": 51,
            "image_id": 5,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": [[2, 2, 20, 3, 10, 14]],
        },
    ]


def _uncompressed_counts(mask):
    """COCO's uncompressed RLE counts (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    return [0] + counts if flat[0] else counts


@pytest.fixture
def refcoco_dir(tmp_path):
    """images/, instances.json and refs(unc).p of the tables above."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for image_id, (name, width, height) in IMAGES.items():
        if image_id != 4:
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / name)
    instances = {
        "images": [
            {"id": i, "file_name": n, "width": w, "height": h} for i, (n, w, h) in IMAGES.items()
        ],
        "annotations": _annotations(),
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    refs = [
        {
            "ref_id": ref_id,
            "ann_id": ann_id,
            "image_id": image_id,
            "split": split,
            "category_id": 1,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
            "sent_ids": list(range(len(sents))),
            "sentences": [
                {"sent": s, "raw": s.capitalize(), "tokens": s.split(), "sent_id": k}
                for k, s in enumerate(sents)
            ],
        }
        for split, by_image in REFS.items()
        for image_id, image_refs in by_image.items()
        for ref_id, ann_id, sents in image_refs
    ]
    with open(tmp_path / "refs(unc).p", "wb") as file:
        pickle.dump(refs, file, protocol=2)
    return tmp_path


def _config(root, out, **kw):
    return RefcocoConfig(
        refs=root / "refs(unc).p",
        instances=root / "instances.json",
        images=root / "images",
        dataset="refcoco",
        split_by="unc",
        out=out,
        **kw,
    )


def raw_images(paths):
    """{key: image bytes} straight from the tars (tarfile, not the project's reader); also
    used by test_png.py."""
    raw = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                if extension != "json":
                    raw[key] = tar.extractfile(member).read()
    return raw


def test_conversion_writes_one_sample_per_image_with_exact_masks_and_bytes(refcoco_dir, tmp_path):
    out = tmp_path / "out"
    stats = convert_refcoco(_config(refcoco_dir, out, samples_per_shard=1))
    coco = COCO(str(refcoco_dir / "instances.json"))
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "refcoco_unc-testA-000000.tar",
        "refcoco_unc-train-000000.tar",
        "refcoco_unc-val-000000.tar",
        "refcoco_unc-val-000001.tar",
    ]
    for split, by_image in REFS.items():
        samples = list(read_samples(stats[split].shards))
        raw = raw_images(stats[split].shards)
        expected_ids = [i for i in sorted(by_image) if i != 4]
        assert [s["key"] for s in samples] == [f"{split}_{i:012d}" for i in expected_ids]
        for sample, image_id in zip(samples, expected_ids):
            name, width, height = IMAGES[image_id]
            meta = sample["meta"]
            assert "." not in sample["key"] and "/" not in sample["key"]
            assert raw[sample["key"]] == (refcoco_dir / "images" / name).read_bytes()
            assert (meta["width"], meta["height"], meta["image_id"]) == (width, height, image_id)
            kept = [r for r in by_image[image_id] if r[1] != 999]
            assert [o["ref_id"] for o in meta["objects"]] == [r[0] for r in kept]
            assert [o["ann_id"] for o in meta["objects"]] == [r[1] for r in kept]
            assert [o["expressions"] for o in meta["objects"]] == [r[2] for r in kept]
            assert meta["phrases"] == [s for r in kept for s in r[2]]
            for obj in meta["objects"]:
                ann = coco.anns[obj["ann_id"]]
                assert obj["category"] == coco.cats[ann["category_id"]]["name"]
                assert obj["mask"]["size"] == [height, width]
                assert isinstance(obj["mask"]["counts"], str)
                expected = coco.annToMask(ann).astype(bool)
                assert expected.any()
                np.testing.assert_array_equal(decode_rle(obj["mask"]), expected)


def test_missing_image_and_missing_annotation_are_skipped_and_counted(refcoco_dir, tmp_path):
    stats = convert_refcoco(_config(refcoco_dir, tmp_path / "out"))
    test_a = stats["testA"]
    assert (test_a.images, test_a.objects, test_a.expressions) == (1, 1, 1)
    assert test_a.skipped_images == 1
    assert sorted((s["ref_id"], s["reason"]) for s in test_a.skipped) == [
        (302, "missing annotation"),
        (401, "missing image file"),
    ]
    assert (stats["train"].images, stats["train"].objects, stats["train"].expressions) == (1, 2, 3)
    assert (stats["val"].images, stats["val"].objects, stats["val"].skipped) == (2, 3, [])
    written = json.loads((tmp_path / "out" / "refcoco_unc-testA.stats.json").read_text())
    assert written["skipped_reasons"] == {"missing annotation": 1, "missing image file": 1}
    assert "skipped 1 images, 2 objects" in test_a.summary()


def test_cli_converts_chosen_splits_and_replaces_an_earlier_run(refcoco_dir, tmp_path):
    out = tmp_path / "out"
    convert_refcoco(_config(refcoco_dir, out, samples_per_shard=1))
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "prepare_refcoco.py"),
            "--refs",
            str(refcoco_dir / "refs(unc).p"),
            "--instances",
            str(refcoco_dir / "instances.json"),
            "--images",
            str(refcoco_dir / "images"),
            "--dataset",
            "refcoco",
            "--split-by",
            "unc",
            "--out",
            str(out),
            "--splits",
            "val,testA",
            "--samples-per-shard",
            "5",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "refcoco_unc val: 2 images, 3 objects, 3 expressions" in run.stdout
    assert "refcoco_unc testA: 1 images" in run.stdout and "missing image file: 1" in run.stdout
    assert not (out / "refcoco_unc-val-000001.tar").exists()  # stale shard of the first run
    assert (out / "refcoco_unc-train-000000.tar").exists()  # a split not asked for is untouched
    assert len(list(read_samples([out / "refcoco_unc-val-000000.tar"]))) == 2
    assert not list(out.glob(".*"))  # no temp folder left


def test_unknown_split_is_an_error(refcoco_dir, tmp_path):
    with pytest.raises(ValueError, match="testC"):
        convert_refcoco(_config(refcoco_dir, tmp_path / "out", splits=("testC",)))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_malicious_refs_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "payload": _Exploit(str(marker))}], protocol=2))
    with pytest.raises(ValueError, match="refusing to load"):
        load_refs(path)
    assert not marker.exists()


def test_an_annotation_pycocotools_cannot_read_is_skipped_not_fatal(refcoco_dir, tmp_path):
    instances = json.loads((refcoco_dir / "instances.json").read_text())
    next(a for a in instances["annotations"] if a["id"] == 51)["segmentation"] = [[1, 2]]
    (refcoco_dir / "instances.json").write_text(json.dumps(instances))
    stats = convert_refcoco(_config(refcoco_dir, tmp_path / "out", splits=("val",)))["val"]
    assert (stats.images, stats.objects, stats.skipped_images) == (1, 2, 1)
    assert [(s["ref_id"], s["reason"]) for s in stats.skipped] == [
        (501, "bad segmentation (Exception)")
    ]


def test_cli_writes_shards_to_s3_as_it_writes_them_locally(refcoco_dir, tmp_path, s3_bucket):
    """``--out s3://...`` (the session's moto server): the same shard bytes as a local run, the
    stats file beside them, and a rerun removes the shards of the first that it did not write."""
    import pyarrow.fs as pafs

    def cli(out: str, per_shard: int) -> None:
        args = ["--refs", str(refcoco_dir / "refs(unc).p"), "--dataset", "refcoco"]
        args += ["--instances", str(refcoco_dir / "instances.json"), "--split-by", "unc"]
        args += ["--images", str(refcoco_dir / "images"), "--splits", "val"]
        args += ["--out", out, "--samples-per-shard", str(per_shard)]
        script = str(ROOT / "jobs" / "prepare_refcoco.py")
        cmd = [sys.executable, script, *args]
        run = subprocess.run(cmd, check=False, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr

    uri = f"s3://{s3_bucket}/refcoco"
    cli(uri, 1)
    fs, root = pafs.FileSystem.from_uri(uri)

    def names() -> list[str]:
        infos = fs.get_file_info(pafs.FileSelector(root))
        return sorted(i.base_name for i in infos if not i.base_name.startswith("."))

    assert names() == [f"refcoco_unc-val-00000{i}.tar" for i in range(2)] + [
        "refcoco_unc-val.stats.json"
    ]
    cli(uri, 5)
    cli(str(tmp_path / "local"), 5)
    assert names() == ["refcoco_unc-val-000000.tar", "refcoco_unc-val.stats.json"]
    for name in names():
        with fs.open_input_stream(f"{root}/{name}") as remote:
            assert remote.read() == (tmp_path / "local" / name).read_bytes(), name
    assert len(list(read_samples(resolve_shards([uri])))) == 2
