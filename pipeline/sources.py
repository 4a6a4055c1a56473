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
import re
import tarfile
import time
from collections import deque
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
from braceexpand import braceexpand

from pipeline.formats import IMAGE_EXTENSIONS, TEXT_EXTENSIONS

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


class ShardError(ValueError):
    """A shard that cannot be read whole; ``kind`` is ``truncated`` (cut short: an interrupted
    copy or download) or ``corrupt`` (not a sound tar)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


TAR_BLOCK = 512
END_OF_ARCHIVE = 2 * TAR_BLOCK  # the two zero blocks every complete tar ends with
_READ_BUFFER = 1 << 20
_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's metadata members, skipped as it does


def iter_tar_members(uri: str) -> Iterator[tuple[str, str, bytes]]:
    """Stream ``(key, ext, bytes)`` per regular file of an uncompressed tar shard, in tar order.
    Keys are split at the file name's first dot (WebDataset's rule), extensions lower-cased.

    The shard must be whole: raises ``ShardError`` if a member is cut short, if the archive does
    not end with its end-of-archive marker (a tar cut exactly at a member boundary reads as
    complete otherwise), if anything but zeros follows the marker, or if the bytes read differ
    from the file's size on the filesystem. The error comes after the members already yielded,
    so callers must not commit anything of a shard before the iteration ends."""
    fs, path = pafs.FileSystem.from_uri(_local_or_uri(uri))
    size = fs.get_file_info(path).size
    with fs.open_input_stream(path, buffer_size=_READ_BUFFER) as raw:
        stream = _TailKeeper(raw)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for info in tar:
                    if info.isreg() and not _META.match(info.name):
                        yield *_split_name(info.name), tar.extractfile(info).read()
                end = tar.offset  # where the end-of-archive marker must start
        except tarfile.ReadError as error:
            cut = any(
                words in str(error)
                for words in ("unexpected end", "empty file", "truncated header")
            )
            kind = "truncated" if cut else "corrupt"
            raise ShardError(kind, f"{uri}: {error}") from None
        _check_end_of_archive(stream, end, uri)
    if size is not None and stream.position != size:
        raise ShardError(
            "truncated" if stream.position < size else "corrupt",
            f"{uri}: read {stream.position} bytes but the file has {size}",
        )


class _TailKeeper:
    """A read-only stream that remembers the last bytes it delivered, so that the bytes after
    the archive's last member can be checked although tarfile has already read past them."""

    def __init__(self, raw, keep: int = 1 << 16):
        self.raw, self.keep = raw, keep
        self.chunks: deque[bytes] = deque()
        self.kept = 0
        self.position = 0  # bytes delivered so far

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read() if size is None or size < 0 else self.raw.read(size)
        self.position += len(data)
        self.chunks.append(data)
        self.kept += len(data)
        while self.chunks and self.kept - len(self.chunks[0]) >= self.keep:
            self.kept -= len(self.chunks.popleft())
        return data

    def since(self, offset: int) -> bytes:
        """The delivered bytes from absolute ``offset`` on (must still be kept)."""
        start = self.position - self.kept
        if offset < start:
            raise ShardError("corrupt", f"internal: offset {offset} no longer kept")
        return b"".join(self.chunks)[offset - start :]


def _check_end_of_archive(stream: _TailKeeper, end: int, uri: str) -> None:
    """From ``end`` (after the last member) to the end of the file: at least the two zero blocks
    of the end-of-archive marker, and nothing but zeros (tar pads to a record size)."""
    trailer = stream.since(end)
    while trailer.count(0) == len(trailer):
        chunk = stream.read(_READ_BUFFER)
        if not chunk:
            break
        trailer = chunk
    else:
        while stream.read(_READ_BUFFER):  # the rest, to tell a cut header from garbage
            pass
        if stream.position - end < TAR_BLOCK:
            raise ShardError("truncated", f"{uri}: cut inside a member's header at byte {end}")
        raise ShardError("corrupt", f"{uri}: data after an invalid header at byte {end}")
    if stream.position - end < END_OF_ARCHIVE:
        raise ShardError(
            "truncated",
            f"{uri}: no end-of-archive marker after the last member (byte {end}): the file was "
            "cut short",
        )


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
    except ShardError as error:
        return [_shard_row(name, 0, f"{error.kind}: {error}", time.perf_counter() - start)]
    except Exception as error:  # noqa: BLE001 - any read failure fails this shard only
        message = f"unreadable: {type(error).__name__}: {error}"
        return [_shard_row(name, 0, message, time.perf_counter() - start)]
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
    return {**_shard_row(name, n, "", seconds), "key": key, **sample_files(files, exts)}


def raw_samples(uri: str, keys: set[str]) -> dict[str, dict]:
    """``key → sample_files`` fields of the samples of shard ``uri`` whose key is in ``keys``
    (keys not in the shard are simply absent)."""
    return {
        key: sample_files(files, exts) for key, files, exts in iter_tar_samples(uri) if key in keys
    }


def sample_files(files: dict[str, bytes], exts: list[str]) -> dict:
    """A sample's files (``iter_tar_samples``) → the ``RAW_SCHEMA`` fields that
    ``pipeline.decode.decode_sample`` reads: ``image``/``image_ext`` (the first of
    ``IMAGE_EXTENSIONS`` present), ``text``/``text_ext`` (json before txt), ``exts``."""
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), "")
    text_ext = next((e for e in TEXT_EXTENSIONS if e in files), "")
    return {
        "image": files.get(image_ext, b""),
        "image_ext": image_ext,
        "text": files.get(text_ext, b""),
        "text_ext": text_ext,
        "exts": ",".join(exts),
    }
