"""Real input shards for the annotation tests: good samples, and every kind of bad one.

``write_mixed_shard`` writes one shard holding a good sample of each image mode the decoder
must convert (16-bit, greyscale, RGBA, CMYK, palette) and one sample of each error kind;
``MIXED_EXPECTED`` says what the job must report for each key. ``write_good_shards`` writes
small shards of plain RGB samples.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

PHRASES = ["the red circle", "a small blue square"]


def image_bytes(mode: str, size=(40, 28), fmt: str = "PNG", seed: int = 0) -> bytes:
    """An image of ``size`` (w, h) in PIL ``mode`` encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "RGBA":
        rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        rgba[: h // 2, :, 3] = 0  # top half fully transparent
        image = Image.fromarray(rgba, "RGBA")
    else:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def meta(phrases=None, **extra) -> bytes:
    body = {"phrases": PHRASES if phrases is None else phrases, **extra}
    return json.dumps(body).encode()


# key → (files, expected status, expected error kind or None)
MIXED = {
    "good_rgb": ({"jpg": image_bytes("RGB", fmt="JPEG"), "json": meta()}, "ok", None),
    "good_16bit": ({"png": image_bytes("I;16"), "json": meta()}, "ok", None),
    "good_grey": ({"png": image_bytes("L", size=(33, 21)), "json": meta()}, "ok", None),
    "good_rgba": ({"png": image_bytes("RGBA"), "json": meta(["the red circle"])}, "ok", None),
    "good_cmyk": ({"jpeg": image_bytes("CMYK", fmt="JPEG"), "json": meta()}, "ok", None),
    "good_palette": ({"png": image_bytes("P"), "json": meta()}, "ok", None),
    "bad_corrupt": (
        {"png": b"\x89PNG\r\n\x1a\nnot really", "json": meta()},
        "error",
        "corrupt_image",
    ),
    "bad_zero_bytes": ({"jpg": b"", "json": meta()}, "error", "empty_image"),
    "bad_empty_phrases": ({"png": image_bytes("RGB"), "json": meta([])}, "error", "no_phrases"),
    "bad_empty_caption": ({"png": image_bytes("RGB"), "txt": b" \n "}, "error", "no_phrases"),
    "bad_no_caption": ({"png": image_bytes("RGB"), "json": b'{"x": 1}'}, "error", "missing_text"),
    # Caption and image-only samples decode fine; the tiny test models' heads have no keyword
    # selector, so under --phrases selector the model stage makes them no_selector rows
    # (DECODE_EXPECTED: "ok"; the default, --phrases auto, has the LMM propose their phrases).
    "image_only": ({"png": image_bytes("RGB")}, "error", "no_selector"),
    "caption_json": (
        {"png": image_bytes("RGB"), "json": json.dumps({"caption": "a red circle"}).encode()},
        "error",
        "no_selector",
    ),
    "caption_txt": ({"png": image_bytes("RGB"), "txt": b"a red circle"}, "error", "no_selector"),
    "caption_long": (
        {"png": image_bytes("RGB"), "txt": b"the red circle and " * 1000 + b"the end"},
        "error",
        "no_selector",
    ),
    "bad_no_image": ({"json": meta()}, "error", "missing_image"),
    "bad_json": ({"png": image_bytes("RGB"), "json": b"{not json"}, "error", "bad_text"),
}
MIXED_EXPECTED = {key: (status, kind) for key, (_, status, kind) in MIXED.items()}
# What the decode stage says (the selector is the model stage's to check).
DECODE_EXPECTED = {
    key: ("ok", None) if kind == "no_selector" else (status, kind)
    for key, (status, kind) in MIXED_EXPECTED.items()
}


def write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """A WebDataset shard: ``<key>.<ext>`` members in order, fixed mtimes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_mixed_shard(path: Path) -> Path:
    return write_tar(path, {key: files for key, (files, _, _) in MIXED.items()})


def write_good_shards(directory: Path, n_shards: int, per_shard: int, prefix="good") -> list[Path]:
    """``n_shards`` shards of ``per_shard`` RGB samples with one or two phrases each."""
    paths = []
    for s in range(n_shards):
        samples = {
            f"{prefix}{s}_{i:03d}": {
                "png": image_bytes("RGB", size=(24 + 8 * i, 32), seed=100 * s + i),
                "json": meta(PHRASES[: 1 + i % 2]),
            }
            for i in range(per_shard)
        }
        paths.append(write_tar(directory / f"{prefix}-{s:06d}.tar", samples))
    return paths


def write_truncated_shard(path: Path) -> Path:
    """A shard cut in the middle of a member, as an interrupted upload leaves it."""
    write_good_shards(path.parent / ".full", 1, 3, prefix="cut")
    data = (path.parent / ".full" / "cut-000000.tar").read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    return path


def decoded_by_key(path: Path) -> dict[str, dict]:
    """A shard read and decoded as the annotation job's first stages do (``read_shard``,
    ``decode_batch``): its ``DECODED_SCHEMA`` rows by key."""
    import pyarrow as pa

    from pipeline.decode import decode_batch
    from pipeline.sources import read_shard, shard_name

    raw = read_shard(pa.table({"uri": [str(path)], "shard": [shard_name(str(path))]}))
    return {r["key"]: r for r in pa.concat_tables(decode_batch(raw)).to_pylist()}
