"""RefCOCO / RefCOCO+ / RefCOCOg and COCO Panoptic Narrative Grounding (PNG) → WebDataset shards
of the project's input format.

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

PNG input (González et al., ICCV 2021), one split (``train2017`` or ``val2017``) per conversion, as
laid out by the benchmark's own code (github.com/BCV-Uniandes/PNG: ``README.md`` "Dataset
Preparation", ``data/pre_process.py``, ``baseline/data/panoptic_narrative_grounding.py``):

- ``annotations/png_coco_{split}.json``: a list of localized narratives, each with ``image_id``
  (an int or a numeric str), ``caption`` and ``segments``: the caption cut into consecutive
  pieces ``{utterance, segment_ids, noun, plural, ...}``; a piece is a grounded noun phrase when
  ``noun`` is true and ``segment_ids`` (ids, int or numeric str, of segments of the image's COCO
  panoptic annotation) is not empty. Missing ``noun`` counts as true.
- COCO panoptic ``annotations/panoptic_{split}.json``: ``images`` (as in ``instances.json``),
  ``annotations`` (one per image: ``image_id``, ``file_name`` of its label PNG, ``segments_info``:
  ``[{id, category_id, iscrowd, bbox, area}]``) and ``categories`` (``id``, ``name``,
  ``isthing``); format: cocodataset.org/#format-data, section "Panoptic Segmentation"
  (github.com/cocodataset/cocodataset.github.io ``dataset/format-data.htm``).
- the label PNGs (PNG's layout: ``annotations/panoptic_segmentation/{split}/``, COCO's zip:
  ``panoptic_{split}/``), RGB, segment id = R + 256·G + 256²·B, 0 = void (the same page;
  github.com/cocodataset/panopticapi ``panopticapi/utils.py``, ``rgb2id``).
- the COCO images directory holding ``images[].file_name`` (``images/{split}``).

PNG output: shards ``png_coco-{split}-{000000..}.tar`` with one sample per image that has a
grounded noun phrase, key ``f"{split}_{image_id:012d}"``: the original image bytes, and a JSON whose
``objects`` are the grounded noun phrases of all the image's narratives (in file order): the phrase
(its ``utterance``) as the single expression, the union of its panoptic segments as the mask (COCO
RLE), ``segment_ids``, ``categories`` (one per segment), ``plural``, ``narrative`` and ``segment``
(indices into the file and into the narrative's ``segments``); beside them ``phrases``,
``narratives`` (the image's captions), ``width``, ``height``, ``image_id``. The stats file
``png_coco-{split}.stats.json`` also counts the narratives read and the pieces that are not grounded
noun phrases (``ungrounded_phrases``, not skips).

Bad input does not stop a conversion: a ref or grounded phrase whose image file or annotation is
missing (or whose segmentation does not decode, or, for PNG, whose panoptic label file is missing
or whose segment ids are not in the image's panoptic annotation or cover no pixel) is skipped and
counted, and so is a malformed PNG record; an image left with no object is skipped.
"""

from __future__ import annotations

import io
import json
import pickle
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from pipeline.formats import IMAGE_EXTENSIONS, encode_rle
from pipeline.shards import write_shards

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
    out: Path
    splits: tuple[str, ...] | None = None
    samples_per_shard: int = 1000


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
    shards: list[Path] = field(default_factory=list)
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
            "shards": [path.name for path in self.shards],
            "skipped": self.skipped,
        }


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
        "mask": mask,
        "ann_id": ref["ann_id"],
        "ref_id": ref["ref_id"],
        "category": instances.categories.get(ann.get("category_id")),
    }


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


# --- writing -------------------------------------------------------------------------------------


def write_split_shards(
    prefix: str,
    out: Path,
    samples_per_shard: int,
    samples: Iterable[dict | None],
    stats: SplitStats,
) -> SplitStats:
    """Write ``samples`` (``None``s left out; ``stats`` filled while they are built) as shards
    ``{prefix}-{000000..}.tar`` (``pipeline.shards.write_shards``: shards of an earlier run with
    this prefix that this run did not write are removed), then ``{prefix}.stats.json``."""
    stats.shards = write_shards(out, prefix, samples, samples_per_shard)
    (Path(out) / f"{prefix}.stats.json").write_text(json.dumps(stats.to_json(), indent=1))
    return stats


def write_split(
    split: str, refs_by_image: dict[int, list[dict]], instances: Instances, config: RefcocoConfig
) -> SplitStats:
    """Write one split's shards and stats file (``write_split_shards``); images in ``image_id`` order."""
    stats = SplitStats(split)
    samples = (
        build_sample(
            split, image_id, refs_by_image[image_id], instances, Path(config.images), stats
        )
        for image_id in sorted(refs_by_image)
    )
    prefix = f"{config.dataset}_{config.split_by}-{split}"
    return write_split_shards(prefix, config.out, config.samples_per_shard, samples, stats)


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name or any(c in name for c in "./-"):
        raise ValueError(f"{what} must be non-empty without '.', '/', '-': {name!r}")


def convert_refcoco(config: RefcocoConfig) -> dict[str, SplitStats]:
    """Convert the refs of ``config.splits`` (default: all) into shards; return stats per split.

    Raises ``ValueError`` for a refs file that is not a data-only list of refs, a requested split
    the refs do not have, or names that would break shard names or keys.
    """
    for name in (config.dataset, config.split_by):
        _check_name(name, "dataset and split_by")
    if config.samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    grouped = group_refs(load_refs(config.refs))
    splits = list(config.splits or grouped)
    unknown = [split for split in splits if split not in grouped]
    if unknown:
        raise ValueError(f"splits {unknown} not in {config.refs}; it has {list(grouped)}")
    instances = Instances.load(config.instances)
    return {split: write_split(split, grouped[split], instances, config) for split in splits}


# --- COCO Panoptic Narrative Grounding (PNG) -----------------------------------------------------

PNG_NAME = "png_coco"  # shard prefix: png_coco-{split}-000000.tar


@dataclass(frozen=True)
class PngConfig:
    """One PNG split: ``narratives`` (``png_coco_{split}.json``), COCO ``panoptic`` JSON
    (``panoptic_{split}.json``), ``panoptic_masks`` (the folder of its label PNGs), ``images``
    directory, output ``out`` directory."""

    narratives: Path
    panoptic: Path
    panoptic_masks: Path
    images: Path
    split: str
    out: Path
    samples_per_shard: int = 1000


@dataclass
class PngSplitStats(SplitStats):
    """``SplitStats`` of a PNG split; a ``skipped`` entry is one grounded phrase (or malformed
    record): ``{"image_id", "narrative", "segment", "reason"}``. ``narratives``: records read;
    ``ungrounded``: pieces that are not grounded noun phrases (not skips)."""

    narratives: int = 0
    ungrounded: int = 0
    item_name: ClassVar[str] = "phrases"

    def skip_phrase(
        self, reason: str, image_id: int | None, narrative: int, segment: int | None
    ) -> None:
        self.add_skip(reason, image_id=image_id, narrative=narrative, segment=segment)

    def summary(self) -> str:
        return (
            f"{super().summary()}; {self.narratives} narratives, "
            f"{self.ungrounded} pieces not grounded"
        )

    def to_json(self) -> dict:
        return {
            **super().to_json(),
            "narratives": self.narratives,
            "ungrounded_phrases": self.ungrounded,
        }


@dataclass
class Panoptic:
    """The parts of a COCO panoptic JSON a PNG conversion needs: ``images`` by id,
    ``annotations`` by ``image_id``, category names by id. Entries without their id (images also
    without ``file_name``, ``width``, ``height``) are left out: their images are then skipped."""

    images: dict[int, dict]
    annotations: dict[int, dict]
    categories: dict[int, str]

    @classmethod
    def load(cls, path: str | Path) -> Panoptic:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
        if not isinstance(data, dict) or not all(
            isinstance(data.get(key), list) for key in ("images", "annotations")
        ):
            raise ValueError(f"{path}: not a COCO panoptic JSON with 'images' and 'annotations'")
        images = data["images"]
        annotations = data["annotations"]
        categories = data.get("categories") or []
        return cls(
            images={
                i["id"]: i
                for i in images
                if isinstance(i, dict)
                and all(k in i for k in ("id", "file_name", "width", "height"))
            },
            annotations={
                a["image_id"]: a for a in annotations if isinstance(a, dict) and "image_id" in a
            },
            categories={
                c["id"]: c.get("name") for c in categories if isinstance(c, dict) and "id" in c
            },
        )


def load_narratives(path: str | Path) -> list:
    """The records of a ``png_coco_{split}.json``; raises ``ValueError`` unless it is a non-empty
    list (single records are checked while converting, and skipped if malformed)."""
    with open(path, encoding="utf-8") as file:
        narratives = json.load(file)
    if not isinstance(narratives, list) or not narratives:
        raise ValueError(f"{path}: expected a non-empty list of narratives")
    return narratives


def _as_id(value: object) -> int | None:
    """An id given as an int or a numeric str (PNG has both), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def group_narratives(narratives: list, stats: PngSplitStats) -> dict[int, list[tuple[int, dict]]]:
    """``{image_id: [(index in the file, narrative)]}``; a record without a usable ``image_id`` or
    a ``segments`` list is skipped and counted."""
    grouped: dict[int, list[tuple[int, dict]]] = {}
    for index, narrative in enumerate(narratives):
        stats.narratives += 1
        image_id = _as_id(narrative.get("image_id")) if isinstance(narrative, dict) else None
        if image_id is None or not isinstance(narrative.get("segments"), list):
            stats.skip_phrase("malformed narrative", image_id, index, None)
            continue
        grouped.setdefault(image_id, []).append((index, narrative))
    return grouped


@dataclass(frozen=True)
class GroundedPhrase:
    """One grounded noun phrase of a narrative: where it is, its text and panoptic segment ids."""

    narrative: int
    segment: int
    text: str
    segment_ids: tuple[int, ...]
    plural: bool | None


def grounded_phrases(
    image_id: int, index: int, narrative: dict, stats: PngSplitStats
) -> list[GroundedPhrase]:
    """The grounded noun phrases of one narrative, in order. Pieces that are not (``noun`` false
    or no ``segment_ids``) are counted in ``stats.ungrounded``; malformed ones are skipped."""
    phrases = []
    for k, piece in enumerate(narrative["segments"]):
        ids = piece.get("segment_ids") if isinstance(piece, dict) else None
        if not isinstance(ids, list):
            stats.skip_phrase("malformed segment", image_id, index, k)
            continue
        if not ids or not piece.get("noun", True):
            stats.ungrounded += 1
            continue
        parsed = [_as_id(i) for i in ids]
        text = piece.get("utterance")
        text = text.strip() if isinstance(text, str) else ""
        if any(i is None for i in parsed) or not text:
            stats.skip_phrase("malformed segment", image_id, index, k)
            continue
        plural = piece.get("plural")
        phrases.append(
            GroundedPhrase(
                index,
                k,
                text,
                tuple(dict.fromkeys(parsed)),
                plural if isinstance(plural, bool) else None,
            )
        )
    return phrases


def read_panoptic_label(annotation: dict, image: dict, masks_dir: Path) -> np.ndarray | str:
    """The ``[h, w]`` segment-id map (R + 256·G + 256²·B) of an image's panoptic annotation, or
    the reason it cannot be used."""
    name = annotation.get("file_name", f"{image['id']:012d}.png")
    if not isinstance(name, str) or not isinstance(annotation.get("segments_info"), list):
        return "malformed panoptic annotation"
    try:
        with Image.open(masks_dir / name) as opened:
            if opened.mode not in ("RGB", "RGBA", "P"):
                return "unsupported panoptic label mode"
            rgb = np.asarray(opened.convert("RGB"), dtype=np.int64)
    except FileNotFoundError:
        return "missing panoptic label file"
    except OSError:
        return "unreadable panoptic label file"
    if rgb.shape[:2] != (image["height"], image["width"]):
        return "panoptic label size differs from image"
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def build_png_sample(
    split: str,
    image_id: int,
    narratives: list[tuple[int, dict]],
    panoptic: Panoptic,
    config: PngConfig,
    stats: PngSplitStats,
) -> dict | None:
    """The webdataset sample of one image with the grounded noun phrases of all its narratives,
    or ``None`` (counted in ``stats``) when the image, its panoptic label or all its phrases cannot
    be used."""
    phrases = [
        phrase
        for index, narrative in narratives
        for phrase in grounded_phrases(image_id, index, narrative, stats)
    ]
    if not phrases:
        stats.skipped_images += 1
        return None
    image = panoptic.images.get(image_id)
    read = read_image(image, Path(config.images), source="panoptic")
    annotation = panoptic.annotations.get(image_id)
    label: np.ndarray | str
    if isinstance(read, str):
        label = read
    elif annotation is None:
        label = "no panoptic annotation"
    else:
        label = read_panoptic_label(annotation, image, Path(config.panoptic_masks))
    if isinstance(label, str):
        for phrase in phrases:
            stats.skip_phrase(label, image_id, phrase.narrative, phrase.segment)
        stats.skipped_images += 1
        return None
    segments = {
        info["id"]: info
        for info in annotation["segments_info"]
        if isinstance(info, dict) and "id" in info
    }
    objects = []
    for phrase in phrases:
        if any(i not in segments for i in phrase.segment_ids):
            stats.skip_phrase(
                "segment not in panoptic annotation", image_id, phrase.narrative, phrase.segment
            )
            continue
        mask = np.isin(label, phrase.segment_ids)
        if not mask.any():
            stats.skip_phrase("empty mask", image_id, phrase.narrative, phrase.segment)
            continue
        objects.append(
            {
                "expressions": [phrase.text],
                "mask": encode_rle(mask),
                "segment_ids": list(phrase.segment_ids),
                "categories": [
                    panoptic.categories.get(segments[i].get("category_id"))
                    for i in phrase.segment_ids
                ],
                "plural": phrase.plural,
                "narrative": phrase.narrative,
                "segment": phrase.segment,
            }
        )
    captions = [narrative.get("caption") for _, narrative in narratives]
    return image_sample(split, image_id, image, read, objects, stats, narratives=captions)


def convert_png(config: PngConfig) -> dict[str, PngSplitStats]:
    """Convert one PNG split into shards ``png_coco-{split}-*.tar``; return ``{split: stats}``.

    Raises ``ValueError`` for a narratives file that is not a non-empty list, a panoptic JSON
    without ``images`` and ``annotations``, or a split name that would break shard names or keys.
    """
    _check_name(config.split, "split")
    if config.samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    narratives = load_narratives(config.narratives)
    panoptic = Panoptic.load(config.panoptic)
    stats = PngSplitStats(config.split)
    grouped = group_narratives(narratives, stats)
    samples = (
        build_png_sample(config.split, image_id, grouped[image_id], panoptic, config, stats)
        for image_id in sorted(grouped)
    )
    prefix = f"{PNG_NAME}-{config.split}"
    return {
        config.split: write_split_shards(prefix, config.out, config.samples_per_shard, samples, stats)
    }
