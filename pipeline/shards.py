"""WebDataset shards of the project's input format (see ``schemas/INPUT_FORMAT.md``).

Writing: toy-world scenes (``toyworld.scenes``) become ``{split}-{000000..}.tar`` shards, one
sample per scene: ``<key>.png`` (lossless) + ``<key>.json`` (phrases, objects with COCO RLE masks,
width, height). Reading: a small webdataset iterator for tests and tools; the Ray reader is
separate.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import webdataset as wds
from PIL import Image

from toyworld.scenes import Scene, SceneConfig, make_scene, scene_seed

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def encode_rle(mask: np.ndarray) -> dict:
    """COCO RLE of a bool ``[h, w]`` mask (column-major, as COCO): ``{"size": [h, w],
    "counts": str}``, JSON-ready."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """Bool ``[h, w]`` mask, in pixels of the original image, from a COCO RLE dict whose
    ``counts`` is a str (as stored in our JSON) or bytes."""
    counts = rle["counts"]
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    return mask_utils.decode({"size": list(rle["size"]), "counts": counts}).astype(bool)


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 ``[H, W, 3]`` RGB image."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def scene_metadata(scene: Scene) -> dict:
    """The ``<key>.json`` of a scene. Beyond the input format's fields, objects carry the toy
    world's attributes (optional fields: shape, colour, size, centre (x, y) pixels, kinds)."""
    height, width = scene.image.shape[:2]
    objects = [
        {
            "expressions": list(obj.expressions),
            "mask": encode_rle(obj.mask),
            "expression_kinds": list(obj.expression_kinds),
            "shape": obj.shape,
            "colour": obj.colour,
            "size": obj.size,
            "centre": list(obj.centre),
        }
        for obj in scene.objects
    ]
    return {
        "phrases": scene.phrases,
        "objects": objects,
        "width": width,
        "height": height,
        "scene_seed": scene.seed,
    }


def write_toy_shards(
    out_dir: str | Path,
    n_scenes: int,
    scenes_per_shard: int,
    seed: int,
    config: SceneConfig | None = None,
    split_name: str = "train",
    first_index: int = 0,
) -> list[Path]:
    """Write ``n_scenes`` toy scenes as ``out_dir/{split_name}-{000000..}.tar``; return the paths.

    The scenes are indices ``first_index, first_index + 1, …`` (held-out sets start at the toy
    world's evaluation offset, 1_000_000, disjoint from every training set).
    Scene ``index`` has key ``f"{split_name}_{index:08d}"`` and seed ``scene_seed(seed, index)``,
    so the shards are a pure function of the arguments (tar mtimes are fixed at 0). Shards are
    written to a hidden temp folder in ``out_dir`` and renamed into place when all are done.
    ``config`` defaults to ``SceneConfig()``.
    """
    config = config or SceneConfig()
    if n_scenes < 1 or scenes_per_shard < 1:
        raise ValueError("n_scenes and scenes_per_shard must be >= 1")
    if not split_name or any(c in split_name for c in "./"):
        raise ValueError(f"split_name must be non-empty without '.' or '/': {split_name!r}")
    out_dir = Path(out_dir)
    tmp_dir = out_dir / f".{split_name}.partial"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    pattern = str(tmp_dir / f"{split_name}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=scenes_per_shard, verbose=0, mtime=0.0) as sink:
        for index in range(first_index, first_index + n_scenes):
            scene = make_scene(scene_seed(seed, index), config)
            sink.write(
                {
                    "__key__": f"{split_name}_{index:08d}",
                    "png": png_bytes(scene.image),
                    "json": json.dumps(scene_metadata(scene)).encode("utf-8"),
                }
            )
    return move_into_place(sorted(tmp_dir.glob("*.tar")), out_dir, tmp_dir)


def cached_toy_shards(
    out_dir: str | Path,
    n_scenes: int,
    scenes_per_shard: int,
    seed: int,
    split_name: str,
    first_index: int = 0,
) -> Path:
    """``out_dir`` holding ``write_toy_shards(...)``'s shards, written only if one is missing."""
    out_dir = Path(out_dir)
    n_shards = -(-n_scenes // scenes_per_shard)
    if not all((out_dir / f"{split_name}-{i:06d}.tar").is_file() for i in range(n_shards)):
        print(f"writing {n_scenes} toy-world {split_name} scenes to {out_dir}/")
        out_dir.mkdir(parents=True, exist_ok=True)
        write_toy_shards(out_dir, n_scenes, scenes_per_shard, seed, None, split_name, first_index)
    return out_dir


def move_into_place(paths: list[Path], out_dir: Path, tmp_dir: Path) -> list[Path]:
    """Rename each finished shard from ``tmp_dir`` into ``out_dir`` and remove ``tmp_dir``."""
    final = []
    for path in paths:
        os.replace(path, out_dir / path.name)
        final.append(out_dir / path.name)
    tmp_dir.rmdir()
    return final


def read_samples(paths: Iterable[str | Path]) -> Iterator[dict]:
    """Iterate the samples of shards in order: ``{"key": str, "image": uint8 [H, W, 3] RGB,
    "meta": dict}``. ``meta`` is the ``<key>.json``, or ``{"caption": text}`` from ``<key>.txt``.
    """
    urls = [str(path) for path in paths]
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    for sample in pipeline:
        yield _decode_sample(sample)


def _decode_sample(sample: dict) -> dict:
    """Decode one raw webdataset sample (bytes per extension) into key, image and meta."""
    extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if extension is None:
        raise ValueError(f"{sample['__key__']}: no image among {IMAGE_EXTENSIONS}")
    with Image.open(io.BytesIO(sample[extension])) as image:
        rgb = np.asarray(image.convert("RGB"))
    if "json" in sample:
        meta = json.loads(sample["json"])
    elif "txt" in sample:
        meta = {"caption": sample["txt"].decode("utf-8")}
    else:
        meta = {}
    return {"key": sample["__key__"], "image": rgb, "meta": meta}
