"""Visual chain-of-thought's geometry: where the evidence of a first look is, and the view a
second look answers from.

A question is grounded first (the objects it names; their masks in the original frame); the
union of those masks, widened by a margin, is the evidence box, and the LMM answers the question
again looking at it: cropped (at the LMM's own resolution a small object then fills its
fixed-size view), or in focus (the whole frame, everything outside the box painted over: sizes
and places, which a crop loses, are kept), or, by default, cropped when that zooms in and in
focus otherwise. Boxes are integer pixel corners ``(x0, y0, x1, y1)``, half-open,
in the original frame: crop pixel ``(u, v)`` is original pixel ``(x0 + u, y0 + v)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CropConfig:
    """``margin``: the box is widened on every side by this fraction of its own width (height);
    ``min_side``: pixels, a narrower (lower) box is widened about its centre to this, so that a
    speck of evidence still gives the LMM some context. Both stop at the image's edges.
    ``view`` (``second_view``): ``crop``, ``focus``, or ``auto``: the crop when the box covers at
    most ``zoom_area`` of the image (it magnifies ~2.5× per side or more at the default), else
    the focus."""

    margin: float = 0.25
    min_side: int = 32
    view: str = "auto"
    zoom_area: float = 0.15

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"--cot-view {self.view!r}: one of {VIEWS}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"--cot-margin must be a number >= 0, got {self.margin}")
        if not 0 < self.zoom_area <= 1:
            raise ValueError(f"the zoom area must be in (0, 1], got {self.zoom_area}")
        if self.min_side < 1:
            raise ValueError(f"the crop's min_side must be >= 1, got {self.min_side}")


Box = tuple[int, int, int, int]
VIEWS = ("auto", "crop", "focus")


def evidence_box(masks: torch.Tensor, config: CropConfig = CropConfig()) -> Box | None:
    """masks bool ``[P, H, W]`` (original frame) → the box ``(x0, y0, x1, y1)`` around their
    union, widened (``CropConfig``) and clipped to ``[0, W] × [0, H]``; None when every mask is
    empty (no evidence)."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be [P, H, W], got {tuple(masks.shape)}")
    union = masks.any(0)
    height, width = union.shape
    rows, cols = union.any(1).nonzero(), union.any(0).nonzero()
    if len(rows) == 0:
        return None
    x0, x1 = _widened(int(cols[0]), int(cols[-1]) + 1, width, config)
    y0, y1 = _widened(int(rows[0]), int(rows[-1]) + 1, height, config)
    return x0, y0, x1, y1


def _widened(start: int, end: int, limit: int, config: CropConfig) -> tuple[int, int]:
    """One axis of ``evidence_box``: ``[start, end)`` widened by the margin, then to
    ``min_side`` about its centre, clipped to ``[0, limit)``."""
    pad = math.ceil(config.margin * (end - start))
    start, end = start - pad, end + pad
    short = config.min_side - (end - start)
    if short > 0:
        start, end = start - short // 2, end + short - short // 2
    return max(0, start), min(limit, end)


def crop(image: torch.Tensor, box: Box) -> torch.Tensor:
    """The ``box`` of an image ``[H, W, C]`` (a view, ``[y1 - y0, x1 - x0, C]``)."""
    x0, y0, x1, y1 = box
    return image[y0:y1, x0:x1]


def focus(image: torch.Tensor, box: Box) -> torch.Tensor:
    """The image ``[H, W, C]`` with everything outside ``box`` painted its median colour (for
    most photos and every toy scene, the background's): the evidence keeps its size and place in
    the frame, and the distractors are gone."""
    x0, y0, x1, y1 = box
    out = image.flatten(0, 1).median(0).values.expand_as(image).clone()
    out[y0:y1, x0:x1] = image[y0:y1, x0:x1]
    return out


def zooms(image: torch.Tensor, box: Box, config: CropConfig) -> bool:
    """Whether the second look sees the crop (else the focus view): ``CropConfig.view``."""
    if config.view != "auto":
        return config.view == "crop"
    x0, y0, x1, y1 = box
    return (x1 - x0) * (y1 - y0) <= config.zoom_area * image.shape[0] * image.shape[1]


def second_view(image: torch.Tensor, box: Box, config: CropConfig) -> torch.Tensor:
    """What the second look sees (``CropConfig.view``, ``zooms``): the ``crop`` of ``box``
    (zoomed in to the LMM's resolution: small evidence gains pixels), or the whole frame in
    ``focus`` on it (sizes and places kept); contiguous."""
    view = crop(image, box) if zooms(image, box, config) else focus(image, box)
    return view.contiguous()


def xywh(box: Box) -> list[float]:
    """``(x0, y0, x1, y1)`` → ``[x, y, w, h]``, as the annotations' boxes are written."""
    x0, y0, x1, y1 = box
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
