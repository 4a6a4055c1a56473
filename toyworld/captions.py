"""Toy-world captions with gold spans: what a caption-only corpus looks like, with the answer.

A caption names some of a scene's objects by one of their expressions, inside filler words that
name nothing to ground: ``"Here we see the big red circle next to the square on the left, on a
striped background."``. The gold spans are the expressions' character ranges; each belongs to one
object, so grounding a span can be scored against that object's mask.

A description is what the toy LMM learnt to write (``toyworld.vqa.describe``, detailed): every
object's expression followed by its size, colour and shape, ``"the circle on the left. big red
circle. the blue object. small blue star."``; only the expressions are gold spans (a detail names
the object just named again).

A list is what the toy LMM answers to ``toyworld.vqa.LIST_INSTRUCTION`` (what the image-only mode
asks it): ``"the big red circle. the small blue star."``, every segment a gold span.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toyworld.scenes import Scene
from toyworld.vqa import describe, list_name, listed_objects

OPENERS = (
    "",
    "A picture of ",
    "This image shows ",
    "Here we see ",
    "There is ",
    "In this scene there is ",
    "We can see ",
    "A drawing with ",
)
JOINERS = (" and ", ", ", " next to ", " beside ", ", as well as ", " with ", ", then ")
CLOSERS = (
    ".",
    " in the picture.",
    " on a {background} background.",
    ", nothing else.",
    " in this image.",
    "",
)
BACKGROUNDS = {"plain": "plain", "noise": "noisy", "stripes": "striped", "checker": "chequered"}


@dataclass(frozen=True)
class Caption:
    """text; spans: ``[start, end)`` characters of each named expression, in text order;
    objects: the index (in ``scene.objects``) of the object each span names."""

    text: str
    spans: tuple[tuple[int, int], ...]
    objects: tuple[int, ...]


def make_caption(scene: Scene, rng: np.random.Generator, all_objects: bool = False) -> Caption:
    """A caption naming 1 … all of the scene's objects (every one with ``all_objects``), each
    once, in random order, by a random one of its expressions."""
    n = len(scene.objects) if all_objects else int(rng.integers(1, len(scene.objects) + 1))
    chosen = [int(i) for i in rng.permutation(len(scene.objects))[:n]]
    text = str(rng.choice(OPENERS))
    spans = []
    for k, index in enumerate(chosen):
        if k:
            text += str(rng.choice(JOINERS))
        expression = str(rng.choice(scene.objects[index].expressions))
        spans.append((len(text), len(text) + len(expression)))
        text += expression
    closer = str(rng.choice(CLOSERS))
    text += closer.format(background=BACKGROUNDS.get(scene.background, scene.background))
    return Caption(text, tuple(spans), tuple(chosen))


def make_description(scene: Scene, rng: np.random.Generator) -> Caption:
    """A detailed toy description of the scene (as the toy LMM is trained to write one) with the
    expressions as gold spans."""
    segments = describe(scene, rng, detailed=True).phrases  # expression, detail, expression, …
    text, spans, objects = "", [], []
    for k, segment in enumerate(segments):
        text += ("" if not text else " ") + segment
        if k % 2 == 0:
            spans.append((len(text) - len(segment), len(text)))
            objects.append(_object_of(scene, segment))
        text += "."
    return Caption(text, tuple(spans), tuple(objects))


def make_list(scene: Scene) -> Caption:
    """The toy list of the scene's objects (``toyworld.vqa.list_objects``), every item a span."""
    text, spans, objects = "", [], []
    for obj in listed_objects(scene):
        phrase = list_name(obj)
        text += ("" if not text else " ") + phrase
        spans.append((len(text) - len(phrase), len(text)))
        objects.append(next(i for i, o in enumerate(scene.objects) if o is obj))
        text += "."
    return Caption(text, tuple(spans), tuple(objects))


def scene_text(scene: Scene) -> Caption:
    """The text a toy training sample carries for the keyword selector (``caption`` and objects'
    ``spans`` in its JSON), drawn from the scene's seed: a list (a third of the scenes: what
    the image-only mode grounds), a description (a sixth) or a caption (the rest)."""
    rng = np.random.default_rng([scene.seed, 7])
    draw = rng.random()
    if draw < 1 / 3:
        return make_list(scene)
    if draw < 1 / 2:
        return make_description(scene, rng)
    return make_caption(scene, rng)


def _object_of(scene: Scene, expression: str) -> int:
    return next(i for i, obj in enumerate(scene.objects) if expression in obj.expressions)
