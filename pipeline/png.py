"""COCO Panoptic Narrative Grounding (PNG) → WebDataset shards of the project's input format.

PNG input (González et al., ICCV 2021), one split (``train2017`` or ``val2017``) per conversion, as
laid out by the benchmark's own code (github.com/BCV-Uniandes/PNG: ``README.md`` "Dataset
Preparation", ``data/pre_process.py``, ``baseline/data/panoptic_narrative_grounding.py``):

- ``annotations/png_coco_{split}.json``: a list of localized narratives, each with ``image_id``
  (an int or a numeric str), ``caption`` and ``segments``: the caption cut into consecutive
  pieces ``{utterance, segment_ids, noun, plural, ...}``; a piece is grounded when its
  ``segment_ids`` (ids, int or numeric str, of segments of the image's COCO panoptic annotation)
  is not empty, whatever its ``noun`` flag: F-LMM's reader grounds every piece with segment ids
  and never reads ``noun`` (github.com/wusize/F-LMM ``flmm/datasets/png.py``, ``PNGDataset``;
  PNG's own ``data/pre_process.py`` also wants ``noun``, which is kept per object: missing counts
  as true).
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
grounded phrase, key ``f"{split}_{image_id:012d}"``: the original image bytes, and a JSON whose
``objects`` are the grounded phrases of all the image's narratives (in file order): the phrase
(its ``utterance``) as the single expression, the union of its panoptic segments as the mask (COCO
RLE), ``segment_ids``, ``categories`` and ``isthing`` (one per segment, from the panoptic
categories), ``plural``, ``noun``, ``narrative`` and ``segment`` (indices into the file and into
the narrative's ``segments``) and ``narrative_span``; beside them ``phrases``, ``narratives`` (the
image's captions), ``narrative_ids`` (their indices in the file) and ``narrative_texts``, ``width``,
``height``, ``image_id``.

Narratives as F-LMM feeds them (``flmm/datasets/png.py``, ``PNGDataset.__getitem__``): after the
prompt, the tokens of every piece's utterance, encoded piece by piece, back to back; a grounded
piece's tokens are its mask's tokens. ``narrative_texts[k]`` is that text: the narrative's
utterances, stripped, joined by one space (what piece-by-piece encoding gives with LLaVA's
SentencePiece tokenizer, which starts every encoded piece with a word boundary), and an object's
``narrative_span`` is its utterance's ``[start, end)`` characters in the text of its narrative
(``narrative_ids.index(object["narrative"])``). ``narrative_queries`` and ``phrase_kinds`` read
them back for PNG evaluation (``pipeline/evaluate.py``, protocol ``png``).

The first narrative is also the sample's ``caption``, and each of its phrases found in it carries
its ``spans`` there (``[start, end)`` characters, found piece after piece from where the previous
piece ended): the training job trains the keyword selector on them. The stats file
``png_coco-{split}.stats.json`` also counts the narratives read and the pieces that are not grounded
(``ungrounded_phrases``, not skips).

Shared with the RefCOCO converter: ``pipeline.coco``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from pipeline.coco import SplitStats, check_name, image_sample, read_image, write_split_shards
from pipeline.formats import encode_rle
from pipeline.progress import track

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
    out: str | Path  # a folder or a URI (s3://...)
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
    isthing: dict[int, bool]  # category id → a thing (countable) category, else stuff

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
            isthing={
                c["id"]: bool(c.get("isthing"))
                for c in categories
                if isinstance(c, dict) and "id" in c
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
    """One grounded phrase of a narrative: where it is, its text and panoptic segment ids."""

    narrative: int
    segment: int
    text: str
    segment_ids: tuple[int, ...]
    plural: bool | None
    span: tuple[int, int] | None = None  # [start, end) of ``text`` in the narrative's caption
    noun: bool = True
    text_span: tuple[int, int] | None = None  # [start, end) in ``narrative_text``'s text


def narrative_text(narrative: dict) -> tuple[str, dict[int, tuple[int, int]]]:
    """The narrative as F-LMM feeds it (see the module): its pieces' utterances, stripped, joined
    by one space; and piece index → its ``[start, end)`` characters there (pieces without text
    have none)."""
    text, spans = "", {}
    for k, piece in enumerate(narrative["segments"]):
        utterance = piece.get("utterance") if isinstance(piece, dict) else None
        if isinstance(utterance, str) and utterance.strip():
            text += " " if text else ""
            spans[k] = (len(text), len(text) + len(utterance.strip()))
            text += utterance.strip()
    return text, spans


def grounded_phrases(
    image_id: int, index: int, narrative: dict, stats: PngSplitStats
) -> list[GroundedPhrase]:
    """The grounded phrases of one narrative, in order. Pieces without ``segment_ids`` are
    counted in ``stats.ungrounded``; malformed ones are skipped."""
    phrases = []
    caption = narrative.get("caption")
    caption = caption if isinstance(caption, str) else ""
    _, text_spans = narrative_text(narrative)
    cursor = 0  # pieces are consecutive: each is looked for after the previous one
    for k, piece in enumerate(narrative["segments"]):
        utterance = piece.get("utterance") if isinstance(piece, dict) else None
        span = None
        if isinstance(utterance, str) and utterance.strip():
            found = caption.find(utterance.strip(), cursor)
            if found >= 0:
                span = (found, found + len(utterance.strip()))
                cursor = span[1]
        ids = piece.get("segment_ids") if isinstance(piece, dict) else None
        if not isinstance(ids, list):
            stats.skip_phrase("malformed segment", image_id, index, k)
            continue
        if not ids:
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
                span,
                piece.get("noun", True) is not False,
                text_spans.get(k),
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
    ids = [index for index, _ in narratives]
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
                "isthing": [
                    panoptic.isthing.get(segments[i].get("category_id"), False)
                    for i in phrase.segment_ids
                ],
                "plural": phrase.plural,
                "noun": phrase.noun,
                "narrative": phrase.narrative,
                "segment": phrase.segment,
                "narrative_span": list(phrase.text_span),
            }
        )
        first = narratives[0][0]
        if phrase.narrative == first and phrase.span is not None:
            objects[-1]["spans"] = [list(phrase.span)]
    captions = [narrative.get("caption") for _, narrative in narratives]
    texts = [narrative_text(narrative)[0] for _, narrative in narratives]
    extra = {"narratives": captions, "narrative_ids": ids, "narrative_texts": texts}
    if isinstance(captions[0], str) and any("spans" in obj for obj in objects):
        extra["caption"] = captions[0]
    return image_sample(split, image_id, image, read, objects, stats, **extra)


def convert_png(config: PngConfig) -> dict[str, PngSplitStats]:
    """Convert one PNG split into shards ``png_coco-{split}-*.tar``; return ``{split: stats}``.

    Raises ``ValueError`` for a narratives file that is not a non-empty list, a panoptic JSON
    without ``images`` and ``annotations``, or a split name that would break shard names or keys.
    """
    check_name(config.split, "split")
    if config.samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    narratives = load_narratives(config.narratives)
    panoptic = Panoptic.load(config.panoptic)
    stats = PngSplitStats(config.split)
    grouped = group_narratives(narratives, stats)
    samples = (
        build_png_sample(config.split, image_id, grouped[image_id], panoptic, config, stats)
        for image_id in track(sorted(grouped), len(grouped), f"{config.split} images")
    )
    prefix = f"{PNG_NAME}-{config.split}"
    return {
        config.split: write_split_shards(
            prefix, config.out, config.samples_per_shard, samples, stats
        )
    }


# --------------------------------------------------------------------------------------------
# Reading PNG samples back (evaluation)
# --------------------------------------------------------------------------------------------


def narrative_queries(meta: dict) -> list[tuple[str, list[tuple[int, tuple[int, int]]]]] | None:
    """A PNG sample's narratives to ground in place: per narrative with a grounded object, its
    text (``narrative_texts``) and its objects' ``(object index, [start, end))`` there, in
    object order; None for a sample without ``narrative_texts`` (not a PNG sample, or one
    converted before they existed). Raises ``ValueError`` for fields that do not fit."""
    texts, ids = meta.get("narrative_texts"), meta.get("narrative_ids")
    if texts is None:
        return None
    objects = meta.get("objects")
    if not (isinstance(texts, list) and isinstance(ids, list) and len(ids) == len(texts)):
        raise ValueError("`narrative_texts` and `narrative_ids` are not parallel lists")
    grounded: dict[int, list[tuple[int, tuple[int, int]]]] = {}
    for index, obj in enumerate(objects):
        narrative, span = obj.get("narrative"), obj.get("narrative_span")
        if narrative not in ids:
            raise ValueError(f"object {index}: narrative {narrative!r} not in `narrative_ids`")
        k = ids.index(narrative)
        if not (
            isinstance(texts[k], str)
            and isinstance(span, list)
            and len(span) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in span)
            and 0 <= span[0] < span[1] <= len(texts[k])
        ):
            raise ValueError(f"object {index}: `narrative_span` {span!r} not inside its text")
        grounded.setdefault(k, []).append((index, (span[0], span[1])))
    return [(texts[k], grounded[k]) for k in sorted(grounded)]


def phrase_kinds(meta: dict) -> tuple[list[bool], list[bool]]:
    """Per object of a PNG sample: (thing, plural), as F-LMM's PNG evaluation splits phrases
    (``flmm/datasets/png.py``: ``mask_infos``; ``scripts/multiprocess_eval_png.py``): plural is
    the piece's ``plural`` flag (missing: singular); a plural phrase counts as a thing, a
    singular one is a thing when its segment's category ``isthing`` (the first segment's,
    should one have several: F-LMM asserts a singular phrase has exactly one). PNG's own
    evaluation (``baseline/test_net.py``) instead takes a plural phrase's category too."""
    things, plurals = [], []
    for obj in meta["objects"]:
        plural = obj.get("plural") is True
        isthing = obj.get("isthing") or [False]
        plurals.append(plural)
        things.append(plural or bool(isthing[0]))
    return things, plurals
