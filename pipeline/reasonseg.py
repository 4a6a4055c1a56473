"""ReasonSeg (LISA's reasoning segmentation benchmark) → WebDataset shards of the input format.

ReasonSeg input, the release layout (github.com/dvlab-research/LISA ``README.md`` "Dataset";
``utils/data_processing.py``, ``get_mask_from_json``): one folder per split (``train``, ``val``,
``test``) holding ``<name>.jpg`` beside ``<name>.json``, a LabelMe-style JSON with

- ``text``: the queries (a list of strings; training images may have several rephrasings);
- ``is_sentence``: whether the queries are long sentences (else short phrases);
- ``shapes``: polygons ``{"label", "points": [[x, y], ...]}``; a label containing ``ignore``
  (any case) marks an ambiguous region left out of the evaluation, ``flag`` shapes are skipped
  (deprecated), any other label is the target.

The gold masks are drawn as LISA draws them: points truncated to integers, each polygon filled
with its one-pixel outline, largest polygon first (area: its own drawn pixels), so a smaller
polygon paints over a larger one; ``target`` pixels are 1, ``ignore`` pixels 255 there. LISA draws
with OpenCV (``cv2.fillPoly`` + ``cv2.polylines``), this module with PIL's ``ImageDraw.polygon``
(fill and outline): the same pixels inside and on the vertices, a boundary pixel of a slanted edge
may differ (not measured: OpenCV is not a dependency). Images are read as LISA reads them
(``cv2.imread`` applies the EXIF orientation): an image whose EXIF orientation is not 1 is stored
rotated, re-encoded as PNG (lossless), its JSON says ``exif_transposed``.

ReasonSeg output: shards ``reason_seg-{split}-{000000..}.tar``, one sample per image, key
``f"{split}_{index:012d}"`` (images in name order): the image bytes, and a JSON with
``question`` (the first query as LISA's evaluation asks it: a long sentence as it is, a short
phrase as ``"What is {text} in this image?"``, without LISA's "Please output segmentation mask."),
``queries`` (all of ``text``), ``is_sentence``, ``file_name``, and one object: ``expressions`` (the
queries), ``mask`` (the target pixels, COCO RLE, possibly empty) and ``ignore`` (the ignore
pixels, COCO RLE); ``phrases``, ``width``, ``height``, ``image_id`` (the index). One sample per
image with its first query is LISA's evaluation (``utils/dataset.py``, ``ValDataset``:
``sampled_sents = [sampled_sents[0]]``). Beside the shards, ``reason_seg-{split}.stats.json``.
An image whose file or JSON is missing or unreadable, or whose JSON does not fit, is skipped and
counted; it does not stop the conversion.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageDraw, ImageOps

from pipeline.coco import SplitStats, check_name, image_sample, write_split_shards
from pipeline.progress import track

REASON_NAME = "reason_seg"  # shard prefix: reason_seg-{split}-{000000..}.tar
TARGET, IGNORE = 1, 255  # LISA's gold mask values
SHORT_QUESTION = "What is {} in this image?"  # LISA's ValDataset, short queries


@dataclass(frozen=True)
class ReasonSegConfig:
    """One conversion: ``root`` holds one folder per split; ``splits`` defaults to every
    folder of ``root`` that holds a ``.json``, in name order."""

    root: Path
    out: str | Path  # a folder or a URI (s3://...)
    splits: tuple[str, ...] | None = None
    samples_per_shard: int = 1000


@dataclass
class ReasonSegStats(SplitStats):
    """``SplitStats`` of a ReasonSeg split; a ``skipped`` entry is one image: ``{"name",
    "reason"}``. ``long``: samples with ``is_sentence``."""

    long: int = 0
    item_name: ClassVar[str] = "images"


class BadAnnotation(ValueError):
    """A ReasonSeg JSON that does not fit the layout; the message is the skip reason."""


def question_of(query: str, is_sentence: bool) -> str:
    """The question LISA's evaluation asks for a query (without its segmentation request)."""
    query = query.strip()
    return query if is_sentence else SHORT_QUESTION.format(query)


def gold_mask(shapes: list, height: int, width: int) -> np.ndarray:
    """LISA's gold mask of LabelMe ``shapes``: uint8 ``[height, width]``, ``TARGET`` (1),
    ``IGNORE`` (255) or 0; largest polygon first, ``flag`` shapes skipped. Raises BadAnnotation
    for shapes that are not ``{"label": str, "points": [[x, y], ...]}``."""
    drawn = []  # (label value, its own mask)
    for shape in shapes:
        label, points = _shape(shape)
        if label.lower() == "flag":
            continue
        own = _draw(points, 1, height, width)
        drawn.append((IGNORE if "ignore" in label.lower() else TARGET, points, int(own.sum())))
    mask = Image.new("L", (width, height), 0)
    order = np.argsort([area for _, _, area in drawn], kind="stable")[::-1]
    for k in order:
        value, points, _ = drawn[k]
        _polygon(ImageDraw.Draw(mask), points, value)
    return np.asarray(mask)


def _shape(shape) -> tuple[str, list[tuple[int, int]]]:
    if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
        raise BadAnnotation("bad shapes")
    points = shape.get("points")
    try:
        # int(): truncation toward zero, as LISA's np.array(points, dtype=np.int32)
        return shape["label"], [(int(x), int(y)) for x, y in points]
    except (TypeError, ValueError, OverflowError):
        raise BadAnnotation("bad shapes") from None


def _draw(points: list[tuple[int, int]], value: int, height: int, width: int) -> np.ndarray:
    image = Image.new("L", (width, height), 0)
    _polygon(ImageDraw.Draw(image), points, value)
    return np.asarray(image)


def _polygon(draw: ImageDraw.ImageDraw, points: list[tuple[int, int]], value: int) -> None:
    """A filled polygon with its one-pixel outline (a point or a segment for 1 or 2 points)."""
    if len(points) == 1:
        draw.point(points, fill=value)
    elif points:
        draw.polygon(points, fill=value, outline=value)


def rle(mask: np.ndarray) -> dict:
    """JSON-ready COCO RLE of a bool ``[H, W]`` mask."""
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def read_annotation(path: Path) -> tuple[list[str], bool, list]:
    """``(text, is_sentence, shapes)`` of a ReasonSeg JSON (read as UTF-8, else cp1252, as LISA
    reads it). Raises BadAnnotation (the reason) for a JSON that does not fit."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadAnnotation("missing json file") from None
    try:
        try:
            anno = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            anno = json.loads(data.decode("cp1252"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadAnnotation("unreadable json file") from None
    if not isinstance(anno, dict):
        raise BadAnnotation("unreadable json file")
    text, is_sentence, shapes = anno.get("text"), anno.get("is_sentence"), anno.get("shapes")
    if isinstance(text, str):
        text = [text]
    if not isinstance(text, list) or not text or not all(isinstance(t, str) for t in text):
        raise BadAnnotation("bad text")
    if not text[0].strip():
        raise BadAnnotation("empty text")
    if is_sentence not in (True, False):  # (0 and 1 pass as the bools they equal)
        raise BadAnnotation("bad is_sentence")
    if not isinstance(shapes, list):
        raise BadAnnotation("bad shapes")
    return text, bool(is_sentence), shapes


def read_image(path: Path) -> tuple[str, bytes, int, int, bool]:
    """``(extension, bytes, width, height, transposed)`` of an image as LISA reads it: with its
    EXIF orientation applied (then re-encoded as PNG). Raises BadAnnotation (the reason)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadAnnotation("missing image file") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            orientation = image.getexif().get(0x0112, 1)
            if orientation in (None, 1):
                return "jpg", data, image.width, image.height, False
            rotated = ImageOps.exif_transpose(image)
    except OSError:
        raise BadAnnotation("unreadable image file") from None
    out = io.BytesIO()
    rotated.save(out, format="PNG")
    return "png", out.getvalue(), rotated.width, rotated.height, True


def build_sample(split: str, index: int, json_path: Path, stats: ReasonSegStats) -> dict | None:
    """The webdataset sample of one ReasonSeg image, or ``None`` (counted in ``stats``)."""
    name = json_path.stem
    try:
        text, is_sentence, shapes = read_annotation(json_path)
        extension, data, width, height, transposed = read_image(json_path.with_suffix(".jpg"))
        gold = gold_mask(shapes, height, width)
    except BadAnnotation as error:
        stats.add_skip(str(error), name=name)
        stats.skipped_images += 1
        return None
    obj = {
        "expressions": [t.strip() for t in text],
        "mask": rle(gold == TARGET),
        "ignore": rle(gold == IGNORE),
    }
    extra = {"question": question_of(text[0], is_sentence), "queries": text}
    extra.update(is_sentence=is_sentence, file_name=f"{name}.jpg")
    if transposed:
        extra["exif_transposed"] = True
    stats.long += is_sentence
    image = {"width": width, "height": height}
    return image_sample(split, index, image, (extension, data), [obj], stats, **extra)


def write_split(split: str, folder: Path, config: ReasonSegConfig) -> ReasonSegStats:
    """Write one split's shards and stats file; images in name order."""
    stats = ReasonSegStats(split)
    paths = sorted(folder.glob("*.json"))
    samples = (
        build_sample(split, index, path, stats)
        for index, path in enumerate(track(paths, len(paths), f"{split} images"))
    )
    prefix = f"{REASON_NAME}-{split}"
    return write_split_shards(prefix, config.out, config.samples_per_shard, samples, stats)


def convert_reasonseg(config: ReasonSegConfig) -> dict[str, ReasonSegStats]:
    """Convert the splits of ``config.root`` into shards; return stats per split. Raises
    ``ValueError`` for a root without split folders, a requested split it does not have, or a
    split name that would break shard names or keys."""
    root = Path(config.root)
    if config.samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.json")))
    if not found:
        raise ValueError(f"{root}: no split folder (train/val/test) with ReasonSeg .json files")
    splits = list(config.splits or found)
    for split in splits:
        check_name(split, "split")
    if missing := [s for s in splits if s not in found]:
        raise ValueError(f"splits {missing} not in {root}; it has {found}")
    return {split: write_split(split, root / split, config) for split in splits}
