"""The frozen stage of head training: shards → decoded training samples → ``ImageFeatures``.

    from_items(shards) → read_shard (pipeline.sources) → training_samples (CPU) → EncodeActor
    (frozen LMM + SAM image encoder, GPU when given) → rows {shard, key, features: bytes}

The same reader and parsers as the annotation job. A training sample grounds one expression per
annotated object, all objects of an image in one sequence, each with its object's mask as target
— F-LMM's training layout. The expression is drawn at random once per object for the whole run
(``draw_seed``: the same in every epoch, as F-LMM's RefCOCO training set draws it once when it is
built: mmdet's ``RefCocoDataset.load_data_list``, ``text_mode='random'``, mmdet/datasets/refcoco.py),
or afresh every time the stream is read, i.e. every epoch (``draw_seed=None``, the toy recipe).
A sample whose JSON has a ``caption`` and objects' ``spans`` in it (``schemas/INPUT_FORMAT.md``)
also trains the keyword selector: its caption gets a prefill of its own (image + caption), whose
text tokens' hidden states travel with their gold tags. The same prefill grounds every span in
place (its tokens' maps and hidden states, as caption-mode annotation reads them; as F-LMM feeds
Panoptic Narrative Grounding's narratives whole): extra targets for the heads, with the mask of
the object the span names (the union for a span naming several).
Samples that cannot be used (bad image, no objects, …) are dropped here and counted by
``count_training_samples``; they never fail a shard.

When the keyword selector trains alone (``selector_only``), only the samples with a caption go
on, without their masks, to ``CaptionActor``: the LMM alone (no SAM image encoding, no phrase
prefill) prefills each image + caption once → ``TextFeatures``.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import ray
import torch

from flmm.families import ImageInputs
from flmm.prompt import span_slots
from flmm.selector import bio_tags
from pipeline.decode import (
    SampleError,
    caption_spans,
    decode_sample,
    object_targets,
    pixels_of,
)
from pipeline.features import ImageFeatures, TextFeatures
from pipeline.sources import read_shard
from pipeline.spec import ModelSpec

SAMPLE_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),  # "ok" | "error"
        ("error", pa.string()),
        ("pixels", pa.large_binary()),  # uint8 [height, width, 3] RGB
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("phrases", pa.list_(pa.string())),  # one expression per object
        ("masks", pa.large_binary()),  # uint8 [P, height, width], 0/1
        ("text", pa.string()),  # a caption to train the keyword selector on ("" if none)
        ("text_spans", pa.list_(pa.list_(pa.int32(), 2))),  # its groundable [start, end)
        ("span_masks", pa.large_binary()),  # uint8 [S, height, width]: what each span names
    ]
)
FEATURE_SCHEMA = pa.schema(
    [("shard", pa.string()), ("key", pa.string()), ("features", pa.large_binary())]
)


def training_sample(row: dict, rng: np.random.Generator) -> dict:
    """A ``RAW_SCHEMA`` row → a ``SAMPLE_SCHEMA`` row (status "error" with the reason if the
    sample is unusable for training)."""
    out = {"shard": row["shard"], "key": row["key"], "status": "ok", "error": ""}
    out.update(pixels=b"", height=0, width=0, phrases=[], masks=b"", text="", text_spans=[])
    out["span_masks"] = b""
    try:
        if row["shard_error"] or not row["key"]:
            raise SampleError("internal_error", row["shard_error"] or "empty shard")
        pixels, meta = decode_sample(row)
        height, width = pixels.shape[:2]
        objects = object_targets(meta, height, width)
        targets = [(e, m) for e, m in objects if e]
        if not targets:
            raise SampleError("bad_objects", "objects have no expressions")
        out.update(pixels=pixels.tobytes(), height=height, width=width)
        out["phrases"] = [e[int(rng.integers(len(e)))] for e, _ in targets]
        out["masks"] = np.stack([m for _, m in targets]).astype(np.uint8).tobytes()
        text = caption_spans(meta)
        if text is not None:
            caption, spans, owners = text
            out["text"], out["text_spans"] = caption, [list(span) for span in spans]
            named = [np.any([objects[i][1] for i in o], axis=0) for o in owners]
            out["span_masks"] = np.stack(named).astype(np.uint8).tobytes()
    except SampleError as error:
        out.update(status="error", error=f"{error.kind}: {error}")
    return out


def training_samples(
    batch: pa.Table, draw_seed: int | None = 0, captions_only: bool = False
) -> pa.Table:
    """Pipeline stage: raw rows → training samples; unusable ones are dropped (see module).
    draw_seed: each sample's expressions drawn from a generator of (draw_seed, shard, key), the
    same on every pass; None: from a fresh generator, different on every pass. captions_only:
    only the samples with a caption, their masks dropped (the keyword selector alone needs
    neither the others nor masks)."""
    fresh = np.random.default_rng()
    rows = [training_sample(row, _draw(row, draw_seed, fresh)) for row in batch.to_pylist()]
    kept = [r for r in rows if r["status"] == "ok" and (r["text"] or not captions_only)]
    if captions_only:
        for row in kept:
            row.update(masks=b"", span_masks=b"")
    return pa.Table.from_pylist(kept, SAMPLE_SCHEMA)


def _draw(row: dict, seed: int | None, fresh: np.random.Generator) -> np.random.Generator:
    """The generator a sample's expressions are drawn from (see ``training_samples``)."""
    if seed is None:
        return fresh
    return np.random.default_rng([seed, zlib.crc32(f"{row['shard']}/{row['key']}".encode())])


class EncodeActor:
    """Holds the frozen LMM and SAM image encoder (``spec.build()``; the heads are not used) and
    runs one batched LMM prefill + SAM encoding per batch of images, and one more prefill for
    the captions of those that have one (keyword selector targets)."""

    def __init__(self, spec: ModelSpec):
        self.model = spec.build()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        with torch.inference_mode():
            images = [_image(row) for row in rows]
            inputs = [self.model.prepare(image, row["phrases"]) for image, row in zip(images, rows)]
            lmm_out, embeddings = self.model.encode(inputs)
            texts = self._caption_features(rows, images, [x.lmm.image for x in inputs])
        out = []
        for b, row in enumerate(rows):
            shape = (len(row["phrases"]), row["height"], row["width"])
            masks = torch.from_numpy(np.frombuffer(row["masks"], np.uint8).reshape(shape).copy())
            attention, hidden = lmm_out.attention[b], lmm_out.hidden[b]
            text = texts.get(b, {})
            if "span_attention" in text:  # the caption's spans, grounded in place
                attention = torch.cat([attention, text.pop("span_attention")])
                hidden = [*hidden, *text.pop("span_hidden")]
                masks = torch.cat([masks, text.pop("span_masks")])
            features = ImageFeatures(
                attention=attention,
                hidden=hidden,
                embedding=embeddings[b],
                masks=masks,
                sam_input_size=inputs[b].sam_input_size,
                geometry=inputs[b].lmm.geometry,
                lmm_pixels=inputs[b].lmm.image.pixels,
                **text,
            )
            out.append({"shard": row["shard"], "key": row["key"], "features": features.to_bytes()})
        return pa.Table.from_pylist(out, FEATURE_SCHEMA)

    def _caption_features(
        self, rows: list[dict], images: list[torch.Tensor], image_inputs: list[ImageInputs]
    ) -> dict[int, dict]:
        """Row index → for its caption (rows with one), from one batched prefill of image +
        caption: ``text_hidden`` ``[T, L, D]`` and ``text_tags`` ``[T]`` (the selector's
        targets), and its gold spans grounded in place: ``span_attention`` ``[S, C, h, w]``,
        ``span_hidden`` (per span ``[n_tok, L, D]``) and ``span_masks`` ``[S, H, W]``."""
        chosen = [b for b, row in enumerate(rows) if row["text"]]
        if not chosen:
            return {}
        lmm_out, prepared = caption_prefill(  # the images' LMM inputs of the phrases' prefill
            self.model.lmm,
            [images[b] for b in chosen],
            [rows[b] for b in chosen],
            [image_inputs[b] for b in chosen],
        )
        out = {}
        for k, (b, (sample, offsets)) in enumerate(zip(chosen, prepared)):
            row = rows[b]
            spans = [tuple(span) for span in row["text_spans"]]
            shape = (len(spans), row["height"], row["width"])
            named = torch.from_numpy(
                np.frombuffer(row["span_masks"], np.uint8).reshape(shape).copy()
            )
            found = span_slots(offsets, spans)
            kept = [i for i, slot in enumerate(found) if slot is not None]
            text = selector_targets(lmm_out, k, offsets, row)
            out[b] = {"text_hidden": text.hidden, "text_tags": text.tags}
            if kept:
                slots = [found[i] for i in kept]
                attention, hiddens = self.model.lmm.in_place(lmm_out, k, sample.image, slots)
                out[b]["span_attention"] = attention
                out[b]["span_hidden"] = [h.cpu() for h in hiddens]
                out[b]["span_masks"] = named[kept]
        return out


class CaptionActor:
    """The frozen stage when the keyword selector trains alone: the LMM only (``spec.build_lmm``;
    no SAM, no heads), one batched prefill of image + caption per batch of captioned samples
    (``training_samples(captions_only=True)``) → ``TextFeatures`` rows."""

    def __init__(self, spec: ModelSpec):
        self.lmm = spec.build_lmm()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        with torch.inference_mode():
            lmm_out, prepared = caption_prefill(self.lmm, [_image(row) for row in rows], rows)
        out = [
            {
                "shard": row["shard"],
                "key": row["key"],
                "features": selector_targets(lmm_out, k, offsets, row).to_bytes(),
            }
            for k, (row, (_, offsets)) in enumerate(zip(rows, prepared))
        ]
        return pa.Table.from_pylist(out, FEATURE_SCHEMA)


def _image(row: dict) -> torch.Tensor:
    """A ``SAMPLE_SCHEMA`` row's pixels, uint8 ``[H, W, 3]`` RGB (a writable copy)."""
    return torch.from_numpy(pixels_of(row).copy())


def caption_prefill(
    lmm, images: list[torch.Tensor], rows: list[dict], inputs: list[ImageInputs] | None = None
):
    """One batched prefill of each image + its row's caption (``FrozenLMM.prepare_text``;
    ``inputs``: the images' LMM inputs when already made) → (``LMMOutput``, per row its
    ``(LMMSample, token offsets)``)."""
    inputs = inputs or [None] * len(images)
    prepared = [lmm.prepare_text(i, row["text"], x) for i, row, x in zip(images, rows, inputs)]
    return lmm([sample for sample, _ in prepared]), prepared


def selector_targets(lmm_out, k: int, offsets: list[tuple[int, int]], row: dict) -> TextFeatures:
    """Row ``k`` of a ``caption_prefill``: its caption tokens' hidden states ``[T, L, D]`` (CPU)
    and their gold tags for the row's ``text_spans``."""
    spans = [tuple(span) for span in row["text_spans"]]
    hidden = lmm_out.token_hidden[k, : len(offsets)].cpu()
    return TextFeatures(hidden, bio_tags(offsets, spans))


READ_CPUS = 0.25  # read + decode tasks are light; whole CPUs would starve a small node


def _raw(uris: dict[str, str]) -> ray.data.Dataset:
    items = [{"uri": uri, "shard": name} for name, uri in uris.items()]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(read_shard, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS)


def count_training_samples(uris: dict[str, str]) -> tuple[int, int, int]:
    """(usable, unusable, usable with a caption for the selector) samples in the shards: one
    cheap pass that reads and decodes."""

    def tally(batch: pa.Table) -> pa.Table:
        rows = [training_sample(row, np.random.default_rng(0)) for row in batch.to_pylist()]
        ok = [r["status"] == "ok" for r in rows]
        return pa.table({"ok": ok, "text": [o and bool(r["text"]) for o, r in zip(ok, rows)]})

    counted = _raw(uris).map_batches(
        tally, batch_size=16, batch_format="pyarrow", num_cpus=READ_CPUS
    )
    flags = counted.to_pandas()
    ok = flags["ok"]
    return int(ok.sum()), int((~ok).sum()), int(flags["text"].sum())


def features_dataset(
    uris: dict[str, str],
    spec: ModelSpec,
    batch_size: int,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    draw_seed: int | None = 0,
    selector_only: bool = False,
) -> ray.data.Dataset:
    """The stream the trainer's workers split: rows ``FEATURE_SCHEMA``, one per usable image
    (``ImageFeatures``), or with ``selector_only`` one per captioned image (``TextFeatures``).

    uris: shard name → URI (``pipeline.sources.resolve_shards`` + ``shard_name``); draw_seed:
    see ``training_samples`` (None: expressions drawn afresh every epoch).
    """
    samples = _raw(uris).map_batches(
        training_samples,
        fn_kwargs={"draw_seed": draw_seed, "captions_only": selector_only},
        batch_size=16,
        batch_format="pyarrow",
        num_cpus=READ_CPUS,
    )
    return samples.map_batches(
        CaptionActor if selector_only else EncodeActor,
        fn_constructor_kwargs={"spec": spec},
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=actors,
        num_gpus=gpus_per_actor,
        num_cpus=cpus_per_actor,
        max_restarts=-1,
        max_task_retries=-1,
    )
