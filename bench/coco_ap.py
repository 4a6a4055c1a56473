"""COCO segm AP of the annotation job's labels on held-out toy scenes, through the COCO export.

The toy world's held-out split (``out/toy/val``: 100 scenes, every unique expression of every
object given as a phrase) is annotated by the job with the shipped toy models (local Ray), then
exported by ``jobs/export.py``'s code with one "object" category, with the inputs' objects
written as ground truth over the same images; ``pycocotools``' ``COCOeval`` scores it. Every
phrase is a prediction, so an object named by k expressions is predicted k times: the extra ones
count as false positives, as they would for any user who exports all phrases as one class.
Printed: the 12 COCOeval segm figures (AP, AP50, AP75, AP small/medium/large, AR@1/10/100, ...).

    python bench/coco_ap.py [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.export import export_coco
from toyworld.models import toy_model_spec
from toyworld.shards import toy_shards

NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100",
         "AR_small", "AR_medium", "AR_large")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from pipeline.annotate import AnnotateConfig, run_annotation

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "out")
        config = AnnotateConfig((str(toy_shards("val")),), str(out), toy_model_spec(),
                                preview_images=0)  # fmt: skip
        summary = run_annotation(config)
        assert not summary.failed, summary.failed
        predictions, truth = Path(tmp, "labels.json"), Path(tmp, "truth.json")
        export_coco(str(out), str(predictions), "object", ground_truth=str(truth))
        gt = COCO(str(truth))
        dt = gt.loadRes(json.loads(predictions.read_text())["annotations"])
        evaluation = COCOeval(gt, dt, "segm")
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
    ray.shutdown()
    results = {
        "images": len(gt.imgs),
        "objects": len(gt.anns),
        "predictions": len(dt.anns),
        **{name: round(float(v), 4) for name, v in zip(NAMES, evaluation.stats)},
    }
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
