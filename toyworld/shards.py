"""Toy-world scenes as shards of the input format, and the one on-disk cache of them.

Each scene is one sample in one of three forms (``MODES``): ``given``: ``<key>.png`` (lossless) +
``<key>.json`` (phrases, objects with COCO RLE masks, width, height, the toy world's attributes,
and a text with each object's spans in it for the keyword selector); ``caption``: ``<key>.png`` + ``<key>.txt``, a caption naming some of the objects
(``toyworld.captions``); ``image``: ``<key>.png`` alone. The jobs' toy defaults read the splits of
``TOY_SPLITS`` from ``out/toy/<split>/``, written on first use and again when
``TOY_SHARDS_VERSION`` (in ``out/toy/<split>/VERSION``) changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.formats import encode_rle, png_bytes
from pipeline.shards import write_shards
from toyworld.captions import make_caption, scene_text
from toyworld.scenes import EVAL_START, Scene, SceneConfig, make_scene, scene_seed

TOY_CACHE = Path("out/toy")
MODES = ("given", "caption", "image")


def scene_metadata(scene: Scene) -> dict:
    """The ``<key>.json`` of a scene. Beyond the input format's fields, objects carry the toy
    world's attributes (optional fields: shape, colour, size, centre (x, y) pixels, kinds), and
    ``caption`` is the scene's ``toyworld.captions.scene_text`` with each object's ``spans`` in
    it (what the training job trains the keyword selector on)."""
    height, width = scene.image.shape[:2]
    text = scene_text(scene)
    objects = [
        {
            "expressions": list(obj.expressions),
            "mask": encode_rle(obj.mask),
            "expression_kinds": list(obj.expression_kinds),
            "shape": obj.shape,
            "colour": obj.colour,
            "size": obj.size,
            "centre": list(obj.centre),
            "spans": [list(s) for s, o in zip(text.spans, text.objects) if o == index],
        }
        for index, obj in enumerate(scene.objects)
    ]
    return {
        "phrases": scene.phrases,
        "caption": text.text,
        "objects": objects,
        "width": width,
        "height": height,
        "scene_seed": scene.seed,
    }


def scene_sample(key: str, scene: Scene, meta: dict | None = None, mode: str = "given") -> dict:
    """The webdataset sample of a scene in ``mode`` (``MODES``): PNG + JSON (``meta``, default
    ``scene_metadata``), PNG + caption (drawn from the scene's seed), or PNG alone."""
    sample = {"__key__": key, "png": png_bytes(scene.image)}
    if mode == "given":
        meta = scene_metadata(scene) if meta is None else meta
        sample["json"] = json.dumps(meta).encode()
    elif mode == "caption":
        sample["txt"] = make_caption(scene, np.random.default_rng(scene.seed)).text.encode()
    elif mode != "image":
        raise ValueError(f"mode {mode!r}: one of {MODES}")
    return sample


def write_toy_shards(
    out_dir: str | Path,
    n_scenes: int,
    scenes_per_shard: int,
    seed: int,
    config: SceneConfig | None = None,
    split_name: str = "train",
    first_index: int = 0,
    modes: tuple[str, ...] = ("given",),
) -> list[Path]:
    """Write ``n_scenes`` toy scenes as ``out_dir/{split_name}-{000000..}.tar``; return the paths.

    The scenes are indices ``first_index, first_index + 1, …`` (held-out sets start at the toy
    world's evaluation offset ``EVAL_START``, disjoint from every training set). Scene ``index``
    has key ``f"{split_name}_{index:08d}"`` and seed ``scene_seed(seed, index)``, so the shards
    are a pure function of the arguments. ``config`` defaults to ``SceneConfig()``. Scene
    ``index`` is written in form ``modes[index % len(modes)]`` (``scene_sample``).
    """
    if n_scenes < 1:
        raise ValueError("n_scenes must be >= 1")
    config = config or SceneConfig()
    samples = (
        scene_sample(
            f"{split_name}_{index:08d}",
            make_scene(scene_seed(seed, index), config),
            mode=modes[index % len(modes)],
        )
        for index in range(first_index, first_index + n_scenes)
    )
    return write_shards(out_dir, split_name, samples, scenes_per_shard)


TOY_SHARDS_VERSION = 2  # 2: captions with spans in the JSON


@dataclass(frozen=True)
class ToySplit:
    """A split of the toy world's cached shards: ``n_scenes`` scenes of ``seed`` from scene
    index ``first_index`` on, ``scenes_per_shard`` per shard, in ``TOY_CACHE / name``, in the
    sample forms ``modes`` by turns."""

    name: str
    n_scenes: int
    scenes_per_shard: int
    seed: int
    first_index: int = 0
    modes: tuple[str, ...] = ("given",)


TOY_SPLITS = {
    split.name: split
    for split in (
        ToySplit("train", 2000, 100, seed=0),  # the toy heads' training set (jobs/train.py)
        # the annotate job's default input, all three sample forms; seed 1: unseen scenes
        ToySplit("sample", 24, 8, seed=1, modes=MODES),
        ToySplit("val", 100, 100, seed=0, first_index=EVAL_START),  # held out (jobs/evaluate.py)
    )
}


def toy_shards(name: str, cache: str | Path = TOY_CACHE, n_scenes: int | None = None) -> Path:
    """``cache/name`` holding the shards of ``TOY_SPLITS[name]`` (``n_scenes`` overrides its
    size), written only if one is missing."""
    split = TOY_SPLITS[name]
    n_scenes = n_scenes or split.n_scenes
    out_dir = Path(cache) / name
    n_shards = -(-n_scenes // split.scenes_per_shard)
    version = out_dir / "VERSION"
    current = version.is_file() and version.read_text().strip() == str(TOY_SHARDS_VERSION)
    if not current or not all((out_dir / f"{name}-{i:06d}.tar").is_file() for i in range(n_shards)):
        print(f"writing {n_scenes} toy-world {name} scenes to {out_dir}/")
        out_dir.mkdir(parents=True, exist_ok=True)
        write_toy_shards(
            out_dir,
            n_scenes,
            split.scenes_per_shard,
            split.seed,
            None,
            name,
            split.first_index,
            split.modes,
        )
        version.write_text(f"{TOY_SHARDS_VERSION}\n")
    return out_dir
