"""A stand-in for the model stage, for measuring what the rest of the job can feed (a benchmark
hook: ``AnnotateConfig.stand_in_s``, ``bench/scale.py --stand-in``).

``StandInActor`` keeps ``GroundingActor``'s contract (``DECODED_SCHEMA`` batches in,
``RESULT_SCHEMA`` rows out, one per input row, error and shard rows passed through) but builds
no model and imports no torch: per batch it sleeps ``seconds`` (a GPU's time per batch; a sleep
holds no CPU, so many such actors share a few cores as GPU actors would) and answers every given
phrase with the same plausible mask for the image's size (an ellipse over about a fifth of the
image, COCO RLE, encoded once per size), its box and a score, so that writers and commits carry
bytes of a realistic size. Samples without given phrases (captions, bare images) get no masks,
and a warning saying so.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import pyarrow as pa
import pycocotools.mask as mask_utils

from schemas.results import RESULT_SCHEMA, STAGES

NOT_GROUNDED = "stand-in model: only given phrases are grounded"


@functools.lru_cache(maxsize=256)
def plausible_mask(height: int, width: int) -> tuple[str, list[float]]:
    """An object-like mask of a ``height × width`` image: COCO RLE counts and its XYWH box (an
    ellipse centred a little off the middle, half the image's height and 45% of its width)."""
    y, x = np.ogrid[:height, :width]
    cy, cx, ry, rx = 0.45 * height, 0.55 * width, 0.25 * height, 0.225 * width
    inside = ((y - cy) / max(ry, 1.0)) ** 2 + ((x - cx) / max(rx, 1.0)) ** 2 <= 1.0
    rle = mask_utils.encode(np.asfortranarray(inside.astype(np.uint8)))
    box = mask_utils.toBbox(rle).astype(np.float32).tolist()
    return rle["counts"].decode("ascii"), box


class StandInActor:
    """Sleeps ``seconds`` per batch in place of the model; the rows it returns are
    ``GroundingActor``'s for a model that finds the same mask for every given phrase."""

    def __init__(self, seconds: float, score: float = 0.9):
        self.seconds, self.score = seconds, score

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        time.sleep(self.seconds)
        kept = [name for name in batch.column_names if name in RESULT_SCHEMA.names]
        rows = batch.select(kept).to_pylist()  # (not the pixels: nothing looks at them)
        ok = sum(row["status"] == "ok" for row in rows)
        out = [self._result(row, kept) for row in rows]
        share = (time.perf_counter() - start) / max(1, ok)
        for row in out:
            row["model_s"] = share if row["status"] == "ok" else 0.0
        return pa.Table.from_pylist(out, RESULT_SCHEMA)

    def _result(self, row: dict, kept: list[str]) -> dict:
        result = {name: row[name] for name in kept}
        result.update(counts=[], bboxes=[], scores=[], mask_size=[], spans=[], selector_scores=[])
        result.update(proposer="", answer="", evidence_box=[], **dict.fromkeys(STAGES, 0.0))
        if row["status"] != "ok":
            return result
        result["mask_size"] = [row["height"], row["width"]]
        if row["source"] != "given":
            result["phrases"] = []
            result["warning"] = "; ".join(w for w in (row["warning"], NOT_GROUNDED) if w)
            return result
        counts, box = plausible_mask(row["height"], row["width"])
        n = len(row["phrases"])
        result.update(counts=[counts] * n, bboxes=[box] * n, scores=[self.score] * n)
        return result
