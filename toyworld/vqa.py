"""Training and evaluation text of the toy world: descriptions and short-answer questions.

Every question is a user instruction beside the image and an assistant answer laid out exactly as
grounding lays out phrases (``flmm.prompt.answer_text``: ``" p1. p2."``):

- ``describe``: the toy world's grounding instruction (``TOY_INSTRUCTION``) answered by one
  expression per object, in the toy LMM's recipe each followed by its object's size, colour and
  shape (``" the circle on the left. big red circle. …"``). Inside a phrase the referent is not yet
  determined, so its tokens can only attend to every object; the token that ends the expression
  knows the referent and has to look at it to go on. Its attention is the same in the plain
  grounding prompt (causal attention sees only the prefix), and it is what the heads read.
- ``colour``, ``shape``, ``size``, ``position``, ``count``, ``existence``: one-word answers. An
  object is named by one of its unique expressions that does not contain the answer.
- ``list`` (the recipe's third stage): ``LIST_INSTRUCTION`` answered by every object once, as
  ``"the {size} {colour} {shape}"``, in the world's colour order (then shape, then size): one
  answer per scene, so that greedy decoding can learn to name every object and stop, which the
  random order and wording of ``describe`` does not teach (the image-only mode asks this).

A question is a pure function of the scene and a ``numpy.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flmm.prompt import PromptConfig
from toyworld.scenes import Scene, SceneConfig, SceneObject, position_tags

DESCRIBE = "describe"
LIST = "list"
VQA_KINDS = ("colour", "shape", "size", "position", "count", "existence")
KINDS = (DESCRIBE, *VQA_KINDS, LIST)  # LIST last: the other kinds' eval seeds use their index
LIST_INSTRUCTION = "List the objects by colour."
# Expression kinds that name an object without its colour: one look at a cell finds a colour, but
# a shape, a size or a position needs the object's outline or the other objects compared.
COLOURLESS_KINDS = frozenset({"shape", "size_shape", "position", "shape_position"})
# The toy LMM's grounding instruction (the one it was pretrained to answer with every object's
# expression; the shipped heads are trained under it). Not F-LMM's: the toy world pins its own.
TOY_INSTRUCTION = "Please briefly describe this image."
TOY_PROMPT = PromptConfig(instruction=TOY_INSTRUCTION)
SCENE_CONFIG = SceneConfig()  # the default world

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# toyworld.scenes.POSITIONS entry → the one-word answer of a "Where is …?" question.
WHERE = {
    "on the left": "left",
    "on the right": "right",
    "at the top": "top",
    "at the bottom": "bottom",
}

TEMPLATES = {
    "colour": "What colour is {}?",
    "shape": "What shape is {}?",
    "size": "What size is {}?",
    "position": "Where is {}?",
    "count": "How many objects are there?",
    "existence": "Is there {} {} {}?",  # article, colour, shape
}


@dataclass(frozen=True)
class Question:
    """``instruction``: the user's text beside the image; ``phrases``: the assistant's answer, one
    entry for a short answer, one expression per object for ``describe``."""

    kind: str
    instruction: str
    phrases: tuple[str, ...]

    @property
    def answer(self) -> str:
        """The short answer (the first phrase; ``describe`` has one phrase per object)."""
        return self.phrases[0]


def ask(
    scene: Scene, kind: str, rng: np.random.Generator, config: SceneConfig = SCENE_CONFIG
) -> Question | None:
    """A question of ``kind`` about ``scene``, or None when the scene has none of that kind.

    ``config`` must be the scene's own (for the position margin and the attribute vocabulary).
    """
    if kind == DESCRIBE:
        return describe(scene, rng)
    if kind == LIST:
        return list_objects(scene, config)
    if kind not in _ASKERS:
        raise ValueError(f"unknown question kind {kind!r}; known kinds: {KINDS}")
    return _ASKERS[kind](scene, rng, config)


def sample_question(
    scene: Scene,
    rng: np.random.Generator,
    describe_fraction: float = 0.5,
    config: SceneConfig = SCENE_CONFIG,
    detail_fraction: float = 0.0,
) -> Question:
    """``describe`` with probability ``describe_fraction`` (detailed with probability
    ``detail_fraction``), else a short-answer kind drawn uniformly among those the scene
    supports."""
    if rng.random() < describe_fraction:
        detailed = detail_fraction > 0 and rng.random() < detail_fraction
        return describe(scene, rng, detailed)
    for kind in rng.permutation(VQA_KINDS):
        question = ask(scene, str(kind), rng, config)
        if question is not None:
            return question
    raise AssertionError("count questions exist for every scene")


def describe(
    scene: Scene,
    rng: np.random.Generator,
    detailed: bool = False,
    prefer: frozenset[str] = frozenset(),
    prefer_p: float = 0.0,
    colour_first: bool = False,
) -> Question:
    """One random unique expression per object, objects in random or left-to-right order.

    ``detailed``: each expression is followed by its object's size, colour and shape
    (``" the circle on the left. big red circle. …"``): the token that ends an expression has to
    find that object to go on, and its attention is the phrase's last row at grounding time.
    ``prefer``: expression kinds (``SceneObject.expression_kinds``) drawn from alone with
    probability ``prefer_p`` for an object that has any. ``colour_first``: the details as colour,
    size, shape (``" the circle. red big circle."``): the expression's last token then predicts
    the colour, which it can only read off its object (size is a coin toss between two).
    """
    objects = list(scene.objects)
    if rng.random() < 0.3:
        objects.sort(key=lambda obj: obj.centre[0])
    else:
        objects = [objects[i] for i in rng.permutation(len(objects))]
    phrases = tuple(str(rng.choice(_expressions(obj, rng, prefer, prefer_p))) for obj in objects)
    if detailed:
        first, second = ("colour", "size") if colour_first else ("size", "colour")
        details = (f"{getattr(obj, first)} {getattr(obj, second)} {obj.shape}" for obj in objects)
        phrases = tuple(x for pair in zip(phrases, details) for x in pair)
    return Question(DESCRIBE, TOY_INSTRUCTION, phrases)


def _expressions(
    obj: SceneObject, rng: np.random.Generator, prefer: frozenset[str], prefer_p: float
) -> list[str]:
    """``obj``'s expressions of the ``prefer`` kinds (with probability ``prefer_p``, when it has
    any), else all of them."""
    preferred = [e for e, k in zip(obj.expressions, obj.expression_kinds) if k in prefer]
    return preferred if preferred and rng.random() < prefer_p else obj.expressions


def listed_objects(scene: Scene, config: SceneConfig = SCENE_CONFIG) -> list[SceneObject]:
    """The scene's objects in list order: by colour, shape and size as ``config`` lists them."""
    colours = [name for name, _ in config.colours]
    sizes = [name for name, _ in config.size_fractions]
    return sorted(
        scene.objects,
        key=lambda o: (colours.index(o.colour), config.shapes.index(o.shape), sizes.index(o.size)),
    )


def list_objects(scene: Scene, config: SceneConfig = SCENE_CONFIG) -> Question:
    """Every object as ``"the {size} {colour} {shape}"``, in ``listed_objects`` order (a pure
    function of the scene: one right answer)."""
    phrases = tuple(list_name(o) for o in listed_objects(scene, config))
    return Question(LIST, LIST_INSTRUCTION, phrases)


def list_name(obj: SceneObject) -> str:
    """An object's name in a list: ``"the {size} {colour} {shape}"``."""
    return f"the {obj.size} {obj.colour} {obj.shape}"


def asked_object(scene: Scene, question: Question) -> SceneObject | None:
    """The one object a colour / shape / size / position question names (its template filled
    with one of the object's unique expressions), else None."""
    if question.kind not in ("colour", "shape", "size", "position"):
        return None
    head, _, tail = TEMPLATES[question.kind].partition("{}")
    name = question.instruction.removeprefix(head).removesuffix(tail)
    (obj,) = [o for o in scene.objects if name in o.expressions]
    return obj


def answer_options(kind: str, config: SceneConfig = SCENE_CONFIG) -> tuple[str, ...]:
    """Every possible answer of a short-answer ``kind`` (chance accuracy is 1 / len)."""
    options = {
        "colour": tuple(name for name, _ in config.colours),
        "shape": tuple(config.shapes),
        "size": tuple(name for name, _ in config.size_fractions),
        "position": tuple(WHERE.values()),
        "count": NUMBER_WORDS[config.min_objects : config.max_objects + 1],
        "existence": ("yes", "no"),
    }
    if kind not in options:
        raise ValueError(f"{kind!r} has no short answer; short-answer kinds: {VQA_KINDS}")
    return options[kind]


# --------------------------------------------------------------------------------------------
# Short-answer questions: (scene, rng, config) → Question | None
# --------------------------------------------------------------------------------------------


def _name_without(obj: SceneObject, words: set[str], rng: np.random.Generator) -> str | None:
    """A unique expression of ``obj`` that contains none of ``words``, or None."""
    names = [e for e in obj.expressions if not words & set(e.split())]
    return str(rng.choice(names)) if names else None


def _pick(askable: list[tuple[str, str]], kind: str, rng: np.random.Generator) -> Question | None:
    """One of the (object name, answer) pairs as a question of ``kind``; None if there is none."""
    if not askable:
        return None
    name, answer = askable[int(rng.integers(len(askable)))]
    return Question(kind, TEMPLATES[kind].format(name), (answer,))


def _attribute(kind: str):
    """Questions "What {kind} is {object}?" → the object's colour / shape / size."""

    def asker(scene: Scene, rng: np.random.Generator, config: SceneConfig) -> Question | None:
        askable = []
        for obj in scene.objects:
            value = getattr(obj, kind)
            name = _name_without(obj, {value}, rng)
            if name is not None:
                askable.append((name, value))
        return _pick(askable, kind, rng)

    return asker


def _position(scene: Scene, rng: np.random.Generator, config: SceneConfig) -> Question | None:
    """Questions "Where is {object}?" → left / right / top / bottom (objects with one tag only)."""
    height, width = scene.image.shape[:2]
    tags = position_tags([o.centre for o in scene.objects], height, width, config.position_margin)
    askable = []
    for obj, where in zip(scene.objects, tags):
        name = _name_without(obj, set(WHERE.values()), rng) if len(where) == 1 else None
        if name is not None:
            askable.append((name, WHERE[where[0]]))
    return _pick(askable, "position", rng)


def _count(scene: Scene, rng: np.random.Generator, config: SceneConfig) -> Question:
    return Question("count", TEMPLATES["count"], (NUMBER_WORDS[len(scene.objects)],))


def _existence(scene: Scene, rng: np.random.Generator, config: SceneConfig) -> Question:
    """Questions "Is there a {colour} {shape}?": about a present object or, half the time, with
    one of its two attributes swapped so that the (colour, shape) pair is absent from the scene."""
    present = {(o.colour, o.shape) for o in scene.objects}
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    colour, shape = obj.colour, obj.shape
    if rng.random() < 0.5:
        options = [(c, shape) for c, _ in config.colours] + [(colour, s) for s in config.shapes]
        options = [pair for pair in options if pair not in present]
        colour, shape = options[int(rng.integers(len(options)))]
    answer = "yes" if (colour, shape) in present else "no"
    return Question("existence", existence_instruction(colour, shape), (answer,))


def existence_instruction(colour: str, shape: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return TEMPLATES["existence"].format(article, colour, shape)


_ASKERS: dict[str, Callable[[Scene, np.random.Generator, SceneConfig], Question | None]] = {
    "colour": _attribute("colour"),
    "shape": _attribute("shape"),
    "size": _attribute("size"),
    "position": _position,
    "count": _count,
    "existence": _existence,
}
