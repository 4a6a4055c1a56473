"""What the COCO-based converters (``pipeline.refcoco``: RefCOCO/+/g; ``pipeline.png``: Panoptic
Narrative Grounding) share: per-split statistics, COCO segmentations as RLE, reading a COCO image
entry's file, the sample of one image, and writing a split's shards with its stats file.

Bad input does not stop a conversion: a ref or grounded phrase whose image file or annotation is
missing (or whose segmentation does not decode, or, for PNG, whose panoptic label file is missing
or whose segment ids are not in the image's panoptic annotation or cover no pixel) is skipped and
counted, and so is a malformed PNG record; an image left with no object is skipped.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pycocotools.mask as mask_utils
from PIL import Image

from pipeline.formats import IMAGE_EXTENSIONS
from pipeline.shards import write_shards
from pipeline.writer import OutputDir


@dataclass
class SplitStats:
    """What one split's conversion wrote and skipped. ``skipped`` holds one entry per skipped
    ref: ``{"ref_id", "ann_id", "image_id", "reason"}``."""

    split: str
    images: int = 0
    objects: int = 0
    expressions: int = 0
    skipped_images: int = 0
    skipped: list[dict] = field(default_factory=list)
    shards: list[Path] | list[str] = field(default_factory=list)  # local paths or URIs
    item_name: ClassVar[str] = "objects"  # what one ``skipped`` entry is, in ``summary``

    def add_skip(self, reason: str, **ids) -> None:
        """Record one skipped item: its ``ids`` (in order), then ``reason``."""
        self.skipped.append({**ids, "reason": reason})

    def skip(self, ref: dict, reason: str) -> None:
        self.add_skip(reason, ref_id=ref["ref_id"], ann_id=ref["ann_id"], image_id=ref["image_id"])

    def reasons(self) -> dict[str, int]:
        return dict(Counter(entry["reason"] for entry in self.skipped))

    def summary(self) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.reasons().items()))
        return (
            f"{self.split}: {self.images} images, {self.objects} objects, "
            f"{self.expressions} expressions, {len(self.shards)} shards; skipped "
            f"{self.skipped_images} images, {len(self.skipped)} {self.item_name}"
            + (f" ({reasons})" if reasons else "")
        )

    def to_json(self) -> dict:
        return {
            "split": self.split,
            "images": self.images,
            "objects": self.objects,
            "expressions": self.expressions,
            "skipped_images": self.skipped_images,
            "skipped_objects": len(self.skipped),
            "skipped_reasons": self.reasons(),
            "shards": [posixpath.basename(str(path)) for path in self.shards],
            "skipped": self.skipped,
        }


def segmentation_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """JSON-ready COCO RLE (``{"size": [h, w], "counts": str}``) of a COCO ``segmentation``:
    polygons (merged into one mask), uncompressed RLE (list counts) or compressed RLE, as
    ``COCO.annToRLE`` reads them. Raises ``ValueError`` if the RLE's size is not ``[h, w]``."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    size = [int(v) for v in rle["size"]]
    if size != [height, width]:
        raise ValueError(f"RLE size {size} is not the image's [{height}, {width}]")
    counts = rle["counts"]
    return {"size": size, "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def read_image(
    image: dict | None, images_dir: Path, source: str = "instances"
) -> tuple[str, bytes] | str:
    """``(extension, original bytes)`` of a COCO image entry, or the reason it cannot be used:
    not in ``source`` (the JSON of the entries), file missing or unreadable, unsupported type, size
    unlike the entry's."""
    if image is None:
        return f"image not in {source}"
    path = images_dir / image["file_name"]
    extension = path.suffix.lower().lstrip(".")
    if extension not in IMAGE_EXTENSIONS:
        return "unsupported image type"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "missing image file"
    except OSError:
        return "unreadable image file"
    try:
        with Image.open(io.BytesIO(data)) as opened:
            size = opened.size
    except OSError:
        return "unreadable image file"
    if size != (image["width"], image["height"]):
        return f"image size differs from {source}"
    return extension, data


def image_sample(
    split: str,
    image_id: int,
    image: dict,
    read: tuple[str, bytes],
    objects: list[dict],
    stats: SplitStats,
    **extra,
) -> dict | None:
    """The webdataset sample of one image (key ``f"{split}_{image_id:012d}"``, its original bytes
    from ``read``, the JSON of its ``objects``, their ``phrases`` flattened in object order, and
    ``extra`` fields), counted in ``stats``; ``None`` (counted as a skipped image) without
    objects."""
    if not objects:
        stats.skipped_images += 1
        return None
    phrases = [expression for obj in objects for expression in obj["expressions"]]
    stats.images += 1
    stats.objects += len(objects)
    stats.expressions += len(phrases)
    meta = {
        "phrases": phrases,
        "objects": objects,
        **extra,
        "width": image["width"],
        "height": image["height"],
        "image_id": image_id,
    }
    extension, data = read
    return {
        "__key__": f"{split}_{image_id:012d}",
        extension: data,
        "json": json.dumps(meta).encode("utf-8"),
    }


def write_split_shards(
    prefix: str,
    out: str | Path,
    samples_per_shard: int,
    samples: Iterable[dict | None],
    stats: SplitStats,
) -> SplitStats:
    """Write ``samples`` (``None``s left out; ``stats`` filled while they are built) as shards
    ``{prefix}-{000000..}.tar`` (``pipeline.shards.write_shards``: shards of an earlier run with
    this prefix that this run did not write are removed), then ``{prefix}.stats.json``."""
    stats.shards = write_shards(out, prefix, samples, samples_per_shard)
    OutputDir(str(out)).write_bytes(
        "", f"{prefix}.stats.json", json.dumps(stats.to_json(), indent=1).encode()
    )
    return stats


def check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name or any(c in name for c in "./-"):
        raise ValueError(f"{what} must be non-empty without '.', '/', '-': {name!r}")
