"""jobs/evaluate.py: metrics of real (tiny) models on real shards, checked against a direct run."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_png import png_config, write_png_dir

import jobs.evaluate as job
import toyworld.models
from flmm.build import build_flmm, build_sam, sam_config
from flmm.heads import save_heads
from flmm.lmm import FrozenLMM
from flmm.metrics import MaskIoU
from pipeline.decode import read_samples
from pipeline.evaluate import (
    PROTOCOLS,
    EvalSet,
    Sequence,
    Skipped,
    eval_sets,
    iter_samples,
    sequences,
    split_name,
)
from pipeline.formats import decode_rle, png_bytes
from toyworld.scenes import SceneConfig, make_scene, scene_seed
from toyworld.shards import toy_shards, write_toy_shards

# Small scenes with few objects keep the query count (and the U-Net's cost) low.
SCENES = SceneConfig(min_side=48, max_side=72, min_objects=2, max_objects=2)


@pytest.fixture(scope="module")
def models(tiny_llava_dir, tmp_path_factory):
    """Paths of a tiny LLaVA, a tiny SAM's weights and random heads saved for them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the U-Net dominates; one thread is fastest on a shared CPU
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("eval_models")
    sam = build_sam(sam_config("tiny"))
    save_file(sam.state_dict(), str(out / "sam.safetensors"))
    lmm = FrozenLMM.from_pretrained(str(tiny_llava_dir))
    heads = build_flmm(lmm, sam).heads
    # A positive U-Net bias makes the random heads predict non-trivial masks (not all empty).
    last_conv = [m for m in heads.mask_decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    last_conv.bias.data.fill_(0.5)
    save_heads(heads, out / "heads.safetensors")
    yield {
        "lmm": str(tiny_llava_dir),
        "sam": out / "sam.safetensors",
        "heads": out / "heads.safetensors",
    }
    torch.set_num_threads(threads)


def _write_tar(path: Path, samples: list[dict]) -> Path:
    """A shard written by hand: each sample is ``{"__key__": key, ext: bytes, ...}``."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _bad_shard(directory: Path) -> Path:
    """One good toy sample between an undecodable image and a sample without objects."""
    good = next(read_samples(write_toy_shards(directory / "src", 1, 1, seed=9, config=SCENES)))
    meta = json.dumps(good["meta"]).encode()
    directory.mkdir(exist_ok=True)
    return _write_tar(
        directory / "bad-000000.tar",
        [
            {"__key__": "broken", "png": b"not a png", "json": meta},
            {"__key__": "good", "png": png_bytes(good["image"]), "json": meta},
            {"__key__": "empty", "png": png_bytes(good["image"]), "json": b'{"objects": []}'},
        ],
    )


def _direct_metrics(models: dict, shards: list[Path]) -> dict:
    """The metrics computed without the job: the model run one image and one sequence at a
    time through ``FLMM.forward``, masks sigmoid > 0.5, MaskIoU."""
    lmm = FrozenLMM.from_pretrained(models["lmm"])
    model = build_flmm(lmm, build_sam(sam_config("tiny"), models["sam"]), models["heads"])
    protocols = ("standard", "flmm", "flmm-separate")
    acc = {(p, o): MaskIoU() for p in protocols for o in ("unet", "refined")}
    for sample in read_samples(shards):
        image = torch.from_numpy(sample["image"].copy())
        objects = sample["meta"]["objects"]
        queries = [("standard", [e], [k]) for k, o in enumerate(objects) for e in o["expressions"]]
        queries.append(("flmm", [o["expressions"][0] for o in objects], list(range(len(objects)))))
        queries += [("flmm-separate", [o["expressions"][0]], [k]) for k, o in enumerate(objects)]
        for protocol, phrases, index in queries:
            with torch.inference_mode():
                (out,) = model([model.prepare(image, phrases)])
            gt = np.stack([decode_rle(objects[k]["mask"]) for k in index])
            acc[protocol, "unet"].update(out.coarse[:, 0].sigmoid() > 0.5, gt)
            acc[protocol, "refined"].update(out.refined[:, 0].sigmoid() > 0.5, gt)
    return {f"toy/{p}": {o: acc[p, o].result() for o in ("unet", "refined")} for p in protocols}


def test_sequences_follow_each_protocol():
    expressions = [["the red circle", "the circle"], ["the blue square"]]
    assert sequences(expressions, "standard", image=3) == [
        Sequence("standard", 3, ("the red circle",), (0,)),
        Sequence("standard", 3, ("the circle",), (0,)),
        Sequence("standard", 3, ("the blue square",), (1,)),
    ]
    assert sequences(expressions, "flmm") == [
        Sequence("flmm", 0, ("the red circle", "the blue square"), (0, 1))
    ]
    assert sequences(expressions, "flmm-separate", image=1) == [
        Sequence("flmm-separate", 1, ("the red circle",), (0,)),
        Sequence("flmm-separate", 1, ("the blue square",), (1,)),
    ]


def test_shards_are_grouped_by_split_unless_named(tmp_path):
    for name in ("refcoco_unc-val-000000", "refcoco_unc-val-000001", "refcoco_unc-testA-000000"):
        (tmp_path / f"{name}.tar").write_bytes(b"")
    assert split_name("val-000003.tar") == "val"
    assert split_name("s3://bucket/dir/refcoco_unc-val-000003.tar") == "refcoco_unc-val"
    assert eval_sets([str(tmp_path)]) == [
        EvalSet("refcoco_unc-testA", (str(tmp_path / "refcoco_unc-testA-000000.tar"),)),
        EvalSet("refcoco_unc-val", tuple(map(str, sorted(tmp_path.glob("refcoco_unc-val-*.tar"))))),
    ]
    named = eval_sets([f"all={tmp_path}"])
    assert [s.name for s in named] == ["all"] and len(named[0].paths) == 3
    with pytest.raises(ValueError, match="no .tar shards"):
        eval_sets([str(tmp_path / "missing")])


def test_toy_val_shards_hold_the_held_out_scenes(tmp_path):
    (path,) = toy_shards("val", tmp_path, n_scenes=2).glob("*.tar")
    samples = list(read_samples([path]))
    assert [s["key"] for s in samples] == ["val_01000000", "val_01000001"]
    np.testing.assert_array_equal(samples[1]["image"], make_scene(scene_seed(0, 1_000_001)).image)


def job_flags(models: dict, output) -> dict:
    """jobs/evaluate.py's flags for the tiny models, writing ``output``."""
    return {
        "--lmm": models["lmm"],
        "--sam": "tiny",
        "--sam-checkpoint": models["sam"],
        "--heads": models["heads"],
        "--batch-size": 2,
        "--output": output,
        "--device": "cpu",
    }


def test_job_metrics_equal_a_direct_computation_and_bad_samples_are_skipped(
    models, tmp_path, capsys
):
    toy = write_toy_shards(tmp_path / "toy", 2, 1, seed=1, config=SCENES, split_name="val")
    bad = _bad_shard(tmp_path / "bad")
    output = tmp_path / "metrics.json"
    flags = job_flags(models, output)
    argv = [str(v) for flag_value in flags.items() for v in flag_value]
    job.main([*argv, "--shards", f"toy={tmp_path / 'toy'}", "--shards", str(bad)])
    metrics = json.loads(output.read_text())

    assert set(metrics) == {f"{s}/{p}" for s in ("toy", "bad") for p in PROTOCOLS}
    for value in metrics.values():
        assert set(value) == {"unet", "refined"}
        for result in value.values():
            assert set(result) == {"ciou", "giou", "n"}
            assert 0.0 <= result["ciou"] <= 1.0 and 0.0 <= result["giou"] <= 1.0
    objects = [o for s in read_samples(toy) for o in s["meta"]["objects"]]
    assert metrics["toy/standard"]["unet"]["n"] == sum(len(o["expressions"]) for o in objects)
    assert metrics["toy/flmm"]["refined"]["n"] == len(objects) == 4
    assert metrics["toy/flmm-separate"]["unet"]["n"] == len(objects)
    assert metrics["bad/flmm"]["unet"]["n"] == 2  # only the good sample's two objects

    direct = _direct_metrics(models, toy)
    assert 0.0 < direct["toy/standard"]["unet"]["giou"] < 1.0  # non-trivial masks
    for key, outputs in direct.items():
        for name, result in outputs.items():
            assert metrics[key][name] == pytest.approx(result, abs=1e-9), (key, name)

    stdout = capsys.readouterr().out
    assert "| toy | standard |" in stdout and "| bad | flmm |" in stdout
    assert "bad: skipped 2 sample(s)" in stdout
    assert "corrupt_image: 1 (e.g. broken)" in stdout and "bad_objects: 1 (e.g. empty)" in stdout
    stats = json.loads((tmp_path / "metrics.stats.json").read_text())
    assert stats["bad"]["skipped"] == {"corrupt_image": 1, "bad_objects": 1}
    assert stats["bad"]["samples"] == 1 and stats["toy"]["samples"] == 2


def test_no_arguments_without_toy_heads_says_they_are_not_trained_yet(monkeypatch, tmp_path):
    monkeypatch.setattr(toyworld.models, "toy_heads", lambda: tmp_path / "heads.safetensors")
    with pytest.raises(SystemExit, match="toy heads .* do not exist yet"):
        job.main([])


def test_no_arguments_evaluate_toy_heads_on_held_out_toy_shards(models, monkeypatch, tmp_path):
    """The default path: toy LMM + toy SAM + toy heads (random ones here, so that the test does
    not depend on the shipped ones), held-out shards generated into
    ./out/toy/val, ./out/evaluate/metrics.json.
    ``--limit 1`` keeps it to one scene."""
    toy = toyworld.models.toy_model_spec(heads=False)
    sam = build_sam(sam_config("toy"), toy.sam_checkpoint)
    heads = build_flmm(FrozenLMM.from_pretrained(toy.lmm), sam).heads
    saved = save_heads(heads, tmp_path / "toy_heads.safetensors")
    monkeypatch.setattr(toyworld.models, "toy_heads", lambda: saved)
    monkeypatch.chdir(tmp_path)
    job.main(["--limit", "1"])
    metrics = json.loads((tmp_path / "out" / "evaluate" / "metrics.json").read_text())
    sample = next(read_samples([tmp_path / "out" / "toy" / "val" / "val-000000.tar"]))
    assert sample["key"] == "val_01000000"
    objects = sample["meta"]["objects"]
    assert metrics["val/flmm"]["refined"]["n"] == len(objects)
    assert metrics["val/standard"]["unet"]["n"] == sum(len(o["expressions"]) for o in objects)


def test_eval_shards_are_found_and_read_on_s3(tmp_path, s3_bucket):
    import pyarrow.fs as pafs

    local = write_toy_shards(tmp_path, 3, 2, seed=4, config=SCENES, split_name="val")
    s3, _ = pafs.FileSystem.from_uri(f"s3://{s3_bucket}")
    for path in local:
        pafs.copy_files(str(path), f"{s3_bucket}/eval/{path.name}", destination_filesystem=s3)
    (remote,) = eval_sets([f"s3://{s3_bucket}/eval/"])
    assert remote.name == "val"
    assert remote.paths == tuple(f"s3://{s3_bucket}/eval/{p.name}" for p in local)
    skipped_local, skipped_remote = Skipped(), Skipped()
    expected = list(iter_samples([str(p) for p in local], skipped_local))
    got = list(iter_samples(remote.paths, skipped_remote))
    assert [s.key for s in got] == [s.key for s in expected] and len(got) == 3
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.masks, b.masks)


def test_flmm_protocols_read_raw_text_lower_cased_and_count_each_annotation_once():
    """As the authors' script: an object is named by its first raw expression, lower-cased, and
    two refs of one annotation are one object."""
    from pipeline.evaluate import eval_sample
    from pipeline.sources import sample_files

    rle = {"size": [4, 4], "counts": "04"}  # every pixel set
    meta = {
        "objects": [
            {"expressions": ["man left"], "raw": ["The Man on the LEFT"], "ann_id": 7, "mask": rle},
            {"expressions": ["guy"], "raw": ["Guy"], "ann_id": 7, "mask": rle},
            {"expressions": ["red ball"], "ann_id": 9, "mask": rle},
        ]
    }
    image = png_bytes(np.zeros((4, 4, 3), np.uint8))
    files = sample_files({"png": image, "json": json.dumps(meta).encode()}, ["png", "json"])
    sample = eval_sample("k", files)
    assert sample.firsts == ["the man on the left", "guy", "red ball"]
    assert sample.distinct == [0, 2]
    seqs = sequences(sample.expressions, "flmm", 0, sample.firsts, sample.distinct)
    assert seqs == [Sequence("flmm", 0, ("the man on the left", "red ball"), (0, 2))]
    separate = sequences(sample.expressions, "flmm-separate", 0, sample.firsts, sample.distinct)
    assert [s.phrases for s in separate] == [("the man on the left",), ("red ball",)]
    assert len(sequences(sample.expressions, "standard")) == 3  # every expression, every ref


# --------------------------------------------------------------------------------------------
# PNG: narratives prefilled whole, phrases grounded in place, average recall
# --------------------------------------------------------------------------------------------


def test_png_sequences_are_one_per_narrative_with_their_spans_in_place():
    narratives = [
        ("a man and his dog under the sky", [(0, (0, 17)), (2, (28, 31))]),
        ("a dog", [(1, (0, 5))]),
    ]
    expressions = [["a man and his dog"], ["a dog"], ["sky"]]
    assert sequences(expressions, "png", 2, narratives=narratives) == [
        Sequence(
            "png", 2, ("a man and his dog", "sky"), (0, 2), narratives[0][0], ((0, 17), (28, 31))
        ),
        Sequence("png", 2, ("a dog",), (1,), "a dog", ((0, 5),)),
    ]
    assert sequences(expressions, "png-separate") == [
        Sequence("png-separate", 0, (e[0],), (k,)) for k, e in enumerate(expressions)
    ]


def _span_positions(tokenizer, prefix: str, text: str, span) -> list[int]:
    """The prompt positions of a span's tokens, from the tokenizer's own char → token map of
    ``prefix + " " + text`` (the text prompt's layout), not from offsets."""
    enc = tokenizer(prefix + " " + text)
    base = len(prefix) + 1
    found = {enc.char_to_token(base + c) for c in range(*span)}
    return sorted(found - {None})


def test_png_protocol_grounds_narratives_in_place_and_reports_average_recall(
    models, tmp_path, capsys
):
    """The job on converted PNG fixture shards (two images, four narratives, six phrases) picks
    the PNG protocols. Checked independently: (1) the maps it grounds each phrase with are the
    stock eager model's attention rows of that phrase's own tokens in its narrative's prefill
    (positions from the tokenizer's char → token map), mean over tokens, normalised; (2) its AR
    and splits equal those of a direct run, one narrative at a time, with the authors' threshold
    loop (``test_metrics._authors_average_accuracy``) on kinds known by hand."""
    from test_metrics import _authors_average_accuracy
    from transformers import AutoModelForImageTextToText

    from flmm.model import GroundingInput
    from pipeline.evaluate import eval_sample, lmm_features
    from pipeline.png import convert_png
    from pipeline.sources import iter_tar_samples, sample_files

    out = tmp_path / "png"
    png_dir = write_png_dir(tmp_path / "png_source")
    (shard,) = convert_png(png_config(png_dir, out))["val2017"].shards
    output = tmp_path / "metrics.json"
    flags = job_flags(models, output)
    job.main([str(v) for item in flags.items() for v in item] + ["--shards", str(out)])
    metrics = json.loads(output.read_text())
    assert set(metrics) == {"png_coco-val2017/png", "png_coco-val2017/png-separate"}

    lmm = FrozenLMM.from_pretrained(models["lmm"])
    model = build_flmm(lmm, build_sam(sam_config("tiny"), models["sam"]), models["heads"])
    tok = lmm.processor.tokenizer
    eager = AutoModelForImageTextToText.from_pretrained(models["lmm"], attn_implementation="eager")
    samples = [eval_sample(k, sample_files(f, e)) for k, f, e in iter_tar_samples(str(shard))]
    # kinds by hand (tests/test_png.py): "a man and his dog" plural → thing; "the blue sky"
    # stuff; "the man", "the dog", "a cloud", "A dog" singular things
    assert [s.things for s in samples] == [[True, False, True], [True, True, True]]
    assert [s.plurals for s in samples] == [[True, False, False], [False, False, False]]

    ious = {"unet": [], "refined": []}
    kinds = []
    for x in samples:
        image = torch.from_numpy(x.image)
        seqs = sequences(x.expressions, "png", 0, narratives=x.narratives)
        assert [s.text for s in seqs] == [text for text, _ in x.narratives]
        with torch.inference_mode():
            prepared, attention, _ = lmm_features(model, [image], seqs)
        for seq, sample, maps in zip(seqs, prepared, attention):
            prefix = lmm.layout.expanded_prefix(sample.image.n_tokens)
            ids = sample.input_ids
            image_pos = torch.nonzero(ids == lmm.image_token_id)[:, 0]
            rows, cols = sample.image.grid
            assert len(sample.image.views) == 1 and len(image_pos) == rows * cols
            with torch.inference_mode():
                _, inputs = lmm.model_inputs([sample])
                stock = eager(**inputs, output_attentions=True)
                direct = lmm([sample])  # this narrative alone, for (2)
            hiddens, own_maps = [], []
            for p, (phrase, span) in enumerate(zip(seq.phrases, seq.spans)):
                pos = _span_positions(tok, prefix, seq.text, span)
                assert tok.decode(ids[pos]).strip() == phrase  # the phrase's own tokens
                # (1) eager attention of those tokens over the image, per layer and head
                eager_maps = torch.stack(
                    [a[0][:, pos][:, :, image_pos].mean(1) for a in stock.attentions]
                )  # [L, H, N]
                eager_maps = eager_maps.reshape(-1, rows, cols)
                eager_maps = eager_maps / eager_maps.sum((-2, -1), keepdim=True)
                torch.testing.assert_close(maps[p], eager_maps, atol=1e-5, rtol=0)
                # (2) the same slots of the narrative's own prefill, merged by hand
                slots = [int(torch.nonzero(sample.phrase_tokens[0] == q)) for q in pos]
                own = direct.token_maps[0][:, :, slots, : rows * cols].mean(2)
                own = own.reshape(-1, rows, cols)
                own_maps.append(own / own.sum((-2, -1), keepdim=True))
                hiddens.append(direct.token_hidden[0, slots])
            sam_pixels, size = model.image_encoder.preprocess(image)
            with torch.inference_mode():
                (grounding,) = model.decode(
                    [GroundingInput(sample, sam_pixels, size)],
                    [torch.stack(own_maps)],
                    [hiddens],
                    model.embed(sam_pixels),
                )
            gt = torch.from_numpy(x.masks[list(seq.objects)])
            for name, logits in (("unet", grounding.coarse), ("refined", grounding.refined)):
                pred = logits[:, 0].sigmoid() > 0.5
                inter, union = (pred & gt).sum((1, 2)), (pred | gt).sum((1, 2))
                ious[name] += (inter / union).tolist()
            kinds += [(x.things[k], x.plurals[k]) for k in seq.objects]

    things = np.array([t for t, _ in kinds])
    plurals = np.array([p for _, p in kinds])
    splits = {"": slice(None), "_things": things, "_stuff": ~things}
    splits.update({"_singular": ~plurals, "_plural": plurals})
    for name, values in ious.items():
        values = np.array(values)
        got = metrics["png_coco-val2017/png"][name]
        assert got["n"] == 6 and (got["n_things"], got["n_plural"]) == (5, 1)
        for suffix, chosen in splits.items():
            expected = _authors_average_accuracy(values[chosen])
            assert got[f"ar{suffix}"] == pytest.approx(expected, abs=1e-9), (name, suffix)
    assert 0.0 < metrics["png_coco-val2017/png"]["refined"]["ar"] < 1.0  # non-trivial masks
    assert metrics["png_coco-val2017/png-separate"]["unet"]["n"] == 6

    stdout = capsys.readouterr().out
    assert "| png_coco-val2017 | png | 6 |" in stdout and "U-Net AR | things" in stdout


def test_png_protocols_skip_samples_without_narratives_or_with_bad_ones():
    from pipeline.evaluate import SkipSample, eval_sample
    from pipeline.sources import sample_files

    rle = {"size": [4, 4], "counts": "04"}  # every pixel set
    obj = {"expressions": ["a dog"], "mask": rle, "narrative": 3, "narrative_span": [0, 5]}
    png = {"objects": [obj], "narrative_ids": [3], "narrative_texts": ["a dog runs"]}
    image = png_bytes(np.zeros((4, 4, 3), np.uint8))

    def files(meta):
        return sample_files({"png": image, "json": json.dumps(meta).encode()}, ["png", "json"])

    sample = eval_sample("k", files(png), narratives_required=True)
    assert sample.narratives == [("a dog runs", [(0, (0, 5))])]
    assert (sample.things, sample.plurals) == ([False], [False])  # no isthing, no plural
    referring = {"objects": [{"expressions": ["a dog"], "mask": rle}]}
    assert eval_sample("k", files(referring)).narratives is None
    with pytest.raises(SkipSample, match="no_narratives"):
        eval_sample("k", files(referring), narratives_required=True)
    bad = {**png, "narrative_ids": [4]}
    with pytest.raises(SkipSample, match="bad_narratives"):
        eval_sample("k", files(bad))
