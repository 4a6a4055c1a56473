"""Exporting the annotation job's output (pipeline/export.py, jobs/export.py): COCO JSON that
pycocotools loads, whose masks equal the Parquet's bit for bit and that COCOeval scores as it
should against the inputs' own objects; images copied out; the HTML gallery's structure and its
escaping; the same export from s3:// through the job's filesystem layer.

The outputs are written with the job's own writer (``shard_tables`` + ``OutputDir``) from toy
scenes whose masks are known: "annotations" that are the objects' true masks."""

from __future__ import annotations

import contextlib
import html
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.export import export_coco, export_html, page_template
from pipeline.formats import decode_rle, encode_rle
from pipeline.writer import OutputDir, shard_tables
from toyworld.scenes import make_scene, scene_seed
from toyworld.shards import write_toy_shards

ROOT = Path(__file__).resolve().parents[1]
N_SCENES, SEED = 5, 2
HOSTILE = "</script><script>alert(\"x\")</script> & 'quotes'"


def scenes():
    return [make_scene(scene_seed(SEED, i)) for i in range(N_SCENES)]


def result_row(key, scene, masks, phrases):
    height, width = scene.image.shape[:2]
    rles = [encode_rle(m) for m in masks]
    boxes = [
        [float(v) for v in mask_utils.toBbox({"size": r["size"], "counts": r["counts"].encode()})]
        for r in rles
    ]
    return {
        "key": key, "status": "ok", "error_kind": "", "error": "", "height": height,
        "width": width, "phrases": phrases, "counts": [r["counts"] for r in rles],
        "bboxes": boxes, "scores": [0.9 - 0.1 * i for i in range(len(masks))],
        "mask_size": [height, width], "source": "given", "text": "", "warning": "",
        "spans": [], "selector_scores": [], "proposer": "",
    }  # fmt: skip


def write_output(root: Path, wrong: bool = False) -> Path:
    """Input shard ``ex-000000.tar`` (5 toy scenes) and an annotation output: scenes 0-2 with
    every object's true mask (scene 0 also ``HOSTILE`` on object 0's mask, at a lower score;
    ``wrong``: scene 1's first mask replaced by its complement), scene 3 ok with no
    annotation, scene 4 an error."""
    (shard,) = write_toy_shards(root / "in", N_SCENES, N_SCENES, seed=SEED, split_name="ex")
    rows = []
    for i, scene in enumerate(scenes()):
        key = f"ex_{i:08d}"
        masks = [o.mask for o in scene.objects]
        phrases = [o.expressions[0] for o in scene.objects]
        if i == 0:
            masks, phrases = [*masks, masks[0]], [*phrases, HOSTILE]
        if i == 1 and wrong:
            masks[0] = ~masks[0]
        if i == 3:
            masks, phrases = [], []
        row = result_row(key, scene, masks, phrases)
        if i == 4:
            row.update(status="error", error_kind="corrupt_image", error="broken", counts=[],
                       phrases=[], bboxes=[], scores=[], source="")  # fmt: skip
        rows.append(row)
    annotations, samples = shard_tables("ex-000000", rows, "toy")
    out = OutputDir(str(root / "out"))
    out.write_shard("ex-000000", annotations, samples, {"input": str(shard), "model": "toy"}, 5)
    return root / "out"


def test_coco_export_loads_in_pycocotools_and_its_masks_equal_the_parquet(tmp_path):
    out = write_output(tmp_path)
    summary = export_coco(str(out), str(tmp_path / "labels.json"))
    coco = COCO(str(tmp_path / "labels.json"))
    rows = pq.read_table(out / "annotations").to_pylist()
    assert (summary.images, summary.annotations, summary.error_samples) == (4, len(rows), 1)
    assert len(coco.imgs) == 4 and len(coco.anns) == len(rows)
    all_scenes = scenes()
    for image in coco.imgs.values():  # the sample without annotations is sized from its image
        index = int(image["flmm_key"].split("_")[1])
        assert image["file_name"] == f"ex-000000/{image['flmm_key']}"
        assert (image["height"], image["width"]) == all_scenes[index].image.shape[:2]
    assert {image["flmm_key"] for image in coco.imgs.values()} == {f"ex_{i:08d}" for i in range(4)}
    for annotation, row in zip(coco.anns.values(), rows):
        mask = coco.annToMask(annotation).astype(bool)
        np.testing.assert_array_equal(mask, decode_rle(row["mask"]))
        assert annotation["area"] == mask.sum()
        assert annotation["phrase"] == row["phrase"] and annotation["score"] == pytest.approx(
            row["score"]
        )
        assert coco.cats[annotation["category_id"]]["name"] == row["phrase"]
    assert len(coco.cats) == len({r["phrase"] for r in rows})
    export_coco(str(out), str(tmp_path / "object.json"), categories="object")
    assert [
        c["name"] for c in json.loads((tmp_path / "object.json").read_text())["categories"]
    ] == ["object"]


def test_coco_export_reads_sizes_and_error_kinds_from_the_output_not_the_input_shard(tmp_path):
    """Schema 4's samples carry height, width and error_kind: a COCO export without copied
    images or ground truth never opens the input shards (gone here), and writes what it wrote
    with them."""
    out = write_output(tmp_path)
    export_coco(str(out), str(tmp_path / "with.json"))
    (tmp_path / "in" / "ex-000000.tar").rename(tmp_path / "moved.tar")
    summary = export_coco(str(out), str(tmp_path / "without.json"))
    assert (tmp_path / "without.json").read_text() == (tmp_path / "with.json").read_text()
    assert summary.images == 4 and summary.errors_by_kind == {"corrupt_image": 1}
    images = json.loads((tmp_path / "without.json").read_text())["images"]
    sizes = [s.image.shape[:2] for s in scenes()[:4]]
    assert [(i["height"], i["width"]) for i in images] == sizes  # ex_00000003: no annotation
    with pytest.raises(FileNotFoundError):  # the images themselves do need the input
        export_coco(str(out), str(tmp_path / "x.json"), image_dir=str(tmp_path / "images"))


def test_outputs_of_an_older_schema_are_refused_by_coco_and_shown_by_the_gallery(tmp_path):
    """A schema-3 samples table (no error_kind, height, width): COCO names the shard and the
    fix; the gallery, which reads the images anyway, still works."""
    out = write_output(tmp_path)
    path = out / "samples" / "ex-000000.parquet"
    table = pq.read_table(path).drop_columns(["error_kind", "height", "width"])
    metadata = {**table.schema.metadata, b"flmm.schema_version": b"3"}
    pq.write_table(table.replace_schema_metadata(metadata), path)
    with pytest.raises(ValueError, match=r"ex-000000: .*schema version 3.*--overwrite"):
        export_coco(str(out), str(tmp_path / "labels.json"))
    assert export_html(str(out), str(tmp_path / "gallery.html")).images == 4


def segm_ap(out: Path, tmp_path: Path) -> float:
    export_coco(str(out), str(tmp_path / "p.json"), "object", ground_truth=str(tmp_path / "g.json"))
    truth = COCO(str(tmp_path / "g.json"))
    predictions = truth.loadRes(json.loads((tmp_path / "p.json").read_text())["annotations"])
    evaluation = COCOeval(truth, predictions, "segm")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0])


def test_cocoeval_scores_true_masks_against_the_inputs_objects_as_expected(tmp_path):
    """Scenes 0-2 predicted with their true masks and scene 3 not at all: every prediction
    ranked above the duplicate is right; AP is below 1 only through scene 3's missed objects.
    A wrong mask for one object of scene 1 lowers it further."""
    n_objects = [len(s.objects) for s in scenes()[:4]]
    perfect = segm_ap(write_output(tmp_path / "a"), tmp_path / "a")
    truth = json.loads((tmp_path / "a" / "g.json").read_text())
    assert len(truth["annotations"]) == sum(n_objects)
    recall = sum(n_objects[:3]) / sum(n_objects)  # the most any threshold can reach
    assert 0 < perfect <= recall + 0.01
    wrong = segm_ap(write_output(tmp_path / "b", wrong=True), tmp_path / "b")
    assert wrong < perfect - 0.05
    with pytest.raises(ValueError, match="categories object"):
        export_coco(str(tmp_path / "a" / "out"), str(tmp_path / "x.json"), ground_truth="g.json")


def test_images_copied_out_are_the_original_bytes(tmp_path):
    out = write_output(tmp_path)
    export_coco(str(out), str(tmp_path / "labels.json"), image_dir=str(tmp_path / "images"))
    coco = json.loads((tmp_path / "labels.json").read_text())
    with tarfile.open(tmp_path / "in" / "ex-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for image in coco["images"]:
        assert image["file_name"] == f"ex-000000/{image['flmm_key']}.png"
        copied = (tmp_path / "images" / image["file_name"]).read_bytes()
        assert copied == members[f"{image['flmm_key']}.png"]


def test_the_gallery_holds_every_sample_every_mask_and_no_injected_markup(tmp_path):
    out = write_output(tmp_path)
    summary = export_html(str(out), str(tmp_path / "gallery.html"), per_page=2)
    page = (tmp_path / "gallery.html").read_text()
    assert summary.images == 4 and summary.error_samples == 1
    assert page.count("<script") == 2 and page.count("</script>") == 2  # data + code only
    assert "alert(" in page and "<script>alert" not in page
    (data_text,) = re.findall(
        r'<script id="data" type="application/json">(.*?)</script>', page, re.DOTALL
    )
    data = json.loads(data_text)
    rows = pq.read_table(out / "annotations").to_pylist()
    assert [item["key"] for item in data["items"]] == [f"ex_{i:08d}" for i in range(4)]
    for item in data["items"]:
        expected = sorted((r for r in rows if r["key"] == item["key"]), key=lambda r: -r["score"])
        assert [a["phrase"] for a in item["annotations"]] == [r["phrase"] for r in expected]
        assert all(a["layer"].startswith("data:image/png;base64,") for a in item["annotations"])
        colours = [a["colour"] for a in item["annotations"]]
        assert len(set(colours)) == len(colours)  # neighbours told apart
    assert HOSTILE in [a["phrase"] for a in data["items"][0]["annotations"]]
    assert data["failed"] == [
        {"shard": "ex-000000", "key": "ex_00000004", "error": "corrupt_image: broken"}
    ]
    assert data["per_page"] == 2 and "textContent" in page and "innerHTML" not in page


def test_the_gallery_is_the_package_template_filled_in(tmp_path):
    """The page's HTML, CSS and script come from the package file ``pipeline/gallery.html``
    (importlib.resources), unchanged but for its three slots."""
    out = write_output(tmp_path)
    export_html(str(out), str(tmp_path / "gallery.html"))
    page = (tmp_path / "gallery.html").read_text()
    template = (ROOT / "pipeline" / "gallery.html").read_text()
    assert page_template() == template and template.count("__DATA__") == 1
    title = html.escape(f"flmm-pipeline annotations: {out}")
    head, tail = template.replace("__TITLE__", title).replace("__SIDE__", "320").split("__DATA__")
    assert page.startswith(head) and page.endswith(tail) and len(page) > len(head) + len(tail)
    assert "__" not in page[len(head) : -len(tail)] and "__TITLE__" not in page


def test_export_reads_and_writes_s3_through_the_jobs_filesystem_layer(tmp_path, s3_bucket):
    out = write_output(tmp_path)
    s3, _ = pafs.FileSystem.from_uri(f"s3://{s3_bucket}")  # as the job opens it
    shard = f"{s3_bucket}/in/ex-000000.tar"
    pafs.copy_files(str(tmp_path / "in" / "ex-000000.tar"), shard, destination_filesystem=s3)
    for path in out.rglob("*"):
        if path.is_file():
            target = f"{s3_bucket}/out/{path.relative_to(out)}"
            if path.parent.name == "_done":  # the input shard as the job on S3 would name it
                done = {**json.loads(path.read_text()), "input": f"s3://{shard}"}
                with s3.open_output_stream(target) as stream:
                    stream.write(json.dumps(done).encode())
            else:
                pafs.copy_files(str(path), target, destination_filesystem=s3)
    export_coco(str(out), str(tmp_path / "local.json"), image_dir=str(tmp_path / "images"))
    summary = export_coco(
        f"s3://{s3_bucket}/out", f"s3://{s3_bucket}/labels.json", image_dir=f"s3://{s3_bucket}/img"
    )
    with s3.open_input_stream(f"{s3_bucket}/labels.json") as stream:
        remote = json.loads(stream.read())
    local = json.loads((tmp_path / "local.json").read_text())
    assert summary.images == 4 and remote["images"] == local["images"]
    assert remote["annotations"] == local["annotations"]
    for image in remote["images"]:
        with s3.open_input_stream(f"{s3_bucket}/img/{image['file_name']}") as stream:
            assert stream.read() == (tmp_path / "images" / image["file_name"]).read_bytes()


def test_the_export_job_writes_both_formats_and_says_what_it_did(tmp_path):
    out = write_output(tmp_path)
    for fmt, name in (("coco", "labels.json"), ("html", "gallery.html")):
        done = subprocess.run(
            [sys.executable, "jobs/export.py", "--input", str(out), "--format", fmt],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert (out / name).is_file()
        assert "exported 4 images" in done.stdout and "1 samples with errors" in done.stdout
    failed = subprocess.run(
        [sys.executable, "jobs/export.py", "--input", str(tmp_path / "nothing")],
        check=False, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert failed.returncode != 0 and "no finished shards" in failed.stderr


def test_preview_tiles_draw_the_best_scored_phrases_in_their_own_colours(tmp_path):
    from pipeline.preview import LINE_HEIGHT, TILE_HEIGHT, _tile
    from pipeline.render import PALETTE, colour, outline

    out = write_output(tmp_path)
    scene = scenes()[0]
    rows = [r for r in pq.read_table(out / "annotations").to_pylist() if r["key"] == "ex_00000000"]
    assert len(rows) >= 3
    tile = np.asarray(_tile(scene.image, rows, per_image=2))
    # two phrases drawn and one line saying how many more
    assert tile.shape[0] == TILE_HEIGHT + 3 * LINE_HEIGHT + 4
    picture = tile[:TILE_HEIGHT].reshape(-1, 3)
    present = {tuple(c) for c in np.unique(picture, axis=0)}
    assert colour(0) in present and colour(1) in present  # the outlines, opaque
    assert colour(2) not in present
    assert len(set(PALETTE)) == len(PALETTE)
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    ring = outline(mask)
    assert ring.sum() == 12 and not ring[2:4, 2:4].any()
