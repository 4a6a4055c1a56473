"""RefCOCO / RefCOCO+ / RefCOCOg → WebDataset shards of the project's input format.

RefCOCO input, the standard layout of the ``refer`` toolkit:

- ``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p``: a pickled list of refs, each
  ``{ref_id, ann_id, image_id, split, sentences: [{sent, raw, tokens, sent_id}], category_id,
  file_name, sent_ids}``. Loaded with a data-only unpickler (no classes, no functions).
- COCO ``instances.json``: ``images`` (``id``, ``file_name``, ``height``, ``width``),
  ``annotations`` (``id``, ``image_id``, ``category_id``, ``segmentation`` as polygons or RLE),
  ``categories``.
- the COCO images directory holding ``images[].file_name``.

RefCOCO output (``schemas/INPUT_FORMAT.md``): per split, shards
``{dataset}_{split_by}-{split}-{000000..}.tar`` with one sample per image of that split, key
``f"{split}_{image_id:012d}"``: the original image bytes as they are, and a JSON with every referred
object of the image (all its ``sent`` expressions, its mask as COCO RLE in the original image
frame, ``ann_id``, ``ref_id``, ``category``), ``phrases`` (all expressions, flattened in object
order), ``width``, ``height``, ``image_id``. Beside the shards,
``{dataset}_{split_by}-{split}.stats.json`` lists the counts and every skipped ref with its reason.

Shared with the PNG converter: ``pipeline.coco``.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

from pipeline.coco import (
    SplitStats,
    check_name,
    image_sample,
    read_image,
    segmentation_rle,
    write_split_shards,
)
from pipeline.progress import track

REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


@dataclass(frozen=True)
class RefcocoConfig:
    """One conversion: ``refs`` pickle, COCO ``instances`` JSON, ``images`` directory, output
    ``out`` directory. ``splits`` defaults to every split of the refs, in order of appearance."""

    refs: Path
    instances: Path
    images: Path
    dataset: str
    split_by: str
    out: str | Path  # a folder or a URI (s3://...)
    splits: tuple[str, ...] | None = None
    samples_per_shard: int = 1000


# --- reading the inputs --------------------------------------------------------------------------


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles builtin containers and scalars only: any class or function is refused, so a
    crafted pickle cannot run code (``__reduce__`` needs ``find_class``)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a refs file holds only lists, dicts, strings "
            "and numbers"
        )


def load_refs(path: str | Path) -> list[dict]:
    """The refs of a ``refs(*).p`` file, checked to be a non-empty list of dicts with ``REF_KEYS`` and
    ``sentences`` as a list of ``{"sent": str, ...}``. Raises ``ValueError`` on anything else."""
    try:
        with open(path, "rb") as file:
            refs = _DataOnlyUnpickler(file, encoding="utf-8").load()
    except (pickle.UnpicklingError, UnicodeDecodeError, EOFError) as error:
        raise ValueError(f"{path}: not a data-only refs pickle: {error}") from error
    if not isinstance(refs, list) or not refs:
        raise ValueError(f"{path}: expected a non-empty list of refs, got {type(refs).__name__}")
    for index, ref in enumerate(refs):
        _check_ref(ref, f"{path}: ref #{index}")
    return refs


def _check_ref(ref: object, where: str) -> None:
    if not isinstance(ref, dict) or any(key not in ref for key in REF_KEYS):
        raise ValueError(f"{where}: expected a dict with keys {REF_KEYS}")
    sentences = ref["sentences"]
    if not isinstance(sentences, list) or not all(
        isinstance(s, dict) and isinstance(s.get("sent"), str) for s in sentences
    ):
        raise ValueError(f"{where}: sentences must be a list of dicts with a str 'sent'")
    split = ref["split"]
    if not isinstance(split, str) or not split or any(c in split for c in "./-"):
        raise ValueError(f"{where}: split must be a non-empty str without '.', '/', '-'")


@dataclass
class Instances:
    """The parts of a COCO ``instances.json`` a conversion needs, indexed by id."""

    images: dict[int, dict]
    annotations: dict[int, dict]
    categories: dict[int, str]

    @classmethod
    def load(cls, path: str | Path) -> Instances:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
        return cls(
            images={image["id"]: image for image in data["images"]},
            annotations={ann["id"]: ann for ann in data["annotations"]},
            categories={cat["id"]: cat["name"] for cat in data.get("categories", [])},
        )


def group_refs(refs: list[dict]) -> dict[str, dict[int, list[dict]]]:
    """``{split: {image_id: [refs of that image, in file order]}}``, splits in file order."""
    grouped: dict[str, dict[int, list[dict]]] = {}
    for ref in refs:
        grouped.setdefault(ref["split"], {}).setdefault(ref["image_id"], []).append(ref)
    return grouped


# --- building samples ----------------------------------------------------------------------------


def build_object(ref: dict, image: dict, instances: Instances, stats: SplitStats) -> dict | None:
    """The ``objects[]`` entry of one ref, or ``None`` (counted in ``stats``) when its annotation
    is missing, belongs to another image, has no sentence or does not decode."""
    ann = instances.annotations.get(ref["ann_id"])
    reason = None
    if ann is None:
        reason = "missing annotation"
    elif ann.get("image_id") != image["id"]:
        reason = "annotation of another image"
    elif not ref["sentences"]:
        reason = "no sentences"
    if reason is None:
        try:
            mask = segmentation_rle(ann["segmentation"], image["height"], image["width"])
        except Exception as error:  # noqa: BLE001 (pycocotools raises bare Exception on bad input)
            reason = f"bad segmentation ({type(error).__name__})"
    if reason is not None:
        stats.skip(ref, reason)
        return None
    return {
        "expressions": [sentence["sent"] for sentence in ref["sentences"]],
        "raw": [sentence.get("raw", sentence["sent"]) for sentence in ref["sentences"]],
        "mask": mask,
        "ann_id": ref["ann_id"],
        "ref_id": ref["ref_id"],
        "category": instances.categories.get(ann.get("category_id")),
    }


def build_sample(
    split: str,
    image_id: int,
    refs: list[dict],
    instances: Instances,
    images_dir: Path,
    stats: SplitStats,
) -> dict | None:
    """The webdataset sample of one image of a split with all its refs, or ``None`` (counted in
    ``stats``) when the image cannot be used or none of its objects can."""
    image = instances.images.get(image_id)
    read = read_image(image, images_dir)
    if isinstance(read, str):
        for ref in refs:
            stats.skip(ref, read)
        stats.skipped_images += 1
        return None
    objects = [obj for ref in refs if (obj := build_object(ref, image, instances, stats))]
    return image_sample(split, image_id, image, read, objects, stats)


def write_split(
    split: str, refs_by_image: dict[int, list[dict]], instances: Instances, config: RefcocoConfig
) -> SplitStats:
    """Write one split's shards and stats file (``write_split_shards``); images in ``image_id`` order."""
    stats = SplitStats(split)
    samples = (
        build_sample(
            split, image_id, refs_by_image[image_id], instances, Path(config.images), stats
        )
        for image_id in track(sorted(refs_by_image), len(refs_by_image), f"{split} images")
    )
    prefix = f"{config.dataset}_{config.split_by}-{split}"
    return write_split_shards(prefix, config.out, config.samples_per_shard, samples, stats)


def convert_refcoco(config: RefcocoConfig) -> dict[str, SplitStats]:
    """Convert the refs of ``config.splits`` (default: all) into shards; return stats per split.

    Raises ``ValueError`` for a refs file that is not a data-only list of refs, a requested split
    the refs do not have, or names that would break shard names or keys.
    """
    for name in (config.dataset, config.split_by):
        check_name(name, "dataset and split_by")
    if config.samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    grouped = group_refs(load_refs(config.refs))
    splits = list(config.splits or grouped)
    unknown = [split for split in splits if split not in grouped]
    if unknown:
        raise ValueError(f"splits {unknown} not in {config.refs}; it has {list(grouped)}")
    instances = Instances.load(config.instances)
    return {split: write_split(split, grouped[split], instances, config) for split in splits}
