"""Held-out toy scenes with a question that one object answers, as eval shards of the ``reason``
protocol (issue 37: reasoning segmentation on the toy world, ``bench/reasoning.py``).

Scene ``index`` of ``seed`` (from ``EVAL_START`` on: no training set reaches it) is asked
``toyworld.instructions.reason`` with the random stream the toy LMM's own record asks it with
(``toyworld.lmm.instruction_examples``: ``[seed, index, REASON_STREAM]``), so the first scenes
are the ones behind ``models/toy/llava/toy_world.json``'s reason accuracy; a scene with no
one-object answer is skipped. Each asked scene is one sample of the input format
(``schemas/INPUT_FORMAT.md``), ``<key>.png`` + ``<key>.json``:

- ``question``: the instruction ("Which object is left of the red circle?"), ``is_sentence``:
  false, ``kind``: the ``REASON_TEMPLATES`` name it was asked from (``largest``, ``smallest``,
  ``left_of``, ``above``, ``odd_colour``), ``answer``: the right answer (the referent's
  ``list_name``, "the big red circle");
- ``objects``: the referent alone, as ``toyworld.shards.scene_metadata`` writes an object (its
  caption spans left out), its ``expressions`` including its list name (a scene's expressions
  always do: its ``size_colour_shape`` one); ``phrases``: those expressions (what the
  ``standard`` protocol grounds, given); ``width``, ``height``, ``scene_seed``.

The shards are ``out_dir/reason-{000000..}.tar``: ``pipeline.evaluate.split_name`` names the set
``reason``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.shards import write_shards
from toyworld.instructions import REASON_TEMPLATES, reason, reason_object
from toyworld.scenes import EVAL_START, Scene, SceneObject, make_scene, scene_seed
from toyworld.shards import scene_metadata, scene_sample
from toyworld.vqa import SCENE_CONFIG, Question

REASON_SPLIT = "reason"  # the shards' prefix and the eval set's name
# toyworld.lmm.instruction_examples draws a reason question of held-out scene ``index`` from
# ``default_rng([seed, index, 100 + INSTRUCTION_KINDS.index("reason")])``
REASON_STREAM = 103


@dataclass(frozen=True, eq=False)
class ReasonScene:
    """Held-out scene ``index`` and its question of ``REASON_TEMPLATES[kind]``, answered by
    ``referent`` (one of ``scene.objects``)."""

    index: int
    scene: Scene
    question: Question
    kind: str
    referent: SceneObject


def reason_kind(instruction: str) -> str:
    """The ``REASON_TEMPLATES`` name ``instruction`` was written from (``instructions.reason``
    keeps only the text): "Which object is above the square?" → ``above``."""
    for kind, template in REASON_TEMPLATES.items():
        head, slot, tail = template.partition("{}")
        if instruction == template or slot and _framed(instruction, head, tail):
            return kind
    raise ValueError(f"not a reason question: {instruction!r}")


def _framed(text: str, head: str, tail: str) -> bool:
    """``text`` is ``head + something + tail``, the something not empty."""
    return len(text) > len(head) + len(tail) and text.startswith(head) and text.endswith(tail)


def reason_scenes(n: int, seed: int = 0, start: int = EVAL_START) -> Iterator[ReasonScene]:
    """The first ``n`` scenes of ``seed`` from index ``start`` on that a reason question has one
    answer for, in index order (the others skipped), each with that question."""
    index, found = start, 0
    while found < n:
        scene = make_scene(scene_seed(seed, index), SCENE_CONFIG)
        rng = np.random.default_rng([seed, index, REASON_STREAM])
        question = reason(scene, rng, SCENE_CONFIG)
        if question is not None:
            kind = reason_kind(question.instruction)
            yield ReasonScene(index, scene, question, kind, reason_object(scene, question))
            found += 1
        index += 1


def reason_metadata(asked: ReasonScene) -> dict:
    """The ``<key>.json`` of an asked scene (module docstring): the scene's metadata with the
    referent as its one object and the question's fields."""
    meta = scene_metadata(asked.scene)
    (referent,) = [m for m, o in zip(meta["objects"], asked.scene.objects) if o is asked.referent]
    name = asked.question.answer
    if name not in referent["expressions"]:  # (it is there: every object's full name is)
        referent["expressions"].append(name)
        referent["expression_kinds"].append("size_colour_shape")
    del referent["spans"]  # (spans of the scene's caption: training only)
    del meta["caption"]
    meta.update(
        question=asked.question.instruction,
        is_sentence=False,
        kind=asked.kind,
        answer=name,
        objects=[referent],
        phrases=list(referent["expressions"]),
    )
    return meta


def reason_shards(
    out_dir: str | Path,
    n: int,
    start: int = EVAL_START,
    seed: int = 0,
    scenes_per_shard: int = 100,
) -> list[Path]:
    """Write the ``n`` asked scenes of ``reason_scenes(n, seed, start)`` as
    ``out_dir/reason-{000000..}.tar``, ``scenes_per_shard`` each; return the paths. Scene
    ``index`` has key ``f"reason_{index:08d}"``; the shards are a pure function of the
    arguments."""
    if n < 1:
        raise ValueError("n must be >= 1")
    samples = (
        scene_sample(f"{REASON_SPLIT}_{a.index:08d}", a.scene, reason_metadata(a))
        for a in reason_scenes(n, seed, start)
    )
    return write_shards(out_dir, REASON_SPLIT, samples, scenes_per_shard)
