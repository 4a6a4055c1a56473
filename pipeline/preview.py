"""``preview.png``: a few annotated images, drawn from what the job wrote, so a person can see
at a glance whether the labels are right.

Reads the annotations Parquet of finished shards and the same samples' images from the input
shards (with the job's own reader and decoder); draws each mask as a coloured
overlay, its box as a rectangle and its phrase with its score and where the phrase came from
(``given``, ``caption``, ``generated``) underneath.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.decode import decode_sample
from pipeline.formats import decode_rle
from pipeline.sources import iter_tar_samples, sample_files
from pipeline.writer import ANNOTATIONS, OutputDir

COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]
TILE_HEIGHT, LINE_HEIGHT, COLUMNS = 256, 16, 3


def render_preview(
    out: OutputDir, shards: list[tuple[str, str]], n_images: int = 6, per_image: int = 4
) -> bytes | None:
    """PNG bytes of up to ``n_images`` images with up to ``per_image`` annotations each, from
    ``shards`` (``(name, uri)``, in order) that are done; None if nothing is annotated."""
    tiles = []
    for name, uri in shards:
        if len(tiles) >= n_images or not out.is_done(name):
            continue
        chosen = _choose(out.read_table(ANNOTATIONS, name).to_pylist(), n_images - len(tiles))
        images = _images(uri, set(chosen))
        tiles += [_tile(images[k], chosen[k][:per_image]) for k in chosen if k in images]
    if not tiles:
        return None
    buffer = io.BytesIO()
    _grid(tiles).save(buffer, format="PNG")
    return buffer.getvalue()


def _choose(annotations: list[dict], n: int) -> dict[str, list[dict]]:
    """The first ``n`` keys with annotations → their annotation rows."""
    chosen: dict[str, list[dict]] = {}
    for row in annotations:
        if row["key"] in chosen or len(chosen) < n:
            chosen.setdefault(row["key"], []).append(row)
    return chosen


def _images(uri: str, keys: set[str]) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    for key, files, exts in iter_tar_samples(uri):
        if key in keys and key not in found:
            found[key] = decode_sample(sample_files(files, exts), text_required=False)[0]
    return found


def _tile(image: np.ndarray, annotations: list[dict]) -> Image.Image:
    """image uint8 ``[H, W, 3]`` with masks and boxes drawn, scaled to ``TILE_HEIGHT``, and one
    line of text per annotation below it."""
    blend = image.astype(np.float32)
    for i, row in enumerate(annotations):
        mask = decode_rle(row["mask"])
        blend[mask] = 0.55 * blend[mask] + 0.45 * np.array(COLOURS[i % len(COLOURS)])
    scale = TILE_HEIGHT / image.shape[0]
    picture = Image.fromarray(blend.astype(np.uint8))
    picture = picture.resize((max(1, round(image.shape[1] * scale)), TILE_HEIGHT))
    text_height = LINE_HEIGHT * len(annotations) + 4
    tile = Image.new("RGB", (max(picture.width, 200), TILE_HEIGHT + text_height), "white")
    tile.paste(picture, (0, 0))
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default()
    for i, row in enumerate(annotations):
        colour = COLOURS[i % len(COLOURS)]
        x, y, w, h = (v * scale for v in row["bbox"])
        if w > 0 and h > 0:
            draw.rectangle([x, y, x + w, y + h], outline=colour, width=2)
        label = f"{row['phrase']} ({row['score']:.2f}, {row['source']})"
        draw.text((4, TILE_HEIGHT + 2 + i * LINE_HEIGHT), label, fill=colour, font=font)
    return tile


def _grid(tiles: list[Image.Image]) -> Image.Image:
    columns = min(COLUMNS, len(tiles))
    rows = [tiles[i : i + columns] for i in range(0, len(tiles), columns)]
    width = max(sum(t.width for t in row) + 8 * (len(row) - 1) for row in rows)
    heights = [max(t.height for t in row) for row in rows]
    canvas = Image.new("RGB", (width, sum(heights) + 8 * (len(rows) - 1)), (235, 235, 235))
    y = 0
    for row, height in zip(rows, heights):
        x = 0
        for tile in row:
            canvas.paste(tile, (x, y))
            x += tile.width + 8
        y += height + 8
    return canvas
