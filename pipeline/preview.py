"""``preview.png``: a few annotated images, drawn from what the job wrote, so a person can see
at a glance whether the labels are right.

Reads the annotations Parquet of finished shards and the same samples' images from the input
shards (with the job's own reader and decoder); draws the image's phrases with the highest scores
(all of them up to ``per_image``, then a "+k more" line), each mask filled and outlined in its
own colour of ``pipeline.render.PALETTE`` with its box, and under the image one line per phrase:
a swatch of its colour, the phrase, its score and where it came from (``given``, ``caption``,
``generated``).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.decode import decode_sample
from pipeline.formats import decode_rle
from pipeline.render import colour, draw_masks
from pipeline.sources import raw_samples
from pipeline.writer import ANNOTATIONS, OutputDir

TILE_HEIGHT, LINE_HEIGHT, COLUMNS = 256, 16, 3


def render_preview(
    out: OutputDir, shards: list[tuple[str, str]], n_images: int = 6, per_image: int = 8
) -> bytes | None:
    """PNG bytes of up to ``n_images`` images with up to ``per_image`` annotations each (the
    highest scores), from ``shards`` (``(name, uri)``, in order) that are done; None if nothing
    is annotated."""
    tiles = []
    for name, uri in shards:
        if len(tiles) >= n_images or not out.is_done(name):
            continue
        chosen = _choose(out.read_table(ANNOTATIONS, name).to_pylist(), n_images - len(tiles))
        images = _images(uri, set(chosen))
        tiles += [_tile(images[k], chosen[k], per_image) for k in chosen if k in images]
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
    return {
        key: decode_sample(raw, text_required=False)[0]
        for key, raw in raw_samples(uri, keys).items()
    }


def _tile(image: np.ndarray, annotations: list[dict], per_image: int) -> Image.Image:
    """image uint8 ``[H, W, 3]`` with the ``per_image`` best-scored masks and boxes drawn,
    scaled to ``TILE_HEIGHT``, and one line of text per drawn annotation below it (and one
    saying how many more there are)."""
    shown = sorted(annotations, key=lambda r: -r["score"])[:per_image]
    more = len(annotations) - len(shown)
    drawn = draw_masks(image, [decode_rle(row["mask"]) for row in shown])
    scale = TILE_HEIGHT / image.shape[0]
    picture = Image.fromarray(drawn)
    picture = picture.resize((max(1, round(image.shape[1] * scale)), TILE_HEIGHT))
    lines = len(shown) + (1 if more else 0)
    tile = Image.new(
        "RGB", (max(picture.width, 240), TILE_HEIGHT + LINE_HEIGHT * lines + 4), "white"
    )
    tile.paste(picture, (0, 0))
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default()
    for i, row in enumerate(shown):
        x, y, w, h = (v * scale for v in row["bbox"])
        if w > 0 and h > 0:
            draw.rectangle([x, y, x + w, y + h], outline=colour(i), width=2)
        top = TILE_HEIGHT + 2 + i * LINE_HEIGHT
        draw.rectangle([4, top + 2, 14, top + 12], fill=colour(i), outline=(60, 60, 60))
        label = f"{row['phrase']} ({row['score']:.2f}, {row['source']})"
        draw.text((20, top), label, fill=(20, 20, 20), font=font)
    if more:
        top = TILE_HEIGHT + 2 + len(shown) * LINE_HEIGHT
        draw.text((20, top), f"+{more} more", fill=(110, 110, 110), font=font)
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
