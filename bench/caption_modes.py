"""The three ways the annotation job finds phrases, measured on the same held-out toy scenes.

Each scene gets a caption naming some of its objects (``toyworld.captions``); the same scenes are
written three times and annotated by the job (local Ray, the shipped toy models, one actor):

  * ``given``: the caption's expressions as ``phrases`` (what the job did before caption mode);
  * ``caption``: the caption alone (``<key>.txt``): the keyword selector picks the spans;
  * ``image``: the image alone: the toy LMM describes it, the selector picks spans in that.

Printed: per mode, gIoU over the gold expressions (a missed span counts 0), span precision /
recall of caption mode, and for image-only mode the share of objects given a mask with IoU ≥ 0.5
(recall) and the share of masks that hit an object that well (precision); model seconds per
image by stage (from the done markers: caption mode adds no prefill, image-only adds the
generation).

    python bench/caption_modes.py [--scenes 90] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.formats import decode_rle
from pipeline.grounding import STAGES
from toyworld.captions import make_caption
from toyworld.models import toy_model_spec
from toyworld.scenes import EVAL_START, make_scene, scene_seed
from toyworld.shards import scene_metadata, scene_sample

MODES = ("given", "caption", "image")


def scenes_and_captions(n: int):
    for index in range(EVAL_START, EVAL_START + n):
        scene = make_scene(scene_seed(0, index))
        yield f"val_{index:08d}", scene, make_caption(scene, np.random.default_rng(scene.seed))


def write_mode(out: Path, mode: str, n: int) -> None:
    from pipeline.shards import write_shards

    def samples():
        for key, scene, caption in scenes_and_captions(n):
            if mode == "given":
                meta = scene_metadata(scene)
                meta["phrases"] = [caption.text[a:b] for a, b in caption.spans]
                yield scene_sample(key, scene, meta)
            else:
                yield scene_sample(key, scene, mode="caption" if mode == "caption" else "image")

    write_shards(out, mode, samples(), 1000)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def score(out: Path, mode: str, n: int) -> dict:
    rows = pq.read_table(out / "annotations").to_pylist()
    by_key: dict[str, list[dict]] = {}
    for row in rows:
        by_key.setdefault(row["key"], []).append(row)
    gold_ious, hits, n_pred, n_gold, objects_found, n_objects, good_masks = [], 0, 0, 0, 0, 0, 0
    for key, scene, caption in scenes_and_captions(n):
        found = by_key.get(key, [])
        masks = [decode_rle(r["mask"]) for r in found]
        if mode == "image":
            for obj in scene.objects:
                best = max((iou(m, obj.mask) for m in masks), default=0.0)
                objects_found += best >= 0.5
                n_objects += 1
            good_masks += sum(max(iou(m, o.mask) for o in scene.objects) >= 0.5 for m in masks)
            n_pred += len(masks)
            continue
        for (a, b), obj_index in zip(caption.spans, caption.objects):
            target = scene.objects[obj_index].mask
            if mode == "given":
                match = [m for r, m in zip(found, masks) if r["phrase"] == caption.text[a:b]]
            else:
                match = [m for r, m in zip(found, masks) if r["span"] == [a, b]]
            gold_ious.append(iou(match[0], target) if match else 0.0)
            hits += bool(match)
        n_gold += len(caption.spans)
        n_pred += len(found)
    done = [json.loads(p.read_text()) for p in (out / "_done").glob("*.json")]
    images = sum(d["samples"] for d in done)
    per_image = {s: sum(d["timings"][s] for d in done) / images for s in STAGES}
    result = {"images": images, "annotations": len(rows), "model_s_per_image": per_image}
    if mode == "image":
        result.update(
            object_recall_iou50=objects_found / n_objects,
            mask_precision_iou50=good_masks / max(1, n_pred),
            objects=n_objects,
        )
    else:
        result.update(giou=float(np.mean(gold_ious)), gold_spans=n_gold)
        if mode == "caption":
            result.update(span_recall=hits / n_gold, span_precision=hits / max(1, n_pred))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=90)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from pipeline.annotate import AnnotateConfig, run_annotation

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            shards, out = Path(tmp, mode, "in"), Path(tmp, mode, "out")
            write_mode(shards, mode, args.scenes)
            config = AnnotateConfig((str(shards),), str(out), toy_model_spec(), preview_images=0)
            summary = run_annotation(config)
            assert not summary.failed, summary.failed
            results[mode] = score(out, mode, args.scenes)
            print(mode, json.dumps(results[mode]), flush=True)
    ray.shutdown()
    given, caption = results["given"], results["caption"]
    print(
        f"caption vs given: gIoU {caption['giou']:.3f} vs {given['giou']:.3f}; LMM s/image "
        f"{caption['model_s_per_image']['lmm_s']:.3f} vs {given['model_s_per_image']['lmm_s']:.3f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
