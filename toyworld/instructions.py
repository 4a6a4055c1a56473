"""Stage 5's instructions: phrase proposals, lists one per line, and questions answered by one
object (what ``--phrases lmm`` and the reasoning work ask a frozen LMM; issues 34 and 37).

- ``propose``: image + ``flmm.proposals.PROPOSE_PROMPT`` with a toy text in its caption slot (the
  one the toy shards carry, ``toyworld.captions.scene_text``: a caption, a description or a list)
  → the text's gold expressions, copied verbatim, in text order, one per line.
- ``list_lines``: image + ``flmm.proposals.LIST_PROMPT`` → every object as
  ``toyworld.vqa.list_name`` gives it, in ``listed_objects`` order (one right answer), one per line.
- ``reason``: "Which object is the largest?", "… left of the circle?", "… has the odd colour?" →
  that object's list name, laid out as every other phrase answer (``" the big red circle."``);
  asked only where the scene has one clear answer. Stage 5 asks ``STAGE_5_REASONS``; stage 6
  (``look``) all of ``REASON_TEMPLATES``, "… has the most corners?" too (``CORNERS``).
- ``look``: a short question about one object (its colour, shape, size or place) asked of the
  second look of visual chain-of-thought (``flmm.cot``): the view of the box around that
  object's mask, as ``--cot`` shows it (``flmm.cot.second_view``; a crop only for colour and
  shape, which a crop keeps).

One-per-line answers are ``" " + LINE_SEPARATOR.join(lines)`` then EOS, as every toy answer
starts with a space and ends with EOS. The separator is a newline *and a space*: the toy
tokenizer (Metaspace BPE) gives a word after a space its word token (``▁the``), and a word right
after a newline its letters (``t h e``), so ``"\\n the"`` keeps every line in the tokens the
caption itself has. A reader strips each line.
"""

from __future__ import annotations

import numpy as np
import torch

from flmm.cot import CropConfig, evidence_box, second_view, zooms
from flmm.proposals import LIST_PROMPT, PROPOSE_PROMPT
from toyworld.captions import Caption, scene_text
from toyworld.scenes import Scene, SceneObject
from toyworld.vqa import SCENE_CONFIG, WHERE, Question, ask, asked_object, list_name, listed_objects

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
    "most_corners": "Which object has the most corners?",
}
STAGE_5_REASONS = ("largest", "smallest", "left_of", "above", "odd_colour")  # (its data stream)
# an outline's corners (a star's five points and five inner corners; a cross's twelve)
CORNERS = {"circle": 0, "triangle": 3, "square": 4, "diamond": 4, "star": 10, "cross": 12}
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


LOOK_KINDS = ("colour", "shape", "size", "position")
COT_VIEW = CropConfig()  # the annotation job's default --cot view
ZOOM_KEEPS = frozenset({"colour", "shape"})  # what a crop still shows (not sizes and places)


def look(
    scene: Scene, rng: np.random.Generator, config=SCENE_CONFIG, crop: CropConfig = COT_VIEW
) -> tuple[Question, np.ndarray] | None:
    """A ``LOOK_KINDS`` question about one object (``toyworld.vqa.ask``) and the image the second
    look of ``--cot`` would answer it from (``flmm.cot.second_view`` of the box around the
    object's mask, ``[h, w, 3]`` uint8); a kind a crop cannot answer is not asked of a crop;
    None when the scene has no such question."""
    image = torch.from_numpy(scene.image)
    for kind in rng.permutation(LOOK_KINDS):
        question = ask(scene, str(kind), rng, config)
        if question is None:
            continue
        mask = torch.from_numpy(asked_object(scene, question).mask)[None]
        box = evidence_box(mask, crop)
        if zooms(image, box, crop) and kind not in ZOOM_KEEPS:
            continue
        return question, second_view(image, box, crop).numpy()
    return None


# --------------------------------------------------------------------------------------------
# Questions answered by one object (issue 37): (scene, rng, config) → (object, instruction) | None
# --------------------------------------------------------------------------------------------


def reason(
    scene: Scene,
    rng: np.random.Generator,
    config=SCENE_CONFIG,
    kinds: tuple[str, ...] = STAGE_5_REASONS,
) -> Question | None:
    """A question of a random kind of ``kinds`` (``REASON_TEMPLATES`` names) that the scene
    answers with one object (the next kind when it does not), or None when it answers none."""
    for kind in rng.permutation(list(kinds)):
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


def _most_corners(scene: Scene, rng: np.random.Generator, config) -> tuple[SceneObject, str] | None:
    """One object has more corners (``CORNERS``) than every other."""
    by_corners = sorted(scene.objects, key=lambda o: CORNERS[o.shape], reverse=True)
    if CORNERS[by_corners[0].shape] == CORNERS[by_corners[1].shape]:
        return None
    return by_corners[0], REASON_TEMPLATES["most_corners"]


_REASONERS = {
    "largest": _extreme(True),
    "smallest": _extreme(False),
    "left_of": _beside(0),
    "above": _beside(1),
    "odd_colour": _odd_colour,
    "most_corners": _most_corners,
}
