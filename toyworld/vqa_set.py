"""Held-out toy questions with short answers as eval shards for ``jobs/evaluate.py --protocol
vqa``: answer accuracy from the whole image and with visual chain-of-thought (issue 37).

Scene ``index`` (from ``EVAL_START``: never trained on) is asked one ``toyworld.vqa`` question,
its kind taken in turn from ``VQA_KINDS`` (the next kind when the scene has none of it). The
sample is ``<key>.png`` + ``<key>.json``: ``question``, ``answers`` (the one right answer),
``subset`` (the kind, and ``small-object`` / ``big-object`` for a question about one object),
and, for a question about one object, ``objects``: that object (its expressions and mask, the
evidence a chain-of-thought should look at).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.formats import encode_rle
from pipeline.shards import write_shards
from toyworld.scenes import EVAL_START, FAR_WORLD, Scene, SceneConfig, make_scene, scene_seed
from toyworld.shards import scene_sample
from toyworld.vqa import SCENE_CONFIG, VQA_KINDS, ask, asked_object

VQA_NAME = "vqa"  # shards vqa-{000000..}.tar: the evaluation's default protocol for them is vqa
WORLDS = {"default": SceneConfig(), "far": FAR_WORLD}  # the worlds bench/cot.py asks in


def vqa_meta(scene: Scene, index: int, config: SceneConfig = SCENE_CONFIG) -> dict:
    """The ``<key>.json`` of scene ``index``'s question (module docstring); ``config``: the
    scene's own."""
    rng = np.random.default_rng(scene.seed)
    kinds = VQA_KINDS[index % len(VQA_KINDS) :] + VQA_KINDS[: index % len(VQA_KINDS)]
    question = next(q for kind in kinds if (q := ask(scene, kind, rng, config)) is not None)
    height, width = scene.image.shape[:2]
    meta = {
        "question": question.instruction,
        "answers": [question.answer],
        "subset": [question.kind],
        "width": width,
        "height": height,
        "scene_seed": scene.seed,
    }
    obj = asked_object(scene, question)
    if obj is not None:
        meta["subset"].append(f"{obj.size}-object")
        meta["objects"] = [{"expressions": list(obj.expressions), "mask": encode_rle(obj.mask)}]
    return meta


def write_vqa_shards(
    out_dir: str | Path,
    n_scenes: int,
    seed: int = 0,
    first_index: int = EVAL_START,
    scenes_per_shard: int = 100,
    config: SceneConfig | None = None,
) -> list[Path]:
    """``n_scenes`` held-out scenes with one question each as ``out_dir/vqa-{000000..}.tar``
    (keys ``vqa_{index:08d}``); a pure function of the arguments."""
    config = config or SceneConfig()

    def sample(index: int) -> dict:
        scene = make_scene(scene_seed(seed, index), config)
        return scene_sample(f"{VQA_NAME}_{index:08d}", scene, vqa_meta(scene, index, config))

    samples = (sample(i) for i in range(first_index, first_index + n_scenes))
    return write_shards(out_dir, VQA_NAME, samples, scenes_per_shard)
