"""The annotation job's output for other tools: COCO instances JSON, or a static HTML gallery.

Both read only committed shards (those with a done marker, ``pipeline/writer.py``), one shard at
a time, from any filesystem pyarrow knows (local, ``s3://``, ...), and write through the same
layer. Images, when needed (the gallery's thumbnails, COCO's copied images and ground truth), come
from the input shard each done marker names; COCO's image sizes and error kinds come from the
samples table (schema version 4 on: older outputs are refused with a clear error).

COCO (``export_coco``): one ``images`` entry per sample that was annotated without error (with 0
annotations too: a negative), one ``annotations`` entry per grounded phrase::

    images       {id, file_name, width, height, flmm_shard, flmm_key}
    annotations  {id, image_id, category_id, segmentation (the RLE as stored), area, bbox (XYWH),
                  score, iscrowd 0, phrase, source, span, proposer, selector_score}
    categories   one per distinct phrase ("phrase", ids in order of first appearance), or one
                 "object" category for every annotation ("object")

``file_name`` is ``<shard>/<key>`` (the sample inside its input shard) unless images are copied
out (``image_dir``): then ``<shard>/<key>.<ext>``, relative to that folder, holding the image's
original bytes. Samples with errors are left out and counted. With ``ground_truth`` (one
"object" category only), the input samples' own ``objects`` (``schemas/INPUT_FORMAT.md``) are
written as a second COCO file over the same images and ids, for ``COCOeval``. The JSON is assembled from two
temporary files of image and annotation entries, so memory holds one shard at a time (and the
category table).

HTML (``export_html``): one self-contained file (images and mask layers inlined as data URIs):
thumbnails with each mask drawn in its own colour of ``pipeline.render.PALETTE`` (fill and
outline, one layer per mask), a legend of phrase, score and source per mask, paging, a minimum
score and a phrase filter, and the samples that failed with their errors. Texts reach the page
only as JSON data inserted with ``textContent``: a phrase cannot inject markup or script.
The page's HTML, CSS and script are a file of this package, ``pipeline/gallery.html``, whose
``__TITLE__``, ``__SIDE__`` and ``__DATA__`` are filled in.
"""

from __future__ import annotations

import base64
import html
import io
import json
import posixpath
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import pyarrow.fs as pafs
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.decode import decode_sample
from pipeline.formats import decode_rle
from pipeline.render import colour, mask_layer
from pipeline.sources import raw_samples
from pipeline.uri import filesystem
from pipeline.writer import ANNOTATIONS, DONE, SAMPLES, OutputDir

CATEGORY_MODES = ("phrase", "object")
SIZED_SAMPLES = 4  # the first schema version whose samples carry error_kind, height and width


@dataclass
class ExportSummary:
    """What an export wrote: shards read, images, annotations, categories, samples left out."""

    shards: int = 0
    images: int = 0
    annotations: int = 0
    categories: int = 0
    error_samples: int = 0
    output: str = ""
    errors_by_kind: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"exported {self.images} images, {self.annotations} annotations, "
            f"{self.categories} categories from {self.shards} shards to {self.output}; "
            f"{self.error_samples} samples with errors left out"
        )


def committed_shards(out: OutputDir) -> list[str]:
    """Names of the shards of ``out`` that have a done marker, sorted."""
    selector = pafs.FileSelector(posixpath.join(out.root, DONE), allow_not_found=True)
    names = [
        info.base_name[: -len(".json")]
        for info in out.fs.get_file_info(selector)
        if info.base_name.endswith(".json") and not info.base_name.startswith(".")
    ]
    if not names:
        raise ValueError(f"{out.uri}: no finished shards (no {DONE}/<shard>.json)")
    return sorted(names)


@dataclass
class ShardOutput:
    """One committed shard: its done marker, its sample rows and its annotation rows by key."""

    name: str
    done: dict
    samples: list[dict]
    annotations: dict[str, list[dict]]
    version: int  # the samples table's schema version (``schemas.annotations``), 0 if unknown

    @classmethod
    def read(cls, out: OutputDir, name: str) -> ShardOutput:
        by_key: dict[str, list[dict]] = {}
        for row in out.read_table(ANNOTATIONS, name).to_pylist():
            by_key.setdefault(row["key"], []).append(row)
        samples = out.read_table(SAMPLES, name)
        version = int((samples.schema.metadata or {}).get(b"flmm.schema_version", b"0"))
        return cls(name, out.read_done(name), samples.to_pylist(), by_key, version)

    def inputs(self, keys: set[str]) -> dict[str, dict]:
        """``key → raw fields`` (``pipeline.sources.sample_files``: image, image_ext, text,
        text_ext, exts) of the wanted samples, from the input shard the done marker names."""
        found = raw_samples(self.done["input"], keys)
        missing = keys - found.keys()
        if missing:
            raise ValueError(
                f"{self.done['input']}: {len(missing)} annotated samples not found (e.g. "
                f"{min(missing)!r}); was the input shard changed after annotation?"
            )
        return found


def _output(uri: str) -> tuple[pafs.FileSystem, str]:
    fs, path = filesystem(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    return fs, path


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------


def export_coco(
    input_uri: str,
    output_uri: str,
    categories: str = "phrase",
    image_dir: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    ground_truth: str | None = None,
) -> ExportSummary:
    """Write the committed shards of ``input_uri`` as one COCO instances JSON at ``output_uri``
    (module doc); with ``image_dir``, copy the images there; with ``ground_truth``, write the
    inputs' objects there. ``progress(done, total)`` is called after each shard."""
    if categories not in CATEGORY_MODES:
        raise ValueError(f"categories {categories!r}: one of {CATEGORY_MODES}")
    if ground_truth and categories != "object":
        raise ValueError("ground truth is written with --categories object only")
    out = OutputDir(input_uri)
    names = committed_shards(out)
    summary = ExportSummary(output=output_uri)
    category_ids: dict[str, int] = {"object": 1} if categories == "object" else {}
    models: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        parts = _Parts(tmp, ground_truth is not None)
        with parts:
            for i, name in enumerate(names):
                shard = ShardOutput.read(out, name)
                models.add(shard.done.get("model", ""))
                _coco_shard(shard, summary, category_ids, categories, image_dir, parts)
                summary.shards += 1
                if progress:
                    progress(i + 1, len(names))
        summary.categories = len(category_ids)
        head = {
            "info": {
                "description": "flmm-pipeline annotations (jobs/export.py)",
                "source": input_uri,
                "models": sorted(models),
            },
            "licenses": [],
            "categories": [
                {"id": cid, "name": phrase, "supercategory": "phrase"}
                for phrase, cid in category_ids.items()
            ],
        }
        _write_coco(output_uri, head, parts.images.name, parts.annotations.name)
        if ground_truth:
            truth = {**head, "info": {**head["info"], "description": "ground truth (inputs)"}}
            _write_coco(ground_truth, truth, parts.images.name, parts.truth.name)
    return summary


class _Parts:
    """Temporary files of comma-separated JSON entries: images, annotations, ground truth."""

    def __init__(self, tmp: str, truth: bool):
        def part(name):
            return open(posixpath.join(tmp, name), "w", encoding="utf-8")

        self.images, self.annotations = part("images"), part("annotations")
        self.truth = part("truth") if truth else None
        self.counts = {"images": 0, "annotations": 0, "truth": 0}

    def add(self, part: str, entry: dict) -> int:
        """Append ``entry`` (its ``id``: the next in its part) to ``part``; returns the id."""
        self.counts[part] += 1
        entry = {"id": self.counts[part], **entry}
        getattr(self, part).write(("," if self.counts[part] > 1 else "") + json.dumps(entry))
        return entry["id"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in (self.images, self.annotations, self.truth):
            if f is not None:
                f.close()


def _write_coco(uri: str, head: dict, images: str, annotations: str) -> None:
    """``head`` (info, licenses, categories) + the two parts' entries as one JSON object."""
    fs, path = _output(uri)
    with fs.open_output_stream(path) as stream:
        stream.write(json.dumps(head)[:-1].encode())  # the object, still open
        for key, part in (("images", images), ("annotations", annotations)):
            stream.write(f', "{key}": ['.encode())
            with open(part, "rb") as entries:
                shutil.copyfileobj(entries, stream)
            stream.write(b"]")
        stream.write(b"}\n")


def _rle_entry(rle: dict, bbox: list[float] | None = None) -> dict:
    """segmentation (as stored), area and bbox (``bbox``, else the mask's) of a COCO RLE
    ``{size, counts: str}``."""
    encoded = {"size": list(rle["size"]), "counts": rle["counts"].encode()}
    if bbox is None:
        bbox = mask_utils.toBbox(encoded)
    return {
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"]},
        "area": float(mask_utils.area(encoded)),
        "bbox": [float(v) for v in bbox],
    }


def _coco_shard(shard, summary, category_ids, categories, image_dir, parts: _Parts):
    """Append one shard's image, annotation (and ground-truth) entries to the parts. The input
    shard is read only for images copied out or the ground truth."""
    if shard.version < SIZED_SAMPLES:
        raise ValueError(
            f"{shard.name}: written with output schema version {shard.version or 'unknown'}; "
            f"COCO export reads the samples' error_kind, height and width (schema version "
            f"{SIZED_SAMPLES} on): annotate the shard again (--overwrite)"
        )
    ok = [s for s in shard.samples if s["status"] == "ok"]
    for sample in shard.samples:
        if sample["status"] != "ok":
            summary.error_samples += 1
            kind = sample["error_kind"]
            summary.errors_by_kind[kind] = summary.errors_by_kind.get(kind, 0) + 1
    wanted = {s["key"] for s in ok} if image_dir or parts.truth else set()
    inputs = shard.inputs(wanted) if wanted else {}
    for sample in ok:
        key = sample["key"]
        rows = shard.annotations.get(key, [])
        width, height = sample["width"], sample["height"]
        file_name = f"{shard.name}/{key}"
        if image_dir:
            file_name = f"{file_name}.{inputs[key]['image_ext']}"
            fs, path = _output(posixpath.join(image_dir, file_name))
            with fs.open_output_stream(path) as stream:
                stream.write(inputs[key]["image"])
        image = {"file_name": file_name, "width": width, "height": height}
        image_id = parts.add("images", {**image, "flmm_shard": shard.name, "flmm_key": key})
        summary.images += 1
        for row in rows:
            phrase = "object" if categories == "object" else row["phrase"]
            category = category_ids.setdefault(phrase, len(category_ids) + 1)
            summary.annotations += 1
            annotation = {"image_id": image_id, "category_id": category}
            annotation.update(
                _rle_entry(row["mask"], row["bbox"]),  # the job's box (equal to the mask's)
                score=float(row["score"]),
                iscrowd=0,
                phrase=row["phrase"],
                source=row["source"],
                span=row["span"],
                proposer=row.get("proposer"),  # (outputs of schema 2 have none)
                selector_score=row["selector_score"],
            )
            parts.add("annotations", annotation)
        if parts.truth:
            meta = decode_sample(inputs[key], text_required=False)[1]
            for obj in _objects(meta, shard.done["input"], key):
                truth = {"image_id": image_id, "category_id": 1, "iscrowd": 0}
                parts.add("truth", {**truth, **_rle_entry(obj["mask"])})


def _decode(raw: dict) -> np.ndarray:
    """A sample's raw fields → its image, uint8 ``[H, W, 3]`` RGB, as the job decoded it."""
    return decode_sample(raw, text_required=False)[0]


def _objects(meta: dict | None, uri: str, key: str) -> list[dict]:
    """The annotated objects of an input sample's parsed text (ValueError if it has none)."""
    objects = (meta or {}).get("objects")
    if not isinstance(objects, list):
        raise ValueError(f"{uri}: sample {key!r} has no `objects` for the ground truth")  # noqa: TRY004 - bad input, as every export error
    return objects


# --------------------------------------------------------------------------------------------
# HTML gallery
# --------------------------------------------------------------------------------------------

THUMB_SIDE = 320  # the longer side of a thumbnail, pixels
PAGE = "gallery.html"  # the page's template, a file of this package


def export_html(
    input_uri: str,
    output_uri: str,
    max_images: int = 1000,
    per_page: int = 24,
    progress: Callable[[int, int], None] | None = None,
) -> ExportSummary:
    """Write the gallery of the first ``max_images`` annotated samples (in shard order) and of
    every sample with an error to ``output_uri`` (module doc)."""
    out = OutputDir(input_uri)
    names = committed_shards(out)
    summary = ExportSummary(output=output_uri)
    items, failed, phrases = [], [], set()
    for i, name in enumerate(names):
        shard = ShardOutput.read(out, name)
        summary.shards += 1
        for sample in shard.samples:
            if sample["status"] != "ok":
                summary.error_samples += 1
                failed.append({"shard": name, "key": sample["key"], "error": sample["error"]})
        room = max_images - len(items)
        shown = [s for s in shard.samples if s["status"] == "ok"][: max(0, room)]
        images = shard.inputs({s["key"] for s in shown}) if shown else {}
        for sample in shown:
            key = sample["key"]
            rows = sorted(shard.annotations.get(key, []), key=lambda r: -r["score"])
            items.append(_gallery_item(name, sample, images[key], rows))
            phrases.update(r["phrase"] for r in rows)
            summary.images += 1
            summary.annotations += len(rows)
        if progress:
            progress(i + 1, len(names))
    summary.categories = len(phrases)
    data = {"items": items, "failed": failed, "per_page": per_page, "source": input_uri}
    fs, path = _output(output_uri)
    with fs.open_output_stream(path) as stream:
        stream.write(_page(data, input_uri).encode())
    return summary


def _data_uri(image: Image.Image, fmt: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {"optimize": True}))
    mime = "jpeg" if fmt == "JPEG" else "png"
    return f"data:image/{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


def _gallery_item(shard: str, sample: dict, image: dict, rows: list[dict]) -> dict:
    """One sample: its thumbnail, and per annotation (highest score first) a mask layer in its
    own colour with phrase, score and source; a question sample's question and answer, and
    under ``--cot`` the box it was answered from (XYWH, thumbnail pixels; null otherwise)."""
    pixels = _decode(image)
    height, width = pixels.shape[:2]
    scale = THUMB_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    thumb = Image.fromarray(pixels).resize(size, Image.BILINEAR)
    annotations = []
    for i, row in enumerate(rows):
        layer = mask_layer(decode_rle(row["mask"]), size, i)
        annotations.append(
            {
                "phrase": row["phrase"],
                "score": round(float(row["score"]), 4),
                "source": row["source"],
                "colour": "#{:02x}{:02x}{:02x}".format(*colour(i)),
                "layer": _data_uri(layer, "PNG"),
            }
        )
    box = sample.get("evidence_box")  # (outputs before schema 6 have no such column)
    return {
        "shard": shard,
        "key": sample["key"],
        "question": sample.get("question"),
        "answer": sample.get("answer"),
        "box": [round(v * scale, 1) for v in box] if box else None,
        "width": size[0],
        "height": size[1],
        "image": _data_uri(thumb, "JPEG"),
        "annotations": annotations,
    }


def _script_json(data: dict) -> str:
    """JSON safe inside ``<script type="application/json">``: no ``<``, ``>`` or ``&`` left
    that could close the element or start markup."""
    text = json.dumps(data)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def page_template() -> str:
    """The gallery page (``pipeline/gallery.html``, package data): HTML, CSS and script, with
    ``__TITLE__``, ``__SIDE__`` and ``__DATA__`` to fill."""
    return resources.files("pipeline").joinpath(PAGE).read_text(encoding="utf-8")


def _page(data: dict, source: str) -> str:
    title = html.escape(f"flmm-pipeline annotations: {source}")
    return (
        page_template()
        .replace("__TITLE__", title)
        .replace("__SIDE__", str(THUMB_SIDE))
        .replace("__DATA__", _script_json(data))
    )
