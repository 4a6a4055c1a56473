"""The toy world: scenes are deterministic, masks are exact, expressions refer to one object, and
WebDataset shards round-trip images and masks losslessly."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from pipeline.decode import read_samples
from pipeline.formats import decode_rle
from toyworld.scenes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SceneConfig,
    make_scene,
    render_shape_mask,
    scene_seed,
)
from toyworld.shards import write_toy_shards

CONFIG = SceneConfig()
N_SCENES = 300


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(scene_seed(7, i), CONFIG) for i in range(N_SCENES)]


def test_same_seed_gives_identical_scene_and_different_seeds_differ():
    a, b, c = make_scene(123), make_scene(123), make_scene(124)
    assert a.image.tobytes() == b.image.tobytes()
    assert [o.mask.tobytes() for o in a.objects] == [o.mask.tobytes() for o in b.objects]
    assert [o.expressions for o in a.objects] == [o.expressions for o in b.objects]
    assert a.image.shape != c.image.shape or a.image.tobytes() != c.image.tobytes()
    assert scene_seed(0, 1) != scene_seed(1, 0)


def test_visible_masks_are_exact_disjoint_and_at_least_half_visible(scenes):
    palette = dict(COLOURS)
    for scene in scenes:
        height, width = scene.image.shape[:2]
        full = [
            render_shape_mask(o.shape, o.centre, o.radius, height, width) for o in scene.objects
        ]
        covered = np.zeros((height, width), dtype=bool)
        for obj, full_mask in reversed(list(zip(scene.objects, full))):
            assert obj.mask.shape == (height, width) and obj.mask.dtype == bool
            # Later objects cover earlier ones: visible = full minus everything drawn later.
            np.testing.assert_array_equal(obj.mask, full_mask & ~covered)
            covered |= full_mask
            assert full_mask.sum() == obj.area
            assert obj.mask.sum() >= CONFIG.min_visible_fraction * obj.area
            assert (scene.image[obj.mask] == palette[obj.colour]).all()
        assert np.sum([o.mask for o in scene.objects], axis=0).max() <= 1


def test_background_never_carries_an_object_colour(scenes):
    for scene in scenes:
        background = ~np.any([o.mask for o in scene.objects], axis=0)
        pixels = _pack_rgb(scene.image[background])
        assert not np.isin(pixels, _pack_rgb(np.array([rgb for _, rgb in COLOURS]))).any()


def test_objects_of_the_same_colour_never_touch(scenes):
    for scene in scenes:
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                if a.colour == b.colour:
                    assert not (_dilate(a.mask) & b.mask).any()


def test_every_expression_refers_to_exactly_its_object(scenes):
    for scene in scenes:
        assert len(scene.phrases) == len(set(scene.phrases))
        for obj in scene.objects:
            assert len(obj.expressions) >= 1
            assert len(obj.expressions) == len(obj.expression_kinds)
            assert f"the {obj.size} {obj.colour} {obj.shape}" in obj.expressions
            for expression in obj.expressions:
                matches = [o for o in scene.objects if _matches(o, expression, scene)]
                assert matches == [obj], expression


def test_several_expression_kinds_occur(scenes):
    kinds = collections.Counter(k for s in scenes for o in s.objects for k in o.expression_kinds)
    expected = ["size_colour_shape", "colour_shape", "size_shape", "shape", "colour"]
    for kind in expected + ["size_colour", "shape_position", "position"]:
        assert kinds[kind] >= 20, kinds
    words = " ".join(p for s in scenes for p in s.phrases)
    assert all(where in words for where in POSITIONS)
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert {s.background for s in scenes} == set(CONFIG.backgrounds)


def test_image_sizes_vary_and_are_mostly_non_square(scenes):
    sizes = [s.image.shape[:2] for s in scenes]
    assert all(CONFIG.min_side <= v <= CONFIG.max_side for hw in sizes for v in hw)
    assert all(max(h, w) <= CONFIG.max_aspect * min(h, w) for h, w in sizes)
    assert len(set(sizes)) > N_SCENES // 2
    assert sum(h != w for h, w in sizes) >= 0.9 * N_SCENES
    assert all(s.image.dtype == np.uint8 and s.image.shape[2] == 3 for s in scenes)


def test_shards_round_trip_images_and_masks(tmp_path):
    paths = write_toy_shards(tmp_path, 7, 4, seed=3, config=CONFIG, split_name="val")
    assert [p.name for p in paths] == ["val-000000.tar", "val-000001.tar"]
    assert sorted(tmp_path.iterdir()) == paths
    samples = list(read_samples(paths))
    assert len(samples) == 7
    keys = [s["key"] for s in samples]
    assert len(set(keys)) == 7 and not any("." in k for k in keys)
    for index, sample in enumerate(samples):
        scene = make_scene(scene_seed(3, index), CONFIG)
        meta = sample["meta"]
        np.testing.assert_array_equal(sample["image"], scene.image)
        assert (meta["height"], meta["width"]) == scene.image.shape[:2]
        assert meta["phrases"] == [e for o in meta["objects"] for e in o["expressions"]]
        assert meta["phrases"] == scene.phrases
        for stored, obj in zip(meta["objects"], scene.objects, strict=True):
            assert isinstance(stored["mask"]["counts"], str)
            np.testing.assert_array_equal(decode_rle(stored["mask"]), obj.mask)
        # the selector's text: each object's spans in the caption name that object
        text = meta["caption"]
        assert any(o["spans"] for o in meta["objects"])
        for stored, obj in zip(meta["objects"], scene.objects):
            for start, end in stored["spans"]:
                named = text[start:end]
                assert (
                    named in obj.expressions or named == f"the {obj.size} {obj.colour} {obj.shape}"
                )


def test_shards_are_byte_identical_across_runs(tmp_path):
    first = write_toy_shards(tmp_path / "a", 3, 2, seed=5, split_name="train")
    second = write_toy_shards(tmp_path / "b", 3, 2, seed=5, split_name="train")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def _pack_rgb(pixels: np.ndarray) -> np.ndarray:
    """``[..., 3]`` uint8 RGB as one int per pixel."""
    pixels = pixels.astype(np.int64)
    return pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """``mask`` [H, W] grown by one pixel in the 8-neighbourhood."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    grown = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy : dy + height, dx : dx + width]
    return grown


def _matches(obj, expression: str, scene) -> bool:
    """Whether ``expression`` describes ``obj``, read from its words alone: every named attribute
    is the object's, and a named position means the object's centre is the extreme one by the
    configured margin."""
    words = expression.split()
    attributes = {obj.size, obj.colour, obj.shape}
    vocabulary = {"small", "big", *dict(COLOURS), *SHAPES}
    if not all(w in attributes for w in words if w in vocabulary):
        return False
    for where in POSITIONS:
        if expression.endswith(where):
            return _is_extreme(obj, where, scene)
    return True


def _is_extreme(obj, where: str, scene) -> bool:
    """Whether ``obj`` lies ``where`` (e.g. "on the left") of every other object, by the margin."""
    height, width = scene.image.shape[:2]
    axis = 0 if where in ("on the left", "on the right") else 1
    sign = 1 if where in ("on the left", "at the top") else -1
    margin = CONFIG.position_margin * (width, height)[axis]
    others = [o.centre[axis] for o in scene.objects if o is not obj]
    return all(sign * (other - obj.centre[axis]) >= margin for other in others)


def test_a_toy_cache_of_an_older_format_is_written_again(tmp_path):
    from toyworld.shards import TOY_SHARDS_VERSION, toy_shards

    directory = toy_shards("val", tmp_path, n_scenes=2)
    (shard,) = directory.glob("*.tar")
    assert (directory / "VERSION").read_text().strip() == str(TOY_SHARDS_VERSION)
    first = shard.read_bytes()
    shard.write_bytes(b"stale")  # an older cache: same names, other content, older VERSION
    (directory / "VERSION").write_text("1\n")
    toy_shards("val", tmp_path, n_scenes=2)
    assert shard.read_bytes() == first
    assert (directory / "VERSION").read_text().strip() == str(TOY_SHARDS_VERSION)
    shard.write_bytes(b"kept")  # the current version is not written again
    toy_shards("val", tmp_path, n_scenes=2)
    assert shard.read_bytes() == b"kept"
