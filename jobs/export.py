"""Export the annotation job's output for other tools: COCO instances JSON, or an HTML gallery.

    python jobs/export.py --input out/annotate --format coco --output out/labels.json
    python jobs/export.py --input out/annotate --format coco --output out/coco/labels.json \
        --images out/coco/images --categories object
    python jobs/export.py --input out/annotate --format html --output out/gallery.html

COCO: one image per sample annotated without error, one annotation per grounded phrase (the RLE as
stored, bbox, area, score, phrase, source); ``--categories phrase`` (default) gives each distinct
phrase its category, ``object`` one category for all. Images are referenced as ``<shard>/<key>``
unless ``--images DIR`` copies them out (``file_name`` relative to DIR). HTML: a self-contained
page (open it from disk) of the first ``--max-images`` images with their masks, filters and
paging, and every sample that failed. Input and outputs may be local paths or ``s3://`` URIs.
COCO export reads outputs of schema version 4 on (the samples' ``height``, ``width``,
``error_kind``) and opens the input shards only for ``--images`` or ground truth; older shards:
annotate them again with ``--overwrite``. The HTML gallery reads any version, and the input
images for its thumbnails.
Details: ``pipeline/export.py``. (For Hugging Face ``datasets``, no export is needed: the output's
Parquet loads as it is, ``load_dataset("parquet", data_files="out/annotate/annotations/*.parquet")``.)
"""

from __future__ import annotations

import argparse
import sys

from pipeline.export import CATEGORY_MODES, export_coco, export_html
from pipeline.progress import Progress


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", default="out/annotate", help="the annotation job's output")
    p.add_argument("--format", choices=("coco", "html"), default="coco")
    p.add_argument("--output", help="file to write (default: <input>/labels.json or gallery.html)")
    p.add_argument("--categories", choices=CATEGORY_MODES, default="phrase", help="COCO only")
    p.add_argument("--images", help="COCO only: copy the images into this folder")
    p.add_argument("--max-images", type=int, default=1000, help="HTML only: images in the page")
    p.add_argument("--per-page", type=int, default=24, help="HTML only")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    default = "labels.json" if args.format == "coco" else "gallery.html"
    output = args.output or f"{args.input.rstrip('/')}/{default}"
    bar = Progress("shards", 0)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done)

    try:
        if args.format == "coco":
            summary = export_coco(args.input, output, args.categories, args.images, progress)
        else:
            summary = export_html(args.input, output, args.max_images, args.per_page, progress)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    finally:
        bar.close()
    print(summary.line(), flush=True)


if __name__ == "__main__":
    main()
