"""Writing WebDataset shards of the input format (``schemas/INPUT_FORMAT.md``): the one shard
writer behind every producer of shards (the RefCOCO and PNG converters, the toy world, benches).

Reading is ``pipeline.sources`` (raw files per sample) and ``pipeline.decode`` (pixels + meta).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds

from pipeline.uri import is_uri, join
from pipeline.writer import OutputDir


def write_shards(
    out_dir: str | Path, prefix: str, samples: Iterable[dict | None], samples_per_shard: int
) -> list[Path] | list[str]:
    """Write ``samples`` as ``out_dir/{prefix}-{000000..}.tar``; return the paths (URIs for a
    remote ``out_dir`` such as ``s3://bucket/shards``), in order.

    A sample is a webdataset dict: ``{"__key__": key, ext: bytes, ...}``; ``None``s are left out
    (a producer that skips an input still yields in order). Tar mtimes are 0, so the shards are a
    pure function of the samples. They are written to a hidden temp folder in ``out_dir`` and
    renamed into place when all are done (remote: written locally, then each uploaded under a
    temp name and moved into place); shards named ``{prefix}-*.tar`` of an earlier run that this
    run did not write are removed. No sample: no shard.
    """
    if not prefix or any(c in prefix for c in "./"):
        raise ValueError(f"shard prefix must be non-empty without '.' or '/': {prefix!r}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, not {samples_per_shard}")
    if is_uri(str(out_dir)):
        return _write_remote(str(out_dir), prefix, samples, samples_per_shard)
    out_dir = Path(out_dir)
    tmp_dir = out_dir / f".{prefix}.partial"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    written = 0
    pattern = str(tmp_dir / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, mtime=0.0) as sink:
        for sample in samples:
            if sample is not None:
                sink.write(sample)
                written += 1
    paths = sorted(tmp_dir.glob("*.tar"))
    if not written:  # ShardWriter opens its first shard before any write
        for path in paths:
            path.unlink()
        paths = []
    final = []
    for path in paths:
        os.replace(path, out_dir / path.name)
        final.append(out_dir / path.name)
    tmp_dir.rmdir()
    for stale in set(out_dir.glob(f"{prefix}-*.tar")) - set(final):
        stale.unlink()
    return final


def _write_remote(uri: str, prefix: str, samples, samples_per_shard: int) -> list[str]:
    out = OutputDir(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = write_shards(tmp, prefix, samples, samples_per_shard)
        for path in local:
            out.upload("", path.name, path)
    names = [path.name for path in local]
    for stale in out.names("", f"{prefix}-", ".tar") - set(names):
        out.delete("", stale)
    return [join(uri, name) for name in names]
