"""COCO Panoptic Narrative Grounding conversion (pipeline/png.py, jobs/prepare_refcoco.py
--dataset png) on a tiny val2017 split written here in PNG's layout (github.com/BCV-Uniandes/PNG
README): images/, panoptic_val2017.json, panoptic_segmentation/ (RGB label PNGs, id = R + 256 G +
256² B), png_coco_val2017.json. Image 3's file and image 5's label PNG are missing."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_refcoco import raw_images

from pipeline.decode import read_samples
from pipeline.formats import decode_rle
from pipeline.png import PngConfig, convert_png, narrative_queries, phrase_kinds

ROOT = Path(__file__).resolve().parents[1]
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
    {  # the caption's spacing differs from its pieces'
        "image_id": 2,
        "caption": "A dog  sleeps.",
        "segments": [
            {"utterance": "A dog", "segment_ids": [77], "plural": False},
            {"utterance": " sleeps.", "segment_ids": []},
        ],
    },
]
# (image id, objects as (expression, segment ids)), in sample order
PNG_EXPECTED = [
    (1, [("a man and his dog", [233, 1001]), ("the blue sky", [SKY]), ("the man", [233])]),
    (2, [("the dog", [77]), ("a cloud", [77]), ("A dog", [77])]),
]
PNG_CATEGORIES = {1: "person", 2: "dog", 3: "sky-other-merged"}


def _id_map(image_id):
    _, width, height = PNG_IMAGES[image_id]
    ids = np.zeros((height, width), np.int64)
    for segment_id, (_, rows, cols) in PNG_SEGMENTS[image_id].items():
        ids[rows, cols] = segment_id
    return ids


def write_png_dir(root: Path) -> Path:
    """The fixture split in PNG's layout under ``root`` (see the module)."""
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


@pytest.fixture
def png_dir(tmp_path):
    return write_png_dir(tmp_path / "png")


def png_config(root, out, **kw):
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
    stats = convert_png(png_config(png_dir, out, samples_per_shard=1))["val2017"]
    assert [p.name for p in stats.shards] == [
        "png_coco-val2017-000000.tar",
        "png_coco-val2017-000001.tar",
    ]
    samples = list(read_samples(stats.shards))
    raw = raw_images(stats.shards)
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
    # the first narrative is the caption; its phrases' spans in it, by hand: "a man and his dog"
    # at 16 (the utterance's spaces trimmed), "the blue sky" at 40; "the man" is another's
    caption = PNG_NARRATIVES[0]["caption"]
    assert first["caption"] == caption
    assert [o.get("spans") for o in first["objects"]] == [[[16, 33]], [[40, 52]], None]
    assert caption[16:33] == "a man and his dog" and caption[40:52] == "the blue sky"
    assert samples[1]["meta"]["caption"] == "the dog a cloud a shadow"
    assert [o.get("spans") for o in samples[1]["meta"]["objects"]] == [[[0, 7]], [[8, 15]], None]


def test_png_samples_keep_every_narrative_with_its_spans_in_place_and_phrase_kinds(
    png_dir, tmp_path
):
    """F-LMM's way (flmm/datasets/png.py): each narrative whole (its pieces' utterances, stripped,
    joined by a space), every piece with segment ids grounded in place (``noun`` not read: "a
    cloud" is grounded, its flag kept); things and plurals as F-LMM splits them."""
    stats = convert_png(png_config(png_dir, tmp_path / "out"))["val2017"]
    first, second = (s["meta"] for s in read_samples(stats.shards))
    text = "In this picture a man and his dog under the blue sky a ghost trees"
    assert first["narrative_ids"] == [0, 5]
    assert first["narrative_texts"] == [text, "the man"]
    assert [o["narrative_span"] for o in first["objects"]] == [[16, 33], [40, 52], [0, 7]]
    assert narrative_queries(first) == [
        (text, [(0, (16, 33)), (1, (40, 52))]),
        ("the man", [(2, (0, 7))]),
    ]
    # by hand: "the blue sky" is segment SKY of category 3 (stuff); "a man and his dog" is
    # plural (a thing, whatever its segments); "the man" is a person (a thing)
    assert [o["isthing"] for o in first["objects"]] == [[True, True], [False], [True]]
    assert phrase_kinds(first) == ([True, False, True], [True, False, False])

    assert second["narrative_ids"] == [2, 6]
    assert second["narrative_texts"] == ["the dog a cloud a shadow", "A dog sleeps."]
    assert [o["noun"] for o in second["objects"]] == [True, False, True]
    assert narrative_queries(second) == [
        ("the dog a cloud a shadow", [(0, (0, 7)), (1, (8, 15))]),
        ("A dog sleeps.", [(2, (0, 5))]),
    ]
    # plural missing or false: singular; "the dog" (category 2) is a thing
    assert phrase_kinds(second) == ([True, True, True], [False, False, False])
    assert narrative_queries({"objects": []}) is None
    broken = {**second, "objects": [{**second["objects"][0], "narrative_span": [0, 99]}]}
    with pytest.raises(ValueError, match="not inside its text"):
        narrative_queries(broken)


def test_png_skips_are_counted_and_ungrounded_pieces_are_not_skips(png_dir, tmp_path):
    stats = convert_png(png_config(png_dir, tmp_path / "out"))["val2017"]
    assert (stats.images, stats.objects, stats.expressions) == (2, 6, 6)
    assert (stats.narratives, stats.ungrounded, stats.skipped_images) == (7, 4, 2)
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
        7,
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
    assert "png_coco val2017: 2 images, 6 objects, 6 expressions, 1 shards" in run.stdout
    assert "(5 phrases skipped, see *.stats.json)" in run.stdout
    assert len(list(read_samples([out / "png_coco-val2017-000000.tar"]))) == 2
    assert not list(out.glob(".*"))
    refused = subprocess.run(
        [*command, "--split-by", "unc"], check=False, capture_output=True, text=True
    )
    assert refused.returncode == 2 and "--split-by: not for --dataset png" in refused.stderr
