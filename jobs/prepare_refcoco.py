"""Convert RefCOCO / RefCOCO+ / RefCOCOg, or one split of COCO Panoptic Narrative Grounding (PNG),
into WebDataset shards of the input format.

    python jobs/prepare_refcoco.py --refs data/refcoco/'refs(unc).p' \
        --instances data/refcoco/instances.json --images data/coco/train2014 \
        --dataset refcoco --split-by unc --out shards/refcoco [--splits val,testA,testB]

Writes `{dataset}_{split_by}-{split}-{000000..}.tar` and `{dataset}_{split_by}-{split}.stats.json`
per split into --out, and prints one summary line per split. Refs whose image file or annotation
is missing are skipped and counted (the stats file lists them); they do not stop the conversion.

    python jobs/prepare_refcoco.py --dataset png \
        --narratives data/png/annotations/png_coco_val2017.json \
        --panoptic data/png/annotations/panoptic_val2017.json \
        --panoptic-masks data/png/annotations/panoptic_segmentation/val2017 \
        --images data/png/images/val2017 --out shards/png [--split val2017]

Writes `png_coco-{split}-{000000..}.tar` and `png_coco-{split}.stats.json`: one sample per image,
one object per grounded phrase (a narrative piece with segment ids, as F-LMM reads PNG; mask: the
union of its panoptic segments), every narrative's text with its phrases' spans for the `png`
evaluation protocol. --split defaults
to the {split} of a narratives file named png_coco_{split}.json. Phrases whose image, label PNG or
segments are missing are skipped and counted.

    python jobs/prepare_refcoco.py --dataset reasonseg --images data/reason_seg/ReasonSeg \
        --out shards/reasonseg [--splits val,test]

Writes `reason_seg-{split}-{000000..}.tar` and `reason_seg-{split}.stats.json` per split folder
of --images (LISA's ReasonSeg release: <name>.jpg beside <name>.json): one sample per image, its
first query as the `question` (as LISA's evaluation asks it), the target polygons as the mask and
the `ignore` ones beside it, `is_sentence`; for `jobs/evaluate.py --protocol reason`. Images whose
file or JSON is missing or does not fit are skipped and counted.
See pipeline/refcoco.py, pipeline/png.py and pipeline/reasonseg.py.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pipeline.png import PNG_NAME, PngConfig, convert_png
from pipeline.reasonseg import REASON_NAME, ReasonSegConfig, convert_reasonseg
from pipeline.refcoco import RefcocoConfig, convert_refcoco

REFCOCO_ONLY = ("refs", "instances", "split_by", "splits")
PNG_ONLY = ("narratives", "panoptic", "panoptic_masks", "split")


def parse_args(argv=None) -> RefcocoConfig | PngConfig | ReasonSegConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", required=True, help="refcoco, refcoco+, refcocog, png or reasonseg")
    p.add_argument(
        "--images",
        type=Path,
        required=True,
        help="COCO images directory (reasonseg: the folder of the split folders)",
    )
    p.add_argument("--out", required=True, help="output directory or URI (s3://bucket/prefix)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    refcoco = p.add_argument_group("RefCOCO (required unless --dataset png)")
    refcoco.add_argument("--refs", type=Path, help="refs(unc).p / refs(umd).p / ...")
    refcoco.add_argument("--instances", type=Path, help="COCO instances.json")
    refcoco.add_argument("--split-by", help="unc, umd or google")
    refcoco.add_argument(
        "--splits",
        help="comma-separated splits (default: all in the refs file; reasonseg: all folders)",
    )
    png = p.add_argument_group("PNG (--dataset png)")
    png.add_argument("--narratives", type=Path, help="png_coco_{split}.json")
    png.add_argument("--panoptic", type=Path, help="COCO panoptic_{split}.json")
    png.add_argument(
        "--panoptic-masks",
        type=Path,
        help="folder of its panoptic label PNGs (annotations/panoptic_segmentation/{split})",
    )
    png.add_argument("--split", help="split name (default: from png_coco_{split}.json)")
    args = p.parse_args(argv)
    if args.dataset == "png":
        return _png_config(p, args)
    if args.dataset == "reasonseg":
        if given := _flags(args, REFCOCO_ONLY[:3] + PNG_ONLY, given=True):
            p.error(f"{', '.join(given)}: not for --dataset reasonseg")
        return ReasonSegConfig(args.images, args.out, _splits(args), args.samples_per_shard)
    if given := _flags(args, PNG_ONLY, given=True):
        p.error(f"{', '.join(given)}: only for --dataset png")
    if missing := _flags(args, REFCOCO_ONLY[:3], given=False):
        p.error(f"the following arguments are required: {', '.join(missing)}")
    splits = _splits(args)
    return RefcocoConfig(
        refs=args.refs,
        instances=args.instances,
        images=args.images,
        dataset=args.dataset,
        split_by=args.split_by,
        out=args.out,
        splits=splits,
        samples_per_shard=args.samples_per_shard,
    )


def _splits(args: argparse.Namespace) -> tuple[str, ...] | None:
    return tuple(s for s in args.splits.split(",") if s) if args.splits else None


def _flags(args: argparse.Namespace, names, given: bool) -> list[str]:
    """The ``--flag`` spellings of those ``names`` that were given (``given=False``: left out)."""
    return [f"--{n.replace('_', '-')}" for n in names if (getattr(args, n) is not None) == given]


def _png_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> PngConfig:
    if given := _flags(args, REFCOCO_ONLY, given=True):
        p.error(f"{', '.join(given)}: not for --dataset png")
    if missing := _flags(args, PNG_ONLY[:3], given=False):
        p.error(f"the following arguments are required for --dataset png: {', '.join(missing)}")
    split = args.split
    if split is None:
        match = re.fullmatch(r"png_coco_(\w+)\.json", args.narratives.name)
        if match is None:
            p.error("--split is required when --narratives is not named png_coco_{split}.json")
        split = match.group(1)
    return PngConfig(
        narratives=args.narratives,
        panoptic=args.panoptic,
        panoptic_masks=args.panoptic_masks,
        images=args.images,
        split=split,
        out=args.out,
        samples_per_shard=args.samples_per_shard,
    )


def main(argv=None) -> None:
    config = parse_args(argv)
    try:
        if isinstance(config, PngConfig):
            stats, name, items = convert_png(config), PNG_NAME, "phrases"
        elif isinstance(config, ReasonSegConfig):
            stats, name, items = convert_reasonseg(config), REASON_NAME, "images"
        else:
            stats = convert_refcoco(config)
            name, items = f"{config.dataset}_{config.split_by}", "refs"
    except ValueError as error:
        sys.exit(f"error: {error}")
    for split_stats in stats.values():
        print(f"{name} {split_stats.summary()}")
    skipped = sum(len(s.skipped) for s in stats.values())
    print(
        f"done → {config.out}"
        + (f" ({skipped} {items} skipped, see *.stats.json)" if skipped else "")
    )


if __name__ == "__main__":
    main()
