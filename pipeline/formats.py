"""The input format's file kinds and mask encoding (``schemas/INPUT_FORMAT.md``), shared by the
readers, the writers and the converters: which extensions are images / text, COCO RLE of masks,
lossless PNG of pixels."""

from __future__ import annotations

import io

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("json", "txt")


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
