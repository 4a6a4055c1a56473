"""RefCOCO and PNG conversion (pipeline/refcoco.py, pipeline/png.py, jobs/prepare_refcoco.py) on
tiny fixtures written here: real images, instances.json with polygon and RLE segmentations, a refs(unc).p; and a
PNG split: panoptic JSON, RGB-encoded panoptic label PNGs, png_coco_val2017.json."""

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
from pipeline.png import PngConfig, convert_png
from pipeline.refcoco import RefcocoConfig, convert_refcoco, load_refs

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


def _raw_images(paths):
    """{key: image bytes} straight from the tars."""
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
        raw = _raw_images(stats[split].shards)
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


# --- COCO Panoptic Narrative Grounding (PNG) -----------------------------------------------------
# A val2017 split written here in PNG's layout (github.com/BCV-Uniandes/PNG README): images/,
# panoptic_val2017.json, panoptic_segmentation/ (RGB label PNGs, id = R + 256 G + 256² B),
# png_coco_val2017.json. Image 3's file and image 5's label PNG are missing.
PNG_IMAGES = {
    1: ("000000000001.jpg", 40, 30),
    2: ("000000000002.png", 32, 24),
    3: ("000000000003.jpg", 20, 20),
    5: ("000000000005.jpg", 16, 16),
}
SKY = 9 + 256 * 7 + 256**2 * 5  # uses all three channels
# image id → {segment id: (category id, painted rows, painted cols)}; 233 and 1001 share R = 233;
# segment 66 of image 2 is in segments_info but has no pixel.
PNG_SEGMENTS = {
    1: {
        233: (1, slice(10, 28), slice(2, 12)),
        1001: (2, slice(18, 28), slice(20, 34)),
        SKY: (3, slice(0, 8), slice(0, 40)),
    },
    2: {77: (2, slice(4, 20), slice(6, 30)), 66: (2, slice(0, 0), slice(0, 0))},
    3: {9: (1, slice(2, 9), slice(2, 9))},
    5: {9: (1, slice(2, 9), slice(2, 9))},
}
PNG_NARRATIVES = [
    {
        "image_id": 1,
        "annotator_id": 7,
        "caption": "In this picture a man and his dog under the blue sky a ghost trees",
        "segments": [
            {"utterance": "In this picture", "segment_ids": [], "noun": False, "plural": False},
            {
                "utterance": " a man and his dog ",
                "segment_ids": [233, 1001],
                "noun": True,
                "plural": True,
            },
            {"utterance": "under", "segment_ids": [], "noun": False, "plural": False},
            {"utterance": "the blue sky", "segment_ids": [SKY], "noun": True, "plural": False},
            {"utterance": "a ghost", "segment_ids": [4242], "noun": True, "plural": False},
            {"utterance": "trees", "segment_ids": [], "noun": True, "plural": True},
        ],
    },
    "not a narrative",
    {
        "image_id": "2",
        "caption": "the dog a cloud a shadow",
        "segments": [
            {"utterance": "the dog", "segment_ids": ["77"]},  # no noun flag: counts as a noun
            {"utterance": "a cloud", "segment_ids": [77], "noun": False},
            {"utterance": "a shadow", "segment_ids": [66], "noun": True},
        ],
    },
    {"image_id": 3, "caption": "a car", "segments": [{"utterance": "a car", "segment_ids": [9]}]},
    {"image_id": 5, "caption": "a boat", "segments": [{"utterance": "a boat", "segment_ids": [9]}]},
    {
        "image_id": "1",
        "caption": "the man",
        "segments": [
            {"utterance": "the man", "segment_ids": ["233"], "noun": True, "plural": False}
        ],
    },
]
# (image id, objects as (expression, segment ids)), in sample order
PNG_EXPECTED = [
    (1, [("a man and his dog", [233, 1001]), ("the blue sky", [SKY]), ("the man", [233])]),
    (2, [("the dog", [77])]),
]
PNG_CATEGORIES = {1: "person", 2: "dog", 3: "sky-other-merged"}


def _id_map(image_id):
    _, width, height = PNG_IMAGES[image_id]
    ids = np.zeros((height, width), np.int64)
    for segment_id, (_, rows, cols) in PNG_SEGMENTS[image_id].items():
        ids[rows, cols] = segment_id
    return ids


@pytest.fixture
def png_dir(tmp_path):
    root = tmp_path / "png"
    (root / "images").mkdir(parents=True)
    (root / "panoptic_segmentation").mkdir()
    rng = np.random.default_rng(1)
    for image_id, (name, width, height) in PNG_IMAGES.items():
        if image_id != 3:
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / name)
        if image_id != 5:
            ids = _id_map(image_id)
            rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256**2], axis=-1).astype(np.uint8)
            Image.fromarray(rgb).save(root / "panoptic_segmentation" / f"{image_id:012d}.png")
    panoptic = {
        "images": [
            {"id": i, "file_name": n, "width": w, "height": h}
            for i, (n, w, h) in PNG_IMAGES.items()
        ],
        "annotations": [
            {
                "image_id": image_id,
                "file_name": f"{image_id:012d}.png",
                "segments_info": [
                    {"id": segment_id, "category_id": category, "iscrowd": 0}
                    for segment_id, (category, _, _) in segments.items()
                ],
            }
            for image_id, segments in PNG_SEGMENTS.items()
        ],
        "categories": [
            {"id": i, "name": name, "isthing": int(i < 3)} for i, name in PNG_CATEGORIES.items()
        ],
    }
    (root / "panoptic_val2017.json").write_text(json.dumps(panoptic))
    (root / "png_coco_val2017.json").write_text(json.dumps(PNG_NARRATIVES))
    return root


def _png_config(root, out, **kw):
    return PngConfig(
        narratives=root / "png_coco_val2017.json",
        panoptic=root / "panoptic_val2017.json",
        panoptic_masks=root / "panoptic_segmentation",
        images=root / "images",
        split="val2017",
        out=out,
        **kw,
    )


def test_png_conversion_unions_the_segments_of_each_grounded_phrase(png_dir, tmp_path):
    out = tmp_path / "out"
    stats = convert_png(_png_config(png_dir, out, samples_per_shard=1))["val2017"]
    assert [p.name for p in stats.shards] == [
        "png_coco-val2017-000000.tar",
        "png_coco-val2017-000001.tar",
    ]
    samples = list(read_samples(stats.shards))
    raw = _raw_images(stats.shards)
    assert [s["key"] for s in samples] == [f"val2017_{i:012d}" for i, _ in PNG_EXPECTED]
    for sample, (image_id, expected) in zip(samples, PNG_EXPECTED):
        name, width, height = PNG_IMAGES[image_id]
        meta = sample["meta"]
        assert raw[sample["key"]] == (png_dir / "images" / name).read_bytes()
        assert (meta["width"], meta["height"], meta["image_id"]) == (width, height, image_id)
        assert meta["phrases"] == [text for text, _ in expected]
        assert [o["expressions"] for o in meta["objects"]] == [[text] for text, _ in expected]
        assert [o["segment_ids"] for o in meta["objects"]] == [ids for _, ids in expected]
        ids = _id_map(image_id)
        for obj, (_, segment_ids) in zip(meta["objects"], expected):
            assert obj["mask"]["size"] == [height, width] and isinstance(obj["mask"]["counts"], str)
            painted = np.zeros((height, width), bool)
            for segment_id in segment_ids:
                _, rows, cols = PNG_SEGMENTS[image_id][segment_id]
                painted[rows, cols] = True
            assert painted.any()
            np.testing.assert_array_equal(painted, np.isin(ids, segment_ids))
            np.testing.assert_array_equal(decode_rle(obj["mask"]), painted)
            assert obj["categories"] == [
                PNG_CATEGORIES[PNG_SEGMENTS[image_id][i][0]] for i in segment_ids
            ]
    first = samples[0]["meta"]
    assert [o["plural"] for o in first["objects"]] == [True, False, False]
    assert [(o["narrative"], o["segment"]) for o in first["objects"]] == [(0, 1), (0, 3), (5, 0)]
    assert first["narratives"] == [PNG_NARRATIVES[0]["caption"], "the man"]


def test_png_skips_are_counted_and_ungrounded_pieces_are_not_skips(png_dir, tmp_path):
    stats = convert_png(_png_config(png_dir, tmp_path / "out"))["val2017"]
    assert (stats.images, stats.objects, stats.expressions) == (2, 4, 4)
    assert (stats.narratives, stats.ungrounded, stats.skipped_images) == (6, 4, 2)
    assert [(s["image_id"], s["narrative"], s["segment"], s["reason"]) for s in stats.skipped] == [
        (None, 1, None, "malformed narrative"),
        (1, 0, 4, "segment not in panoptic annotation"),
        (2, 2, 2, "empty mask"),
        (3, 3, 0, "missing image file"),
        (5, 4, 0, "missing panoptic label file"),
    ]
    written = json.loads((tmp_path / "out" / "png_coco-val2017.stats.json").read_text())
    assert (written["skipped_objects"], written["ungrounded_phrases"], written["narratives"]) == (
        5,
        4,
        6,
    )
    assert written["shards"] == ["png_coco-val2017-000000.tar"]
    assert "skipped 2 images, 5 phrases" in stats.summary()


def test_png_cli_infers_the_split_and_refuses_refcoco_flags(png_dir, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(ROOT / "jobs" / "prepare_refcoco.py"),
        "--dataset",
        "png",
        "--narratives",
        str(png_dir / "png_coco_val2017.json"),
        "--panoptic",
        str(png_dir / "panoptic_val2017.json"),
        "--panoptic-masks",
        str(png_dir / "panoptic_segmentation"),
        "--images",
        str(png_dir / "images"),
        "--out",
        str(out),
    ]
    run = subprocess.run(command, check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "png_coco val2017: 2 images, 4 objects, 4 expressions, 1 shards" in run.stdout
    assert "(5 phrases skipped, see *.stats.json)" in run.stdout
    assert len(list(read_samples([out / "png_coco-val2017-000000.tar"]))) == 2
    assert not list(out.glob(".*"))
    refused = subprocess.run(
        [*command, "--split-by", "unc"], check=False, capture_output=True, text=True
    )
    assert refused.returncode == 2 and "--split-by: not for --dataset png" in refused.stderr
