"""What an evaluation writes: ``metrics.json`` (per eval set and protocol, each output's metrics),
``*.stats.json`` (samples, queries, seconds, skipped samples per reason) and the markdown table the
evaluate job prints. The loop that fills the accumulators is ``pipeline/evaluate.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.evaluate import SetResult

OUTPUTS = ("unet", "refined")  # Grounding.coarse (U-Net, resized) and Grounding.refined


def metrics_json(results: dict[str, SetResult]) -> dict:
    """``{"<set>/<protocol>": {"unet": {"ciou", "giou", "n"}, "refined": {...}}}``; PNG protocols
    add ``ar``, ``ar_things``, ``ar_stuff``, ``ar_singular``, ``ar_plural``, ``n_things`` …
    ``n_plural`` and ``acc_50`` (``flmm.metrics.AverageRecall``); the ``reason`` protocol
    writes ``reason``, ``reason-short`` and ``reason-long`` (LISA's, ``pipeline.reason``); the
    ``vqa`` protocol ``vqa`` and ``vqa-<subset>``, each ``{"plain": {"accuracy", "n",
    "cropped"}, "cot": {...}}`` (``pipeline.vqa``)."""
    return {
        f"{name}/{protocol}": {output: acc.result() for output, acc in outputs.items()}
        for name, result in results.items()
        for protocol, outputs in result.metrics.items()
    }


def stats_json(results: dict[str, SetResult]) -> dict:
    """Per set: samples evaluated, queries, seconds, and skipped samples per reason."""
    return {
        name: {
            "samples": r.samples,
            "queries": r.queries,
            "seconds": round(r.seconds, 3),
            "skipped": dict(r.skipped.counts),
            "skipped_examples": r.skipped.examples,
        }
        for name, r in results.items()
    }


def write_json(data: dict, path: Path) -> Path:
    """Write ``data`` as indented JSON via a temp name and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


AR_COLUMNS = ("ar", "ar_things", "ar_stuff", "ar_singular", "ar_plural")


def markdown_table(metrics: dict) -> str:
    """The metrics as markdown tables, values ×100 with one decimal as papers print them: cIoU /
    gIoU of the referring protocols, average recall (all, things, stuff, singular, plural) of
    the PNG ones, answer accuracy without and with chain-of-thought of the VQA one."""
    referring, png, vqa = [], [], []
    for key, outputs in metrics.items():
        name, _, protocol = key.rpartition("/")
        if "cot" in outputs:
            plain, cot = outputs["plain"], outputs["cot"]
            cells = " | ".join(
                f"{100 * v:.1f}" for v in (plain["accuracy"], cot["accuracy"], cot["cropped"])
            )
            vqa.append(f"| {name} | {protocol} | {plain['n']} | {cells} |")
            continue
        ar = "ar" in outputs["unet"]
        columns = AR_COLUMNS if ar else ("ciou", "giou")
        values = [outputs[o][m] for o in OUTPUTS for m in columns]
        cells = " | ".join(f"{100 * v:.1f}" if math.isfinite(v) else "-" for v in values)
        (png if ar else referring).append(
            f"| {name} | {protocol} | {outputs['unet']['n']} | {cells} |"
        )
    tables = []
    if referring:
        tables.append(
            "| eval set | protocol | n | U-Net cIoU | U-Net gIoU | refined cIoU | refined gIoU |\n"
            "|---|---|---:|---:|---:|---:|---:|\n" + "\n".join(referring)
        )
    if png:
        splits = "AR | things | stuff | singular | plural"
        tables.append(
            f"| eval set | protocol | n | U-Net {splits} | refined {splits} |\n"
            "|---|---|---:" + "|---:" * 10 + "|\n" + "\n".join(png)
        )
    if vqa:
        tables.append(
            "| eval set | protocol | n | accuracy | accuracy --cot | answered from a crop |\n"
            "|---|---|---:|---:|---:|---:|\n" + "\n".join(vqa)
        )
    return "\n\n".join(tables)
