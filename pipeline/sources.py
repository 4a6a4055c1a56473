"""Input shards: resolve what the user gave into shard URIs, and read one shard as raw samples.

Inputs (``schemas/INPUT_FORMAT.md``) are WebDataset ``.tar`` shards given as directories (their
``*.tar``, sorted), files, or brace patterns (``data/shard-{000000..000099}.tar``), on the local
disk or any filesystem pyarrow knows (``s3://``, ``gs://``, ``hdfs://``; filesystem options as
the URI's query, ``pipeline.uri``). A shard's name is its file name without ``.tar`` (and without
the query); outputs are named after it, so names must be unique.

``read_shard`` is the first pipeline stage: one shard in, one row per sample out, the raw bytes
untouched (``RAW_SCHEMA``). A shard whose tar is corrupt or truncated becomes a single row with
``shard_error`` set: it is reported as failed and, having no done marker, retried by a rerun.
Members that belong to no sample (a directory entry, a name without extension) are skipped as
WebDataset skips them, named in every row's ``warning``.
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
from pipeline.uri import absolute, basename, filesystem, on_same_filesystem

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
        ("warning", pa.string()),  # tar members skipped (skipped_warning), on every row; or ""
        ("read_s", pa.float64()),  # seconds spent reading the whole shard
    ]
)


def resolve_shards(inputs: Sequence[str]) -> list[str]:
    """Expand directories, files and brace patterns into shard URIs, in the order given.

    Raises ValueError if nothing is found, a path does not exist, or two shards share a name.
    """
    uris: list[str] = []
    for given in inputs:
        for path in braceexpand(given):
            uris.extend(_expand_one(absolute(path), given))
    if not uris:
        raise ValueError(f"no .tar shards found in {list(inputs)}")
    names: dict[str, str] = {}
    for found in uris:
        name = shard_name(found)
        if name in names:
            raise ValueError(f"two shards named {name!r}: {names[name]} and {found}")
        names[name] = found
    return uris


def _expand_one(path: str, given: str) -> list[str]:
    """One path or URI → its shard URIs. Listed files get the URI's scheme, authority and query
    back (``pipeline.uri.on_same_filesystem``), e.g. ``s3://`` + ``bucket/dir/x.tar``."""
    fs, on_fs = filesystem(path)
    info = fs.get_file_info(on_fs)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"input not found: {path} (from {given!r})")
    if info.type == pafs.FileType.Directory:
        listing = fs.get_file_info(pafs.FileSelector(on_fs, recursive=False))
        tars = sorted(i.path for i in listing if i.is_file and i.path.endswith(".tar"))
        return [on_same_filesystem(path, on_fs, tar) for tar in tars]
    return [path]


def shard_name(path: str) -> str:
    """``s3://b/data/train-000003.tar?region=r`` → ``train-000003`` (never the query)."""
    return basename(path).removesuffix(".tar")


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


def iter_tar_members(
    uri: str, skipped: list[str] | None = None
) -> Iterator[tuple[str, str, bytes]]:
    """Stream ``(key, ext, bytes)`` per regular file of an uncompressed tar shard, in tar order.
    Keys are split at the file name's first dot (WebDataset's rule), extensions lower-cased.

    Members WebDataset skips are skipped: its metadata (``__*__``) silently; a member that is not
    a regular file (a directory entry, a link) or whose name is not ``<key>.<extension>`` (no
    extension, or a hidden ``.name``) with a note in ``skipped``, when given.

    The shard must be whole: raises ``ShardError`` if a member is cut short, if the archive does
    not end with its end-of-archive marker (a tar cut exactly at a member boundary reads as
    complete otherwise), if anything but zeros follows the marker, or if the bytes read differ
    from the file's size on the filesystem. The error comes after the members already yielded,
    so callers must not commit anything of a shard before the iteration ends."""
    fs, path = filesystem(uri)
    size = fs.get_file_info(path).size
    with fs.open_input_stream(path, buffer_size=_READ_BUFFER) as raw:
        stream = _TailKeeper(raw)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for info in tar:
                    data = _member_data(tar, info, uri)
                    split = _split_name(info.name) if info.isreg() else None
                    if _META.match(info.name):
                        continue
                    if split is None:
                        if skipped is not None:
                            skipped.append(_skip_note(info))
                        continue
                    yield *split, data
                end = tar.offset  # where the end-of-archive marker must start
        except tarfile.TarError as error:
            raise ShardError(_error_kind(error, stream), f"{uri}: {error}") from None
        _check_end_of_archive(stream, end, uri)
    if size is not None and stream.position != size:
        raise ShardError(
            "truncated" if stream.position < size else "corrupt",
            f"{uri}: read {stream.position} bytes but the file has {size}",
        )


def _member_data(tar: tarfile.TarFile, info: tarfile.TarInfo, uri: str) -> bytes:
    """A regular member's bytes (every one is read, so that a cut in its data shows here, the
    one place tarfile meets it); b"" for other members. Raises ShardError("truncated")."""
    if not info.isreg():
        return b""
    try:
        return tar.extractfile(info).read()
    except tarfile.ReadError as error:  # tarfile's only error here: the data ran out
        raise ShardError("truncated", f"{uri}: member {info.name!r}: {error}") from None


# Header errors that mean the bytes ran out: none left, or fewer than a header's 512.
_CUT_HEADERS = (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)


def _error_kind(error: tarfile.TarError, stream: _TailKeeper) -> str:
    """``truncated`` or ``corrupt`` from the exception's type. tarfile raises a header error as
    a ``ReadError`` whose context is the ``HeaderError`` (a pax or GNU long-name header's cut
    successor: a ``SubsequentHeaderError`` whose context is the cut one); a bare ``ReadError`` is
    data that ran out, which the stream confirms by having reached the end of the file."""
    inner: BaseException = error
    while isinstance(inner.__context__, tarfile.TarError):
        inner = inner.__context__
    if isinstance(inner, tarfile.HeaderError):
        return "truncated" if isinstance(inner, _CUT_HEADERS) else "corrupt"
    return "truncated" if stream.at_end else "corrupt"


_MEMBER_TYPES = {
    tarfile.DIRTYPE: "a directory",
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
}


def _skip_note(info: tarfile.TarInfo) -> str:
    if info.isreg():
        return f"{info.name!r} (not <key>.<extension>)"
    what = _MEMBER_TYPES.get(info.type, f"not a regular file (type {info.type!r})")
    return f"{info.name!r} ({what})"


class _TailKeeper:
    """A read-only stream that remembers the last bytes it delivered, so that the bytes after
    the archive's last member can be checked although tarfile has already read past them."""

    def __init__(self, raw, keep: int = 1 << 16):
        self.raw, self.keep = raw, keep
        self.chunks: deque[bytes] = deque()
        self.kept = 0
        self.position = 0  # bytes delivered so far
        self.at_end = False  # a read found the end of the file

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read() if size is None or size < 0 else self.raw.read(size)
        self.at_end = self.at_end or size is None or size < 0 or len(data) < size
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


def iter_tar_samples(
    uri: str, skipped: list[str] | None = None
) -> Iterator[tuple[str, dict[str, bytes], list[str]]]:
    """``(key, {ext: bytes}, exts)`` per sample of a shard, in order of first appearance.

    Reads the whole shard first: files of one key are grouped even when not adjacent. ``exts``
    lists every member's extension (a repeated ``key.ext`` shows twice; the first copy is kept).
    ``skipped``: as ``iter_tar_members`` (complete before the first sample is yielded).
    """
    samples: dict[str, tuple[dict[str, bytes], list[str]]] = {}
    for key, ext, data in iter_tar_members(uri, skipped):
        files, exts = samples.setdefault(key, ({}, []))
        files.setdefault(ext, data)
        exts.append(ext)
    for key, (files, exts) in samples.items():
        yield key, files, sorted(exts)


def _split_name(fname: str) -> tuple[str, str] | None:
    """``dir/key.ext.more`` → (``dir/key``, ``ext.more``); None if the file name has no dot or
    starts with one (WebDataset's ``base_plus_ext`` rule: such members belong to no sample)."""
    directory, base = posixpath.split(fname)
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
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
    skipped: list[str] = []
    try:
        samples = list(iter_tar_samples(uri, skipped))
    except ShardError as error:
        return [_shard_row(name, 0, f"{error.kind}: {error}", time.perf_counter() - start)]
    except Exception as error:  # noqa: BLE001 - any read failure fails this shard only
        message = f"unreadable: {type(error).__name__}: {error}"
        return [_shard_row(name, 0, message, time.perf_counter() - start)]
    seconds = time.perf_counter() - start
    warning = skipped_warning(skipped)
    if not samples:
        return [_shard_row(name, 0, "", seconds, warning)]
    n = len(samples)
    return [
        _sample_row(name, key, files, exts, n, seconds, warning) for key, files, exts in samples
    ]


SKIPPED_SHOWN = 3  # skipped members named in a warning; the rest are counted


def skipped_warning(skipped: list[str]) -> str:
    """The warning every row of a shard carries when members were skipped ("" if none)."""
    if not skipped:
        return ""
    named = ", ".join(skipped[:SKIPPED_SHOWN])
    more = f" and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
    return f"shard: skipped {len(skipped)} tar member(s) of no sample: {named}{more}"


def _shard_row(name: str, n_samples: int, error: str, seconds: float, warning: str = "") -> dict:
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
        "warning": warning,
        "read_s": seconds,
    }


def _sample_row(
    name: str,
    key: str,
    files: dict[str, bytes],
    exts: list[str],
    n: int,
    seconds: float,
    warning: str,
) -> dict:
    return {**_shard_row(name, n, "", seconds, warning), "key": key, **sample_files(files, exts)}


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
