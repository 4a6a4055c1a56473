"""Input shards: resolve what the user gave into shard URIs, and read one shard as raw samples.

Inputs (``schemas/INPUT_FORMAT.md``) are WebDataset ``.tar`` shards given as directories (their
``*.tar``, sorted), files, or brace patterns (``data/shard-{000000..000099}.tar``), on the local
disk or any filesystem pyarrow knows (``s3://``, ``gs://``, ``hdfs://``). A shard's name is its
file name without ``.tar``; outputs are named after it, so names must be unique.

``read_shard`` is the first pipeline stage: one shard in, one row per sample out, the raw bytes
untouched (``RAW_SCHEMA``). A shard whose tar is corrupt or truncated becomes a single row with
``shard_error`` set: it is reported as failed and, having no done marker, retried by a rerun.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
from braceexpand import braceexpand
from webdataset.tariterators import tar_file_iterator

from pipeline.shards import IMAGE_EXTENSIONS

TEXT_EXTENSIONS = ("json", "txt")

# One row per sample. ``key == ""`` marks a shard-level row (an empty or unreadable shard), with
# ``shard_error`` saying why ("" for an empty shard). No nulls: absent files are b"" / "".
RAW_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("n_samples", pa.int64()),  # samples in this shard: the writer's completeness count
        ("image", pa.large_binary()),  # bytes of the image file (b"" if none)
        ("image_ext", pa.string()),  # "" if the sample has no image file
        ("text", pa.large_binary()),
        ("text_ext", pa.string()),  # "json" | "txt" | ""
        ("exts", pa.string()),  # every member's extension, comma-separated, sorted, repeats kept
        ("shard_error", pa.string()),
        ("read_s", pa.float64()),  # seconds spent reading the whole shard
    ]
)


def _local_or_uri(path: str) -> str:
    """pyarrow wants absolute local paths; URIs (``s3://...``) pass unchanged."""
    return path if "://" in path else posixpath.abspath(path)


def resolve_shards(inputs: Sequence[str]) -> list[str]:
    """Expand directories, files and brace patterns into shard URIs, in the order given.

    Raises ValueError if nothing is found, a path does not exist, or two shards share a name.
    """
    uris: list[str] = []
    for given in inputs:
        for path in braceexpand(given):
            uris.extend(_expand_one(_local_or_uri(path), given))
    if not uris:
        raise ValueError(f"no .tar shards found in {list(inputs)}")
    names: dict[str, str] = {}
    for uri in uris:
        name = shard_name(uri)
        if name in names:
            raise ValueError(f"two shards named {name!r}: {names[name]} and {uri}")
        names[name] = uri
    return uris


def _expand_one(uri: str, given: str) -> list[str]:
    """One path or URI → its shard URIs. Listed files get the URI's scheme (and authority)
    back, e.g. ``s3://`` + ``bucket/dir/x.tar``, ``hdfs://host:8020`` + ``/dir/x.tar``."""
    uri = uri.rstrip("/") if "://" in uri else uri
    fs, path = pafs.FileSystem.from_uri(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"input not found: {uri} (from {given!r})")
    prefix = uri[: len(uri) - len(path)] if "://" in uri and uri.endswith(path) else ""
    if info.type == pafs.FileType.Directory:
        listing = fs.get_file_info(pafs.FileSelector(path, recursive=False))
        tars = sorted(i.path for i in listing if i.is_file and i.path.endswith(".tar"))
        return [prefix + p for p in tars]
    return [uri]


def shard_name(uri: str) -> str:
    """``s3://b/data/train-000003.tar`` → ``train-000003``."""
    base = posixpath.basename(uri.rstrip("/"))
    return base.removesuffix(".tar")


def iter_tar_members(uri: str) -> Iterator[tuple[str, str, bytes]]:
    """Stream ``(key, ext, bytes)`` per file of a tar shard, in tar order. Keys are split at the
    file name's first dot (WebDataset's rule), extensions lower-cased. Raises on a corrupt or
    truncated tar, including data after what tarfile takes for the archive's end."""
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as stream:
        for entry in tar_file_iterator(stream):
            yield *_split_name(entry["fname"]), entry["data"]
        _check_trailing_zeros(stream, uri)


def iter_tar_samples(uri: str) -> Iterator[tuple[str, dict[str, bytes], list[str]]]:
    """``(key, {ext: bytes}, exts)`` per sample of a shard, in order of first appearance.

    Reads the whole shard first: files of one key are grouped even when not adjacent. ``exts``
    lists every member's extension (a repeated ``key.ext`` shows twice; the first copy is kept).
    """
    samples: dict[str, tuple[dict[str, bytes], list[str]]] = {}
    for key, ext, data in iter_tar_members(uri):
        files, exts = samples.setdefault(key, ({}, []))
        files.setdefault(ext, data)
        exts.append(ext)
    for key, (files, exts) in samples.items():
        yield key, files, sorted(exts)


def _split_name(fname: str) -> tuple[str, str]:
    directory, base = posixpath.split(fname)
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        raise ValueError(f"tar member {fname!r} is not <key>.<extension>")
    return posixpath.join(directory, stem), ext.lower()


def _check_trailing_zeros(stream, uri: str) -> None:
    """tarfile ends silently at an invalid header after the first member; a sound archive has
    only zero padding left after its end, so anything else means the tar is corrupt."""
    while chunk := stream.read(1 << 20):
        if chunk.count(0) != len(chunk):
            raise ValueError(f"{uri}: corrupt tar (data after an invalid header)")


def read_shard(batch: pa.Table) -> pa.Table:
    """Pipeline stage: rows ``{uri, shard}`` → ``RAW_SCHEMA`` rows, one per sample.

    Never raises for a bad shard: it becomes one row with ``key = ""`` and ``shard_error``.
    """
    rows: list[dict] = []
    for uri, name in zip(batch["uri"].to_pylist(), batch["shard"].to_pylist()):
        rows.extend(_shard_rows(uri, name))
    return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def _shard_rows(uri: str, name: str) -> list[dict]:
    start = time.perf_counter()
    try:
        samples = list(iter_tar_samples(uri))
    except Exception as error:  # noqa: BLE001 - any read failure fails this shard only
        message = f"{type(error).__name__}: {error}"
        return [_shard_row(name, 0, message or "unreadable shard", time.perf_counter() - start)]
    seconds = time.perf_counter() - start
    if not samples:
        return [_shard_row(name, 0, "", seconds)]
    n = len(samples)
    return [_sample_row(name, key, files, exts, n, seconds) for key, files, exts in samples]


def _shard_row(name: str, n_samples: int, error: str, seconds: float) -> dict:
    return {
        "shard": name,
        "key": "",
        "n_samples": n_samples,
        "image": b"",
        "image_ext": "",
        "text": b"",
        "text_ext": "",
        "exts": "",
        "shard_error": error,
        "read_s": seconds,
    }


def _sample_row(
    name: str, key: str, files: dict[str, bytes], exts: list[str], n: int, seconds: float
) -> dict:
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), "")
    text_ext = next((e for e in TEXT_EXTENSIONS if e in files), "")
    return {
        **_shard_row(name, n, "", seconds),
        "key": key,
        "image": files.get(image_ext, b""),
        "image_ext": image_ext,
        "text": files.get(text_ext, b""),
        "text_ext": text_ext,
        "exts": ",".join(exts),
    }
