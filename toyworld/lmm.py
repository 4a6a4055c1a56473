"""The toy LMM: a tiny LLaVA pretrained (every weight, vision tower included) on toy-world text.

Recipe (``python -m toyworld.lmm --out models/toy/llava``):

1. a BPE tokenizer trained on ``corpus()`` (every word the scene generator and the questions can
   produce, the chat template's words and the grounding instruction) and a randomly initialised
   ``TINY_LLAVA_VARIANTS["toy"]`` (``flmm.tiny_llava.write_tiny_llava``);
2. next-token training on the answers of ``toyworld.vqa`` questions about freshly generated
   scenes: half ``describe`` (phrases in the assistant turn, laid out exactly as grounding lays
   them out, each expression followed by its object's size, colour and shape: see
   ``toyworld.vqa``), half short-answer questions. Loss only on the answer tokens and a final EOS;
3. saved in fp16 with ``save_pretrained``; then a third stage, from those fp16 weights: 70% of
   the questions ask to list every object (``toyworld.vqa.list_objects``,
   one right answer per scene, what the image-only mode asks), the rest as in stage 2 so that
   nothing learnt is lost; saved in fp16 again;
4. a fourth stage (the referent stage), from the stage-3 fp16 weights: detailed descriptions whose
   expressions name objects without their colour (shape, size + shape, position) where they can,
   their details colour first, so that the token ending such an expression has to find its
   object to predict what comes next; plus lists, "Where is …?" and other short-answer
   questions (without them the model forgets those answers); saved in fp16;
5. a fifth stage (the proposal stage), from the stage-4 fp16 weights, the vision tower frozen:
   the instructions a frozen LMM is asked when the heads have no selector
   (``toyworld.instructions``: a toy text's phrases copied one per line, a list one per line) and
   questions answered by one object, mixed with replay of stage 4's questions so that the
   attention the heads read moves little. Saved in fp16 (plus ``toy_world.json``, the recipe and
   its results); then frozen forever: the F-LMM heads are trained on its phrase→image attention.
   Each stage after the second starts from the saved weights of the one before, so
   ``--resume-from DIR`` (a model saved after stage 2, 3 or 4) runs the remaining stages alone
   and gives what the whole recipe gives;
6. evaluated on held-out scenes (indices from ``EVAL_START``): greedy answers per question kind
   (and per stage-5 instruction), and how much of each phrase's attention falls on its object
   (``attention_lift``).

Scene ``i`` of training is ``make_scene(scene_seed(seed, i))``; everything follows from ``seed``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, LlavaForConditionalGeneration

from flmm.build import TINY_LLAVA_VARIANTS
from flmm.families.llava import llava_pixels
from flmm.geometry import ImageGeometry
from flmm.lmm import FrozenLMM
from flmm.optim import OptimConfig
from flmm.optim import step as optim_step
from flmm.prompt import PromptConfig, PromptLayout, build_prompt, build_text_prompt
from flmm.tiny_llava import TinyLlavaConfig, write_tiny_llava
from toyworld.captions import make_caption
from toyworld.instructions import (
    LINE_KINDS,
    PROPOSE,
    REASON_TEMPLATES,
    line_match,
    line_text,
    list_lines,
    look,
    propose,
    read_lines,
    reason,
)
from toyworld.scenes import (
    EVAL_START,
    FAR_WORLD,
    POSITIONS,
    Scene,
    SceneConfig,
    candidate_expressions,
    make_scene,
    scene_seed,
)
from toyworld.vqa import (
    COLOURLESS_KINDS,
    DESCRIBE,
    KINDS,
    LIST,
    NUMBER_WORDS,
    SCENE_CONFIG,
    TEMPLATES,
    TOY_INSTRUCTION,
    TOY_PROMPT,
    WHERE,
    Question,
    answer_options,
    ask,
    describe,
    existence_instruction,
    list_objects,
    sample_question,
)

VISION_START = 100_000_000  # the vision stage's scenes
LIST_START = 200_000_000  # the list stage's scenes
REFERENT_START = 300_000_000  # the referent stage's scenes
PROPOSAL_START = 400_000_000  # the proposal stage's scenes
LOOK_START = 500_000_000  # the look stage's scenes
RECORD = "toy_world.json"


@dataclass(frozen=True)
class Recipe:
    """Pretraining hyperparameters. lr follows a linear warm-up then a cosine to ``min_lr_ratio``.

    Measured on a CPU core shared with other jobs: batch 8 (2400 steps) never localised objects
    (attention lift 1.1), batch 16-32 did (lift ~5); two intra-op threads ran a step 18x slower
    than one when the other core was busy, hence ``threads=1``.
    """

    vision_steps: int = 1500
    vision_batch: int = 32
    vision_lr: float = 2e-3
    steps: int = 1000
    batch: int = 24
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    describe_fraction: float = 0.5
    detail_fraction: float = 1.0  # of the descriptions: each expression + its object's attributes
    vqa_tower_lr_scale: float = 1.0  # the vision tower's lr in the VQA stage, × lr (0: frozen)
    list_steps: int = 2000  # stage 3 (0: none); batch as stage 2
    list_lr: float = 1e-3
    list_warmup: int = 20
    list_tower_lr_scale: float = 1.0  # the vision tower's lr in stage 3, × list_lr (0: frozen)
    list_fraction: float = 0.7  # of stage 3's questions; the rest drawn as in stage 2
    referent_steps: int = 1600  # stage 4 (0: none); batch as stage 2, every weight
    referent_lr: float = 1e-3
    referent_warmup: int = 20
    referent_list_fraction: float = 0.15  # of stage 4's questions: lists (as stage 3's)
    referent_position_fraction: float = 0.1  # "Where is …?" questions
    referent_short_fraction: float = 0.1  # short-answer questions of any kind (as stage 2's)
    referent_colourless: float = 0.8  # the rest: detailed descriptions, colourless expressions
    proposal_steps: int = 2400  # stage 5 (0: none); batch as stage 2
    proposal_lr: float = 1e-3
    proposal_warmup: int = 20
    proposal_tower_lr_scale: float = 0.0  # the vision tower's lr in stage 5, × proposal_lr
    proposal_fraction: float = 0.5  # of stage 5's questions: phrase proposals of a toy text
    proposal_caption_fraction: float = 0.67  # of the proposals: on a fresh caption (make_caption)
    proposal_list_fraction: float = 0.15  # lists one per line (LIST_PROMPT)
    proposal_reason_fraction: float = 0.1  # questions answered by one object (if the scene has)
    # stage 6 (0: none; batch as stage 2), not in the shipped weights: 600 steps teach --cot's
    # views and "most corners" and cost plain answers (bench/NOTES.md, issue 37)
    look_steps: int = 0
    look_lr: float = 5e-4
    look_warmup: int = 20
    look_tower_lr_scale: float = 0.0  # the vision tower's lr in stage 6, × look_lr
    look_fraction: float = 0.3  # of stage 6's questions: asked of --cot's second look
    look_far_fraction: float = 0.5  # of those: in the far world (small objects: crops)
    look_reason_fraction: float = 0.15  # questions answered by one object, every reason kind
    seed: int = 0
    threads: int = 1
    log_every: int = 50


# --------------------------------------------------------------------------------------------
# Text: tokenizer corpus and prompts
# --------------------------------------------------------------------------------------------


def corpus(scenes: SceneConfig = SCENE_CONFIG) -> list[str]:
    """Every expression and question the world can produce, every answer, the chat words."""
    sizes = [name for name, _ in scenes.size_fractions]
    colours = [name for name, _ in scenes.colours]
    lines = [TOY_INSTRUCTION, "USER: <image>\n ASSISTANT:", TEMPLATES["count"]]
    lines += [" ".join(NUMBER_WORDS), " ".join(WHERE.values()), "yes no"]
    for size in sizes:
        for colour in colours:
            for shape in scenes.shapes:
                for _, text in candidate_expressions(size, colour, shape, list(POSITIONS)):
                    lines.append(f"{text}.")
                    lines += [TEMPLATES[k].format(text) for k in ("colour", "shape", "size")]
                lines.append(existence_instruction(colour, shape))
    return lines


class Encoder:
    """Question → (input_ids ``[T]``, answer start) in the grounding layout, + EOS at the end.

    The prompt is ``build_prompt(PromptLayout(processor, PromptConfig(instruction)), phrases)``,
    exactly what ``FrozenLMM.prepare`` builds; input_ids[start:] are the answer tokens. Stage 5's
    one-per-line answers (``toyworld.instructions.LINE_KINDS``) are ``" " + line_text(phrases)``
    (``build_text_prompt``), the same prefix before them and the same EOS after.
    """

    def __init__(self, processor, n_image_tokens: int):
        self.processor = processor
        self.n_image_tokens = n_image_tokens
        self.eos = torch.tensor([processor.tokenizer.eos_token_id])
        self.layouts: dict[str, PromptLayout] = {}

    def __call__(self, question: Question) -> tuple[torch.Tensor, int]:
        layout = self.layout(question)
        if question.kind in LINE_KINDS:  # " line1\n line2", stage 5's one-per-line answers
            text = line_text(question.phrases)
            prompt, _ = build_text_prompt(layout, text, self.n_image_tokens)
        else:
            prompt = build_prompt(layout, list(question.phrases), self.n_image_tokens)
        return torch.cat([prompt.input_ids, self.eos]), int(prompt.phrase_tokens[0][0])

    def layout(self, question: Question) -> PromptLayout:
        """The prompt prefix of the question's instruction (kept, except a proposal's: each
        holds its own caption)."""
        if question.instruction in self.layouts:
            return self.layouts[question.instruction]
        layout = PromptLayout(self.processor, PromptConfig(instruction=question.instruction))
        if question.kind != PROPOSE:
            self.layouts[question.instruction] = layout
        return layout


def n_image_tokens(model: LlavaForConditionalGeneration) -> int:
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One training / eval example: pixel_values ``[3, S, S]``, input_ids ``[T]`` (answer + EOS
    from ``start`` on), the question and the scene index it was asked about."""

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    start: int
    question: Question
    index: int


def pad_batch(examples: list[Example], pad_id: int, with_answer: bool) -> dict[str, torch.Tensor]:
    """Left-padded input_ids / attention_mask / position_ids (from the mask, as
    ``flmm.lmm.collate``) ``[B, T]``, pixel_values ``[B, 3, S, S]``; with the answer: labels
    ``[B, T]`` (-100 except the answer and EOS), without: the prompt only, for ``generate``."""
    rows = [e.input_ids if with_answer else e.input_ids[: e.start] for e in examples]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (row, example) in enumerate(zip(rows, examples)):
        offset = length - len(row)
        ids[b, offset:], mask[b, offset:] = row, 1
        labels[b, offset + example.start :] = row[example.start :]
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "pixel_values": torch.stack([e.pixel_values for e in examples]),
    }
    if with_answer:
        batch["labels"] = labels
    return batch


class ToyData:
    """Examples of the toy world for one processor: scene ``index`` of ``seed`` and a question.

    Preprocessing runs single-threaded: torch's intra-op threads only add latency to these tiny
    tensors (and stall badly when the cores are shared).
    """

    def __init__(self, processor, n_image_tokens: int, seed: int, scenes: SceneConfig):
        self.processor = processor
        self.encode = Encoder(processor, n_image_tokens)
        self.seed = seed
        self.scenes = scenes

    def scene(self, index: int) -> Scene:
        return make_scene(scene_seed(self.seed, index), self.scenes)

    def pixels(self, image: Scene | np.ndarray) -> torch.Tensor:
        """A scene's image (or an image ``[H, W, 3]`` uint8) as the LMM's ``[3, S, S]``."""
        image = image.image if isinstance(image, Scene) else image
        with _threads(1):
            return llava_pixels(self.processor.image_processor, torch.from_numpy(image))[0]

    def example(self, index: int, question: Question, pixels: torch.Tensor) -> Example:
        ids, start = self.encode(question)
        return Example(pixels, ids, start, question, index)

    def training_batch(self, step: int, recipe: Recipe) -> dict[str, torch.Tensor]:
        """Scenes ``step·batch …`` with a question each (half ``describe``), padded."""
        return self._batch(step * recipe.batch, recipe, self._stage_2_question)

    def list_batch(self, step: int, recipe: Recipe) -> dict[str, torch.Tensor]:
        """Stage 3: scenes ``LIST_START + step·batch …``, a list question with probability
        ``list_fraction``, else a question drawn as in stage 2; padded."""

        def question(scene: Scene, rng: np.random.Generator, recipe: Recipe) -> Question:
            if rng.random() < recipe.list_fraction:
                return list_objects(scene, self.scenes)
            return self._stage_2_question(scene, rng, recipe)

        return self._batch(LIST_START + step * recipe.batch, recipe, question)

    def referent_batch(self, step: int, recipe: Recipe) -> dict[str, torch.Tensor]:
        """Stage 4: scenes ``REFERENT_START + step·batch …``; a list (``referent_list_fraction``),
        a "Where is …?" question (``referent_position_fraction``, when the scene has one), a
        short-answer question (``referent_short_fraction``: the other answers are not forgotten)
        or a detailed description, colour first, naming each object by a ``COLOURLESS_KINDS``
        expression with probability ``referent_colourless``; padded."""
        return self._batch(REFERENT_START + step * recipe.batch, recipe, self._referent_question)

    def proposal_batch(self, step: int, recipe: Recipe) -> dict[str, torch.Tensor]:
        """Stage 5: scenes ``PROPOSAL_START + step·batch …``; a phrase proposal of the scene's toy
        text (``proposal_fraction``), a list one per line (``proposal_list_fraction``), a question
        answered by one object (``proposal_reason_fraction``, when the scene has one), else a
        question drawn as stage 4 draws (replay: nothing learnt is forgotten); padded."""

        return self._batch(PROPOSAL_START + step * recipe.batch, recipe, self._proposal_question)

    def _proposal_question(self, scene: Scene, rng: np.random.Generator, recipe: Recipe):
        draw = rng.random()
        if draw < recipe.proposal_fraction:
            if rng.random() < recipe.proposal_caption_fraction:
                return propose(scene, make_caption(scene, rng))
            return propose(scene)
        draw -= recipe.proposal_fraction
        if draw < recipe.proposal_list_fraction:
            return list_lines(scene, self.scenes)
        if draw < recipe.proposal_list_fraction + recipe.proposal_reason_fraction:
            asked = reason(scene, rng, self.scenes)
            if asked is not None:
                return asked
        return self._referent_question(scene, rng, recipe)

    def look_batch(self, step: int, recipe: Recipe) -> dict[str, torch.Tensor]:
        """Stage 6: scenes ``LOOK_START + step·batch …``; a question about one object asked of
        ``--cot``'s second look of it (``look_fraction``; in the far world, its objects at 40 %
        of their size, with probability ``look_far_fraction``: ``toyworld.instructions.look``),
        a question answered by one object of any reason kind, "… has the most corners?" too
        (``look_reason_fraction``), else a question drawn as stage 5 draws (replay); padded."""
        proposal = self._proposal_question

        def question(scene: Scene, rng: np.random.Generator, recipe: Recipe):
            draw = rng.random()
            if draw < recipe.look_fraction:
                config = FAR_WORLD if rng.random() < recipe.look_far_fraction else self.scenes
                asked = look(make_scene(scene.seed, config), rng, config)
                if asked is not None:
                    return asked
            elif draw < recipe.look_fraction + recipe.look_reason_fraction:
                asked = reason(scene, rng, self.scenes, kinds=tuple(REASON_TEMPLATES))
                if asked is not None:
                    return asked
            return proposal(scene, rng, recipe)

        return self._batch(LOOK_START + step * recipe.batch, recipe, question)

    def _referent_question(self, scene: Scene, rng: np.random.Generator, recipe: Recipe):
        draw = rng.random()
        if draw < recipe.referent_list_fraction:
            return list_objects(scene, self.scenes)
        draw -= recipe.referent_list_fraction
        if draw < recipe.referent_position_fraction:
            where = ask(scene, "position", rng, self.scenes)
            if where is not None:
                return where
        elif draw < recipe.referent_position_fraction + recipe.referent_short_fraction:
            return sample_question(scene, rng, 0.0, self.scenes)
        return describe(
            scene, rng, True, COLOURLESS_KINDS, recipe.referent_colourless, colour_first=True
        )

    def _stage_2_question(self, scene: Scene, rng: np.random.Generator, recipe: Recipe):
        return sample_question(
            scene, rng, recipe.describe_fraction, self.scenes, recipe.detail_fraction
        )

    def _batch(self, first: int, recipe: Recipe, question_of) -> dict[str, torch.Tensor]:
        """Scenes ``first … first + batch - 1``, each with ``question_of(scene, rng, recipe)``
        (``rng`` seeded by the data seed and the scene index): a question about the scene's
        image, or a question and the image it is asked of; padded with their answers."""
        examples = []
        for index in range(first, first + recipe.batch):
            scene = self.scene(index)
            rng = np.random.default_rng([self.seed, index])
            asked = question_of(scene, rng, recipe)
            question, image = asked if isinstance(asked, tuple) else (asked, scene.image)
            examples.append(self.example(index, question, self.pixels(image)))
        return pad_batch(examples, self.processor.tokenizer.pad_token_id, with_answer=True)


class _threads:
    """``with _threads(n):`` torch intra-op threads set to ``n`` inside the block."""

    def __init__(self, n: int):
        self.n, self.saved = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


# --------------------------------------------------------------------------------------------
# Stage 1: the vision tower learns what is where (the role CLIP pretraining plays for LLaVA)
# --------------------------------------------------------------------------------------------


def cell_labels(scene: Scene, grid: tuple[int, int], scenes: SceneConfig) -> torch.Tensor:
    """Per token-grid cell (LLaVA square frame): ``[3, h, w]`` long — colour, shape and size
    index of the object covering most of the cell (at least a quarter of it), else the last
    index of each vocabulary ("nothing")."""
    colours = [name for name, _ in scenes.colours]
    sizes = [name for name, _ in scenes.size_fractions]
    nothing = torch.tensor([len(colours), len(scenes.shapes), len(sizes)])
    labels = nothing[:, None, None].expand(3, *grid).clone()
    cover = torch.stack([grid_cover(obj.mask, grid) for obj in scene.objects])  # [O, h, w]
    best, which = cover.max(dim=0)
    for o, obj in enumerate(scene.objects):
        cells = (which == o) & (best >= 0.25)
        values = (colours.index(obj.colour), scenes.shapes.index(obj.shape), sizes.index(obj.size))
        for row, value in enumerate(values):
            labels[row][cells] = value
    return labels


def vision_features(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """The patch features the language model is fed from (``vision_feature_layer``, CLS dropped):
    pixels ``[B, 3, S, S]`` → ``[B, h·w, D_vision]``."""
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def pretrain_vision(
    model: LlavaForConditionalGeneration,
    data: ToyData,
    recipe: Recipe,
    log: Callable[[str], None] = print,
) -> tuple[torch.nn.Linear, list[float]]:
    """Train the vision tower for ``recipe.vision_steps`` steps to label every grid cell with
    the colour, shape and size of the object on it (a linear probe head, discarded afterwards).

    Scenes come from indices ``VISION_START …``, disjoint from the VQA stage's and the held-out
    ones. Returns the probe and the loss per step.
    """
    grid, heads = _probe_layout(model, data.scenes)
    tower = model.model.vision_tower.train().requires_grad_(True)
    probe = torch.nn.Linear(model.config.vision_config.hidden_size, sum(heads))
    trained = torch.nn.ModuleList([tower, probe])
    optimizer = torch.optim.AdamW(
        trained.parameters(), lr=recipe.vision_lr, weight_decay=recipe.weight_decay
    )
    warmup = max(1, recipe.vision_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, Recipe(steps=recipe.vision_steps, warmup=warmup))
    )
    losses, start = [], time.perf_counter()
    for step in range(recipe.vision_steps):
        pixels, labels = [], []
        for i in range(recipe.vision_batch):
            scene = data.scene(VISION_START + step * recipe.vision_batch + i)
            pixels.append(data.pixels(scene))
            labels.append(cell_labels(scene, grid, data.scenes))
        logits = probe(vision_features(model, torch.stack(pixels)))  # [B, h·w, ΣC]
        targets = torch.stack(labels).flatten(2)  # [B, 3, h·w]
        loss = sum(
            F.cross_entropy(part.transpose(1, 2), targets[:, k])
            for k, part in enumerate(logits.split(heads, dim=-1))
        )
        optim_step(loss, trained, optimizer, schedule, OptimConfig(grad_clip=recipe.grad_clip))
        losses.append(loss.item())
        _log_progress(log, "vision step", losses, recipe.vision_steps, recipe.log_every, start)
    return probe, losses


def _log_progress(
    log: Callable[[str], None], label: str, losses: list[float], total: int, every: int, start
) -> None:
    """Every ``every`` steps and at the last: mean recent loss and seconds per step."""
    done = len(losses)
    if done % every == 0 or done == total:
        per_step = (time.perf_counter() - start) / done
        log(f"{label} {done:5d}  loss {np.mean(losses[-every:]):.4f}  {per_step:.3f} s/step")


def _probe_layout(model, scenes: SceneConfig) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """The token grid and the probe's class counts (colour, shape, size, each + "nothing")."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    counts = (len(scenes.colours), len(scenes.shapes), len(scenes.size_fractions))
    return (side, side), tuple(n + 1 for n in counts)


def probe_accuracy(
    model: LlavaForConditionalGeneration, probe: torch.nn.Linear, data: ToyData, n_scenes: int
) -> dict[str, float]:
    """Held-out accuracy of the stage-1 probe on the cells that an object covers, per attribute."""
    grid, heads = _probe_layout(model, data.scenes)
    right, total = torch.zeros(3), 0
    with torch.inference_mode():
        for index in range(EVAL_START, EVAL_START + n_scenes):
            scene = data.scene(index)
            labels = cell_labels(scene, grid, data.scenes).flatten(1)  # [3, h·w]
            logits = probe(vision_features(model, data.pixels(scene)[None]))[0]
            guesses = torch.stack([p.argmax(-1) for p in logits.split(heads, dim=-1)])
            on_object = labels[0] < heads[0] - 1
            right += (guesses == labels)[:, on_object].sum(-1)
            total += int(on_object.sum())
    return dict(zip(("colour", "shape", "size"), (right / max(1, total)).tolist()))


# --------------------------------------------------------------------------------------------
# Stage 2: visual question answering, every weight
# --------------------------------------------------------------------------------------------


def lr_factor(step: int, recipe: Recipe) -> float:
    """Linear warm-up to 1, then a cosine down to ``min_lr_ratio`` at the last step."""
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine


def optimizer_for(model: LlavaForConditionalGeneration, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW over the trainable weights; weight decay on matrices only (not on norms and
    biases), as nanoGPT; the vision tower's groups at ``recipe.vqa_tower_lr_scale`` × lr."""
    tower = {id(p) for p in model.model.vision_tower.parameters()}
    groups = []
    for in_tower, scale in ((False, 1.0), (True, recipe.vqa_tower_lr_scale)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in tower) == in_tower]
        for decay, chosen in (
            (recipe.weight_decay, [p for p in params if p.dim() >= 2]),
            (0.0, [p for p in params if p.dim() < 2]),
        ):
            if chosen:
                groups.append({"params": chosen, "weight_decay": decay, "lr": recipe.lr * scale})
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95))


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged over each answer's tokens, then over the questions.

    logits ``[B, T, V]``, labels ``[B, T]`` (-100 outside the answers). Per-question means give a
    one-word answer the weight of a whole description; a token mean would let descriptions (about
    six times longer) drown the short answers, whose every token depends on the image.
    """
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    return (nll.sum(-1) / (targets != -100).sum(-1).clamp(min=1)).mean()


def pretrain(
    model: LlavaForConditionalGeneration,
    data: ToyData,
    recipe: Recipe,
    log: Callable[[str], None] = print,
    batches: Callable[[int, Recipe], dict[str, torch.Tensor]] | None = None,
) -> list[float]:
    """Train ``model`` for ``recipe.steps`` steps (every weight; the vision tower frozen when
    ``recipe.vqa_tower_lr_scale`` is 0) on ``batches(step, recipe)`` (default: stage 2's
    ``data.training_batch``); returns the loss per step."""
    batches = batches or data.training_batch
    torch.manual_seed(recipe.seed)
    model.train().requires_grad_(True)
    if recipe.vqa_tower_lr_scale == 0:
        model.model.vision_tower.eval().requires_grad_(False)
    optimizer = optimizer_for(model, recipe)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, recipe))
    losses, start = [], time.perf_counter()
    for step in range(recipe.steps):
        batch = batches(step, recipe)
        labels = batch.pop("labels")
        loss = answer_loss(model(**batch).logits, labels)
        optim_step(loss, model, optimizer, schedule, OptimConfig(grad_clip=recipe.grad_clip))
        losses.append(loss.item())
        _log_progress(log, "step", losses, recipe.steps, recipe.log_every, start)
    return losses


def stage_recipe(recipe: Recipe, stage: int) -> Recipe:
    """Stage 3, 4, 5 or 6's schedule as a stage-2 ``Recipe``: the steps, lr, warm-up and tower lr
    of its ``STAGE_PREFIX`` fields (stage 4 trains every weight: no tower lr of its own)."""
    prefix = STAGE_PREFIX[stage]
    return dataclasses.replace(
        recipe,
        steps=getattr(recipe, f"{prefix}steps"),
        lr=getattr(recipe, f"{prefix}lr"),
        warmup=getattr(recipe, f"{prefix}warmup"),
        vqa_tower_lr_scale=getattr(recipe, f"{prefix}tower_lr_scale", 1.0),
    )


def _load_for_training(
    out_dir: Path, recipe: Recipe
) -> tuple[LlavaForConditionalGeneration, AutoProcessor, ToyData]:
    """The model saved in ``out_dir`` in fp32 (Hub kernels off, as ``FrozenLMM`` loads: on a GPU
    machine offline transformers' default fails), its processor and the recipe's ``ToyData``."""
    model = LlavaForConditionalGeneration.from_pretrained(
        out_dir, dtype=torch.float32, use_kernels=False
    )
    processor = AutoProcessor.from_pretrained(out_dir)
    return model, processor, ToyData(processor, n_image_tokens(model), recipe.seed, SCENE_CONFIG)


def train_stage(
    out_dir: Path, recipe: Recipe, stage: int, log: Callable[[str], None] = print
) -> tuple[list[float], float]:
    """Stage 3, 4, 5 or 6 of ``recipe`` on the fp16 model saved in ``out_dir``, saved back there in
    fp16; returns the loss per step and the seconds it took."""
    model, _, data = _load_for_training(out_dir, recipe)
    batches = {
        3: data.list_batch,
        4: data.referent_batch,
        5: data.proposal_batch,
        6: data.look_batch,
    }
    start = time.perf_counter()
    losses = pretrain(model, data, stage_recipe(recipe, stage), log, batches[stage])
    seconds = time.perf_counter() - start
    model.half().save_pretrained(out_dir)
    return losses, seconds


# --------------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------------


def eval_examples(data: ToyData, kind: str, n: int) -> list[Example]:
    """``n`` questions of ``kind`` on held-out scenes ``EVAL_START, EVAL_START + 1, …`` (scenes
    that have no question of ``kind`` are skipped)."""
    examples, index = [], EVAL_START
    while len(examples) < n:
        scene = data.scene(index)
        rng = np.random.default_rng([data.seed, index, KINDS.index(kind)])
        question = ask(scene, kind, rng, data.scenes)
        if question is not None:
            examples.append(data.example(index, question, data.pixels(scene)))
        index += 1
    return examples


def generate_texts(
    model: LlavaForConditionalGeneration, data: ToyData, examples: list[Example], max_new: int
) -> list[str]:
    """Greedy answers, decoded (special tokens dropped)."""
    tokenizer = data.processor.tokenizer
    batch = pad_batch(examples, tokenizer.pad_token_id, with_answer=False)
    batch.pop("position_ids")  # generate derives positions from the mask
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def generate_answers(
    model: LlavaForConditionalGeneration, data: ToyData, examples: list[Example], max_new: int
) -> list[list[str]]:
    """Greedy answers, each split into its phrases (``" p1. p2."`` → ``["p1", "p2"]``)."""
    texts = generate_texts(model, data, examples, max_new)
    return [[p.strip() for p in text.split(".") if p.strip()] for text in texts]


def score(question: Question, scene: Scene, phrases: list[str]) -> float:
    """1 for a right short answer or a right whole list; for ``describe``, the fraction of the
    generated segments that are right (0 for none): an expression is right when it is a unique
    expression of an object of the scene, a detail (``"big red circle"``, after an expression) when it gives the
    size, colour and shape of the object the expression before it names (either order)."""
    if question.kind == LIST:
        return float(tuple(phrases) == question.phrases)
    if question.kind != DESCRIBE:
        return float(phrases[:1] == [question.answer])
    named = {e: obj for obj in scene.objects for e in obj.expressions}
    right, previous = 0, None
    for segment in phrases:
        if segment.startswith("the "):
            right += segment in named
            previous = named.get(segment)
        else:
            obj, previous = previous, None
            right += obj is not None and segment in (
                f"{obj.size} {obj.colour} {obj.shape}",
                f"{obj.colour} {obj.size} {obj.shape}",  # stage 4's order
            )
    return right / len(phrases) if phrases else 0.0


def evaluate(
    model: LlavaForConditionalGeneration, data: ToyData, n: int, batch: int = 50
) -> dict[str, dict[str, float]]:
    """Per kind: held-out accuracy (``describe``: see ``score``), count and chance."""
    model.eval()
    table = {}
    for kind in KINDS:
        examples = eval_examples(data, kind, n)
        max_new = 40 if kind in (DESCRIBE, LIST) else 6
        scores = []
        for i in range(0, n, batch):
            chunk = examples[i : i + batch]
            for example, phrases in zip(chunk, generate_answers(model, data, chunk, max_new)):
                scores.append(score(example.question, data.scene(example.index), phrases))
        chance = 0.0 if kind in (DESCRIBE, LIST) else 1 / len(answer_options(kind, data.scenes))
        table[kind] = {"accuracy": float(np.mean(scores)), "n": len(scores), "chance": chance}
    return table


INSTRUCTION_KINDS = ("propose", "propose_caption", "list_lines", "reason")


def instruction_examples(data: ToyData, kind: str, n: int) -> list[Example]:
    """``n`` stage-5 questions on held-out scenes ``EVAL_START …`` (``INSTRUCTION_KINDS``; scenes
    without one skipped)."""
    examples, index = [], EVAL_START
    while len(examples) < n:
        scene = data.scene(index)
        rng = np.random.default_rng([data.seed, index, 100 + INSTRUCTION_KINDS.index(kind)])
        question = instruction_question(scene, kind, rng, data.scenes)
        if question is not None:
            examples.append(data.example(index, question, data.pixels(scene)))
        index += 1
    return examples


def instruction_question(
    scene: Scene, kind: str, rng: np.random.Generator, scenes: SceneConfig
) -> Question | None:
    """``propose`` (the scene's toy text, as the shards carry it), ``propose_caption`` (a
    caption, ``make_caption``), ``list_lines`` or ``reason`` (None when the scene has none)."""
    if kind == "propose":
        return propose(scene)
    if kind == "propose_caption":
        return propose(scene, make_caption(scene, rng))
    if kind == "list_lines":
        return list_lines(scene, scenes)
    return reason(scene, rng, scenes)


def evaluate_instructions(
    model: LlavaForConditionalGeneration, data: ToyData, n: int, batch: int = 50
) -> dict[str, dict[str, float]]:
    """Stage 5's instructions, greedy, on held-out scenes. One-per-line answers: the answer's
    lines that equal a gold line (case-insensitive, each gold line once) over the lines given
    (``precision``) and over the gold lines (``recall``), and the share of answers exactly the
    gold lines in order (``exact``); ``reason``: the share of right answers (``accuracy``)."""
    model.eval()
    table = {}
    for kind in INSTRUCTION_KINDS:
        examples = instruction_examples(data, kind, n)
        hits = given = gold = exact = 0
        for i in range(0, n, batch):
            chunk = examples[i : i + batch]
            for example, text in zip(chunk, generate_texts(model, data, chunk, 48)):
                truth = example.question.phrases
                lines = read_lines(text) if kind != "reason" else [text.split(".")[0].strip()]
                hits += line_match(lines, truth)
                given, gold = given + len(lines), gold + len(truth)
                exact += [line.lower() for line in lines] == [t.lower() for t in truth]
        row = {"exact": exact / n, "n": n}
        if kind == "reason":
            row = {"accuracy": exact / n, "n": n}
        else:
            row.update(precision=hits / max(1, given), recall=hits / max(1, gold))
        table[kind] = row
    return table


def attention_lift(lmm: FrozenLMM, data: ToyData, n_scenes: int) -> dict[str, float]:
    """How strongly phrase→image attention falls on the phrase's object, on held-out scenes.

    For every object phrase of a ``describe`` prompt and every layer·head channel: the attention
    mass on the object's mask (fraction of each grid cell covered) divided by the mask's share of
    the grid (what uniform attention would give). Returns the mean lift over channels and the
    mean lift of the best channel.
    """
    lifts = []
    for index in range(EVAL_START, EVAL_START + n_scenes):
        scene = data.scene(index)
        objects = list(scene.objects)
        phrases = [obj.expressions[0] for obj in objects]
        with torch.inference_mode():
            out = lmm([lmm.prepare(torch.from_numpy(scene.image), phrases)])
        for obj, maps in zip(objects, out.attention[0]):  # maps [L·H, h, w]
            cover = grid_cover(obj.mask, maps.shape[-2:])
            lifts.append((maps * cover).sum(dim=(-2, -1)) / cover.mean())
    lift = torch.stack(lifts).mean(dim=0)  # [L·H]
    return {"mean_channel": float(lift.mean()), "best_channel": float(lift.max())}


def grid_cover(mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each token-grid cell ``[h, w]`` covered by a bool ``[H, W]`` mask (original
    frame), after LLaVA's centred square padding."""
    g = ImageGeometry.square(*mask.shape)
    square = g.paste(torch.from_numpy(mask).float())
    return F.adaptive_avg_pool2d(square[None, None], grid)[0, 0]


# --------------------------------------------------------------------------------------------
# Build, save, control
# --------------------------------------------------------------------------------------------


def toy_config(seed: int) -> TinyLlavaConfig:
    return dataclasses.replace(TINY_LLAVA_VARIANTS["toy"], seed=seed)


def write_control(out_dir: str | Path, seed: int = 0) -> Path:
    """The toy LMM's config and tokenizer with random weights (never trained), for controls."""
    return write_tiny_llava(toy_config(seed), corpus(), out_dir)


def build_toy_lmm(
    out_dir: str | Path,
    recipe: Recipe = Recipe(),
    n_eval: int = 200,
    log: Callable[[str], None] = print,
    resume_from: str | Path | None = None,
) -> dict:
    """Initialise, pretrain (stages 1-2), save (fp16), run stages 3, 4 and 5 each from the saved
    weights, save and evaluate the toy LMM in ``out_dir``; returns the record also written to
    ``out_dir/toy_world.json``. ``resume_from``: a model saved after stage 2, 3 or 4 (its
    ``toy_world.json`` recipe must equal ``recipe`` on the stages it has had): the stages it has
    not had run from it, which gives what the whole recipe gives."""
    torch.set_num_threads(recipe.threads)
    out_dir = Path(out_dir)
    config = toy_config(recipe.seed)
    if resume_from is None:
        record, done = _train_stages_1_2(out_dir, config, recipe, log), 2
    else:
        record, done = _copy_saved(Path(resume_from), out_dir, recipe)
    stages = ((3, recipe.list_steps), (4, recipe.referent_steps), (5, recipe.proposal_steps))
    stages += ((6, recipe.look_steps),)
    for stage, steps in stages:
        if stage > done and steps:
            losses, seconds = train_stage(out_dir, recipe, stage, log)
            loss_key, seconds_key = STAGE_RECORD[stage]
            record[loss_key] = float(np.mean(losses[-recipe.log_every :]))
            record[seconds_key] = round(seconds, 1)
    lmm = FrozenLMM.from_pretrained(
        str(out_dir), prompt=TOY_PROMPT
    )  # the shipped fp16 weights, as fp32
    processor = AutoProcessor.from_pretrained(out_dir)
    data = ToyData(processor, n_image_tokens(lmm.model), recipe.seed, SCENE_CONFIG)
    record.update(
        recipe=dataclasses.asdict(recipe),
        eval_scene_start=EVAL_START,
        eval=evaluate(lmm.model, data, n_eval),
        instructions_eval=evaluate_instructions(lmm.model, data, n_eval),
        attention_lift=attention_lift(lmm, data, n_scenes=50),
        torch=torch.__version__,
    )
    (out_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


# What each stage adds to the record; stages 3 to 5 own the recipe fields of their prefix.
STAGE_RECORD = {
    2: (
        "variant", "parameters", "final_vision_loss", "vision_probe_accuracy", "final_loss",
        "train_seconds",
    ),
    3: ("final_list_stage_loss", "list_stage_seconds"),
    4: ("final_referent_stage_loss", "referent_stage_seconds"),
    5: ("final_proposal_stage_loss", "proposal_stage_seconds"),
    6: ("final_look_stage_loss", "look_stage_seconds"),
}  # fmt: skip
STAGE_PREFIX = {3: "list_", 4: "referent_", 5: "proposal_", 6: "look_"}


def saved_stages(record: dict) -> int:
    """How many stages a saved model's record says it has had (2 to 6)."""
    for stage in (6, 5, 4, 3):
        if record.get(STAGE_RECORD[stage][0]) is not None:
            return stage
    return 2


def _train_stages_1_2(out_dir: Path, config: TinyLlavaConfig, recipe: Recipe, log) -> dict:
    """Stages 1-2 from a fresh model, saved in fp16 to ``out_dir``; their part of the record."""
    write_tiny_llava(config, corpus(), out_dir)
    model, processor, data = _load_for_training(out_dir, recipe)
    start = time.perf_counter()
    probe, vision_losses = pretrain_vision(model, data, recipe, log)
    probe_eval = probe_accuracy(model, probe, data, n_scenes=100)
    log(f"vision probe, held-out object cells: {probe_eval}")
    losses = pretrain(model, data, recipe, log)
    train_s = time.perf_counter() - start
    model.half().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {
        "variant": dataclasses.asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_vision_loss": float(np.mean(vision_losses[-recipe.log_every :])),
        "vision_probe_accuracy": probe_eval,
        "final_loss": float(np.mean(losses[-recipe.log_every :])),
        "train_seconds": round(train_s, 1),
    }


def _copy_saved(source: Path, out_dir: Path, recipe: Recipe) -> tuple[dict, int]:
    """A model saved after stage 2, 3 or 4 copied to ``out_dir``; its record of those stages and
    how many it has had. Refused when its recorded recipe differs from ``recipe`` in the stages it
    has had, or when it has had every stage."""
    saved = json.loads((source / RECORD).read_text())
    done = saved_stages(saved)
    if done == max(STAGE_RECORD):
        raise ValueError(f"{source} has had every stage already: nothing to resume")
    ours = dataclasses.asdict(recipe)
    later = tuple(prefix for stage, prefix in STAGE_PREFIX.items() if stage > done)
    differ = sorted(
        k for k in ours if not k.startswith(later) and saved["recipe"].get(k) != ours[k]
    )
    if differ:
        raise ValueError(f"{source} was trained with a different recipe ({differ})")
    out_dir.mkdir(parents=True, exist_ok=True)
    if source.resolve() != out_dir.resolve():
        for path in source.iterdir():
            if path.is_file() and path.name not in (RECORD, "signal_check.json"):
                shutil.copyfile(path, out_dir / path.name)
    carried = [k for stage in range(2, done + 1) for k in STAGE_RECORD[stage]]
    return {k: saved[k] for k in carried}, done


def format_table(record: dict) -> str:
    lines = [f"{'kind':<10} {'accuracy':>8} {'chance':>7} {'n':>5}"]
    for kind, row in record["eval"].items():
        lines.append(f"{kind:<10} {row['accuracy']:8.3f} {row['chance']:7.3f} {row['n']:5d}")
    for kind, row in record.get("instructions_eval", {}).items():
        lines.append(f"{kind:<15} " + " ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "n"))
    lift = record["attention_lift"]
    lines.append(
        f"attention lift on the object: best channel {lift['best_channel']:.2f}, "
        f"mean channel {lift['mean_channel']:.2f} (uniform = 1)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (LLaVA format)")
    parser.add_argument("--vision-steps", type=int, default=Recipe.vision_steps)
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--batch", type=int, default=Recipe.batch)
    parser.add_argument("--lr", type=float, default=Recipe.lr)
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--threads", type=int, default=Recipe.threads)
    parser.add_argument("--list-steps", type=int, default=Recipe.list_steps)
    parser.add_argument("--list-lr", type=float, default=Recipe.list_lr)
    parser.add_argument("--list-fraction", type=float, default=Recipe.list_fraction)
    parser.add_argument("--list-tower-lr-scale", type=float, default=Recipe.list_tower_lr_scale)
    parser.add_argument("--eval-questions", type=int, default=200, help="per question kind")
    parser.add_argument("--referent-steps", type=int, default=Recipe.referent_steps)
    parser.add_argument("--referent-lr", type=float, default=Recipe.referent_lr)
    parser.add_argument("--proposal-steps", type=int, default=Recipe.proposal_steps)
    parser.add_argument("--proposal-lr", type=float, default=Recipe.proposal_lr)
    parser.add_argument(
        "--proposal-tower-lr-scale", type=float, default=Recipe.proposal_tower_lr_scale
    )
    for name in ("fraction", "caption_fraction", "list_fraction", "reason_fraction"):
        default = getattr(Recipe, f"proposal_{name}")
        parser.add_argument(f"--proposal-{name.replace('_', '-')}", type=float, default=default)
    parser.add_argument("--look-steps", type=int, default=Recipe.look_steps)
    parser.add_argument("--look-lr", type=float, default=Recipe.look_lr)
    parser.add_argument(
        "--resume-from",
        help="a model saved after stage 2, 3, 4 or 5 (same recipe): run the stages it has not had",
    )
    args = parser.parse_args(argv)
    recipe = Recipe(
        vision_steps=args.vision_steps,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        list_steps=args.list_steps,
        list_lr=args.list_lr,
        list_fraction=args.list_fraction,
        list_tower_lr_scale=args.list_tower_lr_scale,
        referent_steps=args.referent_steps,
        referent_lr=args.referent_lr,
        proposal_steps=args.proposal_steps,
        proposal_lr=args.proposal_lr,
        proposal_tower_lr_scale=args.proposal_tower_lr_scale,
        proposal_fraction=args.proposal_fraction,
        proposal_caption_fraction=args.proposal_caption_fraction,
        proposal_list_fraction=args.proposal_list_fraction,
        proposal_reason_fraction=args.proposal_reason_fraction,
        look_steps=args.look_steps,
        look_lr=args.look_lr,
    )
    start = time.perf_counter()
    record = build_toy_lmm(args.out, recipe, args.eval_questions, resume_from=args.resume_from)
    print(format_table(record))
    print(
        f"trained {record['train_seconds']:.0f} s (vision stage loss "
        f"{record['final_vision_loss']:.4f}, VQA stage loss {record['final_loss']:.4f}, list "
        f"stage loss {record.get('final_list_stage_loss', float('nan')):.4f}, referent stage "
        f"loss {record.get('final_referent_stage_loss', float('nan')):.4f}, proposal stage "
        f"loss {record.get('final_proposal_stage_loss', float('nan')):.4f}, look stage loss "
        f"{record.get('final_look_stage_loss', float('nan')):.4f}), "
        f"total {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
