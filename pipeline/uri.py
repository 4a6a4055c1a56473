"""Local paths and URIs: the one rule every reader and writer of the pipeline follows.

A string holding ``://`` is a URI (``s3://bucket/dir/x.tar``, ``gs://``, ``hdfs://host:8020/dir``,
``file:///abs/dir``) and may end with a query of filesystem options that pyarrow's
``FileSystem.from_uri`` reads (``s3://bucket/dir?endpoint_override=127.0.0.1:9000&scheme=http``,
``?region=eu-west-1``). The query belongs to the filesystem, never to a name: ``basename`` and
``join`` keep it out of shard and file names, and ``on_same_filesystem`` gives a listed path its
URI back, query included, so that every worker reaches the same store. Anything else is a local
path, made absolute (actors run in other working directories); it has no query.
"""

from __future__ import annotations

import posixpath

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """A URI as given; a local path made absolute."""
    return path if is_uri(path) else posixpath.abspath(path)


def split_query(path: str) -> tuple[str, str]:
    """``s3://b/x.tar?region=r`` → (``s3://b/x.tar``, ``?region=r``); a local path (made
    absolute) has no query: ``?`` is part of its name."""
    if not is_uri(path):
        return absolute(path), ""
    base, mark, query = path.partition("?")
    return base, mark + query


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``path`` (its query's options applied) and the path on it."""
    return pafs.FileSystem.from_uri(absolute(path))


def basename(path: str) -> str:
    """The last name of the path, without the query: ``s3://b/d/x.tar?region=r`` → ``x.tar``."""
    return posixpath.basename(split_query(path)[0].rstrip("/"))


def join(path: str, *names: str) -> str:
    """``names`` appended to the path, before its query: (``s3://b/d?scheme=http``, ``x.tar``)
    → ``s3://b/d/x.tar?scheme=http``."""
    base, query = split_query(path)
    return posixpath.join(base.rstrip("/") if is_uri(base) else base, *names) + query


def on_same_filesystem(path: str, on_fs: str, found: str) -> str:
    """``found``, a path listed on the filesystem of ``path`` (where ``path`` is ``on_fs``:
    ``filesystem(path)[1]``), as a URI like ``path``: its scheme and authority, and its query.
    ``s3://b/d?scheme=http`` + ``b/d/x.tar`` → ``s3://b/d/x.tar?scheme=http``; a local path stays
    a path."""
    if not is_uri(path):
        return found
    base, query = split_query(path)
    base = base.rstrip("/")
    if not base.endswith(on_fs):
        raise ValueError(f"{path}: cannot tell its scheme and authority from its path {on_fs!r}")
    return base[: len(base) - len(on_fs)] + found + query
