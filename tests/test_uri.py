"""One rule for local paths and URIs (``pipeline.uri``): a URI's query holds filesystem options
that reach pyarrow, never a shard or output name. On the session's S3 server (moto on loopback)
through ``?endpoint_override=host:port&scheme=http`` URIs."""

from urllib.parse import urlsplit

import pyarrow.fs as pafs
import pytest
from annotate_inputs import write_good_shards

from pipeline.annotate import AnnotateConfig, run_annotation
from pipeline.export import export_html
from pipeline.shards import write_shards
from pipeline.sources import resolve_shards, shard_name
from pipeline.spec import ModelSpec
from pipeline.uri import basename, join, on_same_filesystem, split_query
from pipeline.writer import OutputDir

QUERY = "?region=eu-west-1&scheme=http"


def test_the_query_is_never_part_of_a_name():
    uri = "s3://b/d/x-000001.tar" + QUERY
    assert shard_name(uri) == "x-000001"
    assert basename("s3://b/d/" + QUERY) == "d"
    assert split_query(uri) == ("s3://b/d/x-000001.tar", QUERY)
    assert join("s3://b/d/" + QUERY, "_done", "x.json") == "s3://b/d/_done/x.json" + QUERY


def test_a_local_path_is_made_absolute_and_has_no_query(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert split_query("odd?name.tar") == (f"{tmp_path}/odd?name.tar", "")
    assert shard_name("odd?name.tar") == "odd?name"
    assert join("out", "a.json") == f"{tmp_path}/out/a.json"


def test_a_listed_path_gets_the_scheme_authority_and_query_back():
    assert on_same_filesystem("s3://b/d/" + QUERY, "b/d", "b/d/x.tar") == "s3://b/d/x.tar" + QUERY
    hdfs = on_same_filesystem("hdfs://nn:8020/d", "/d", "/d/x.tar")
    assert hdfs == "hdfs://nn:8020/d/x.tar"
    assert on_same_filesystem("/data/d", "/data/d", "/data/d/x.tar") == "/data/d/x.tar"


@pytest.fixture
def s3_inputs(s3_server, s3_bucket, tmp_path):
    """Two shards at ``s3://<bucket>/in/``; the query that reaches the session's server."""
    local = write_good_shards(tmp_path, 2, 3, prefix="q")
    s3, _ = pafs.FileSystem.from_uri(f"s3://{s3_bucket}")
    for path in local:
        pafs.copy_files(str(path), f"{s3_bucket}/in/{path.name}", destination_filesystem=s3)
    query = f"?endpoint_override={urlsplit(s3_server).netloc}&scheme=http"
    return s3, query


def test_shards_listed_through_an_endpoint_override_keep_it(s3_inputs, s3_bucket):
    _, query = s3_inputs
    listed = resolve_shards([f"s3://{s3_bucket}/in/{query}"])
    assert listed == [f"s3://{s3_bucket}/in/q-00000{i}.tar{query}" for i in (0, 1)]
    assert [shard_name(u) for u in listed] == ["q-000000", "q-000001"]
    # the negative control: the query is what points pyarrow at the server (the session's AWS
    # variables point at it too), so a wrong endpoint in the query fails
    with pytest.raises(OSError, match="127.0.0.1:1"):
        resolve_shards([f"s3://{s3_bucket}/in/?endpoint_override=127.0.0.1:1&scheme=http"])


def test_annotate_and_export_through_endpoint_override_uris(
    ray_session, s3_inputs, s3_bucket, tiny_llava_dir
):
    s3, query = s3_inputs
    inputs = f"s3://{s3_bucket}/in/q-{{000000..000001}}.tar{query}"
    output = f"s3://{s3_bucket}/out{query}"
    config = AnnotateConfig((inputs,), output, ModelSpec(str(tiny_llava_dir), "tiny"))
    summary = run_annotation(config)
    assert sorted(summary.done) == ["q-000000", "q-000001"] and not summary.failed
    written = s3.get_file_info(pafs.FileSelector(f"{s3_bucket}/out", recursive=True))
    names = sorted(i.path.removeprefix(f"{s3_bucket}/out/") for i in written if i.is_file)
    assert not [n for n in names if "?" in n or "endpoint" in n], names
    for folder, ext in (("annotations", "parquet"), ("samples", "parquet"), ("_done", "json")):
        assert {f"{folder}/q-000000.{ext}", f"{folder}/q-000001.{ext}"} <= set(names), names
    done = OutputDir(output).read_done("q-000000")
    assert done["input"] == f"s3://{s3_bucket}/in/q-000000.tar{query}"  # what export rereads
    gallery = export_html(output, f"s3://{s3_bucket}/gallery/index.html{query}")
    assert gallery.images == 6
    assert s3.get_file_info(f"{s3_bucket}/gallery/index.html").is_file


def test_shards_written_through_an_endpoint_override_are_named_before_the_query(
    s3_inputs, s3_bucket
):
    _, query = s3_inputs
    samples = [{"__key__": f"k{i}", "txt": b"a caption"} for i in range(3)]
    uris = write_shards(f"s3://{s3_bucket}/made{query}", "w", samples, 2)
    assert uris == [f"s3://{s3_bucket}/made/w-00000{i}.tar{query}" for i in (0, 1)]
    assert resolve_shards(uris) == uris  # each one readable where it says it is
