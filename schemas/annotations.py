"""Arrow schemas of the annotation job's output (documented in ``schemas/ANNOTATIONS.md``).

Writers take these schemas as they are; nothing is inferred from data. ``SCHEMA_VERSION`` goes
up whenever a column is added, removed or changes meaning; it is stored in each schema's
metadata (``flmm.schema_version``) and in every shard's done marker.
"""

from __future__ import annotations

import pyarrow as pa

# 2: where phrases come from (source, span, selector_score; text); 3: who picked them (proposer);
# 4: the samples' error_kind, height and width; 5: question samples (source "answer", proposer
# "whole", the samples' question and answer); 6: visual chain-of-thought (source "evidence",
# the samples' evidence_box)
SCHEMA_VERSION = 6


def _list(item: pa.DataType) -> pa.ListType:
    """A list type as Parquet stores it (item field named ``element``), so that a table read
    back from Parquet has exactly the declared schema."""
    return pa.list_(pa.field("element", item))


# COCO RLE as pycocotools writes it: size [h, w], counts the compressed string (ASCII).
RLE_TYPE = pa.struct(
    [
        pa.field("size", _list(pa.int32()), nullable=False),
        pa.field("counts", pa.string(), nullable=False),
    ]
)


def _metadata(name: str) -> dict[bytes, bytes]:
    return {b"flmm.schema": name.encode(), b"flmm.schema_version": str(SCHEMA_VERSION).encode()}


# One row per grounded phrase.
ANNOTATIONS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("phrase", pa.string(), nullable=False),
        # "given" | "caption" | "generated" | "answer" | "evidence" (--cot: an object the
        # question names, looked at before answering)
        pa.field("source", pa.string(), nullable=False),
        # [start, end) characters of the phrase in the sample's text; null when given
        pa.field("span", _list(pa.int32()), nullable=True),
        # who picked the phrase in the text: "selector" | "lmm" | "whole" (the whole answer);
        # null when given
        pa.field("proposer", pa.string(), nullable=True),
        # the keyword selector's confidence; null when given or proposed by the LMM
        pa.field("selector_score", pa.float32(), nullable=True),
        pa.field("mask", RLE_TYPE, nullable=False),
        pa.field("bbox", _list(pa.float32()), nullable=False),  # XYWH, original pixels
        pa.field("score", pa.float32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
    ],
    metadata=_metadata("annotations"),
)

# One row per input sample.
SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error_kind", pa.string(), nullable=True),  # pipeline.decode.ERROR_KINDS
        pa.field("error", pa.string(), nullable=True),  # "<kind>: <message>", null when ok
        pa.field("n_annotations", pa.int32(), nullable=False),
        # the image's size; null on error rows of the decoding stage (it is not kept there)
        pa.field("height", pa.int32(), nullable=True),
        pa.field("width", pa.int32(), nullable=True),
        pa.field("source", pa.string(), nullable=True),  # null for error rows
        pa.field("proposer", pa.string(), nullable=True),  # null when given or error
        # the caption, generated description or answer phrases were selected from; else null
        pa.field("text", pa.string(), nullable=True),
        # a question sample's question and the LMM's answer to it; null otherwise
        pa.field("question", pa.string(), nullable=True),
        pa.field("answer", pa.string(), nullable=True),
        # --cot: the crop of the original image the answer was given from, XYWH pixels; null
        # when answered from the whole image, or not asked
        pa.field("evidence_box", _list(pa.float32()), nullable=True),
        pa.field("warning", pa.string(), nullable=True),  # e.g. a truncated caption
    ],
    metadata=_metadata("samples"),
)
