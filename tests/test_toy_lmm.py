"""The toy LMM: the shipped checkpoint loads like a llava-hf one and sees the scene; the question
generator is deterministic and truthful; the pretraining recipe trains."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoProcessor, LlavaForConditionalGeneration

from flmm.build import TINY_LLAVA_VARIANTS
from flmm.cot import evidence_box, second_view
from flmm.families import family_for
from flmm.lmm import FrozenLMM
from flmm.proposals import LIST_PROMPT, PROPOSE_PROMPT
from flmm.tiny_llava import write_tiny_llava
from toyworld.captions import scene_text
from toyworld.instructions import (
    CORNERS,
    COT_VIEW,
    LINE_SEPARATOR,
    REASON_TEMPLATES,
    ZOOM_KEEPS,
    line_match,
    list_lines,
    look,
    propose,
    read_lines,
    reason,
    reason_object,
)
from toyworld.lmm import (
    RECORD,
    Recipe,
    ToyData,
    answer_loss,
    attention_lift,
    build_toy_lmm,
    cell_labels,
    corpus,
    eval_examples,
    generate_answers,
    grid_cover,
    n_image_tokens,
    pretrain,
    score,
)
from toyworld.scenes import FAR_WORLD, make_scene, position_tags, scene_seed
from toyworld.vqa import (
    COLOURLESS_KINDS,
    KINDS,
    LIST_INSTRUCTION,
    SCENE_CONFIG,
    TOY_INSTRUCTION,
    TOY_PROMPT,
    WHERE,
    answer_options,
    ask,
    asked_object,
    describe,
    list_name,
    listed_objects,
)

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "toy" / "llava"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: torch's intra-op threads only add latency (and stall on shared cores)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def shipped():
    return FrozenLMM.from_pretrained(str(SHIPPED), prompt=TOY_PROMPT)


def test_shipped_toy_lmm_is_an_fp16_llava_checkpoint_of_the_toy_variant(shipped):
    with safe_open(str(SHIPPED / "model.safetensors"), "pt") as f:
        names = f.keys()
        assert {f.get_slice(name).get_dtype() for name in names} == {"F16"}
    variant = TINY_LLAVA_VARIANTS["toy"]
    side = variant.image_size // variant.patch_size
    assert n_image_tokens(shipped.model) == side * side
    assert (shipped.num_layers, shipped.num_heads) == (variant.text_layers, variant.text_heads)
    scene = make_scene(scene_seed(0, 10**9))
    phrases = [obj.expressions[0] for obj in scene.objects]
    with torch.inference_mode():
        out = shipped([shipped.prepare(torch.from_numpy(scene.image), phrases)])
    assert out.attention[0].shape == (len(phrases), shipped.in_channels, side, side)
    torch.testing.assert_close(out.attention[0].sum(dim=(-2, -1)), torch.ones(len(phrases), 16))


def test_shipped_toy_lmm_phrase_attention_falls_on_the_phrase_object(shipped):
    """The property the F-LMM heads rely on; a random-weight control scores 1.0 (uniform)."""
    data = ToyData(shipped.processor, n_image_tokens(shipped.model), 0, SCENE_CONFIG)
    assert attention_lift(shipped, data, n_scenes=10)["best_channel"] >= 2.0


@pytest.mark.parametrize("kind", ["colour", "shape"])
def test_shipped_toy_lmm_answers_held_out_questions_well_above_chance(shipped, kind):
    seed = json.loads((SHIPPED / RECORD).read_text())["recipe"]["seed"]
    data = ToyData(shipped.processor, n_image_tokens(shipped.model), seed, SCENE_CONFIG)
    examples = eval_examples(data, kind, 20)  # held-out scene indices: never trained on
    answers = generate_answers(shipped.model, data, examples, max_new=6)
    accuracy = np.mean([a[:1] == [e.question.answer] for e, a in zip(examples, answers)])
    assert accuracy >= 2 / len(answer_options(kind))


def test_shipped_toy_lmm_lists_the_objects_of_held_out_scenes(shipped):
    """The list question (what image-only annotation asks): on the first 20 held-out scenes,
    the share of objects the greedy list names exactly. Measured on the first 100 held-out
    scenes: 74.5%, per 20-scene window 62% to 90% (these 20: 63%); the bar, 55%, sits below
    every window. Before the list stage the model named 34% of the objects when describing."""
    from toyworld.vqa import list_name

    data = ToyData(shipped.processor, n_image_tokens(shipped.model), 0, SCENE_CONFIG)
    examples = eval_examples(data, "list", 20)
    answers = generate_answers(shipped.model, data, examples, max_new=40)
    named = total = 0
    for example, items in zip(examples, answers):
        names = [list_name(o) for o in data.scene(example.index).objects]
        named += sum(name in items for name in names)
        total += len(names)
    assert named / total >= 0.55, named / total


def test_cell_labels_name_the_object_covering_each_token_cell():
    grid = (12, 12)
    colours = [name for name, _ in SCENE_CONFIG.colours]
    for index in range(20):
        scene = make_scene(scene_seed(5, index))
        labels = cell_labels(scene, grid, SCENE_CONFIG)
        covers = torch.stack([grid_cover(o.mask, grid) for o in scene.objects])  # [O, h, w]
        for y in range(grid[0]):
            for x in range(grid[1]):
                best = int(covers[:, y, x].argmax())
                if covers[best, y, x] < 0.25:
                    assert labels[0, y, x] == len(colours)  # "nothing"
                else:
                    obj = scene.objects[best]
                    assert colours[labels[0, y, x]] == obj.colour
                    assert SCENE_CONFIG.shapes[labels[1, y, x]] == obj.shape


def _owner(scene, name):
    (obj,) = [o for o in scene.objects if name in o.expressions]
    return obj


COLOURS = [name for name, _ in SCENE_CONFIG.colours]


def test_questions_are_deterministic_and_their_answers_match_the_scene():
    for index in range(60):
        scene = make_scene(scene_seed(3, index))
        tags = position_tags([o.centre for o in scene.objects], *scene.image.shape[:2], 0.12)
        for kind in KINDS:
            question = ask(scene, kind, np.random.default_rng(index))
            assert question == ask(scene, kind, np.random.default_rng(index))
            if question is None:
                assert kind == "position"
                continue
            text, answer = question.instruction, question.answer
            if kind in ("colour", "shape", "size", "position"):
                name = text.split(" is ", 1)[1].rstrip("?")
                obj = _owner(scene, name)
                assert answer not in name.split()
                if kind == "position":
                    assert [WHERE[t] for t in tags[scene.objects.index(obj)]] == [answer]
                else:
                    assert getattr(obj, kind) == answer
            elif kind == "count":
                assert answer == ("two", "three", "four")[len(scene.objects) - 2]
            elif kind == "existence":
                colour, shape = text.rstrip("?").split()[-2:]
                present = any((o.colour, o.shape) == (colour, shape) for o in scene.objects)
                assert answer == ("yes" if present else "no")
            elif kind == "list":  # every object once, by colour, then shape, then size
                keys = [
                    (COLOURS.index(o.colour), SCENE_CONFIG.shapes.index(o.shape), o.size != "small")
                    for o in scene.objects
                ]
                expected = [
                    scene.objects[i] for i in sorted(range(len(keys)), key=keys.__getitem__)
                ]
                assert question.phrases == tuple(
                    f"the {o.size} {o.colour} {o.shape}" for o in expected
                )
            else:
                owners = [_owner(scene, phrase) for phrase in question.phrases]
                assert sorted(map(id, owners)) == sorted(map(id, scene.objects))
            assert kind in ("describe", "list") or answer in answer_options(kind)


@pytest.fixture(scope="module")
def tiny_toy(tmp_path_factory):
    out = write_tiny_llava(TINY_LLAVA_VARIANTS["tiny"], corpus(), tmp_path_factory.mktemp("toy"))
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    return model, ToyData(processor, n_image_tokens(model), seed=0, scenes=SCENE_CONFIG)


def test_training_sequences_are_the_grounding_prompt_with_labels_on_the_answer(tiny_toy):
    model, data = tiny_toy
    scene = data.scene(0)
    question = ask(scene, "describe", np.random.default_rng(0))
    example = data.example(0, question, data.pixels(scene))
    lmm = FrozenLMM(
        model, data.processor, family_for("llava"), TOY_PROMPT
    )  # the default grounding prompt
    grounding = lmm.prepare(torch.from_numpy(scene.image), list(question.phrases))
    tokenizer = data.processor.tokenizer
    assert torch.equal(example.input_ids[:-1], grounding.input_ids)
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.start == int(grounding.phrase_tokens[0][0])
    batch = data.training_batch(0, Recipe(batch=3))
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        answer = tokenizer.decode(labels[labels != -100])
        assert answer.endswith(".</s>") and "ASSISTANT" not in answer
        assert tokenizer.decode(ids).endswith(answer)


def test_a_few_pretraining_steps_lower_the_answer_loss_on_a_fixed_batch(tiny_toy):
    model, data = tiny_toy
    recipe = Recipe(steps=8, batch=4, lr=1e-2, warmup=1, log_every=100)
    fixed = data.training_batch(1000, recipe)  # a batch the steps never see
    labels = fixed.pop("labels")
    with torch.no_grad():
        before = answer_loss(model(**fixed).logits, labels).item()
    losses = pretrain(model, data, recipe, log=lambda line: None)
    with torch.no_grad():
        after = answer_loss(model(**fixed).logits, labels).item()
    assert len(losses) == recipe.steps
    assert after < 0.7 * before


def test_a_zero_tower_lr_scale_trains_the_language_side_and_leaves_the_vision_tower(tmp_path):
    out = write_tiny_llava(TINY_LLAVA_VARIANTS["tiny"], corpus(), tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(out)
    data = ToyData(AutoProcessor.from_pretrained(out), n_image_tokens(model), 0, SCENE_CONFIG)
    tower = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    projector = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    recipe = Recipe(steps=2, batch=2, lr=1e-2, warmup=1, vqa_tower_lr_scale=0.0, log_every=100)
    pretrain(model, data, recipe, log=lambda line: None)
    after = model.model.vision_tower.state_dict()
    assert all(torch.equal(tower[k], after[k]) for k in tower)
    moved = model.model.multi_modal_projector.state_dict()
    assert any(not torch.equal(projector[k], moved[k]) for k in projector)


def test_detailed_descriptions_follow_each_expression_with_its_objects_attributes():
    for index in range(30):
        scene = make_scene(scene_seed(0, index))
        question = describe(scene, np.random.default_rng(index), detailed=True)
        expressions, details = question.phrases[::2], question.phrases[1::2]
        assert len(expressions) == len(details) == len(scene.objects)
        for expression, detail in zip(expressions, details):
            (obj,) = [o for o in scene.objects if expression in o.expressions]
            assert detail == f"{obj.size} {obj.colour} {obj.shape}"
        assert score(question, scene, list(question.phrases)) == 1.0
        wrong = [question.phrases[0], question.phrases[3], *question.phrases[2:]]
        assert score(question, scene, wrong) < 1.0  # the first object given another's details
        plain = describe(scene, np.random.default_rng(index))
        assert plain.phrases == expressions  # same draws: details only add segments


def test_referent_stage_names_objects_by_colourless_expressions_where_they_have_them(tiny_toy):
    _, data = tiny_toy
    colourless = {1.0: [], 0.0: []}
    for index in range(40):
        scene = make_scene(scene_seed(0, index))
        for p, drawn in colourless.items():
            rng = np.random.default_rng(index)
            question = describe(scene, rng, True, COLOURLESS_KINDS, p)
            for expression, obj in zip(question.phrases[::2], _named(scene, question)):
                kind = obj.expression_kinds[obj.expressions.index(expression)]
                drawn.append(kind in COLOURLESS_KINDS)
                if p == 1.0:
                    assert kind in COLOURLESS_KINDS or not COLOURLESS_KINDS & set(
                        obj.expression_kinds
                    )
            assert score(question, scene, list(question.phrases)) == 1.0
    assert np.mean(colourless[1.0]) > 0.8 and np.mean(colourless[0.0]) < 0.5
    mixed = [data.referent_batch(step, Recipe(batch=8)) for step in range(3)]
    texts = [data.processor.tokenizer.decode(ids) for b in mixed for ids in b["input_ids"]]
    assert any(LIST_INSTRUCTION in t for t in texts) and any("Where is" in t for t in texts)
    assert any("How many" in t or "What " in t or "Is there" in t for t in texts)
    again = data.referent_batch(1, Recipe(batch=8))
    assert torch.equal(again["input_ids"], mixed[1]["input_ids"])  # a pure function of the step


def _named(scene, question):
    """The objects a description's expressions name, in order."""
    return [
        next(o for o in scene.objects if expression in o.expressions)
        for expression in question.phrases[::2]
    ]


def test_list_answers_name_every_object_once_and_score_only_when_whole():
    for index in range(30):
        scene = make_scene(scene_seed(0, index))
        question = ask(scene, "list", np.random.default_rng(index))
        assert question.instruction == LIST_INSTRUCTION
        assert sorted(question.phrases) == sorted(
            f"the {o.size} {o.colour} {o.shape}" for o in scene.objects
        )
        assert score(question, scene, list(question.phrases)) == 1.0
        assert score(question, scene, list(question.phrases[:-1])) == 0.0
        assert score(question, scene, list(question.phrases[::-1])) == float(
            question.phrases[::-1] == question.phrases
        )


def test_the_shipped_tokenizer_encodes_the_stage_5_prompts_without_unknown_tokens():
    tokenizer = AutoProcessor.from_pretrained(SHIPPED).tokenizer
    scene = make_scene(scene_seed(0, 10**9))
    for question in (propose(scene), list_lines(scene)):
        assert tokenizer.unk_token_id not in tokenizer(question.instruction)["input_ids"]
    # a line after the first starts with its word token, as the words of the caption do
    ids = tokenizer(" the star" + LINE_SEPARATOR + "the circle")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[1:] == ["▁the", "▁star", "\n", "▁the", "▁circle"]


def test_proposal_stage_answers_are_the_texts_gold_spans_and_the_list_one_per_line(tiny_toy):
    """Stage 5's data: a proposal's answer lines are the scene text's gold span texts in text
    order (each verbatim in the caption of its prompt), a list's are the listed objects' names;
    both tokenised as ``" line\n line"`` + EOS after the usual prompt."""
    _, data = tiny_toy
    tokenizer = data.processor.tokenizer
    for index in range(40):
        scene = make_scene(scene_seed(0, index))
        text = scene_text(scene)
        question = propose(scene)
        assert question.instruction == PROPOSE_PROMPT.format(caption=text.text)
        assert question.phrases == tuple(text.text[s:e] for s, e in text.spans)
        assert all(line in text.text for line in question.phrases)
        listed = list_lines(scene)
        assert listed.instruction == LIST_PROMPT
        assert listed.phrases == tuple(list_name(o) for o in listed_objects(scene))
        for asked in (question, listed):
            ids, start = data.encode(asked)
            answer = tokenizer.decode(ids[start:])
            assert answer.endswith("</s>") and "ASSISTANT" not in answer
            assert read_lines(answer.removesuffix("</s>")) == list(asked.phrases)
            assert tokenizer.decode(ids[:start]).endswith("ASSISTANT:")
    batches = [data.proposal_batch(step, Recipe(batch=8)) for step in range(3)]
    texts = [tokenizer.decode(ids) for b in batches for ids in b["input_ids"]]
    assert any("Caption:" in t for t in texts) and any(LIST_PROMPT in t for t in texts)
    assert any("Which object" in t for t in texts) and any(TOY_INSTRUCTION in t for t in texts)
    again = data.proposal_batch(1, Recipe(batch=8))
    assert torch.equal(again["input_ids"], batches[1]["input_ids"])  # a pure function of the step


def test_read_lines_and_line_match_count_each_gold_line_once():
    lines = read_lines(" the star\n The Circle\n\n the star \n the cross")
    assert lines == ["the star", "The Circle", "the star", "the cross"]
    assert line_match(lines, ("the star", "the circle", "the square")) == 2


def test_reasoning_questions_name_the_one_object_that_answers_them():
    asked = set()
    for index in range(150):
        scene = make_scene(scene_seed(0, index))
        question = reason(scene, np.random.default_rng(index), kinds=tuple(REASON_TEMPLATES))
        if question is None:
            continue
        obj = reason_object(scene, question)
        others = [o for o in scene.objects if o is not obj]
        kind = next(
            k for k, t in REASON_TEMPLATES.items() if t.split("{")[0] in question.instruction
        )
        asked.add(kind)
        area = {id(o): int(o.mask.sum()) for o in scene.objects}
        if kind == "largest":
            assert all(area[id(obj)] >= 1.5 * area[id(o)] for o in others)
        elif kind == "smallest":
            assert all(1.5 * area[id(obj)] <= area[id(o)] for o in others)
        elif kind == "odd_colour":
            assert len(others) >= 2 and {o.colour for o in others} == {others[0].colour}
            assert obj.colour != others[0].colour
        elif kind == "most_corners":
            assert all(CORNERS[obj.shape] > CORNERS[o.shape] for o in others)
        else:
            axis = ("left_of", "above").index(kind)
            anchor = _owner(
                scene, question.instruction.split(" of " if axis == 0 else " above ")[1].rstrip("?")
            )
            assert obj.centre[axis] < anchor.centre[axis]
            assert all(o.centre[axis] > anchor.centre[axis] for o in others if o is not anchor)
    assert asked == set(REASON_TEMPLATES)


def test_resuming_a_saved_model_equals_the_whole_recipe(tmp_path):
    recipe = Recipe(
        vision_steps=2, vision_batch=2, steps=2, batch=2, warmup=1, list_steps=2, list_warmup=1,
        referent_steps=2, referent_warmup=1, proposal_steps=2, proposal_warmup=1, log_every=100,
        look_steps=2, look_warmup=1,
    )  # fmt: skip
    quiet = {"n_eval": 1, "log": lambda line: None}
    whole = build_toy_lmm(tmp_path / "whole", recipe, **quiet)
    stage_5 = dataclasses.replace(recipe, look_steps=0)
    stage_4 = dataclasses.replace(stage_5, proposal_steps=0)
    stage_3 = dataclasses.replace(stage_4, referent_steps=0)
    build_toy_lmm(tmp_path / "stage2", dataclasses.replace(stage_3, list_steps=0), **quiet)
    build_toy_lmm(tmp_path / "stage3", stage_3, **quiet)
    build_toy_lmm(tmp_path / "stage4", stage_4, **quiet)
    build_toy_lmm(tmp_path / "stage5", stage_5, **quiet)
    resumed = {
        n: build_toy_lmm(tmp_path / f"from{n}", recipe, **quiet, resume_from=tmp_path / f"stage{n}")
        for n in (2, 3, 4, 5)
    }
    stages = ("whole", "stage2", "stage3", "stage4", "stage5")
    names = (*stages, "from2", "from3", "from4", "from5")
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in names}
    assert weights["from2"] == weights["from3"] == weights["from4"] == weights["whole"]
    assert weights["from5"] == weights["whole"]
    assert len({weights[name] for name in stages}) == 5
    for record in resumed.values():
        for key in (
            "final_look_stage_loss", "final_proposal_stage_loss", "final_referent_stage_loss",
            "final_list_stage_loss", "final_loss",  # stage 2's record carried over
        ):  # fmt: skip
            assert record[key] == whole[key]
    assert set(whole["instructions_eval"]) == {"propose", "propose_caption", "list_lines", "reason"}
    with pytest.raises(ValueError, match=r"different recipe \(\['lr'\]\)"):
        build_toy_lmm(
            tmp_path / "other", dataclasses.replace(recipe, lr=0.5), **quiet,
            resume_from=tmp_path / "stage2",
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"different recipe \(\['referent_lr'\]\)"):
        build_toy_lmm(
            tmp_path / "other", dataclasses.replace(recipe, referent_lr=0.5), **quiet,
            resume_from=tmp_path / "stage4",
        )  # fmt: skip
    with pytest.raises(ValueError, match="every stage already"):
        build_toy_lmm(tmp_path / "again", recipe, **quiet, resume_from=tmp_path / "whole")


def test_look_questions_are_asked_of_the_view_cot_would_show():
    crops = focused = 0
    for index in range(60):
        config = FAR_WORLD if index % 2 else SCENE_CONFIG
        scene = make_scene(scene_seed(0, index), config)
        asked = look(scene, np.random.default_rng(index), config)
        assert asked is not None  # every scene has a colour or shape question
        question, view = asked
        obj = asked_object(scene, question)
        if question.kind in ("colour", "shape"):
            assert question.answer == getattr(obj, question.kind)
        image = torch.from_numpy(scene.image)
        box = evidence_box(torch.from_numpy(obj.mask)[None], COT_VIEW)
        assert np.array_equal(view, second_view(image, box, COT_VIEW).numpy())
        if view.shape != scene.image.shape:  # a crop: only what a crop still shows is asked
            assert question.kind in ZOOM_KEEPS
            crops += 1
        else:
            focused += 1
    assert crops and focused  # both views are taught (crops mostly in the far world)
