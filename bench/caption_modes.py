"""The ways the annotation job finds phrases, measured on the same held-out toy scenes.

Each scene gets a caption naming some of its objects (``toyworld.captions``); the same scenes are
written three times and annotated by the job (local Ray, the toy models, one actor):

  * ``given``: the caption's expressions as ``phrases`` (what the job did before caption mode);
  * ``caption``: the caption alone (``<key>.txt``): the keyword selector picks the spans, or the
    LMM proposes them (``--phrases lmm``: proposals located in the caption, grounded in place);
  * ``image``: the image alone: the toy LMM describes it and the selector picks spans in that,
    or the LMM lists what it sees and every item is grounded.

Caption and image modes run once per proposer (``--proposers``; the selector only when the heads
file has one). Printed: per mode, gIoU over the gold expressions (a missed span counts 0), span
precision / recall / F1 of caption mode, and for image-only mode the share of objects given a
mask with IoU ≥ 0.5 (recall) and the share of masks that hit an object that well (precision);
the share of samples given at least one mask, error rows; model seconds per image by stage
(from the done markers: caption mode with the selector adds no prefill, LMM proposals add one
generation, image-only adds the generation).

    python bench/caption_modes.py [--scenes 90] [--heads FILE] [--lmm DIR]
        [--proposers selector,lmm] [--caption-layout in-place|listed] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from flmm.metrics import mask_iou
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
                best = max((mask_iou(m, obj.mask) for m in masks), default=0.0)
                objects_found += best >= 0.5
                n_objects += 1
            good_masks += sum(max(mask_iou(m, o.mask) for o in scene.objects) >= 0.5 for m in masks)
            n_pred += len(masks)
            continue
        for (a, b), obj_index in zip(caption.spans, caption.objects):
            target = scene.objects[obj_index].mask
            if mode == "given":
                match = [m for r, m in zip(found, masks) if r["phrase"] == caption.text[a:b]]
            else:
                match = [m for r, m in zip(found, masks) if r["span"] == [a, b]]
            gold_ious.append(mask_iou(match[0], target) if match else 0.0)
            hits += bool(match)
        n_gold += len(caption.spans)
        n_pred += len(found)
    done = [json.loads(p.read_text()) for p in (out / "_done").glob("*.json")]
    images = sum(d["samples"] for d in done)
    per_image = {s: sum(d["timings"][s] for d in done) / images for s in STAGES}
    samples = pq.read_table(out / "samples").to_pylist()
    result = {
        "images": images,
        "annotations": len(rows),
        "with_masks": sum(s["n_annotations"] > 0 for s in samples) / len(samples),
        "errors": sum(s["status"] != "ok" for s in samples),
        "model_s_per_image": per_image,
    }
    if mode == "image":
        result.update(
            object_recall_iou50=objects_found / n_objects,
            mask_precision_iou50=good_masks / max(1, n_pred),
            objects=n_objects,
        )
    else:
        result.update(giou=float(np.mean(gold_ious)), gold_spans=n_gold)
        if mode == "caption":
            recall, precision = hits / n_gold, hits / max(1, n_pred)
            f1 = 2 * recall * precision / (recall + precision) if hits else 0.0
            result.update(span_recall=recall, span_precision=precision, span_f1=f1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=90)
    parser.add_argument("--heads", help="heads file (default: the toy heads)")
    parser.add_argument("--lmm", help="LMM directory (default: the toy LMM)")
    parser.add_argument("--proposers", default="selector,lmm", help="comma-separated")
    parser.add_argument("--caption-layout", default="listed", help="listed or in-place")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from pipeline.annotate import AnnotateConfig, run_annotation

    spec = toy_model_spec()
    spec = dataclasses.replace(spec, heads=args.heads or spec.heads, lmm=args.lmm or spec.lmm)
    has_selector = str(spec.heads).endswith(".safetensors") and _has_selector(spec.heads)
    proposers = [p for p in args.proposers.split(",") if p != "selector" or has_selector]
    runs = [("given", "auto")] + [(m, p) for m in ("caption", "image") for p in proposers]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            write_mode(Path(tmp, mode, "in"), mode, args.scenes)
        for mode, proposer in runs:
            name = mode if mode == "given" else f"{mode}/{proposer}"
            out = Path(tmp, name.replace("/", "_"), "out")
            config = AnnotateConfig(
                (str(Path(tmp, mode, "in")),),
                str(out),
                spec,
                preview_images=0,
                phrases=proposer,
                caption_layout=args.caption_layout,
            )
            summary = run_annotation(config)
            assert not summary.failed, summary.failed
            results[name] = score(out, mode, args.scenes)
            print(name, json.dumps(results[name]), flush=True)
    ray.shutdown()
    given = results["given"]
    for proposer in proposers:
        caption = results[f"caption/{proposer}"]
        print(
            f"{proposer}: caption vs given gIoU {caption['giou']:.3f} vs {given['giou']:.3f} "
            f"(gap {given['giou'] - caption['giou']:.3f}); span F1 {caption['span_f1']:.3f}; "
            f"image recall / precision {results[f'image/{proposer}']['object_recall_iou50']:.3f}"
            f" / {results[f'image/{proposer}']['mask_precision_iou50']:.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def _has_selector(path: str) -> bool:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return any(k.startswith("selector.") for k in f.keys())  # noqa: SIM118 (not a dict)


if __name__ == "__main__":
    main()
