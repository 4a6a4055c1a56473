"""The toy world: deterministic synthetic scenes of a few shapes, with exact masks and referring
expressions.

No pretrained weights exist where this project is developed, so we own a small world in which a
tiny LLaVA and a tiny SAM are pretrained and the F-LMM heads are trained and evaluated.

A scene is an RGB image of ``H×W`` pixels (each side drawn from ``[min_side, max_side]``, the
long side at most ``max_aspect`` times the short one, mostly non-square) with 2–4 objects. Every object has a shape, a colour and a size ("small" | "big"); the
(size, colour, shape) triple is unique within a scene, so ``"the small blue square"`` always refers
to exactly one object. Objects are drawn in order, later ones on top; each keeps at least
``min_visible_fraction`` of its area visible.

Coordinate frame everywhere: pixels of the image, ``x`` to the right (column), ``y`` down (row).

Exactness: each object's mask is rasterised first (PIL, no anti-aliasing) and the image pixels are
then painted from the visible mask, so ``image[mask] == colour`` holds exactly. Backgrounds are
muted (every pixel has channel values in ``[40, 180]`` and a channel spread of at most 24), while
every object colour has a channel spread of at least 100, so no background pixel can carry an
object colour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("square", "circle", "triangle", "star", "diamond", "cross")
COLOURS = (
    ("red", (220, 30, 30)),
    ("green", (30, 170, 50)),
    ("blue", (40, 80, 230)),
    ("yellow", (240, 220, 30)),
    ("purple", (150, 50, 200)),
    ("orange", (255, 140, 0)),
)
BACKGROUNDS = ("plain", "noise", "stripes", "checker")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom")
EVAL_START = 1_000_000  # held-out scenes are indices >= this (training sets use indices below)

# Background tones: grey level, per-channel tint, and the clip range that keeps them muted.
_GREY_RANGE = (70, 150)
_TINT = 12
_BG_CLIP = (40, 180)


@dataclass(frozen=True)
class SceneConfig:
    """Everything that shapes a toy scene. Lengths are pixels unless named ``*_fraction``.

    ``size_fractions``: object radius (half its bounding box) as a fraction of ``min(H, W)``, per
    size name; the actual radius is jittered by ``±size_jitter`` (relative). The defaults make a
    typical object cover ~9 cells of a 12×12 token grid (an 8% radius left most objects inside 1–3
    cells, below what attention maps at that grid can outline).
    ``max_aspect``: the long side over the short side, at most.
    ``attribute_sharing``: probability that a new object copies two attributes of an earlier one
    (a distractor, which makes size / colour words necessary to disambiguate).
    ``position_margin``: an object is "on the left" only if its centre is left of every other
    centre by at least this fraction of the image width (height for top / bottom).
    ``same_colour_gap``: pixels between the bounding boxes of two objects of the same colour.
    """

    min_side: int = 96
    max_side: int = 256
    max_aspect: float = 1.5
    min_objects: int = 2
    max_objects: int = 4
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[tuple[str, tuple[int, int, int]], ...] = COLOURS
    size_fractions: tuple[tuple[str, float], ...] = (("small", 0.18), ("big", 0.30))
    size_jitter: float = 0.1
    backgrounds: tuple[str, ...] = BACKGROUNDS
    min_visible_fraction: float = 0.5
    attribute_sharing: float = 0.5
    position_margin: float = 0.12
    same_colour_gap: float = 3.0
    placement_tries: int = 50
    max_attempts: int = 100

    def __post_init__(self) -> None:
        unknown = set(self.shapes) - set(SHAPES) | set(self.backgrounds) - set(BACKGROUNDS)
        if unknown:
            raise ValueError(f"unknown shapes or backgrounds: {sorted(unknown)}")
        n_triples = len(self.shapes) * len(self.colours) * len(self.size_fractions)
        if not 1 <= self.min_objects <= self.max_objects <= n_triples:
            raise ValueError("need 1 <= min_objects <= max_objects <= distinct attribute triples")
        if not 16 <= self.min_side <= self.max_side:
            raise ValueError("need 16 <= min_side <= max_side")
        if self.max_aspect < 1:
            raise ValueError("need max_aspect >= 1")


@dataclass(frozen=True, eq=False)
class SceneObject:
    """One object of a scene.

    ``centre``: (x, y) pixels, the centre of the shape's bounding box. ``radius``: half the side of
    that box, pixels. ``mask``: bool ``[H, W]``, the exact visible pixels after occlusion.
    ``area``: pixel count of the unoccluded shape, ``render_shape_mask(...).sum()``.
    ``expressions`` and ``expression_kinds`` are parallel lists; each expression refers to this
    object only within its scene.
    """

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    radius: float
    area: int
    mask: np.ndarray
    expressions: list[str] = field(default_factory=list)
    expression_kinds: list[str] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class Scene:
    """``image``: uint8 ``[H, W, 3]`` RGB; ``objects`` in drawing order (later ones on top)."""

    image: np.ndarray
    objects: list[SceneObject]
    background: str
    seed: int

    @property
    def phrases(self) -> list[str]:
        """All expressions of the scene, object by object, in drawing order."""
        return [e for obj in self.objects for e in obj.expressions]


# The toy world seen from afar: the same words, objects at 40 % of their radius ("small" 7.2 % of
# the short side, "big" 12 %) in larger images; a small object spans ~1.5 cells of the toy LMM's
# 12×12 grid, where a crop has pixels to gain (visual chain-of-thought, issue 37)
FAR_WORLD = SceneConfig(size_fractions=(("small", 0.072), ("big", 0.12)), min_side=160)


def scene_seed(seed: int, index: int) -> int:
    """The seed of scene ``index`` of a data set generated from ``seed`` (a 63-bit int)."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def make_scene(seed: int, config: SceneConfig = SceneConfig()) -> Scene:
    """Generate one scene; the same ``(seed, config)`` gives byte-identical images and masks."""
    rng = np.random.default_rng(seed)
    for _ in range(config.max_attempts):
        height, width = _sample_sides(rng, config)
        n_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
        attributes = _sample_attributes(rng, n_objects, config)
        placed = _place_objects(rng, attributes, height, width, config)
        if placed is not None:
            background = str(rng.choice(config.backgrounds))
            image = _draw_background(rng, height, width, background)
            return _compose(image, attributes, placed, background, seed, config)
    raise RuntimeError(f"seed {seed}: no valid layout in {config.max_attempts} attempts")


def _sample_sides(rng: np.random.Generator, config: SceneConfig) -> tuple[int, int]:
    """(H, W) pixels: H uniform in ``[min_side, max_side]``, W uniform among the sides in that
    range whose ratio to H is at most ``max_aspect`` either way."""
    height = int(rng.integers(config.min_side, config.max_side + 1))
    low = max(config.min_side, int(np.ceil(height / config.max_aspect)))
    high = min(config.max_side, int(height * config.max_aspect))
    return height, int(rng.integers(low, high + 1))


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices (x, y) pixels of a polygonal shape inside the box ``[cx ± r, cy ± r]``."""
    if shape == "square":
        h = 0.8 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.48 * r)
        return [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)]
    if shape == "cross":
        a = 0.35 * r
        unit = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a)]
        unit += [(-dx, -dy) for dx, dy in unit]
        return [(cx + dx, cy + dy) for dx, dy in unit]
    raise ValueError(f"not a polygonal shape: {shape}")


def render_shape_mask(
    shape: str, centre: tuple[float, float], radius: float, height: int, width: int
) -> np.ndarray:
    """The unoccluded shape rasterised without anti-aliasing: bool ``[height, width]``."""
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = centre
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, radius), fill=1)
    return np.array(canvas, dtype=bool)


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


def _sample_attributes(
    rng: np.random.Generator, n_objects: int, config: SceneConfig
) -> list[tuple[str, str, str]]:
    """``n_objects`` distinct (size, colour, shape) triples, some of them near-copies."""
    options = (
        [name for name, _ in config.size_fractions],
        [name for name, _ in config.colours],
        list(config.shapes),
    )
    triples: list[tuple[str, str, str]] = []
    while len(triples) < n_objects:
        if triples and rng.random() < config.attribute_sharing:
            candidate = list(triples[int(rng.integers(len(triples)))])
            slot = int(rng.integers(3))
            candidate[slot] = str(rng.choice(options[slot]))
        else:
            candidate = [str(rng.choice(values)) for values in options]
        if tuple(candidate) not in triples:
            triples.append(tuple(candidate))
    return triples


def _place_objects(
    rng: np.random.Generator,
    attributes: list[tuple[str, str, str]],
    height: int,
    width: int,
    config: SceneConfig,
) -> list[tuple[tuple[float, float], float, np.ndarray]] | None:
    """(centre, radius, full mask ``[H, W]``) per object, or None when no layout was found.

    Every object lies fully inside the image; after all later objects are drawn on top each
    keeps at least ``min_visible_fraction`` of its pixels; objects of the same colour never touch
    (their bounding boxes are ``same_colour_gap`` pixels apart), so every boundary is visible.
    """
    fractions = dict(config.size_fractions)
    placed: list[tuple[tuple[float, float], float, np.ndarray]] = []
    visible: list[np.ndarray] = []
    for size, colour, shape in attributes:
        jitter = 1.0 + config.size_jitter * rng.uniform(-1.0, 1.0)
        radius = round(fractions[size] * min(height, width) * jitter, 1)
        same_colour = [p for p, (_, c, _) in zip(placed, attributes) if c == colour]
        for _ in range(config.placement_tries):
            centre = _sample_centre(rng, radius, height, width)
            gap = config.same_colour_gap
            if not all(_boxes_apart(centre, radius, c, r, gap) for c, r, _ in same_colour):
                continue
            full = render_shape_mask(shape, centre, radius, height, width)
            if _keeps_visible(placed, visible, full, config.min_visible_fraction):
                visible = [v & ~full for v in visible] + [full]
                placed.append((centre, radius, full))
                break
        else:
            return None
    return placed


def _sample_centre(
    rng: np.random.Generator, radius: float, height: int, width: int
) -> tuple[float, float]:
    """A centre (x, y) pixels, rounded to 0.1, that keeps the box ``centre ± radius`` inside."""
    x = rng.uniform(radius + 1, width - radius - 2)
    y = rng.uniform(radius + 1, height - radius - 2)
    return round(float(x), 1), round(float(y), 1)


def _boxes_apart(
    a: tuple[float, float], ra: float, b: tuple[float, float], rb: float, gap: float
) -> bool:
    """Whether the boxes ``a ± ra`` and ``b ± rb`` (pixels) are at least ``gap`` apart."""
    limit = ra + rb + gap
    return abs(a[0] - b[0]) >= limit or abs(a[1] - b[1]) >= limit


def _keeps_visible(
    placed: list, visible: list[np.ndarray], new: np.ndarray, min_fraction: float
) -> bool:
    """Whether drawing ``new`` on top leaves every earlier object ``min_fraction`` visible."""
    return all(
        (v & ~new).sum() >= min_fraction * full.sum() for v, (_, _, full) in zip(visible, placed)
    )


def _visible_masks(full_masks: list[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask ``[H, W]`` when drawn in order (later masks cover earlier)."""
    covered = np.zeros_like(full_masks[0])
    visible = []
    for full in reversed(full_masks):
        visible.append(full & ~covered)
        covered |= full
    return visible[::-1]


# --------------------------------------------------------------------------------------------
# Backgrounds (muted: channel values in [40, 180], channel spread <= 2 * _TINT)
# --------------------------------------------------------------------------------------------


def _muted_tone(rng: np.random.Generator) -> np.ndarray:
    """A float ``[3]`` RGB tone: a grey level plus a small per-channel tint."""
    return rng.uniform(*_GREY_RANGE) + rng.uniform(-_TINT, _TINT, 3)


def _draw_background(rng: np.random.Generator, height: int, width: int, kind: str) -> np.ndarray:
    """uint8 ``[height, width, 3]`` background. Texture varies the grey level only."""
    tone = _muted_tone(rng)
    rows, cols = np.mgrid[0:height, 0:width]
    if kind == "plain":
        level = np.zeros((height, width))
    elif kind == "noise":
        level = rng.normal(0.0, 10.0, (height, width))
    elif kind == "stripes":
        period = int(rng.integers(6, 21))
        direction = (rows, cols, rows + cols)[int(rng.integers(3))]
        level = np.where(direction % period < period // 2, 0.0, rng.choice([-1, 1]) * 25.0)
    elif kind == "checker":
        cell = int(rng.integers(8, 25))
        level = np.where((rows // cell + cols // cell) % 2 == 0, 0.0, rng.choice([-1, 1]) * 25.0)
    else:
        raise ValueError(f"unknown background: {kind}")
    image = tone[None, None, :] + level[:, :, None]
    return np.clip(np.rint(image), *_BG_CLIP).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Expressions and composition
# --------------------------------------------------------------------------------------------


def position_tags(
    centres: list[tuple[float, float]], height: int, width: int, margin: float
) -> list[list[str]]:
    """Per object, the positions of ``POSITIONS`` in which it is the extreme one by a clear margin
    (``margin × width`` for left / right, ``margin × height`` for top / bottom)."""
    xy = np.asarray(centres, dtype=float).reshape(-1, 2)
    tags: list[list[str]] = []
    for i in range(len(xy)):
        others = np.delete(xy, i, axis=0)
        if len(others) == 0:
            tags.append([])
            continue
        gaps = (
            others[:, 0].min() - xy[i, 0],
            xy[i, 0] - others[:, 0].max(),
            others[:, 1].min() - xy[i, 1],
            xy[i, 1] - others[:, 1].max(),
        )
        limits = (margin * width, margin * width, margin * height, margin * height)
        tags.append([p for p, gap, lim in zip(POSITIONS, gaps, limits) if gap >= lim])
    return tags


def candidate_expressions(
    size: str, colour: str, shape: str, positions: list[str]
) -> list[tuple[str, str]]:
    """(kind, expression) pairs that describe an object, before the uniqueness filter."""
    candidates = [
        ("size_colour_shape", f"the {size} {colour} {shape}"),
        ("colour_shape", f"the {colour} {shape}"),
        ("size_shape", f"the {size} {shape}"),
        ("size_colour", f"the {size} {colour} object"),
        ("shape", f"the {shape}"),
        ("colour", f"the {colour} object"),
    ]
    for where in positions:
        candidates += [
            ("shape_position", f"the {shape} {where}"),
            ("position", f"the object {where}"),
        ]
    return candidates


def unique_expressions(candidates: list[list[tuple[str, str]]]) -> list[list[tuple[str, str]]]:
    """Keep, per object, the candidates that no other object of the scene also matches."""
    owners: dict[str, set[int]] = {}
    for i, pairs in enumerate(candidates):
        for _, text in pairs:
            owners.setdefault(text, set()).add(i)
    return [[(k, t) for k, t in pairs if owners[t] == {i}] for i, pairs in enumerate(candidates)]


def _compose(
    image: np.ndarray,
    attributes: list[tuple[str, str, str]],
    placed: list[tuple[tuple[float, float], float, np.ndarray]],
    background: str,
    seed: int,
    config: SceneConfig,
) -> Scene:
    """Paint the objects' visible pixels onto ``image`` (in place) and attach expressions."""
    height, width = image.shape[:2]
    rgb = dict(config.colours)
    visible = _visible_masks([full for _, _, full in placed])
    tags = position_tags([c for c, _, _ in placed], height, width, config.position_margin)
    expressions = unique_expressions(
        [candidate_expressions(*attrs, where) for attrs, where in zip(attributes, tags)]
    )
    objects = []
    for (size, colour, shape), (centre, radius, full), mask, exprs in zip(
        attributes, placed, visible, expressions
    ):
        image[mask] = rgb[colour]
        objects.append(
            SceneObject(
                shape=shape,
                colour=colour,
                size=size,
                centre=centre,
                radius=radius,
                area=int(full.sum()),
                mask=mask,
                expressions=[text for _, text in exprs],
                expression_kinds=[kind for kind, _ in exprs],
            )
        )
    return Scene(image=image, objects=objects, background=background, seed=seed)
