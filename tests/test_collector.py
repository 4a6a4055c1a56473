"""The driver's collector (``pipeline.annotate._Collector``) on real result rows (a real shard
through the read, decode and model stages, a tiny LLaVA and SAM) and a real output folder: a row
that arrives twice (a retried batch) is written once, its first copy kept, and counted in the
done marker; a row for a shard already written is dropped with a warning."""

import pyarrow as pa
import pytest
from annotate_inputs import MIXED, write_tar

from pipeline.annotate import Summary, _Collector
from pipeline.decode import decode_batch
from pipeline.grounding import GroundingActor
from pipeline.sources import read_shard
from pipeline.spec import ModelSpec
from pipeline.writer import ANNOTATIONS, SAMPLES, OutputDir

KEYS = ("good_rgb", "good_grey", "bad_corrupt")  # two grounded samples, one error row


def test_a_duplicate_row_is_written_once_and_counted(tmp_path, tiny_llava_dir, one_thread, capsys):
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
    collector.add(first)
    collector.add(retried)  # the copy a retried batch delivers again (scores marked to tell)
    collector.add(by_key["bad_corrupt"])
    assert summary.done == []  # two keys of three: not written yet
    collector.add(by_key["good_grey"])
    assert summary.done == ["s-000000"]

    done = out.read_done("s-000000")
    assert done["duplicate_rows_dropped"] == 1 and done["samples"] == 3
    assert done["ok"] == 2 and done["errors_by_kind"] == {"corrupt_image": 1}
    samples = out.read_table(SAMPLES, "s-000000").to_pylist()
    assert sorted(r["key"] for r in samples) == sorted(KEYS)  # each key once
    annotations = out.read_table(ANNOTATIONS, "s-000000").to_pylist()
    kept = [r for r in annotations if r["key"] == "good_rgb"]
    assert [r["phrase"] for r in kept] == first["phrases"]
    assert [r["score"] for r in kept] == pytest.approx(first["scores"])  # the first copy's
    assert [r["mask"]["counts"] for r in kept] == first["counts"]
    assert len(annotations) == 2 + len(by_key["good_grey"]["phrases"])

    collector.add(by_key["good_grey"])  # after the shard was written
    assert "row s-000000/good_grey came after its shard was written" in capsys.readouterr().err
    assert out.read_done("s-000000") == done
    collector.close()
    assert summary.failed == {}
