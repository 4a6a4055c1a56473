"""Arrow schemas of the rows that flow between the annotation job's stages (internal: the
output's schemas are ``schemas.annotations``).

``RESULT_SCHEMA``: the model stage's rows (``pipeline.grounding.GroundingActor``), one per
sample; ``MANIFEST_SCHEMA``: the writer stage's rows (``pipeline.writer.write_parts``), one per
shard and batch, all the driver receives. Kept apart from the stages' modules so that the
writer's workers need not import torch.
"""

from __future__ import annotations

import pyarrow as pa

STAGES = ("describe_s", "prepare_s", "lmm_s", "sam_s", "heads_s", "post_s")

RESULT_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("n_samples", pa.int64()),
        ("status", pa.string()),  # "ok" | "error" | "shard"
        ("error_kind", pa.string()),
        ("error", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("phrases", pa.list_(pa.string())),  # parallel lists, one entry per phrase
        ("spans", pa.list_(pa.list_(pa.int32()))),  # [start, end) in text; [] when given
        # the selector's confidence (null items for LMM proposals); [] when given
        ("selector_scores", pa.list_(pa.float32())),
        ("counts", pa.list_(pa.string())),  # COCO RLE counts of a [height, width] mask
        ("bboxes", pa.list_(pa.list_(pa.float32()))),  # XYWH, original pixels
        ("scores", pa.list_(pa.float32())),
        ("mask_size", pa.list_(pa.int32())),  # [h, w] the masks were encoded at; [] unless ok
        # the caption, generated description or answer phrases were picked in ("" when given)
        ("text", pa.string()),
        ("question", pa.string()),  # the question asked ("answer", "evidence"), else ""
        ("answer", pa.string()),  # the LMM's answer to it ("answer", "evidence"), else ""
        # --cot: the crop the answer was given from, XYWH original pixels; [] otherwise
        ("evidence_box", pa.list_(pa.float32())),
        ("source", pa.string()),  # "given" | "caption" | "generated" | "answer" | "evidence"
        # who picked the phrases: "selector" | "lmm" | "whole" (the whole answer); "" when given
        ("proposer", pa.string()),
        ("warning", pa.string()),
        ("shard_error", pa.string()),
        ("read_s", pa.float64()),
        ("decode_s", pa.float64()),
        ("model_s", pa.float64()),  # this sample's share of its batch's model time
        # model_s split by stage (shares of the batch's successful forward; 0 on error rows):
        # prepare (LMM + SAM preprocessing), LMM prefill, SAM image encoder, heads (U-Net +
        # refiner), postprocess (threshold, RLE, box, score); describe: generating the
        # descriptions of image-only samples and the answers of question samples (both looks
        # under --cot)
        *((name, pa.float64()) for name in STAGES),
    ]
)


MANIFEST_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("n_samples", pa.int64()),
        ("part", pa.string()),  # "" when nothing was written
        ("keys", pa.list_(pa.string())),
        ("shard_error", pa.string()),  # the shard could not be read
        ("problem", pa.string()),  # results that do not fit their samples (a bug)
        ("write_error", pa.string()),  # the part could not be written
        ("write_retries", pa.int32()),
        ("result_bytes", pa.int64()),  # the result rows' bytes this part stands for
        ("read_s", pa.float64()),
        ("decode_s", pa.float64()),
        ("model_s", pa.float64()),
        *((name, pa.float64()) for name in STAGES),
        ("write_s", pa.float64()),  # writing the part (retries included)
    ]
)
