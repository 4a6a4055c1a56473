"""Question samples (issue 37, item 1): the frozen LMM answers a sample's ``question`` (or one
``--question`` for the corpus) and the answer's phrases, or the whole answer, are grounded.
Decoding by hand (precedence, empty and 20,000-character questions); the GroundingActor on tiny
random models of every family, each answer checked against the LMM's answer to that question
alone; the annotate job on the session's Ray, per-sample questions and ``--question``."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from annotate_inputs import decoded_by_key, image_bytes, meta, write_tar
from grounding_helpers import every_token_selector_spec, lm_calls

from flmm.prompt import PromptConfig, PromptLayout
from flmm.proposals import PROPOSE_PROMPT, has_word, locate, parse_proposals, whole_words
from flmm.selector import Span, char_span
from flmm.tiny_lmms import MODEL_TYPES
from jobs import annotate as job
from pipeline.annotate import AnnotateConfig, run_annotation
from pipeline.decode import DECODED_SCHEMA, SampleError, grounding_request, pixels_of
from pipeline.grounding import GroundingActor, Text
from pipeline.spec import ModelSpec

NEW_TOKENS = 6
LARGEST = "Which object is the largest?"
HUGE = ("which object is left of the red circle and " * 500)[:20_000]


def ask(question, **extra) -> bytes:
    return json.dumps({"question": question, **extra}).encode()


SHARD = {
    "ask_largest": {"png": image_bytes("RGB", size=(40, 28), seed=1), "json": ask(LARGEST)},
    "ask_colour": {
        "jpg": image_bytes("RGB", size=(30, 44), fmt="JPEG", seed=2),
        "json": ask("What colour is the shape on the right?", phrases=["the red circle"]),
    },
    "ask_huge": {"png": image_bytes("RGB", size=(52, 40), seed=3), "json": ask(HUGE)},
    "ask_empty": {"png": image_bytes("RGB", seed=4), "json": ask("  \n")},
    "ask_number": {"png": image_bytes("RGB", seed=5), "json": ask(7)},
    "given": {"png": image_bytes("RGB", seed=6), "json": meta()},
    "caption": {"png": image_bytes("RGB", seed=7), "txt": b"a red circle"},
}
ASKED = ("ask_largest", "ask_colour", "ask_huge")


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_tar(tmp_path_factory.mktemp("questions") / "q-000000.tar", SHARD)


@pytest.fixture(scope="module")
def decoded(shard):
    return decoded_by_key(shard)


def test_a_question_comes_before_phrases_and_captions_and_question_before_everything():
    request = grounding_request({"question": " Why? ", "phrases": ["a"], "caption": "b"})
    assert (request.source, request.question, request.phrases, request.text) == (
        "answer", "Why?", (), "")  # fmt: skip
    for meta_ in ({"phrases": ["a"]}, {"caption": "b"}, None, {"question": "Who?"}):
        request = grounding_request(meta_, question="Which one?")
        assert (request.source, request.question) == ("answer", "Which one?")
    assert grounding_request({"question": "Who?"}, describe=True).source == "generated"


def test_empty_odd_and_huge_questions_are_clear_rows(decoded):
    assert decoded["ask_empty"]["status"] == "error"
    assert decoded["ask_empty"]["error_kind"] == "no_question"
    assert decoded["ask_number"]["error_kind"] == "bad_text"
    assert "`question` must be a string" in decoded["ask_number"]["error"]
    huge = decoded["ask_huge"]
    assert (huge["status"], huge["source"], huge["question"]) == ("ok", "answer", HUGE[:1000])
    assert huge["warning"] == "question truncated from 20000 to 1000 characters"
    colour = decoded["ask_colour"]  # its phrases are left alone: it asks a question
    assert (colour["source"], colour["phrases"]) == ("answer", [])
    with pytest.raises(SampleError, match="--question is empty") as error:
        grounding_request(None, question="")
    assert error.value.kind == "no_question"


def test_the_answer_as_text_whole_or_nothing():
    def text(ground_answer, answer):
        return GroundingActor._answer_text(type("A", (), {"ground_answer": ground_answer}), answer)

    assert text("phrases", "the red circle.") == Text("the red circle.")
    assert text("whole", "“The red circle.”") == Text("“The red circle.”", [(1, 15)])
    assert text("whole", "") == Text("", [], "the LMM's answer is empty")
    assert text("phrases", " ?! ") == Text(" ?! ", [], "the LMM's answer holds no word to ground")


@pytest.fixture(scope="module", params=MODEL_TYPES)
def actor(request, tiny_lmm_dir):
    torch.manual_seed(0)
    spec = ModelSpec(str(tiny_lmm_dir(request.param)), "tiny", device="cpu")
    return GroundingActor(spec, max_new_tokens=NEW_TOKENS, phrases="lmm", ground_answer="whole")


def image_of(row: dict) -> torch.Tensor:
    return torch.from_numpy(pixels_of(row).copy())


def alone(actor, row: dict, instruction: str) -> str:
    """The LMM's answer to one instruction about one row's image, alone in its batch."""
    return actor.model.lmm.answer([image_of(row)], [instruction], NEW_TOKENS)[0]


def counted_run(actor, rows):
    """The actor's results by key, and the language model's calls (``lm_calls``)."""
    with lm_calls(actor) as calls:
        table = actor(pa.Table.from_pylist(rows, DECODED_SCHEMA))
    return {r["key"]: r for r in table.to_pylist()}, calls


def test_every_family_answers_in_one_batch_as_alone_and_grounds_the_whole_answer(
    actor, decoded, one_thread
):
    rows = [decoded[k] for k in ("given", *ASKED, "caption")]
    results, calls = counted_run(actor, rows)
    assert {r["status"] for r in results.values()} == {"ok"}
    for key in ASKED:
        row, result = decoded[key], results[key]
        answer = alone(actor, row, row["question"])  # batched answers = one at a time
        assert (result["source"], result["question"], result["answer"]) == (
            "answer", row["question"], answer)  # fmt: skip
        assert (result["text"], result["proposer"]) == (answer, "whole")
        if not has_word(answer):  # nothing to ground: ok, 0 rows, and why
            assert (result["spans"], result["counts"]) == ([], [])
            assert "the LMM's answer" in result["warning"]
            continue
        span = whole_words(answer, 0, len(answer))
        assert result["spans"] == [list(span)] and result["phrases"] == [answer[slice(*span)]]
        assert len(result["counts"]) == 1 and result["selector_scores"] == [None]
    # (random weights answer words more often than not: every family grounds some, asserted)
    assert any(results[key]["counts"] for key in ASKED)
    assert results["ask_huge"]["warning"].startswith("question truncated from 20000")
    assert len(results["given"]["counts"]) == 2 and results["given"]["answer"] == ""
    # one generation answers the three questions, one proposes the caption's phrases; one
    # prefill grounds the whole batch (the caption too, if the LMM proposed one of its words)
    grounded = sum(r["source"] == "given" or bool(r["spans"]) for r in results.values())
    assert calls == {"generate": [3, 1], "prefill": [grounded]}


def test_in_place_the_answer_is_grounded_in_its_own_conversation(actor, decoded, one_thread):
    """``--caption-layout in-place``: the prefill is the prompt the answer was generated from
    (image + question) followed by the answer, and its spans are grounded from it."""
    rows = [decoded[k] for k in ASKED]
    listed_rows, _ = counted_run(actor, rows)
    lmm = actor.model.lmm
    prefilled = []  # the token ids of every sequence the LMM prefills

    def forward(samples):
        prefilled.extend(s.input_ids for s in samples)
        return type(lmm).forward(lmm, samples)

    actor.caption_layout, lmm.forward = "in-place", forward
    try:
        results, calls = counted_run(actor, rows)
    finally:
        actor.caption_layout = "listed"
        del lmm.forward
    grounded = [key for key in ASKED if results[key]["spans"]]
    assert calls == {"generate": [3], "prefill": [len(grounded)] if grounded else []}
    for key in ASKED:
        assert results[key]["spans"] == listed_rows[key]["spans"]
        assert len(results[key]["counts"]) == len(results[key]["spans"])
    for key, ids in zip(grounded, prefilled, strict=True):
        row, image = decoded[key], image_of(decoded[key])
        layout = PromptLayout(lmm.processor, PromptConfig(row["question"], lmm.merge))
        asked = lmm.processor.tokenizer(layout.expanded_prefix(lmm.image_inputs(image).n_tokens))
        assert ids[: len(asked["input_ids"])].tolist() == asked["input_ids"]
        answer = results[key]["answer"]  # ... and the answer after it
        assert torch.equal(ids, lmm.prepare_text(image, answer, None, row["question"])[0].input_ids)


def test_an_answers_phrases_are_the_lmms_proposals_found_in_it(actor, decoded, one_thread):
    rows = [decoded[k] for k in ("caption", *ASKED)]
    actor.ground_answer = "phrases"
    try:
        results, calls = counted_run(actor, rows)
    finally:
        actor.ground_answer = "whole"
    # the answers, then the caption's and the answers' proposals (an answer with no word: none)
    worded = sum(has_word(results[key]["answer"]) for key in ASKED)
    assert calls["generate"] == [3, 1 + worded]
    for key in ASKED:
        result = results[key]
        answer = result["answer"]
        proposed = alone(actor, decoded[key], PROPOSE_PROMPT.replace("{caption}", answer))
        located = locate(answer, parse_proposals(proposed))
        assert (result["status"], result["proposer"], result["text"]) == ("ok", "lmm", answer)
        if not has_word(answer):
            assert result["spans"] == [] and result["warning"].startswith("the LMM's answer ")
            continue
        assert result["spans"] == [list(s) for s in located.spans]  # (possibly none: ok)
        assert len(result["counts"]) == len(located.spans)
        if located.missing:
            assert "proposed phrase(s) not in the answer" in result["warning"]


@pytest.fixture(scope="module")
def selector_spec(tiny_llava_dir, tmp_path_factory):
    """Tiny LLaVA + tiny SAM + random heads with a selector that tags every token B (as
    tests/test_caption_modes.py: every token of a text is its own span)."""
    return every_token_selector_spec(tiny_llava_dir, tmp_path_factory.mktemp("question_models"))


def test_the_selector_picks_an_answers_spans_in_its_conversation_or_as_a_caption(
    selector_spec, decoded, one_thread
):
    """In place, from image + question → answer; listed, from the answer under the grounding
    prompt, as a caption's (then the picked spans are prefilled again, listed)."""
    actor = GroundingActor(selector_spec, max_new_tokens=NEW_TOKENS, caption_layout="in-place")
    rows = [decoded[k] for k in ("given", *ASKED)]
    lmm = actor.model.lmm
    prefilled = {"in-place": [], "listed": []}
    for layout, ids in prefilled.items():

        def forward(samples, ids=ids):
            ids.append([s.input_ids for s in samples])
            return type(lmm).forward(lmm, samples)

        actor.caption_layout, lmm.forward = layout, forward
        try:
            results, calls = counted_run(actor, rows)
        finally:
            del lmm.forward
    worded = [key for key in ASKED if has_word(results[key]["answer"])]
    # (listed: one more prefill of the answers' picked spans)
    assert worded and calls == {"generate": [3], "prefill": [1 + len(worded), len(worded)]}
    for k, key in enumerate(worded, start=1):  # (the given row's sequence comes first)
        row, answer, image = decoded[key], results[key]["answer"], image_of(decoded[key])
        in_conversation = lmm.prepare_text(image, answer, None, row["question"])[0].input_ids
        assert torch.equal(prefilled["in-place"][0][k], in_conversation)
        assert torch.equal(prefilled["listed"][0][k], lmm.prepare_text(image, answer)[0].input_ids)
    for key in worded:
        row, result = decoded[key], results[key]
        answer = alone(actor, row, row["question"])
        assert (result["answer"], result["proposer"]) == (answer, "selector")
        _, offsets = actor.model.lmm.prepare_text(image_of(row), answer, None, row["question"])
        first = {}  # every token tagged B: one span per token, a repeated one grounded once
        for t in range(len(offsets)):
            a, b = char_span(offsets, Span(t, t + 1, 1.0), answer)
            if b > a:
                first.setdefault(answer[a:b], [a, b])
        assert result["spans"] == list(first.values())
        assert len(result["counts"]) == len(result["spans"])


def read(out, table: str) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in pq.read_table(out / table / "q-000000.parquet").to_pylist():
        rows.setdefault(row["key"], []).append(row)
    return rows


def test_question_samples_through_the_annotate_job(ray_session, shard, tiny_llava_dir, tmp_path):
    spec = ModelSpec(str(tiny_llava_dir), "tiny")
    out = tmp_path / "out"
    config = AnnotateConfig((str(shard),), str(out), spec, batch_size=3, ground_answer="whole")
    summary = run_annotation(config)
    assert summary.done == ["q-000000"] and summary.errors == 2
    samples = {k: v[0] for k, v in read(out, "samples").items()}
    annotations = read(out, "annotations")
    assert samples["ask_empty"]["error_kind"] == "no_question"
    assert samples["ask_number"]["error_kind"] == "bad_text"
    for key in ASKED:
        sample, rows = samples[key], annotations[key]
        assert (sample["status"], sample["source"], sample["proposer"]) == ("ok", "answer", "whole")
        assert sample["question"] == json.loads(SHARD[key]["json"])["question"].strip()[:1000]
        assert sample["answer"] and sample["text"] == sample["answer"]
        assert sample["n_annotations"] == len(rows) == 1
        assert rows[0]["source"] == "answer" and rows[0]["proposer"] == "whole"
        assert rows[0]["phrase"] == sample["answer"][slice(*rows[0]["span"])]
    assert samples["given"]["question"] is None and samples["given"]["source"] == "given"
    assert samples["ask_huge"]["warning"].startswith("question truncated from 20000")
    done = json.loads((out / "_done" / "q-000000.json").read_text())
    assert done["schema_version"] == 6 and done["errors_by_kind"] == {
        "no_question": 1, "bad_text": 1}  # fmt: skip


def test_one_question_for_the_whole_corpus(ray_session, shard, tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--input", str(shard), "--output", str(out), "--lmm", str(tiny_llava_dir)]
    args += ["--sam", "tiny", "--question", LARGEST, "--ground-answer", "whole"]
    job.main([*args, "--batch-size", "4", "--preview-images", "0", "--max-new-tokens", "5"])
    assert "1 done" in capsys.readouterr().out
    samples = {k: v[0] for k, v in read(out, "samples").items()}
    assert len(samples) == len(SHARD)
    for key, sample in samples.items():  # every sample asked, whatever its text
        assert (sample["status"], sample["source"], sample["question"]) == (
            "ok", "answer", LARGEST), key  # fmt: skip
        assert sample["n_annotations"] == any(c.isalnum() for c in sample["answer"]), key
    with pytest.raises(SystemExit, match="--question is empty"):
        job.main([*args[:-4], "--question", " "])
