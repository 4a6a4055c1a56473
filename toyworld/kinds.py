"""Where the toy heads fail: held-out gIoU per expression kind, under the ``standard`` protocol.

    python -m toyworld.kinds [--heads models/toy/heads.safetensors] [--scenes 100] [--json PATH]

Each held-out scene of the val split (``toyworld.shards``: ``scene_seed(0, EVAL_START + i)``) is
grounded as ``jobs/evaluate.py`` grounds the ``standard`` protocol (every expression of every
object alone in its own sequence, one LMM prefill per scene), and every result is scored by the
kind of its expression (``SceneObject.expression_kinds``: ``colour``, ``shape``, ``position``, …),
for the U-Net's mask and the refined one. The val shards do not carry the kinds, hence the scenes
are made here; the ``all`` row over 100 scenes is ``jobs/evaluate.py``'s ``standard`` row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import torch

from flmm.metrics import MaskIoU
from pipeline.evaluate import OUTPUTS, ground, masks_of, sequences
from toyworld.models import toy_heads, toy_model_spec
from toyworld.scenes import EVAL_START, make_scene, scene_seed


def kind_metrics(model, n_scenes: int) -> dict[str, dict[str, dict]]:
    """``{kind: {"unet" | "refined": MaskIoU.result()}}`` over the first ``n_scenes`` held-out
    scenes, plus ``"all"``."""
    metrics: dict[str, dict[str, MaskIoU]] = defaultdict(lambda: {o: MaskIoU() for o in OUTPUTS})
    for i in range(n_scenes):
        scene = make_scene(scene_seed(0, EVAL_START + i))  # the val split's scene i
        seqs = sequences([obj.expressions for obj in scene.objects], "standard")
        kinds = [kind for obj in scene.objects for kind in obj.expression_kinds]  # same order
        with torch.inference_mode():
            groundings = ground(model, [scene.image], seqs)
        for seq, kind, grounding in zip(seqs, kinds, groundings, strict=True):
            gt = torch.from_numpy(scene.objects[seq.objects[0]].mask)[None]
            for output, logits in (("unet", grounding.coarse), ("refined", grounding.refined)):
                for name in (kind, "all"):
                    metrics[name][output].update(masks_of(logits), gt)
    return {
        kind: {o: m.result() for o, m in outputs.items()}
        for kind, outputs in sorted(metrics.items(), key=lambda item: (item[0] == "all", item[0]))
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", default=str(toy_heads()), help="heads file (default: the shipped)")
    p.add_argument("--scenes", type=int, default=100, help="held-out scenes")
    p.add_argument("--json", help="write the table here as JSON")
    args = p.parse_args(argv)
    model = dataclasses.replace(toy_model_spec(heads=False), heads=args.heads).build()
    results = kind_metrics(model, args.scenes)
    print(f"{'kind':<18} {'n':>5} {'U-Net gIoU':>10} {'refined gIoU':>12}")
    for kind, row in results.items():
        unet, refined = row["unet"], row["refined"]
        print(f"{kind:<18} {unet['n']:5d} {unet['giou']:10.3f} {refined['giou']:12.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
