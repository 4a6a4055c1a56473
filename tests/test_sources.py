"""Tars as WebDataset reads them: members of no sample are skipped with a warning, a cut is told
from corruption by tarfile's exception types, and a caption that is not UTF-8 keeps its image.
Every tar is written here with the tarfile module, as other tools write them."""

import io
import tarfile

import pyarrow as pa
import pytest
import webdataset as wds
from annotate_inputs import image_bytes, meta

from pipeline.decode import decode_batch
from pipeline.sources import ShardError, iter_tar_samples, read_shard


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_directory(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    tar.addfile(info)


def read_rows(path) -> list[dict]:
    return read_shard(pa.table({"uri": [str(path)], "shard": ["s"]})).to_pylist()


def decoded_rows(path) -> list[dict]:
    raw = read_shard(pa.table({"uri": [str(path)], "shard": ["s"]}))
    return pa.concat_tables(decode_batch(raw)).to_pylist()


@pytest.fixture
def tar_with_strays(tmp_path):
    """Two samples, as ``tar cf`` of a folder leaves them: a directory entry first, a README
    without extension and a macOS ``._`` file (a hidden name) among them."""
    path = tmp_path / "strays.tar"
    with tarfile.open(path, "w") as tar:
        add_directory(tar, "shard")
        add_file(tar, "shard/a.png", image_bytes("RGB", seed=1))
        add_file(tar, "shard/a.json", meta(["the red circle"]))
        add_file(tar, "shard/README", b"made by hand\n")
        add_file(tar, "._a.png", b"\0\1")
        add_file(tar, "shard/b.png", image_bytes("RGB", seed=2))
        add_file(tar, "shard/b.txt", b"a caption")
    return path


def test_members_of_no_sample_are_skipped_as_webdataset_skips_them(tar_with_strays):
    ours = {key: files for key, files, _ in iter_tar_samples(str(tar_with_strays))}
    theirs = {
        s["__key__"]: {ext: data for ext, data in s.items() if not ext.startswith("__")}
        for s in wds.WebDataset(str(tar_with_strays), shardshuffle=False, empty_check=False)
    }
    assert ours == theirs and sorted(ours) == ["shard/a", "shard/b"]


def test_skipped_members_are_a_warning_on_every_row_of_the_shard(tar_with_strays):
    rows = read_rows(tar_with_strays)
    assert [r["key"] for r in rows] == ["shard/a", "shard/b"]
    assert all(r["shard_error"] == "" for r in rows)
    (warning,) = {r["warning"] for r in rows}
    assert warning.startswith("shard: skipped 3 tar member(s)"), warning
    for name in ("'shard' (a directory)", "'shard/README'", "'._a.png'"):
        assert name in warning, (name, warning)
    decoded = decoded_rows(tar_with_strays)
    assert all(r["warning"] == warning for r in decoded)  # carried on by the decode stage


def test_a_shard_of_strays_only_is_an_empty_shard_with_the_warning(tmp_path):
    path = tmp_path / "only.tar"
    with tarfile.open(path, "w") as tar:
        add_directory(tar, "d")
        add_file(tar, "d/notes", b"x")
    (row,) = read_rows(path)
    assert (row["key"], row["n_samples"], row["shard_error"]) == ("", 0, "")
    assert "'d' (a directory)" in row["warning"] and "'d/notes'" in row["warning"]


def test_a_clean_shard_has_no_warning(tmp_path):
    path = tmp_path / "clean.tar"
    with tarfile.open(path, "w") as tar:
        add_file(tar, "a.png", image_bytes("RGB"))
        add_file(tar, "__index__", b"{}")  # WebDataset metadata: skipped silently
    (row,) = read_rows(path)
    assert (row["key"], row["warning"]) == ("a", "")


def pax_shard(tmp_path):
    """A PAX tar whose second member has a long name: a pax header (512 bytes + 512 of data)
    comes before its own header. Returns the bytes and the pax header's offset."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add_file(tar, "a.txt", b"x" * 10)
        add_file(tar, "b" * 120 + ".txt", b"y" * 10)
    data = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        second = tar.getmembers()[1]
    assert second.offset_data - second.offset == 3 * 512  # pax header, its data, the header
    return data, second.offset


def test_a_cut_after_a_pax_header_is_truncated_not_corrupt(tmp_path):
    """tarfile names these cuts "empty header"; only the exception's type tells them apart."""
    data, pax = pax_shard(tmp_path)
    path = tmp_path / "cut.tar"
    for cut in (pax + 512, pax + 700, pax + 1024, pax + 1100):
        path.write_bytes(data[:cut])
        with pytest.raises(ShardError) as caught:
            list(iter_tar_samples(str(path)))
        assert caught.value.kind == "truncated", (cut, caught.value)
    path.write_bytes(data)
    assert len(list(iter_tar_samples(str(path)))) == 2


def test_a_garbage_header_after_a_pax_header_is_corrupt(tmp_path):
    """The negative control: the header after the pax header is there, but invalid."""
    data, pax = pax_shard(tmp_path)
    broken = bytearray(data)
    broken[pax + 1024 : pax + 1024 + 512] = b"\xff" * 512
    path = tmp_path / "broken.tar"
    path.write_bytes(bytes(broken))
    with pytest.raises(ShardError) as caught:
        list(iter_tar_samples(str(path)))
    assert caught.value.kind == "corrupt", caught.value


def test_a_caption_that_is_not_utf8_keeps_its_image_with_a_warning(tmp_path):
    path = tmp_path / "latin1.tar"
    with tarfile.open(path, "w") as tar:
        add_file(tar, "a.png", image_bytes("RGB"))
        add_file(tar, "a.txt", "un café crème".encode("latin-1"))
        add_file(tar, "b.png", image_bytes("RGB", seed=3))
        add_file(tar, "b.json", b'{"phrases": ["caf\xe9"]}')  # JSON must be UTF-8: still an error
    a, b = decoded_rows(path)
    assert (a["status"], a["error_kind"], a["source"]) == ("ok", "", "caption")
    assert a["text"] == "un caf\ufffd cr\ufffdme" and a["height"] > 0
    assert "not UTF-8" in a["warning"] and "U+FFFD" in a["warning"], a["warning"]
    assert (b["status"], b["error_kind"]) == ("error", "bad_text")
