"""The annotation job: WebDataset shards → Ray Data → per-shard Parquet, resumable.

    from_items(shards) ─ read_shard (CPU task per shard: raw bytes, one row per sample)
      → decode_batch   (CPU tasks: pixels + given phrases / caption / nothing, or an error row)
      → GroundingActor (actor pool, ``num_gpus`` each: F-LMM → RLE, box, score per phrase)
      → driver: groups rows by shard; a shard with all its keys is written (writer.OutputDir)

Shards with a done marker are skipped unless ``overwrite``; an unreadable shard, or one left
incomplete, is reported as failed and gets no done marker, so a rerun retries it. A bad sample
is an error row. Ray must be initialised by the caller (``jobs/annotate.py`` does).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import ray

from pipeline.decode import decode_batch
from pipeline.grounding import STAGES, GroundingActor
from pipeline.lock import OutputLock, check_writable
from pipeline.preview import render_preview
from pipeline.sources import read_shard, resolve_shards, shard_name
from pipeline.spec import ModelSpec
from pipeline.writer import OutputDir, shard_tables
from schemas.annotations import SCHEMA_VERSION


@dataclass(frozen=True)
class AnnotateConfig:
    """inputs: directories / files / brace patterns / URIs of shards; output: a folder or URI.
    batch_size: samples per model call; actors: model actors in the pool; gpus_per_actor,
    cpus_per_actor: what each actor reserves; overwrite: redo done shards; force: take the
    output's lock from another run (``pipeline.lock``); threshold: on sigmoid(refined logits);
    preview_images: images in preview.png (0: no preview); describe: ground a generated
    description of every image (image-only samples always are), of at most ``max_new_tokens``
    tokens, asked for with ``describe_prompt`` (None: the selector's own describe instruction,
    else the grounding prompt's)."""

    inputs: tuple[str, ...]
    output: str
    model: ModelSpec
    batch_size: int = 4
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    overwrite: bool = False
    force: bool = False
    threshold: float = 0.5
    preview_images: int = 6
    describe: bool = False
    max_new_tokens: int = 64
    describe_prompt: str | None = None


@dataclass
class Summary:
    """What one run did. ``seconds``: wall time of the run, model loading included;
    ``write_s``: the driver's time building and writing the shards' outputs."""

    output: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    errors: int = 0
    annotations: int = 0
    seconds: float = 0.0
    write_s: float = 0.0
    planned: int = 0  # shards to run (not skipped)

    def line(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        return (
            f"annotate: shards {len(self.done)} done, {len(self.skipped)} skipped, "
            f"{len(self.failed)} failed | samples {self.samples} ({self.errors} errors) | "
            f"annotations {self.annotations} | {rate:.2f} images/s over {self.seconds:.1f} s "
            f"| {self.output}"
        )


@dataclass
class _ShardBuffer:
    uri: str
    n_samples: int = -1
    rows: dict[str, dict] = field(default_factory=dict)
    duplicates: int = 0
    error: str = ""


def run_annotation(
    config: AnnotateConfig,
    on_shard: Callable[[str, dict, Summary], None] | None = None,
    start_ray: Callable[[], None] | None = None,
) -> Summary:
    """Annotate every shard of ``config.inputs`` not yet done; ``on_shard(name, done_marker,
    summary)`` is called after each shard is written (progress, tests).

    Before anything is loaded, the inputs are resolved (ValueError), the output is proven
    writable (OSError) and its lock taken (``pipeline.lock.OutputLocked`` if another run holds
    it); only then is ``start_ray`` called, if given (else Ray must already be initialised)."""
    start = time.perf_counter()
    out = OutputDir(config.output)
    uris = {shard_name(u): u for u in resolve_shards(config.inputs)}
    check_writable(out)
    with OutputLock(out, force=config.force):
        if start_ray is not None:
            start_ray()
        return _run_locked(config, out, uris, on_shard, start)


def _run_locked(config: AnnotateConfig, out: OutputDir, uris: dict[str, str], on_shard, start):
    summary = Summary(config.output)
    todo = _plan(uris, out, config.overwrite, summary)
    summary.planned = len(todo)
    if todo:
        collector = _Collector(out, config.model.model_id(), summary, on_shard, start)
        collector.expect({name: uris[name] for name in todo})
        dataset = _dataset(todo, uris, config)
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                collector.add(row)
        collector.close()
    summary.seconds = time.perf_counter() - start
    _write_preview(out, uris, config.preview_images)
    return summary


def _plan(uris: dict[str, str], out: OutputDir, overwrite: bool, summary: Summary) -> list[str]:
    """Names of the shards to run; done ones are skipped, or their markers removed first when
    overwriting (so an interrupted overwrite leaves no stale marker)."""
    todo = []
    for name in uris:
        if overwrite:
            out.clear_done(name)
        if out.is_done(name):
            summary.skipped.append(name)
        else:
            todo.append(name)
    return todo


def _dataset(todo: list[str], uris: dict[str, str], config: AnnotateConfig) -> ray.data.Dataset:
    """One read task per shard (fused with decoding), blocks cut to ``batch_size`` rows so that
    each actor call is one batch and results reach the driver batch by batch; ``actors`` model
    actors. Ray Data's actor pools default to ``max_restarts=-1`` and ``max_task_retries=-1``:
    a killed actor is restarted and its unfinished batches are run again."""
    items = [{"uri": uris[name], "shard": name} for name in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(read_shard, batch_size=1, batch_format="pyarrow")
    ds = ds.map_batches(
        decode_batch,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={"describe": config.describe},
    )
    ds = ds.repartition(target_num_rows_per_block=config.batch_size)
    return ds.map_batches(
        GroundingActor,
        fn_constructor_kwargs={
            "spec": config.model,
            "threshold": config.threshold,
            "max_new_tokens": config.max_new_tokens,
            "describe_prompt": config.describe_prompt,
        },
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_gpus=config.gpus_per_actor,
        num_cpus=config.cpus_per_actor,
    )


class _Collector:
    """The driver's side: buffers result rows per shard and writes a shard once all its keys
    are in. A key seen twice (a retried batch) keeps its first row and is counted."""

    def __init__(self, out: OutputDir, model_id: str, summary: Summary, on_shard, start: float):
        self.out, self.model_id, self.summary = out, model_id, summary
        self.on_shard, self.start = on_shard, start
        self.buffers: dict[str, _ShardBuffer] = {}

    def expect(self, uris: dict[str, str]) -> None:
        self.buffers.update({name: _ShardBuffer(uri) for name, uri in uris.items()})

    def add(self, row: dict) -> None:
        buffer = self.buffers.get(row["shard"])
        if buffer is None:  # a late duplicate of a shard already written
            where = f"{row['shard']}/{row['key']}"
            print(f"warning: row {where} came after its shard was written", file=sys.stderr)
            return
        buffer.n_samples = row["n_samples"]
        if row["status"] == "shard":  # an empty shard, or one that could not be read
            buffer.error = row["shard_error"]
        elif row["key"] in buffer.rows:
            buffer.duplicates += 1
        else:
            buffer.rows[row["key"]] = row
        if not buffer.error and len(buffer.rows) == buffer.n_samples:
            self._finish(row["shard"], self.buffers.pop(row["shard"]))

    def close(self) -> None:
        """Shards still open when the stream ends have failed."""
        for name, buffer in self.buffers.items():
            got = f"{len(buffer.rows)} of {buffer.n_samples} samples"
            self.summary.failed[name] = buffer.error or f"incomplete: {got}"

    def _finish(self, name: str, buffer: _ShardBuffer) -> None:
        started = time.perf_counter()
        rows = list(buffer.rows.values())
        try:
            annotations, samples = shard_tables(name, rows, self.model_id)
        except ValueError as error:  # results that do not fit their samples: nothing written
            self.summary.failed[name] = str(error)
            return
        elapsed = time.perf_counter() - self.start
        done = _done_marker(name, buffer, rows, annotations, self.model_id, elapsed)
        try:
            self.out.write_shard(name, annotations, samples, done, buffer.n_samples)
        except Exception as error:  # noqa: BLE001 - this shard fails; others go on
            self.summary.failed[name] = f"write failed: {type(error).__name__}: {error}"
            return
        finally:
            self.summary.write_s += time.perf_counter() - started
        self.summary.done.append(name)
        self.summary.samples += done["samples"]
        self.summary.errors += done["errors"]
        self.summary.annotations += done["annotations"]
        if self.on_shard is not None:
            self.on_shard(name, done, self.summary)


def _done_marker(name, buffer, rows, annotations: pa.Table, model_id: str, elapsed: float):
    kinds = Counter(r["error_kind"] for r in rows if r["status"] == "error")
    return {
        "shard": name,
        "input": buffer.uri,
        "schema_version": SCHEMA_VERSION,
        "samples": len(rows),
        "ok": len(rows) - sum(kinds.values()),
        "errors": sum(kinds.values()),
        "errors_by_kind": dict(sorted(kinds.items())),
        "annotations": annotations.num_rows,
        "duplicate_rows_dropped": buffer.duplicates,
        "timings": {
            "read_s": max((r["read_s"] for r in rows), default=0.0),
            "decode_s": sum(r["decode_s"] for r in rows),
            "model_s": sum(r["model_s"] for r in rows),
            **{stage: sum(r[stage] for r in rows) for stage in STAGES},
            "finished_after_s": elapsed,
        },
        "model": model_id,
        "versions": versions(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def versions() -> dict[str, str]:
    """Versions of the project and the libraries that shape the output."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in ("flmm-pipeline", "torch", "transformers", "ray", "pyarrow", "pycocotools"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found


def _write_preview(out: OutputDir, uris: dict[str, str], n_images: int) -> None:
    if n_images <= 0:
        return
    try:
        png = render_preview(out, list(uris.items()), n_images)
    except Exception as error:  # noqa: BLE001 - a preview must never fail the job
        print(f"warning: no preview.png: {type(error).__name__}: {error}", file=sys.stderr)
        return
    if png is not None:
        out.write_bytes("", "preview.png", png)
