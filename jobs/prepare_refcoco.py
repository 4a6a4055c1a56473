"""Convert RefCOCO / RefCOCO+ / RefCOCOg into WebDataset shards of the input format.

    python jobs/prepare_refcoco.py --refs data/refcoco/'refs(unc).p' \
        --instances data/refcoco/instances.json --images data/coco/train2014 \
        --dataset refcoco --split-by unc --out shards/refcoco [--splits val,testA,testB]

Writes `{dataset}_{split_by}-{split}-{000000..}.tar` and `{dataset}_{split_by}-{split}.stats.json`
per split into --out, and prints one summary line per split. Refs whose image file or annotation
is missing are skipped and counted (the stats file lists them); they do not stop the conversion.
See pipeline/refcoco.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.refcoco import RefcocoConfig, convert_refcoco


def parse_args(argv=None) -> RefcocoConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--refs", type=Path, required=True, help="refs(unc).p / refs(umd).p / ...")
    p.add_argument("--instances", type=Path, required=True, help="COCO instances.json")
    p.add_argument("--images", type=Path, required=True, help="COCO images directory")
    p.add_argument("--dataset", required=True, help="refcoco, refcoco+ or refcocog")
    p.add_argument("--split-by", required=True, help="unc, umd or google")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--splits", help="comma-separated splits (default: all in the refs file)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    args = p.parse_args(argv)
    splits = tuple(s for s in args.splits.split(",") if s) if args.splits else None
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


def main(argv=None) -> None:
    config = parse_args(argv)
    try:
        stats = convert_refcoco(config)
    except ValueError as error:
        sys.exit(f"error: {error}")
    for split_stats in stats.values():
        print(f"{config.dataset}_{config.split_by} {split_stats.summary()}")
    skipped = sum(len(s.skipped) for s in stats.values())
    print(
        f"done → {config.out}" + (f" ({skipped} refs skipped, see *.stats.json)" if skipped else "")
    )


if __name__ == "__main__":
    main()
