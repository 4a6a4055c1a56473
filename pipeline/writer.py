"""Per-shard outputs of the annotation job, on any filesystem pyarrow knows.

    DIR/annotations/<shard>.parquet   ANNOTATIONS_SCHEMA, one row per grounded phrase
    DIR/samples/<shard>.parquet       SAMPLES_SCHEMA, one row per input sample
    DIR/_done/<shard>.json            written last: counts, errors by kind, timings, versions
    DIR/_parts/<shard>/<part>.{annotations,samples}.parquet
                                      a shard's results as the workers wrote them, batch by
                                      batch; merged into the two files above by the shard's
                                      commit (``commit_shard``), then deleted once the
                                      done marker is written
    DIR/preview.png

Every file is written under a hidden temp name in its folder and then moved into place, so a
reader never sees a partial file; a shard counts as finished only once its done marker exists.
"""

from __future__ import annotations

import io
import json
import posixpath
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.uri import filesystem as filesystem_of
from schemas.annotations import ANNOTATIONS_SCHEMA, SAMPLES_SCHEMA
from schemas.results import MANIFEST_SCHEMA, STAGES

UPLOAD_CHUNK = 8 << 20  # bytes per write when uploading a local file

ANNOTATIONS, SAMPLES, DONE, PARTS = "annotations", "samples", "_done", "_parts"


class OutputDir:
    """The output folder ``uri`` (local path or ``s3://...``-style URI; a URI's query holds
    filesystem options, ``pipeline.uri``), through ``filesystem`` if given (else the one the URI names; tests pass one that fails on cue)."""

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None):
        self.uri = uri
        self.fs, self.root = filesystem_of(uri)
        if filesystem is not None:
            self.fs = filesystem

    def path(self, folder: str, name: str) -> str:
        return posixpath.join(self.root, folder, name)

    def is_done(self, shard: str) -> bool:
        info = self.fs.get_file_info(self.path(DONE, f"{shard}.json"))
        return info.type == pafs.FileType.File

    def clear_done(self, shard: str) -> None:
        if self.is_done(shard):
            self.fs.delete_file(self.path(DONE, f"{shard}.json"))

    def read_done(self, shard: str) -> dict:
        with self.fs.open_input_stream(self.path(DONE, f"{shard}.json")) as f:
            return json.loads(f.read())

    def read_table(self, folder: str, shard: str) -> pa.Table:
        return pq.read_table(self.path(folder, f"{shard}.parquet"), filesystem=self.fs)

    def write_shard(
        self, shard: str, annotations: pa.Table, samples: pa.Table, done: dict, n_input: int
    ) -> None:
        """Both tables (``write_tables``), then the done marker (``write_done``)."""
        self.write_tables(shard, annotations, samples, n_input)
        self.write_done(shard, done)

    def write_tables(
        self, shard: str, annotations: pa.Table, samples: pa.Table, n_input: int
    ) -> None:
        """The shard's two tables, each to a temp name first; refuses (ValueError) unless
        ``samples`` holds each of the shard's ``n_input`` keys exactly once."""
        check_samples(samples, n_input)
        self.write_bytes(ANNOTATIONS, f"{shard}.parquet", _parquet_bytes(annotations))
        self.write_bytes(SAMPLES, f"{shard}.parquet", _parquet_bytes(samples))

    def write_done(self, shard: str, done: dict) -> None:
        """The shard's done marker: written last, it commits the shard."""
        self.write_bytes(DONE, f"{shard}.json", json.dumps(done, indent=1).encode())

    def write_part(self, shard: str, part: str, annotations: pa.Table, samples: pa.Table) -> None:
        """One batch's results of ``shard`` under ``_parts/<shard>/`` (samples last: a part
        counts once its samples file exists)."""
        folder = posixpath.join(PARTS, shard)
        self.write_bytes(folder, f"{part}.{ANNOTATIONS}.parquet", _parquet_bytes(annotations))
        self.write_bytes(folder, f"{part}.{SAMPLES}.parquet", _parquet_bytes(samples))

    def read_part(self, shard: str, part: str, table: str) -> pa.Table:
        path = posixpath.join(self.root, PARTS, shard, f"{part}.{table}.parquet")
        return pq.read_table(path, filesystem=self.fs)

    def delete_part(self, shard: str, part: str) -> None:
        """Remove one part's files (those that exist)."""
        for table in (ANNOTATIONS, SAMPLES):
            path = posixpath.join(self.root, PARTS, shard, f"{part}.{table}.parquet")
            if self.fs.get_file_info(path).type == pafs.FileType.File:
                self.fs.delete_file(path)

    def part_shards(self) -> set[str]:
        """The shards with a folder under ``_parts/`` (one listing; none when ``_parts`` is not a
        folder: writing parts will then fail, shard by shard)."""
        directory = posixpath.join(self.root, PARTS)
        if self.fs.get_file_info(directory).type != pafs.FileType.Directory:
            return set()
        infos = self.fs.get_file_info(pafs.FileSelector(directory))
        return {posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory}

    def clear_parts(self, shard: str) -> None:
        """Remove ``_parts/<shard>/`` (what an earlier, interrupted run left of the shard)."""
        directory = posixpath.join(self.root, PARTS, shard)
        if self.fs.get_file_info(directory).type == pafs.FileType.Directory:
            self.fs.delete_dir(directory)

    def upload(self, folder: str, name: str, local: Path) -> str:
        """Copy the local file to ``folder/name`` via a temp name and a move, streaming."""
        directory = posixpath.join(self.root, folder) if folder else self.root
        self.fs.create_dir(directory, recursive=True)
        final = posixpath.join(directory, name)
        tmp = posixpath.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        with open(local, "rb") as source, self.fs.open_output_stream(tmp) as sink:
            shutil.copyfileobj(source, sink, UPLOAD_CHUNK)
        self.fs.move(tmp, final)
        return final

    def names(self, folder: str, prefix: str = "", suffix: str = "") -> set[str]:
        """Names of the files directly in ``folder`` (none if it does not exist)."""
        directory = posixpath.join(self.root, folder) if folder else self.root
        selector = pafs.FileSelector(directory, allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        names = {posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File}
        return {n for n in names if n.startswith(prefix) and n.endswith(suffix)}

    def delete(self, folder: str, name: str) -> None:
        self.fs.delete_file(self.path(folder, name) if folder else posixpath.join(self.root, name))

    def write_bytes(self, folder: str, name: str, data: bytes) -> str:
        """Write ``data`` to ``folder/name`` via ``folder/.name.tmp-<random>`` and a move."""
        directory = posixpath.join(self.root, folder) if folder else self.root
        self.fs.create_dir(directory, recursive=True)
        final = posixpath.join(directory, name)
        tmp = posixpath.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, final)
        return final


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def check_samples(samples: pa.Table, n_expected: int) -> None:
    """Every input key exactly once: ``n_expected`` rows with distinct keys, or ValueError."""
    keys = samples["key"].to_pylist()
    if len(keys) != n_expected or len(set(keys)) != n_expected:
        raise ValueError(
            f"samples table has {len(keys)} rows, {len(set(keys))} distinct keys; "
            f"the shard has {n_expected} samples"
        )


def result_problem(row: dict) -> str:
    """Why an ok ``RESULT_SCHEMA`` row cannot be written ("" if it can): its masks must have been
    encoded at the sample's own ``[height, width]``, one mask, box and score per phrase. A failure
    here means a result was matched to the wrong sample (a bug), never bad input."""
    if row["status"] != "ok":
        return ""
    size, expected = list(row["mask_size"]), [row["height"], row["width"]]
    if size != expected:
        return f"{row['key']}: masks of size {size} for an image of [height, width] {expected}"
    lengths = {len(row[c]) for c in ("phrases", "counts", "bboxes", "scores")}
    if row["source"] != "given":
        lengths |= {len(row[c]) for c in ("spans", "selector_scores")}
    if len(lengths) != 1:
        return f"{row['key']}: {len(row['phrases'])} phrases but {len(row['counts'])} masks"
    return ""


def shard_tables(shard: str, rows: list[dict], model: str) -> tuple[pa.Table, pa.Table]:
    """``RESULT_SCHEMA`` rows of one shard (sorted by key here) → (annotations, samples).
    Raises ValueError if a row fails ``result_problem``."""
    if problems := [p for p in map(result_problem, rows) if p]:
        raise ValueError(f"internal_error: {'; '.join(problems)}")
    annotations: list[dict] = []
    samples: list[dict] = []
    for row in sorted(rows, key=lambda r: r["key"]):
        ok = row["status"] == "ok"
        error = None if ok else f"{row['error_kind']}: {row['error']}"
        n = len(row["counts"]) if ok else 0
        sized = bool(row["height"])  # 0: an error of the decoding stage, before any size
        asked = row["source"] in ("answer", "evidence")
        samples.append(
            {"key": row["key"], "shard": shard, "status": row["status"],
             "error_kind": None if ok else row["error_kind"], "error": error, "n_annotations": n,
             "height": row["height"] if sized else None, "width": row["width"] if sized else None,
             "source": row["source"] if ok else None,
             "proposer": row["proposer"] if ok and row["proposer"] else None,
             "text": row["text"] if ok and row["source"] != "given" else None,
             "question": row["question"] if ok and asked else None,
             "answer": row["answer"] if ok and asked else None,
             "evidence_box": (row.get("evidence_box") or None) if ok else None,
             "warning": row["warning"] or None}
        )  # fmt: skip
        for i in range(n):
            annotations.append(_annotation(shard, row, i, model))
    return (
        pa.Table.from_pylist(annotations, ANNOTATIONS_SCHEMA),
        pa.Table.from_pylist(samples, SAMPLES_SCHEMA),
    )


def _annotation(shard: str, row: dict, i: int, model: str) -> dict:
    given = row["source"] == "given"
    return {
        "key": row["key"],
        "shard": shard,
        "phrase": row["phrases"][i],
        "source": row["source"],
        "span": None if given else row["spans"][i],
        "proposer": None if given else row["proposer"],
        "selector_score": None if given else row["selector_scores"][i],
        "mask": {"size": [row["height"], row["width"]], "counts": row["counts"][i]},
        "bbox": row["bboxes"][i],
        "score": row["scores"][i],
        "width": row["width"],
        "height": row["height"],
        "model": model,
    }


def commit_shard(output: str | OutputDir, shard: str, parts: list[str], n_input: int) -> dict:
    """Merge a shard's parts into its final tables (on a worker: the rows never reach the
    driver); returns the counts of the done marker. The parts stay (the driver removes them
    once the done marker is written), so this can be run again after a failure at any step and
    writes the same tables.

    A key in more than one part (a retried batch written twice) keeps its first part's rows, in
    ``parts`` order (the order the driver accounted for them); rows are sorted by key, as one
    shard's rows always were. ValueError unless every one of the ``n_input`` keys is there.
    """
    out = output if isinstance(output, OutputDir) else OutputDir(output)
    chosen: dict[str, int] = {}  # key → index of the part its rows come from
    annotations, samples = [], []
    for index, part in enumerate(parts):
        s = out.read_part(shard, part, SAMPLES)
        keys = s.column("key").to_pylist()
        fresh = [k not in chosen for k in keys]
        for key, keep in zip(keys, fresh):
            if keep:
                chosen[key] = index
        samples.append(s.filter(pa.array(fresh)))
        a = out.read_part(shard, part, ANNOTATIONS)
        own = [chosen.get(k) == index for k in a.column("key").to_pylist()]
        annotations.append(a.filter(pa.array(own, pa.bool_())))
    samples_table = _sorted(samples, SAMPLES_SCHEMA)
    annotations_table = _sorted(annotations, ANNOTATIONS_SCHEMA)
    out.write_tables(shard, annotations_table, samples_table, n_input)
    kinds = Counter(kind for kind in samples_table.column("error_kind").to_pylist() if kind)
    return {
        "samples": samples_table.num_rows,
        "errors_by_kind": dict(sorted(kinds.items())),
        "annotations": annotations_table.num_rows,
    }


def _sorted(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    """The tables concatenated and stably sorted by key (an image's rows keep their order)."""
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, sort_keys=[("key", "ascending")])
    return table.take(order)


WRITE_ATTEMPTS = 3


def write_parts(
    batch: pa.Table, output: str, model_id: str, fail_first_write: tuple[str, ...] = ()
) -> pa.Table:
    """The annotation job's writer stage (a CPU task after the model stage): ``RESULT_SCHEMA``
    rows → one part per shard in the batch, written under ``_parts/<shard>/``
    (``WRITE_ATTEMPTS`` tries, with a short back-off) → one ``MANIFEST_SCHEMA`` row per shard.
    Shard-level rows (``status "shard"``) write nothing and pass their error on."""
    by_shard: dict[str, list[dict]] = {}
    for row in batch.to_pylist():
        by_shard.setdefault(row["shard"], []).append(row)
    out = OutputDir(output)
    manifests = []
    for shard, rows in by_shard.items():
        entry = dict.fromkeys(MANIFEST_SCHEMA.names, "")
        entry.update(shard=shard, n_samples=rows[0]["n_samples"], keys=[], write_retries=0)
        entry["write_s"] = 0.0
        entry["result_bytes"] = batch.filter(pc.equal(batch["shard"], shard)).nbytes
        samples = [r for r in rows if r["status"] != "shard"]
        entry["read_s"] = max((r["read_s"] for r in rows), default=0.0)
        for name in ("decode_s", "model_s", *STAGES):
            entry[name] = sum(r[name] for r in samples)
        errors = [r["shard_error"] for r in rows if r["status"] == "shard" and r["shard_error"]]
        if errors:
            entry["shard_error"] = errors[0]
        if samples:
            try:
                annotations, table = shard_tables(shard, samples, model_id)
            except ValueError as error:
                entry["problem"] = str(error)
            else:
                started = time.perf_counter()
                entry.update(part=uuid.uuid4().hex, keys=[r["key"] for r in samples])
                entry.update(_write_part(out, shard, entry["part"], annotations, table,
                                         shard in fail_first_write))  # fmt: skip
                entry["write_s"] = time.perf_counter() - started
        manifests.append(entry)
    return pa.Table.from_pylist(manifests, MANIFEST_SCHEMA)


def retried(action: Callable[[], None]) -> int:
    """``action()``, tried ``WRITE_ATTEMPTS`` times on OSError with a short back-off (the last
    error is raised); → how many retries it took. Every write of the annotation job's own."""
    for attempt in range(WRITE_ATTEMPTS):
        try:
            action()
            return attempt
        except OSError:
            if attempt + 1 == WRITE_ATTEMPTS:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def _write_part(out: OutputDir, shard, part, annotations, samples, fail_first: bool) -> dict:
    """Write one part, retrying; → ``write_retries`` and, if every try failed, ``write_error``
    (the part's files removed)."""
    tries = []

    def write() -> None:
        tries.append(None)
        if fail_first and len(tries) == 1:
            raise OSError(f"injected write failure of {shard}/{part}")
        out.write_part(shard, part, annotations, samples)

    try:
        return {"write_retries": retried(write)}
    except OSError as error:
        last = f"{type(error).__name__}: {error}"
    try:
        out.delete_part(shard, part)
    except OSError:
        pass  # a rerun clears the shard's parts anyway
    return {"write_retries": WRITE_ATTEMPTS - 1, "write_error": last}


def timed_commit(output: str | OutputDir, shard: str, parts: list[str], n_input: int):
    """``commit_shard`` and its seconds (a Ray task)."""
    started = time.perf_counter()
    counts = commit_shard(output, shard, parts, n_input)
    return counts, time.perf_counter() - started
