"""The driver's collector (``pipeline.annotate._Collector``) on real result rows and a real
output folder: a row that arrives twice (a retried batch) is written once, its first copy kept,
and counted in the done marker; a row for a shard already written is dropped with a warning."""

from pipeline.annotate import Summary, _Collector
from pipeline.grounding import RESULT_SCHEMA
from pipeline.writer import SAMPLES, OutputDir


def error_row(shard: str, key: str, kind: str, n_samples: int = 2) -> dict:
    """A RESULT_SCHEMA row of a sample that failed with ``kind`` (no masks to check)."""
    row = {field.name: None for field in RESULT_SCHEMA}
    row.update(
        shard=shard, key=key, n_samples=n_samples, status="error", error_kind=kind,
        error=f"{kind} here", height=0, width=0, phrases=[], spans=[], selector_scores=[],
        counts=[], bboxes=[], scores=[], mask_size=[], text="", source="", warning="",
        shard_error="", read_s=0.0, decode_s=0.0, model_s=0.0,
    )  # fmt: skip
    for name in RESULT_SCHEMA.names:
        if name.endswith("_s"):
            row[name] = 0.0
    return row


def test_a_duplicate_row_is_written_once_and_counted(tmp_path, capsys):
    out = OutputDir(str(tmp_path / "out"))
    summary = Summary(out.uri)
    collector = _Collector(out, "model-x", summary, None, start=0.0)
    collector.expect({"s-000000": "in/s-000000.tar"})
    collector.add(error_row("s-000000", "a", "corrupt_image"))
    collector.add(error_row("s-000000", "a", "model_error"))  # the retried copy
    assert summary.done == []  # one key of two: not written yet
    collector.add(error_row("s-000000", "b", "empty_image"))
    assert summary.done == ["s-000000"]
    done = out.read_done("s-000000")
    assert done["duplicate_rows_dropped"] == 1 and done["samples"] == 2
    assert done["errors_by_kind"] == {"corrupt_image": 1, "empty_image": 1}
    samples = {r["key"]: r["error"] for r in out.read_table(SAMPLES, "s-000000").to_pylist()}
    assert samples == {
        "a": "corrupt_image: corrupt_image here",
        "b": "empty_image: empty_image here",
    }

    collector.add(error_row("s-000000", "b", "model_error"))  # after the shard was written
    assert "came after its shard was written" in capsys.readouterr().err
    assert out.read_done("s-000000") == done
    collector.close()
    assert summary.failed == {}
