"""The writer stage and the driver's collector (``pipeline.annotate.write_parts``,
``_Collector``) on real result rows (a real shard through the read, decode and model stages, a
tiny LLaVA and SAM) and a real output folder: a row that arrives twice (a retried batch, in a
second part) is written once, its first copy kept, and counted in the done marker; a part of a
shard already committed is dropped (its files deleted) with a warning."""

import pyarrow as pa
import pytest
from annotate_inputs import MIXED, write_tar

from pipeline.annotate import Summary, _Collector
from pipeline.decode import decode_batch
from pipeline.grounding import RESULT_SCHEMA, GroundingActor
from pipeline.sources import read_shard
from pipeline.spec import ModelSpec
from pipeline.writer import ANNOTATIONS, SAMPLES, OutputDir, write_parts

KEYS = ("good_rgb", "good_grey", "bad_corrupt")  # two grounded samples, one error row


def add(collector: _Collector, out: OutputDir, row: dict) -> None:
    """One row as a batch of its own: written as a part by the writer stage, its manifest
    accounted for by the collector."""
    batch = pa.Table.from_pylist([row], RESULT_SCHEMA)
    (manifest,) = write_parts(batch, out.uri, "model-x").to_pylist()
    collector.add(manifest)


def test_a_duplicate_row_is_written_once_and_counted(
    ray_session, tmp_path, tiny_llava_dir, one_thread, capsys
):
    path = write_tar(tmp_path / "in" / "s-000000.tar", {k: MIXED[k][0] for k in KEYS})
    raw = read_shard(pa.table({"uri": [str(path)], "shard": ["s-000000"]}))
    decoded = pa.concat_tables(decode_batch(raw))
    rows = GroundingActor(ModelSpec(str(tiny_llava_dir), "tiny"))(decoded).to_pylist()
    by_key = {row["key"]: row for row in rows}
    assert sorted(by_key) == sorted(KEYS) and by_key["good_rgb"]["status"] == "ok"
    n_phrases = len(by_key["good_rgb"]["phrases"])
    assert n_phrases == 2 and len(by_key["good_rgb"]["counts"]) == 2

    out = OutputDir(str(tmp_path / "out"))
    summary = Summary(out.uri)
    collector = _Collector(out, "model-x", summary, None, start=0.0)
    collector.expect({"s-000000": str(path)})
    first, retried = by_key["good_rgb"], dict(by_key["good_rgb"], scores=[0.0] * n_phrases)
    add(collector, out, first)
    add(collector, out, retried)  # the copy a retried batch delivers again (scores marked to tell)
    add(collector, out, by_key["bad_corrupt"])
    assert summary.done == [] and not out.is_done("s-000000")  # two keys of three
    assert len(list((tmp_path / "out" / "_parts" / "s-000000").glob("*.samples.parquet"))) == 3
    add(collector, out, by_key["good_grey"])
    collector.close()  # waits for the commit
    assert summary.done == ["s-000000"] and summary.failed == {}

    done = out.read_done("s-000000")
    assert done["duplicate_rows_dropped"] == 1 and done["samples"] == 3 and done["parts"] == 4
    assert done["ok"] == 2 and done["errors_by_kind"] == {"corrupt_image": 1}
    samples = out.read_table(SAMPLES, "s-000000").to_pylist()
    assert [r["key"] for r in samples] == sorted(KEYS)  # each key once, sorted
    annotations = out.read_table(ANNOTATIONS, "s-000000").to_pylist()
    kept = [r for r in annotations if r["key"] == "good_rgb"]
    assert [r["phrase"] for r in kept] == first["phrases"]
    assert [r["score"] for r in kept] == pytest.approx(first["scores"])  # the first copy's
    assert [r["mask"]["counts"] for r in kept] == first["counts"]
    assert len(annotations) == 2 + len(by_key["good_grey"]["phrases"])
    assert not (tmp_path / "out" / "_parts" / "s-000000").exists()

    add(collector, out, by_key["good_grey"])  # after the shard was committed
    assert "a part of s-000000 came after its shard was closed" in capsys.readouterr().err
    assert out.read_done("s-000000") == done
    assert not list((tmp_path / "out" / "_parts").rglob("*.parquet"))  # the late part deleted
