"""The annotation job: WebDataset shards → Ray Data → per-shard Parquet, resumable.

    from_items(shards) ─ read_shard (CPU task per shard: raw bytes, one row per sample)
      → decode_batch   (CPU tasks: pixels + given phrases / caption / nothing, or an error row)
      → GroundingActor (actor pool, ``num_gpus`` each: F-LMM → RLE, box, score per phrase)
      → write_parts    (CPU tasks: each batch's rows written where they are, as part files
                        ``_parts/<shard>/<part>``; out goes one small manifest row per shard
                        and batch: its keys, counts, timings, the part's name)
      → driver: accounts for each shard's keys from the manifests; once every key of a shard
        is in, a commit task (a worker) merges its parts into the shard's two Parquet files;
        then the driver writes the shard's done marker, which commits it (writer.OutputDir)

The driver never receives a result row (``Summary.driver_bytes`` against ``result_bytes``).
Shards with a done marker are skipped unless ``overwrite``; an unreadable shard, or one left
incomplete, is reported as failed and gets no done marker, so a rerun retries it (its part files
are cleared first). A shard's parts are removed only after its done marker is written, so a
commit retried after any failure finds them. A bad sample is an error row. The run holds the
output's lock (``pipeline.lock``) throughout and checks it is still its own before it plans,
before each commit task (and the task again, on its worker) and before each done marker: a run
whose lock was taken over stops (``LockLost``) before it commits anything more. Ray must be
initialised by the caller (``jobs/annotate.py`` does).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import ray

from flmm.cot import CropConfig
from flmm.proposals import LIST_PROMPT, PROPOSE_PROMPT
from pipeline.decode import decode_batch
from pipeline.lock import LockLost, OutputLock, check_writable, guarded_commit
from pipeline.modes import (
    check_caption_layout,
    check_cot,
    check_ground_answer,
    check_phrases,
    check_propose_prompt,
)
from pipeline.preview import render_preview
from pipeline.sources import read_shard, resolve_shards, shard_name
from pipeline.spec import ModelSpec
from pipeline.stand_in import StandInActor
from pipeline.writer import DONE, OutputDir, retried, write_parts
from schemas.annotations import SCHEMA_VERSION
from schemas.results import STAGES


@dataclass(frozen=True)
class AnnotateConfig:
    """inputs: directories / files / brace patterns / URIs of shards; output: a folder or URI.
    batch_size: samples per model call; actors: model actors in the pool; gpus_per_actor,
    cpus_per_actor: what each actor reserves; overwrite: redo done shards; force: take the
    output's lock from another run (``pipeline.lock``); threshold: on sigmoid(refined logits);
    preview_images: images in preview.png (0: no preview); describe: ground a generated
    description of every image (image-only samples always are), of at most ``max_new_tokens``
    tokens, asked for with ``describe_prompt`` (None: the selector's own describe instruction,
    else the grounding prompt's); phrases: who picks the phrases of captions and image-only
    samples (``auto`` | ``selector`` | ``lmm``, ``pipeline.grounding.proposer_for``), the LMM
    with ``propose_prompt`` (a caption's, its ``{caption}`` slot filled) and ``list_prompt``
    (an image's); caption_layout: where those phrases are grounded, ``in-place`` in the text's
    prefill or ``listed`` in a second prefill as given phrases; question: ask every sample this
    question (None: only samples whose JSON has a ``question``), whose answer is grounded by
    ``ground_answer``: ``phrases`` picked in it as in a caption, or ``whole``; cot: visual
    chain-of-thought for question samples (the objects the question names grounded first, the
    question answered from their crop, widened by ``cot_margin`` of its size per side, or with
    ``cot_view`` ``focus`` from the frame with everything outside that box painted over);
    torch_threads: intra-op threads of each CPU model actor (0: its share of the cluster's cores,
    ``fitted``)."""

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
    phrases: str = "auto"
    propose_prompt: str = PROPOSE_PROMPT
    list_prompt: str = LIST_PROMPT
    caption_layout: str = "listed"
    question: str | None = None
    ground_answer: str = "phrases"
    cot: bool = False
    cot_margin: float = CropConfig.margin
    cot_view: str = CropConfig.view
    torch_threads: int = 0
    # rows per block between decoding and the model (at least batch_size): each block costs a model
    # task, a writer task and a manifest, and the actor cuts it into batches (400 images, blocks of
    # 4 rows: the job at 0.53× a plain script; of 32: 0.63×, bench/NOTES.md)
    block_rows: int = 32
    # fault injection, for tests: the first write attempt of every part of these shards raises
    # OSError (the writers retry; the summary counts the retries)
    fail_first_write: tuple[str, ...] = ()
    # benchmark hook (bench/scale.py --stand-in): > 0, the model actors are stand-ins that sleep
    # this many seconds per batch (pipeline.stand_in: no model, no CPU held; give cpus_per_actor
    # 0 so that many fit)
    stand_in_s: float = 0.0

    def __post_init__(self):
        check_phrases(self.phrases)
        check_propose_prompt(self.propose_prompt)
        check_caption_layout(self.caption_layout)
        check_ground_answer(self.ground_answer)
        check_cot(self.cot, self.ground_answer)
        CropConfig(self.cot_margin, view=self.cot_view)  # (raises on a bad margin or view)
        for name in ("batch_size", "actors", "block_rows"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be at least 1, not {getattr(self, name)}")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ValueError("--cpus-per-actor and --gpus-per-actor cannot be negative")
        if self.torch_threads < 0:
            raise ValueError(
                f"--torch-threads must be ≥ 0 (0: automatic), not {self.torch_threads}"
            )
        if self.question is not None and not self.question.strip():
            raise ValueError("--question is empty")
        if self.question is not None and self.describe:
            raise ValueError("--question and --describe: give one (each replaces every text)")


@dataclass
class Summary:
    """What one run did. ``seconds``: wall time of the run, model loading included;
    ``write_s``: the driver's time writing done markers; ``commit_s``: the commit tasks' time
    (merging parts into shard files, on workers); ``driver_bytes``: the manifest bytes the
    driver received, against ``result_bytes``, the result rows' bytes (what it would have
    received had it written the shards itself); ``retried``: what was done twice (rows of
    retried batches, dropped at commit; part writes retried)."""

    output: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    errors: int = 0
    annotations: int = 0
    seconds: float = 0.0
    write_s: float = 0.0
    commit_s: float = 0.0
    planned: int = 0  # shards to run (not skipped)
    driver_bytes: int = 0
    result_bytes: int = 0
    retried: Counter = field(default_factory=Counter)

    def traffic(self) -> str:
        """What reached the driver, against the result rows the workers wrote."""
        per_row = self.driver_bytes / max(1, self.annotations)
        return (
            f"driver received {self.driver_bytes / 1e3:.1f} kB of manifests for "
            f"{self.result_bytes / 1e3:.1f} kB of result rows written by the workers "
            f"({per_row:.0f} bytes per annotation row); commits {self.commit_s:.1f} s"
        )

    def line(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        retried = ", ".join(f"{n} {what}" for what, n in sorted(self.retried.items()) if n)
        return (
            f"annotate: shards {len(self.done)} done, {len(self.skipped)} skipped, "
            f"{len(self.failed)} failed | samples {self.samples} ({self.errors} errors) | "
            f"annotations {self.annotations} | {rate:.2f} images/s over {self.seconds:.1f} s "
            + (f"| retried: {retried} " if retried else "")
            + f"| {self.output}"
        )


@dataclass
class _ShardBuffer:
    """The driver's account of one shard: its keys seen, the parts holding them (in the order
    accounted for), timings summed over the parts."""

    uri: str
    n_samples: int = -1
    keys: set[str] = field(default_factory=set)
    parts: list[str] = field(default_factory=list)
    duplicates: int = 0
    error: str = ""
    timings: Counter = field(default_factory=Counter)


def run_annotation(
    config: AnnotateConfig,
    on_shard: Callable[[str, dict, Summary], None] | None = None,
    start_ray: Callable[[], None] | None = None,
) -> Summary:
    """Annotate every shard of ``config.inputs`` not yet done; ``on_shard(name, done_marker,
    summary)`` is called after each shard is written (progress, tests).

    Before anything is loaded, the inputs are resolved (ValueError), the output is proven
    writable (OSError) and its lock taken (``pipeline.lock.OutputLocked`` if another run holds
    it); only then is ``start_ray`` called, if given (else Ray must already be initialised); it
    returns True when the Ray it started has all the resources there will be (a local one), so
    that GPU actors it cannot hold fail at once instead of waiting for nodes."""
    start = time.perf_counter()
    out = OutputDir(config.output)
    uris = {shard_name(u): u for u in resolve_shards(config.inputs)}
    check_writable(out)
    with OutputLock(out, force=config.force) as lock:
        final = start_ray() if start_ray is not None else False
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0.0) if final else None
        config, note = fitted(config, resources.get("CPU", 0.0), gpus)
        if note:
            print(f"note: {note}", file=sys.stderr, flush=True)
        return _run_locked(config, out, uris, on_shard, start, lock)


def _run_locked(config: AnnotateConfig, out, uris: dict[str, str], on_shard, start, lock):
    summary = Summary(config.output)
    todo = _plan(uris, out, config.overwrite, summary, lock)
    summary.planned = len(todo)
    if todo:
        collector = _Collector(out, config.model.model_id(), summary, on_shard, start, lock)
        collector.expect({name: uris[name] for name in todo})
        dataset = _dataset(todo, uris, config)
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                summary.driver_bytes += batch.nbytes
                for row in batch.to_pylist():
                    collector.add(row)
        except BaseException:
            collector.abandon()
            raise
        collector.close()
    summary.seconds = time.perf_counter() - start
    _write_preview(out, uris, config.preview_images)
    return summary


def _plan(uris, out: OutputDir, overwrite: bool, summary: Summary, lock: OutputLock) -> list[str]:
    """Names of the shards to run; done ones are skipped, or their markers removed first when
    overwriting (so an interrupted overwrite leaves no stale marker). Parts found under
    ``_parts/`` are an earlier run's: that run is gone or has lost the lock (checked first, so a
    live run's parts are never removed), and this run writes its own."""
    lock.check()
    done = {name.removesuffix(".json") for name in out.names(DONE, suffix=".json")}
    stale = out.part_shards()  # one listing each, not a request per shard (object stores)
    todo = []
    for name in uris:
        if overwrite and name in done:
            out.clear_done(name)
            done.discard(name)
        if name in stale:  # of a shard to run, or of a done one whose parts' removal failed
            out.clear_parts(name)
        if name in done:
            summary.skipped.append(name)
        else:
            todo.append(name)
    return todo


WRITER_CPUS = 0.25  # a writer task is I/O: it must not wait behind the model actors for a CPU
COMMIT_CPUS = 0.25
READ_CPUS = 0.25  # a read + decode task (one shard's tar, its images decoded): likewise
# what the stages around the model need beside the actors, measured on 2 CPUs: 2 actors of 0.5
# CPU run, 2 of 0.75 wait for ever (Ray Data's budget leaves the read tasks none)
IO_CPUS = 1.0
MIN_ACTOR_CPUS = 0.1  # a CPU model actor given less has no CPU to speak of


def fitted(
    config: AnnotateConfig, cluster_cpus: float, cluster_gpus: float | None = None
) -> tuple[AnnotateConfig, str]:
    """CPU model actors fitted beside the reading and writing stages (Ray keeps an actor's CPUs for
    its lifetime: actors that hold every CPU leave the read tasks waiting for ever). When ``actors
    × cpus_per_actor`` leaves less than ``IO_CPUS`` of ``cluster_cpus``, each actor gets an
    equal share of the rest, and the note says so; ValueError when that share is under
    ``MIN_ACTOR_CPUS``. ``torch_threads`` 0 becomes each actor's share of all the cluster's cores
    (``cluster_cpus // actors``, at least its reserved CPUs rounded, at least one): reading,
    decoding and writing take a few percent of a core (bench/NOTES.md), so an actor that used only
    the CPUs it reserves would leave the ``IO_CPUS`` idle. GPU actors are judged only against
    ``cluster_gpus``, the GPUs of a cluster that gets no more nodes (None: a joined cluster, whose
    GPU nodes may still be starting): ValueError when it cannot hold them, which would wait for
    ever."""
    if config.gpus_per_actor > 0:
        wanted = config.actors * config.gpus_per_actor
        if cluster_gpus is not None and wanted > cluster_gpus:
            raise ValueError(
                f"--actors {config.actors} × --gpus-per-actor {config.gpus_per_actor:g} need "
                f"{wanted:g} GPUs and this Ray has {cluster_gpus:g}: fewer actors, or join a "
                "cluster with GPUs (--address)"
            )
        return config, ""
    room, note = cluster_cpus - IO_CPUS, ""
    if config.actors * config.cpus_per_actor > room:
        share = room / config.actors
        if share < MIN_ACTOR_CPUS:
            raise ValueError(
                f"--actors {config.actors} do not fit in the cluster's {cluster_cpus:g} CPUs "
                f"beside reading and writing ({IO_CPUS:g} CPU): give at most "
                f"{max(1, int(room / MIN_ACTOR_CPUS))} actors, or more CPUs (--num-cpus)"
            )
        note = (
            f"{config.actors} actors × {config.cpus_per_actor:g} CPUs do not fit in the "
            f"cluster's {cluster_cpus:g} CPUs beside reading and writing: {share:.3g} CPUs per "
            "actor"
        )
        config = dataclasses.replace(config, cpus_per_actor=share)
    if config.torch_threads == 0:
        threads = max(1, round(config.cpus_per_actor), int(cluster_cpus // config.actors))
        config = dataclasses.replace(config, torch_threads=threads)
    return config, note


class ModelStage:
    """The model stage's actor: ``pipeline.grounding.GroundingActor``, imported and built in the
    actor's process, so that the driver never imports the model code (torch's model libraries
    took 4 of the driver's 5.7 s of imports, all before Ray could start: bench/NOTES.md).

    Every torch call of the actor, the model's build included, runs in one thread of its own:
    Ray Data builds a UDF in the actor's main thread and calls it from another, and two threads
    that each ran torch ops keep two OpenMP teams whose idle threads spin against each other (an
    actor of 2 threads on 2 cores: 45 ms per image when build and calls share a thread, 75 ms
    when they do not; bench/NOTES.md)."""

    def __init__(self, **kwargs):
        from concurrent.futures import ThreadPoolExecutor

        from pipeline.grounding import GroundingActor

        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.actor = self.thread.submit(GroundingActor, **kwargs).result()

    def __call__(self, batch):
        return self.thread.submit(self.actor, batch).result()


def _dataset(todo: list[str], uris: dict[str, str], config: AnnotateConfig) -> ray.data.Dataset:
    """One read task per shard (fused with decoding), blocks cut to ``batch_size`` rows so that
    each actor call is one batch and manifests reach the driver batch by batch; ``actors`` model
    actors, then the writer tasks. Ray Data's actor pools default to ``max_restarts=-1`` and
    ``max_task_retries=-1``: a killed actor is restarted and its unfinished batches are run
    again (their rows may then be written twice: the commit keeps one copy)."""
    items = [{"uri": uris[name], "shard": name} for name in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(read_shard, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS)
    ds = ds.map_batches(
        decode_batch,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=READ_CPUS,
        fn_kwargs={"describe": config.describe, "question": config.question},
    )
    ds = ds.repartition(target_num_rows_per_block=max(config.batch_size, config.block_rows))
    kwargs = {
        "spec": config.model,
        "threshold": config.threshold,
        "max_new_tokens": config.max_new_tokens,
        "describe_prompt": config.describe_prompt,
        "phrases": config.phrases,
        "propose_prompt": config.propose_prompt,
        "list_prompt": config.list_prompt,
        "caption_layout": config.caption_layout,
        "ground_answer": config.ground_answer,
        "cot": config.cot,
        "cot_crop": CropConfig(config.cot_margin, view=config.cot_view),
        "threads": config.torch_threads,
    }
    actor = ModelStage
    if config.stand_in_s > 0:  # a benchmark's stand-in for the model (pipeline.stand_in)
        actor, kwargs = StandInActor, {"seconds": config.stand_in_s}
    ds = ds.map_batches(
        actor,
        fn_constructor_kwargs=kwargs,
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_gpus=config.gpus_per_actor,
        num_cpus=config.cpus_per_actor,
    )
    return ds.map_batches(
        write_parts,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=WRITER_CPUS,
        fn_kwargs={
            "output": config.output,
            "model_id": config.model.model_id(),
            "fail_first_write": config.fail_first_write,
        },
    )


class _Collector:
    """The driver's side: accounts for each shard's keys from the writers' manifests and, once
    all are in, commits the shard: a commit task merges its parts (retried on OSError), then the
    driver writes the done marker, then removes the parts. A key accounted for twice (a retried
    batch) is counted; the commit keeps its first part's rows. With a ``lock``, it is checked
    before each commit task and each done marker (``LockLost`` stops the run); None: not checked
    (tests of the collector alone)."""

    def __init__(self, out: OutputDir, model_id: str, summary: Summary, on_shard, start: float,
                 lock: OutputLock | None = None):  # fmt: skip
        self.out, self.model_id, self.summary = out, model_id, summary
        self.on_shard, self.start, self.lock = on_shard, start, lock
        self.buffers: dict[str, _ShardBuffer] = {}
        self.pending: dict[ray.ObjectRef, tuple[str, _ShardBuffer]] = {}
        self.commit = ray.remote(num_cpus=COMMIT_CPUS, max_retries=2, retry_exceptions=[OSError])(
            guarded_commit
        )  # a function of a light module: a commit worker imports pyarrow, not the model

    def expect(self, uris: dict[str, str]) -> None:
        self.buffers.update({name: _ShardBuffer(uri) for name, uri in uris.items()})

    def add(self, row: dict) -> None:
        """One manifest row (``MANIFEST_SCHEMA``)."""
        name = row["shard"]
        buffer = self.buffers.get(name)
        if buffer is None:  # a late copy of a retried batch, its shard committed or failed
            print(f"warning: a part of {name} came after its shard was closed", file=sys.stderr)
            if row["part"]:
                self.out.delete_part(name, row["part"])
            self._poll()
            return
        buffer.n_samples = row["n_samples"]
        self.summary.retried["part writes"] += row["write_retries"]
        self.summary.result_bytes += row["result_bytes"]
        for timing in ("decode_s", "model_s", *STAGES, "write_s"):
            buffer.timings[timing] += row[timing]
        buffer.timings["read_s"] = max(buffer.timings["read_s"], row["read_s"])
        if row["shard_error"]:  # reported when the stream ends (``close``)
            buffer.error = row["shard_error"]
        elif row["problem"] or row["write_error"]:
            self.summary.failed[name] = row["problem"] or f"write failed: {row['write_error']}"
            self.buffers.pop(name)
            return
        elif row["part"]:
            fresh = set(row["keys"]) - buffer.keys
            duplicates = len(row["keys"]) - len(fresh)
            buffer.duplicates += duplicates
            self.summary.retried["rows of retried batches"] += duplicates
            buffer.keys |= fresh
            buffer.parts.append(row["part"])
        if not buffer.error and len(buffer.keys) == buffer.n_samples:
            self.buffers.pop(name)
            self._check_lock()
            token = self.lock.token if self.lock is not None else None
            ref = self.commit.remote(self.out, name, buffer.parts, buffer.n_samples, token)
            self.pending[ref] = (name, buffer)
        self._poll()

    def close(self) -> None:
        """Waits for the commits in flight; shards still open when the stream ends have
        failed."""
        self._poll(wait=True)
        for name, buffer in self.buffers.items():
            got = f"{len(buffer.keys)} of {buffer.n_samples} samples"
            self.summary.failed[name] = buffer.error or f"incomplete: {got}"

    def abandon(self) -> None:
        """The run is failing: wait for the commits in flight (whatever their outcome), so that
        a rerun's clearing of parts cannot race them."""
        if self.pending:
            ray.wait(list(self.pending), num_returns=len(self.pending))
            self.pending.clear()

    def _poll(self, wait: bool = False) -> None:
        """Finish the commits that are done (all of them with ``wait``)."""
        while self.pending:
            ready, _ = ray.wait(
                list(self.pending), num_returns=len(self.pending), timeout=None if wait else 0
            )
            if not ready:
                return
            for ref in ready:
                self._finish(*self.pending.pop(ref), ref)

    def _check_lock(self) -> None:
        if self.lock is not None:
            self.lock.check()

    def _finish(self, name: str, buffer: _ShardBuffer, ref: ray.ObjectRef) -> None:
        """The commit task's outcome; if it succeeded (and the lock is still this run's), the
        done marker, which commits the shard, then the removal of its parts."""
        try:
            counts, seconds = ray.get(ref)
        except Exception as error:  # noqa: BLE001 - this shard fails; others go on
            cause = getattr(error, "cause", None) or error
            if isinstance(cause, LockLost):
                raise LockLost(str(cause)) from None
            self.summary.failed[name] = f"commit failed: {type(cause).__name__}: {cause}"
            return
        self.summary.commit_s += seconds
        buffer.timings["commit_s"] = seconds
        self._check_lock()
        started = time.perf_counter()
        elapsed = started - self.start
        done = _done_marker(name, buffer, counts, self.model_id, elapsed)
        try:
            retried(lambda: self.out.write_done(name, done))
        except Exception as error:  # noqa: BLE001 - this shard fails; others go on
            self.summary.failed[name] = f"write failed: {type(error).__name__}: {error}"
            return
        finally:
            self.summary.write_s += time.perf_counter() - started
        self._clear_parts(name)
        self.summary.done.append(name)
        self.summary.samples += done["samples"]
        self.summary.errors += done["errors"]
        self.summary.annotations += done["annotations"]
        if self.on_shard is not None:
            self.on_shard(name, done, self.summary)

    def _clear_parts(self, name: str) -> None:
        """Remove a committed shard's parts; if that fails, the shard stays done and the next
        run's planning removes them."""
        try:
            retried(lambda: self.out.clear_parts(name))
        except OSError as error:
            print(f"warning: the parts of {name} were left ({error}); the next run removes them",
                  file=sys.stderr)  # fmt: skip


def _done_marker(name, buffer: _ShardBuffer, counts: dict, model_id: str, elapsed: float):
    errors = sum(counts["errors_by_kind"].values())
    timings = buffer.timings
    return {
        "shard": name,
        "input": buffer.uri,
        "schema_version": SCHEMA_VERSION,
        "samples": counts["samples"],
        "ok": counts["samples"] - errors,
        "errors": errors,
        "errors_by_kind": counts["errors_by_kind"],
        "annotations": counts["annotations"],
        "duplicate_rows_dropped": buffer.duplicates,
        "parts": len(buffer.parts),
        "timings": {
            "read_s": timings["read_s"],
            "decode_s": timings["decode_s"],
            "model_s": timings["model_s"],
            **{stage: timings[stage] for stage in STAGES},
            "write_s": timings["write_s"],
            "commit_s": timings["commit_s"],
            "finished_after_s": elapsed,
        },
        "model": model_id,
        "versions": dict(versions()),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@functools.cache
def versions() -> dict[str, str]:
    """Versions of the project and the libraries that shape the output (looked up once: six
    metadata lookups cost the driver 3.7 ms per done marker, bench/NOTES.md)."""
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
