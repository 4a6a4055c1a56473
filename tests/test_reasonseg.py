"""ReasonSeg (issue 37, item 2): a fixture in LISA's release layout written here (a split folder
of ``<name>.jpg`` beside ``<name>.json`` with ``text``, ``is_sentence`` and LabelMe ``shapes``),
converted (masks checked pixel for pixel against the polygons worked out by hand), LISA's cIoU /
gIoU on hand-made masks (ignore pixels left out, an empty pair scored 1), and ``jobs/evaluate.py
--protocol reason`` with a tiny LLaVA checked against a direct run, one sample at a time."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import job_flags, models  # noqa: F401 (the tiny models fixture)

import jobs.evaluate as job
import jobs.prepare_refcoco as prepare
from flmm.build import build_flmm, build_sam, sam_config
from flmm.lmm import FrozenLMM
from flmm.metrics import MaskIoU
from flmm.proposals import has_word, whole_words
from pipeline.decode import read_samples
from pipeline.formats import decode_rle
from pipeline.reason import ReasonIoU
from pipeline.reasonseg import ReasonSegConfig, convert_reasonseg

LONG = "Which of these would you eat when you are hungry?"


def rect(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def shape(label, points):
    return {"label": label, "points": points, "group_id": None, "shape_type": "polygon"}


# name → (width, height, text, is_sentence, shapes); corners are fractional where LISA truncates
FIXTURE = {
    "apple": (40, 30, ["the red apple", "an apple"], False, [
        shape("flag", rect(0, 0, 39, 29)),  # deprecated: skipped
        shape("target", rect(4.7, 3.2, 20.9, 15.8)),  # → columns 4..20, rows 3..15
        shape("ignore", rect(8, 6, 12.5, 9)),  # smaller, drawn later: over the target
    ]),
    "bread": (36, 28, [LONG], True, [
        shape("target", [[2, 2], [14, 2], [2, 14]]),  # a 45° triangle: x + y <= 16
        shape("ignore", rect(0, 0, 35, 5)),  # larger, drawn first: the triangle paints over it
    ]),
    "sky": (24, 20, ["the sky"], False, [shape("ignore", rect(0, 0, 23, 3))]),  # no target
}  # fmt: skip


def expected_masks(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(target, ignore) of a fixture image, by hand."""
    width, height = FIXTURE[name][:2]
    target, ignore = np.zeros((height, width), bool), np.zeros((height, width), bool)
    y, x = np.mgrid[:height, :width]
    if name == "apple":
        target[3:16, 4:21] = True
        ignore[6:10, 8:13] = True
        target &= ~ignore
    elif name == "bread":
        target = (x >= 2) & (y >= 2) & (x + y <= 16)
        ignore[0:6, 0:36] = True
        ignore &= ~target
    else:
        ignore[0:4, :] = True
    return target, ignore


def write_reasonseg(root):
    """The fixture in the release layout: ``root/val/<name>.jpg`` + ``.json``, and one JSON
    whose image is missing."""
    split = root / "val"
    split.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (width, height, text, is_sentence, shapes) in FIXTURE.items():
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(split / f"{name}.jpg", quality=95)
        anno = {"text": text, "is_sentence": is_sentence, "shapes": shapes}
        anno.update(imageHeight=height, imageWidth=width, imagePath=f"{name}.jpg")
        (split / f"{name}.json").write_text(json.dumps(anno))
    (split / "lost.json").write_text(
        json.dumps({"text": ["x"], "is_sentence": False, "shapes": []})
    )
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = write_reasonseg(tmp_path_factory.mktemp("reasonseg") / "ReasonSeg")
    out = root.parent / "shards"
    stats = convert_reasonseg(ReasonSegConfig(root, out))
    return out, stats


def test_conversion_masks_equal_the_polygons_drawn_by_hand(converted):
    out, stats = converted
    assert list(stats) == ["val"]
    assert (stats["val"].images, stats["val"].long, stats["val"].skipped_images) == (3, 1, 1)
    assert stats["val"].skipped == [{"name": "lost", "reason": "missing image file"}]
    assert [p.name for p in stats["val"].shards] == ["reason_seg-val-000000.tar"]
    samples = {s["meta"]["file_name"][:-4]: s for s in read_samples(sorted(out.glob("*.tar")))}
    assert list(samples) == ["apple", "bread", "sky"]  # name order
    assert samples["apple"]["key"] == "val_000000000000"
    for name, sample in samples.items():
        meta = sample["meta"]
        (obj,) = meta["objects"]
        target, ignore = expected_masks(name)
        np.testing.assert_array_equal(decode_rle(obj["mask"]), target, err_msg=name)
        np.testing.assert_array_equal(decode_rle(obj["ignore"]), ignore, err_msg=name)
        assert obj["expressions"] == meta["queries"] == meta["phrases"] == FIXTURE[name][2]
        assert meta["is_sentence"] is FIXTURE[name][3]
        assert sample["image"].shape == (*target.shape, 3)
    assert samples["apple"]["meta"]["question"] == "What is the red apple in this image?"
    assert samples["bread"]["meta"]["question"] == LONG  # a long sentence is asked as it is
    assert not decode_rle(samples["sky"]["meta"]["objects"][0]["mask"]).any()


def test_an_exif_rotated_image_is_stored_as_lisa_reads_it(tmp_path):
    split = tmp_path / "ReasonSeg" / "test"
    split.mkdir(parents=True)
    image = Image.fromarray(np.zeros((10, 20, 3), np.uint8))  # stored 20 wide, 10 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view: 10 wide, 20 high
    image.save(split / "turned.jpg", exif=exif)
    shapes = [shape("target", rect(1, 1, 3, 17))]
    (split / "turned.json").write_text(
        json.dumps({"text": ["a"], "is_sentence": 0, "shapes": shapes})
    )
    prepare.main(["--dataset", "reasonseg", "--images", str(tmp_path / "ReasonSeg"),
                  "--out", str(tmp_path / "out"), "--splits", "test"])  # fmt: skip
    (sample,) = read_samples(sorted((tmp_path / "out").glob("*.tar")))
    assert sample["image"].shape == (20, 10, 3) and sample["meta"]["exif_transposed"]
    assert decode_rle(sample["meta"]["objects"][0]["mask"]).sum() == 3 * 17
    assert sample["meta"]["is_sentence"] is False
    with pytest.raises(SystemExit, match="splits \\['val'\\] not in"):
        prepare.main(["--dataset", "reasonseg", "--images", str(tmp_path / "ReasonSeg"),
                      "--out", str(tmp_path / "out"), "--splits", "val"])  # fmt: skip


def test_reason_iou_is_lisas_arithmetic_on_hand_made_masks():
    def mask(*cells, shape=(4, 4)):
        m = np.zeros(shape, bool)
        for r, c in cells:
            m[r, c] = True
        return m

    acc = ReasonIoU()
    # 1: target 4 pixels, of which 1 ignored; prediction 3 target pixels + the ignored one + 1
    #    outside → I = 2 ((0,0), (0,1)), U = 3 targets kept + 1 outside = 4
    target = mask((0, 0), (0, 1), (1, 0), (1, 1))
    ignore = mask((1, 1), (3, 3))
    pred = mask((0, 0), (0, 1), (1, 1), (2, 2), (3, 3))
    acc.update(pred, target, ignore)
    # 2: no target, nothing predicted outside the ignored pixels → U = 0: IoU 1
    acc.update(mask((3, 3)), mask(), mask((3, 3)))
    # 3: no target, 2 pixels predicted → IoU 0
    acc.update(mask((0, 0), (0, 1)), mask(), mask())
    assert (acc.intersections, acc.unions) == ([2, 0, 0], [4, 0, 2])
    result = acc.result()
    assert result["giou"] == pytest.approx((2 / (4 + 1e-5) + 1 + 0) / 3, abs=1e-12)
    assert result["ciou"] == pytest.approx(2 / (6 + 1e-10), abs=1e-12)
    assert result["n"] == 3
    # negative control: the project's MaskIoU (no ignore, an empty pair 0) scores otherwise
    plain = MaskIoU()
    plain.update(np.stack([pred, mask((3, 3))]), np.stack([target, mask()]))
    assert plain.ious() == [3 / 6, 0.0]


def lisa_iou(pred, target, ignore) -> tuple[int, int]:
    """LISA's intersectionAndUnionGPU by hand: ignored pixels set to 255 in both."""
    out = np.where(ignore, 255, pred.astype(np.int64))
    gt = np.where(ignore, 255, target.astype(np.int64))
    inter = int(((out == gt) & (gt == 1)).sum())
    return inter, int((out == 1).sum() + (gt == 1).sum() - inter)


def test_reason_protocol_asks_grounds_the_answer_whole_and_splits_short_and_long(
    models,  # noqa: F811
    converted,
    tmp_path,
    capsys,
):
    out, _ = converted
    output = tmp_path / "metrics.json"
    flags = {**job_flags(models, output), "--max-new-tokens": 8}
    job.main([str(v) for item in flags.items() for v in item] + ["--shards", str(out)])
    metrics = json.loads(output.read_text())
    keys = ("reason", "reason-short", "reason-long")
    assert set(metrics) == {f"reason_seg-val/{k}" for k in keys}
    counts = [metrics[f"reason_seg-val/{k}"]["refined"]["n"] for k in keys]
    assert counts == [3, 2, 1]

    # direct: each sample alone, the LMM's answer grounded whole as one given phrase
    lmm = FrozenLMM.from_pretrained(models["lmm"])
    model = build_flmm(lmm, build_sam(sam_config("tiny"), models["sam"]), models["heads"])
    counts = {(k, o): [] for k in keys for o in ("unet", "refined")}
    grounded = 0
    for sample in read_samples(sorted(out.glob("*.tar"))):
        meta, image = sample["meta"], torch.from_numpy(sample["image"].copy())
        target = decode_rle(meta["objects"][0]["mask"])
        ignore = decode_rle(meta["objects"][0]["ignore"])
        (answer,) = lmm.answer([image], [meta["question"]], 8)
        preds = {o: np.zeros(target.shape, bool) for o in ("unet", "refined")}
        if has_word(answer):
            grounded += 1
            start, end = whole_words(answer, 0, len(answer))
            with torch.inference_mode():
                (g,) = model([model.prepare(image, [answer[start:end]])])
            preds = {"unet": g.coarse, "refined": g.refined}
            preds = {o: (v[0, 0].sigmoid() > 0.5).numpy() for o, v in preds.items()}
        split = "reason-long" if meta["is_sentence"] else "reason-short"
        for key in ("reason", split):
            for o, pred in preds.items():
                counts[key, o].append(lisa_iou(pred, target, ignore))
    assert grounded >= 1  # at least one answer is grounded (the rest: empty masks)
    for (key, o), pairs in counts.items():
        got = metrics[f"reason_seg-val/{key}"][o]
        giou = np.mean([i / (u + 1e-5) + (u == 0) for i, u in pairs])
        ciou = sum(i for i, _ in pairs) / (sum(u for _, u in pairs) + 1e-10)
        assert got["giou"] == pytest.approx(giou, abs=1e-9), (key, o)
        assert got["ciou"] == pytest.approx(ciou, abs=1e-9), (key, o)
    stdout = capsys.readouterr().out
    assert "| reason_seg-val | reason-long | 1 |" in stdout
