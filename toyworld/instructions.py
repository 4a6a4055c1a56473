"""Stage 5's instructions: phrase proposals, lists one per line, and questions answered by one
object (what ``--phrases lmm`` and the reasoning work ask a frozen LMM; issues 34 and 37).

- ``propose``: image + ``flmm.proposals.PROPOSE_PROMPT`` with a toy text in its caption slot (the
  one the toy shards carry, ``toyworld.captions.scene_text``: a caption, a description or a list)
  → the text's gold expressions, copied verbatim, in text order, one per line.
- ``list_lines``: image + ``flmm.proposals.LIST_PROMPT`` → every object as
  ``toyworld.vqa.list_name`` gives it, in ``listed_objects`` order (one right answer), one per line.
- ``reason``: "Which object is the largest?", "… left of the circle?", "… has the odd colour?" →
  that object's list name, laid out as every other phrase answer (``" the big red circle."``);
  asked only where the scene has one clear answer.

One-per-line answers are ``" " + LINE_SEPARATOR.join(lines)`` then EOS, as every toy answer
starts with a space and ends with EOS. The separator is a newline *and a space*: the toy
tokenizer (Metaspace BPE) gives a word after a space its word token (``▁the``), and a word right
after a newline its letters (``t h e``), so ``"\\n the"`` keeps every line in the tokens the
caption itself has. A reader strips each line.
"""

from __future__ import annotations

import numpy as np

from flmm.proposals import LIST_PROMPT, PROPOSE_PROMPT
from toyworld.captions import Caption, scene_text
from toyworld.scenes import Scene, SceneObject
from toyworld.vqa import SCENE_CONFIG, WHERE, Question, list_name, listed_objects

PROPOSE = "propose"
LIST_LINES = "list_lines"
REASON = "reason"
LINE_KINDS = frozenset({PROPOSE, LIST_LINES})  # answered one item per line
LINE_SEPARATOR = "\n "
REASON_TEMPLATES = {
    "largest": "Which object is the largest?",
    "smallest": "Which object is the smallest?",
    "left_of": "Which object is left of {}?",
    "above": "Which object is above {}?",
    "odd_colour": "Which object has the odd colour?",
}
AREA_RATIO = 1.5  # the largest (smallest) object's visible area against the next one, at least


def propose(scene: Scene, caption: Caption | None = None) -> Question:
    """``caption`` (default: the scene's ``scene_text``) in ``PROPOSE_PROMPT``, answered by its
    gold spans' text in text order."""
    caption = caption or scene_text(scene)
    lines = tuple(caption.text[s:e] for s, e in sorted(caption.spans))
    return Question(PROPOSE, PROPOSE_PROMPT.format(caption=caption.text), lines)


def list_lines(scene: Scene, config=SCENE_CONFIG) -> Question:
    """``LIST_PROMPT`` answered by every object's ``list_name`` in ``listed_objects`` order."""
    names = tuple(list_name(obj) for obj in listed_objects(scene, config))
    return Question(LIST_LINES, LIST_PROMPT, names)


def line_text(lines: tuple[str, ...] | list[str]) -> str:
    """The answer's text without its leading space: the lines joined by ``LINE_SEPARATOR``."""
    return LINE_SEPARATOR.join(lines)


def read_lines(answer: str) -> list[str]:
    """A generated one-per-line answer → its non-empty lines, stripped."""
    return [line.strip() for line in answer.split("\n") if line.strip()]


def line_match(lines: list[str], gold: tuple[str, ...] | list[str]) -> int:
    """How many of ``lines`` equal a gold item (case-insensitive), each gold item matched once."""
    left = [g.lower() for g in gold]
    hits = 0
    for line in lines:
        if line.lower() in left:
            left.remove(line.lower())
            hits += 1
    return hits


# --------------------------------------------------------------------------------------------
# Questions answered by one object (issue 37): (scene, rng, config) → (object, instruction) | None
# --------------------------------------------------------------------------------------------


def reason(scene: Scene, rng: np.random.Generator, config=SCENE_CONFIG) -> Question | None:
    """A question of a random ``REASON_TEMPLATES`` kind that the scene answers with one object
    (the next kind when it does not), or None when it answers none."""
    for kind in rng.permutation(list(REASON_TEMPLATES)):
        asked = _REASONERS[str(kind)](scene, rng, config)
        if asked is not None:
            obj, instruction = asked
            return Question(REASON, instruction, (list_name(obj),))
    return None


def reason_object(scene: Scene, question: Question) -> SceneObject:
    """The object a ``reason`` question's answer names."""
    (obj,) = [o for o in scene.objects if list_name(o) == question.answer]
    return obj


def _extreme(largest: bool):
    def asker(scene: Scene, rng: np.random.Generator, config) -> tuple[SceneObject, str] | None:
        by_area = sorted(scene.objects, key=lambda o: int(o.mask.sum()), reverse=largest)
        first, second = (int(o.mask.sum()) for o in by_area[:2])
        if max(first, second) < AREA_RATIO * min(first, second):
            return None
        return by_area[0], REASON_TEMPLATES["largest" if largest else "smallest"]

    return asker


def _beside(axis: int):
    """ "Which object is left of (above) B?": exactly one object's centre is left of (above) B's
    by the position margin, and every other one right of (below) it by the margin."""
    kind = ("left_of", "above")[axis]

    def asker(scene: Scene, rng: np.random.Generator, config) -> tuple[SceneObject, str] | None:
        margin = config.position_margin * scene.image.shape[1 - axis]
        askable = []
        for anchor in scene.objects:
            others = [o for o in scene.objects if o is not anchor]
            gaps = [anchor.centre[axis] - o.centre[axis] for o in others]
            before = [o for o, gap in zip(others, gaps) if gap >= margin]
            after = [gap <= -margin for gap in gaps]
            name = _name_without_position(anchor, rng)
            if len(before) == 1 and sum(after) == len(others) - 1 and name is not None:
                askable.append((before[0], REASON_TEMPLATES[kind].format(name)))
        return askable[int(rng.integers(len(askable)))] if askable else None

    return asker


def _name_without_position(obj: SceneObject, rng: np.random.Generator) -> str | None:
    names = [e for e in obj.expressions if not set(WHERE.values()) & set(e.split())]
    return str(rng.choice(names)) if names else None


def _odd_colour(scene: Scene, rng: np.random.Generator, config) -> tuple[SceneObject, str] | None:
    """Three objects or more, all of one colour but one."""
    colours = [o.colour for o in scene.objects]
    odd = [o for o in scene.objects if colours.count(o.colour) == 1]
    if len(scene.objects) < 3 or len(odd) != 1 or len(set(colours)) != 2:
        return None
    return odd[0], REASON_TEMPLATES["odd_colour"]


_REASONERS = {
    "largest": _extreme(True),
    "smallest": _extreme(False),
    "left_of": _beside(0),
    "above": _beside(1),
    "odd_colour": _odd_colour,
}
