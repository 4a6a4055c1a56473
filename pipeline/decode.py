"""Decode and validate samples on CPU: raw bytes → RGB pixels + phrases, or an error row.

The parsing functions are shared by every job that reads the input format
(``schemas/INPUT_FORMAT.md``): ``decode_image`` (any PIL mode → uint8 ``[H, W, 3]`` RGB),
``parse_text`` (``<key>.json`` / ``<key>.txt`` → meta dict), ``grounding_request`` / ``phrases_of``
(what to ground: given phrases, a caption, a question's answer, or nothing: a description to
generate) and
``object_targets`` / ``objects_of`` (training targets: per object / one mask per phrase). Each raises ``SampleError`` whose
``kind`` is one of ``ERROR_KINDS``.

``decode_batch`` is the pipeline stage: ``RAW_SCHEMA`` rows in, ``DECODED_SCHEMA`` rows out, a
per-row try/except turning a bad sample into an error row, so that it never fails its shard.
The heavy columns (image and text bytes) are dropped here.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.formats import IMAGE_EXTENSIONS, decode_rle
from pipeline.sources import iter_tar_samples, sample_files

ERROR_KINDS = {
    "missing_image": "the sample has no .jpg/.jpeg/.png/.webp file",
    "multiple_images": "the sample has more than one image file",
    "empty_image": "the image file has zero bytes",
    "corrupt_image": "the image does not decode (or is too large to decode safely)",
    "missing_text": "the .json has neither `phrases` nor `caption`",
    "bad_text": "the .json is not UTF-8 / not a JSON object / phrases not a list of strings / "
    "caption or question not a string",
    "no_phrases": "the phrase list is empty, or a phrase is blank",
    "no_question": "the sample's `question` (or --question) is empty or blank",
    "no_selector": "a caption / image-only / question sample under --phrases selector, without "
    "a selector",
    "bad_objects": "objects / masks do not match the image (training and evaluation only)",
    "bad_spans": "objects' caption spans are not [start, end) inside the caption (training only)",
    "bad_key": "the key holds '/', '\\', '..' or a control character (stored percent-escaped)",
    "model_error": "the model raised on this sample",
    "internal_error": "an unexpected exception while decoding (a bug: see the message)",
}

DECODED_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),  # "" for a shard-level row (see pipeline.sources)
        ("n_samples", pa.int64()),
        ("status", pa.string()),  # "ok" | "error" | "shard"
        ("error_kind", pa.string()),  # "" when ok
        ("error", pa.string()),  # "" when ok
        ("pixels", pa.large_binary()),  # uint8 [height, width, 3] RGB, C order; b"" unless ok
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("phrases", pa.list_(pa.string())),  # given phrases ("given"), else []
        ("text", pa.string()),  # the caption to select phrases from ("caption"), else ""
        ("question", pa.string()),  # the question the LMM answers ("answer"), else ""
        # "given" | "caption" | "generated" (to describe) | "answer" (to answer); "" unless ok
        ("source", pa.string()),
        ("warning", pa.string()),  # e.g. a truncated caption, skipped tar members; "" if none
        ("shard_error", pa.string()),
        ("read_s", pa.float64()),
        ("decode_s", pa.float64()),
    ]
)


class SampleError(ValueError):
    """A sample that cannot be used; ``kind`` is a key of ``ERROR_KINDS``."""

    def __init__(self, kind: str, message: str):
        assert kind in ERROR_KINDS, kind
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def decode_image(data: bytes) -> np.ndarray:
    """Image file bytes → uint8 ``[H, W, 3]`` RGB in the stored pixel frame (EXIF orientation
    is not applied, as in COCO). 16-bit greyscale is scaled to 8 bits; images with alpha (RGBA,
    LA, palette with transparency) are composited over white, as transformers' ``convert_rgb``
    does for LLaVA; CMYK, palette, greyscale, 1-bit etc. convert through PIL. The first frame of
    an animation is used."""
    if not data:
        raise SampleError("empty_image", "image file has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return _to_rgb(image)
    except SampleError:
        raise
    except Exception as error:  # noqa: BLE001 - PIL raises many types for bad files
        raise SampleError("corrupt_image", f"{type(error).__name__}: {error}") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode.startswith("I;16") or image.mode == "I":
        return _high_bit_depth_grey(np.asarray(image))
    if image.mode == "F":
        grey = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))  # writable
    return np.array(image.convert("RGB"))


def _high_bit_depth_grey(values: np.ndarray) -> np.ndarray:
    """Greyscale with more than 8 bits (PIL modes ``I;16*`` and ``I``) → RGB uint8. ``I`` is
    treated as 8-bit data when its maximum is below 256, as 16-bit otherwise."""
    values = values.astype(np.int64)
    if values.max(initial=0) > 255:
        values = np.clip(values, 0, 65535) * 255 // 65535
    grey = values.astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


# --------------------------------------------------------------------------------------------
# Text: phrases and objects
# --------------------------------------------------------------------------------------------


def parse_text(data: bytes, ext: str) -> dict:
    """``<key>.json`` (a JSON object) or ``<key>.txt`` (a caption) → meta dict. A caption that
    is not UTF-8 (scraped captions sometimes are) is decoded with U+FFFD replacement characters
    (``text_warning`` says so); a JSON file must be UTF-8."""
    if not ext:
        raise SampleError("missing_text", "sample has neither .json nor .txt")
    if ext == "txt":
        return {"caption": data.decode("utf-8", errors="replace")}
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SampleError("bad_text", f"{ext}: {error}") from None
    if not isinstance(meta, dict):
        raise SampleError("bad_text", f"json is a {type(meta).__name__}, not an object")
    return meta


def text_warning(data: bytes, ext: str) -> str:
    """The warning of a ``.txt`` caption that is not UTF-8 ("" for any other text)."""
    if ext != "txt":
        return ""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return (
            f"the .txt caption is not UTF-8 ({error.reason} at byte {error.start}): "
            "undecodable bytes replaced with U+FFFD"
        )
    return ""


MAX_TEXT_CHARS = 1000  # longer captions are cut here (with a warning): the LMM's context is finite
MAX_QUESTION_CHARS = 1000  # likewise for questions


@dataclass(frozen=True)
class Request:
    """What to ground in a sample: ``phrases`` as given (source ``"given"``), or phrases the
    keyword selector picks in ``text`` (``"caption"``), or in a description the LMM writes
    (``"generated"``, text ""), or in the LMM's answer to ``question`` (``"answer"``, text "").
    ``warning``: something the user should know ("" if nothing)."""

    source: str
    phrases: tuple[str, ...] = ()
    text: str = ""
    warning: str = ""
    question: str = ""


def grounding_request(
    meta: dict | None, describe: bool = False, question: str | None = None
) -> Request:
    """The request of a sample whose text parsed to ``meta`` (None: the sample has no text file).
    ``describe``: generate a description for every sample, whatever its text; ``question``: ask
    every sample this question (``--question``), whatever its text. Otherwise a JSON
    ``question`` comes first (the sample asks it; its ``phrases`` / ``caption``, if any, are
    left alone), then ``phrases``, then ``caption``."""
    if question is not None:
        return question_request(question, "--question")
    if describe or meta is None:
        return Request("generated")
    if "question" in meta:
        return question_request(meta["question"], "`question`")
    if "phrases" in meta:
        return Request("given", tuple(phrases_of(meta)))
    caption = meta.get("caption")
    if caption is None:
        raise SampleError("missing_text", "json has neither `phrases` nor `caption`")
    if not isinstance(caption, str):
        raise SampleError("bad_text", "`caption` must be a string")
    caption = caption.strip()
    if not caption:
        raise SampleError("no_phrases", "the caption is empty")
    text, warning = truncated(caption, MAX_TEXT_CHARS, "caption")
    return Request("caption", text=text, warning=warning)


def question_request(question, where: str) -> Request:
    """A question sample: the question stripped, cut to ``MAX_QUESTION_CHARS`` (with a
    warning), or SampleError (``bad_text``: not a string; ``no_question``: blank)."""
    if not isinstance(question, str):
        raise SampleError("bad_text", f"{where} must be a string")
    question = question.strip()
    if not question:
        raise SampleError("no_question", f"{where} is empty")
    question, warning = truncated(question, MAX_QUESTION_CHARS, "question")
    return Request("answer", question=question, warning=warning)


def truncated(text: str, limit: int, what: str) -> tuple[str, str]:
    """``text`` cut to ``limit`` characters, and the warning that says so ("" if not cut)."""
    if len(text) <= limit:
        return text, ""
    return text[:limit], f"{what} truncated from {len(text)} to {limit} characters"


def phrases_of(meta: dict) -> list[str]:
    """The given phrases: ``meta["phrases"]``, non-empty strings, at least one."""
    phrases = meta.get("phrases")
    if phrases is None:
        raise SampleError("missing_text", "json has no `phrases`")
    if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
        raise SampleError("bad_text", "`phrases` must be a list of strings")
    if not phrases:
        raise SampleError("no_phrases", "`phrases` is empty")
    if any(not p.strip() for p in phrases):
        raise SampleError("no_phrases", "`phrases` holds a blank phrase")
    return phrases


def object_targets(meta: dict, height: int, width: int) -> list[tuple[list[str], np.ndarray]]:
    """Every annotated object, in order: its expressions (possibly none) and its mask, bool
    ``[height, width]`` in the original frame. Validates every object and mask."""
    objects = meta.get("objects")
    if not isinstance(objects, list) or not objects:
        raise SampleError("bad_objects", "`objects` missing or empty")
    targets = []
    try:
        for obj in objects:
            mask = decode_rle(obj["mask"])
            if mask.shape != (height, width):
                raise SampleError(
                    "bad_objects", f"mask size {list(mask.shape)} != image {[height, width]}"
                )
            targets.append(([str(e) for e in obj["expressions"]], mask))
    except SampleError:
        raise
    except Exception as error:  # noqa: BLE001 - malformed JSON structures of any kind
        raise SampleError("bad_objects", f"{type(error).__name__}: {error}") from None
    return targets


def caption_spans(
    meta: dict,
) -> tuple[str, list[tuple[int, int]], list[list[int]]] | None:
    """A training sample's text and its groundable spans: ``caption``, every object's ``spans``
    (``[start, end)`` characters in it) sorted and de-duplicated, and per span the indices (in
    ``objects`` order) of the objects that it names (several for a plural phrase, whose target
    is their union); None when the sample has no caption or no object has spans. Validates the
    spans (SampleError ``bad_spans``)."""
    caption, objects = meta.get("caption"), meta.get("objects")
    if not isinstance(caption, str) or not isinstance(objects, list):
        return None
    owners: dict[tuple[int, int], list[int]] = {}
    for index, obj in enumerate(objects):
        given = obj.get("spans", []) if isinstance(obj, dict) else []
        if not isinstance(given, list):
            raise SampleError("bad_spans", f"`spans` is {type(given).__name__}, not a list")
        for span in given:
            if not (
                isinstance(span, list)
                and len(span) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in span)
                and 0 <= span[0] < span[1] <= len(caption)
            ):
                raise SampleError(
                    "bad_spans", f"span {span!r} is not [start, end) inside the caption"
                )
            owners.setdefault((span[0], span[1]), []).append(index)
    spans = sorted(owners)
    return (caption, spans, [owners[s] for s in spans]) if spans else None


def objects_of(meta: dict, height: int, width: int) -> tuple[list[str], np.ndarray]:
    """Training / evaluation targets flat over objects: every object's expressions, in object
    order, and the mask of the object each came from, bool ``[P, height, width]``."""
    targets = object_targets(meta, height, width)
    phrases = [e for expressions, _ in targets for e in expressions]
    if not phrases:
        raise SampleError("bad_objects", "objects have no expressions")
    return phrases, np.stack([mask for expressions, mask in targets for _ in expressions])


# --------------------------------------------------------------------------------------------
# The pipeline stage
# --------------------------------------------------------------------------------------------


def decode_sample(raw: Mapping, text_required: bool = True) -> tuple[np.ndarray, dict | None]:
    """One sample's raw files → (uint8 ``[H, W, 3]`` RGB, meta dict); raises SampleError.
    Without ``text_required`` a sample without a text file gives meta None (image-only).

    ``raw`` holds the ``RAW_SCHEMA`` fields ``image``, ``image_ext``, ``text``, ``text_ext`` and
    ``exts`` (a ``pipeline.sources.read_shard`` row, or ``sources.sample_files``). The text is
    parsed before the image is decoded: it is cheaper, and a bad one ends the work early. What to
    ground or train on is the caller's: ``phrases_of`` / ``object_targets`` of the meta."""
    names = raw["exts"].split(",") if raw["exts"] else []
    n_images = sum(names.count(e) for e in IMAGE_EXTENSIONS)
    if not raw["image_ext"]:
        raise SampleError("missing_image", f"no image among files {names}")
    if n_images > 1:
        raise SampleError("multiple_images", f"{n_images} image files: {names}")
    if not raw["text_ext"] and not text_required:
        return decode_image(raw["image"]), None
    meta = parse_text(raw["text"], raw["text_ext"])
    return decode_image(raw["image"]), meta


def read_samples(uris: Iterable[str | Path]) -> Iterator[dict]:
    """Every sample of the shards, in order, decoded: ``{"key", "image": uint8 [H, W, 3] RGB,
    "meta": dict}`` (for tools and tests; the jobs stream rows through ``decode_batch``). Raises
    SampleError on the first bad sample, ``sources.ShardError`` on a bad shard."""
    for uri in uris:
        for key, files, exts in iter_tar_samples(str(uri)):
            image, meta = decode_sample(sample_files(files, exts))
            yield {"key": key, "image": image, "meta": meta}


def decode_batch(
    batch: pa.Table, chunk: int = 16, describe: bool = False, question: str | None = None
) -> Iterator[pa.Table]:
    """Pipeline stage: ``RAW_SCHEMA`` → ``DECODED_SCHEMA``, one row per row, never raising;
    yields ``chunk`` rows at a time so that a whole shard is never held decoded. ``describe``:
    every sample's phrases come from a generated description; ``question``: from the LMM's
    answer to this question (``grounding_request``)."""
    for start in range(0, batch.num_rows, chunk):
        rows = batch.slice(start, chunk).to_pylist()
        decoded = [_decode_row(row, describe, question) for row in rows]
        yield pa.Table.from_pylist(decoded, DECODED_SCHEMA)


def _decode_row(row: dict, describe: bool = False, question: str | None = None) -> dict:
    start = time.perf_counter()
    out = {name: row[name] for name in ("shard", "key", "n_samples", "shard_error", "read_s")}
    out.update(status="ok", error_kind="", error="", pixels=b"", height=0, width=0, phrases=[])
    out.update(text="", question="", source="", warning=row["warning"])
    if not row["key"]:
        out["status"] = "shard"
    elif problem := key_problem(row["key"]):
        out.update(key=escape_key(row["key"]), status="error", error_kind="bad_key", error=problem)
    else:
        try:
            pixels, meta = decode_sample(row, text_required=False)
            request = grounding_request(meta, describe, question)
            height, width = pixels.shape[:2]
            out.update(pixels=pixels.tobytes(), height=height, width=width)
            out.update(phrases=list(request.phrases), text=request.text, source=request.source)
            out["question"] = request.question
            found = (row["warning"], text_warning(row["text"], row["text_ext"]), request.warning)
            out["warning"] = "; ".join(w for w in found if w)
        except SampleError as error:
            out.update(status="error", error_kind=error.kind, error=str(error))
        except Exception as error:  # noqa: BLE001 - a bug on one sample must not fail a shard
            out.update(status="error", error_kind="internal_error", error=repr(error))
    out["decode_s"] = time.perf_counter() - start
    return out


_CONTROL = {chr(c) for c in range(32)} | {"\x7f"}


def key_problem(key: str) -> str:
    """Why ``key`` may not name outputs ("" if it may): keys become file names downstream, so
    path separators, ``..`` and control characters are refused (``schemas/INPUT_FORMAT.md``)."""
    if "/" in key or "\\" in key:
        return f"key {escape_key(key)!r} holds a path separator"
    if ".." in key:
        return f"key {escape_key(key)!r} holds '..'"
    if any(c in _CONTROL for c in key):
        return f"key {escape_key(key)!r} holds a control character"
    return ""


def escape_key(key: str) -> str:
    """``key`` with ``%``, ``/``, ``\\``, ``.`` and control characters percent-encoded (UTF-8
    bytes), so that a refused key is stored, and reported, in a form that is safe and unique."""
    unsafe = _CONTROL | {"%", "/", "\\", "."}
    return "".join("".join(f"%{b:02X}" for b in c.encode()) if c in unsafe else c for c in key)


def pixels_of(row: dict) -> np.ndarray:
    """The uint8 ``[height, width, 3]`` image of an ok ``DECODED_SCHEMA`` row."""
    shape = (row["height"], row["width"], 3)
    return np.frombuffer(row["pixels"], dtype=np.uint8).reshape(shape)
