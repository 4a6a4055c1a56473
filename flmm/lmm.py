"""The frozen LMM (F-LMM §3.1: frozen LMM, attention + hidden states), for every family.

``FrozenLMM`` wraps a transformers image-text model that is never trained; a family adapter
(``flmm.families``, picked from ``config.model_type``) says how images become its inputs and where
their tokens lie. For a batch of (image, phrases) it runs one prefill and returns, per phrase:

- attention maps ``[V·L·H, h, w]`` (view-major, then layer-major: channel = (v·L + l)·H + head) of
  the phrase tokens over the image's token grids, merged over the phrase's tokens (mean or max),
  each view's map resized (bilinear, antialiased: a shrunk view keeps every row) to the image's
  grid ``(h, w)`` and normalised to sum 1;
- the phrase tokens' hidden states of every layer ``[n_tok, L, D]`` (the language cue of the
  refiner; entry l is the output of layer l, the last one after the final norm, as transformers'
  ``hidden_states[1:]``).

Frames: the maps are in the LMM frame of the image (``flmm.geometry.ImageGeometry``: LLaVA-1.5's
centred square, or the whole image for dynamic-resolution families); its geometry maps back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, PretrainedConfig

from flmm import capture
from flmm.families import Family, ImageInputs, family_for
from flmm.geometry import ImageGeometry
from flmm.prompt import PromptConfig, PromptLayout, build_prompt, build_text_prompt


@dataclass
class LMMSample:
    """One prepared (image, phrases) pair on CPU.

    image: the family's inputs for the image (tensors, token count, grids, geometry);
    input_ids ``[T]``; phrase_tokens: for each phrase, the LongTensor of its token positions in
    input_ids.
    """

    image: ImageInputs
    input_ids: torch.Tensor
    phrase_tokens: list[torch.Tensor]

    @property
    def geometry(self) -> ImageGeometry:
        return self.image.geometry

    @property
    def grid(self) -> tuple[int, int]:
        return self.image.grid


@dataclass
class LMMOutput:
    """Per-sample results of one batched prefill.

    token_maps ``[B, L, H, Q, N]`` in the LMM's dtype: raw softmax rows of every captured query slot (Q = the
    longest sample's phrase-token count) over the image tokens (N = the most of any sample; a
    sample's own are its first ``image.n_tokens``), before merging (``[B, 1, K, Q, N]`` when
    the LMM captures K chosen heads only, ``FrozenLMM.capture_heads``).
    attention: per sample ``[P, V·L·H, h, w]`` float32 maps (see the module).
    hidden: per sample, per phrase ``[n_tok, L, D]`` hidden states (model dtype).
    token_hidden ``[B, Q, L, D]``: the hidden states of every captured query slot (a text's
    tokens in text mode, where the phrases are chosen after the prefill).
    """

    token_maps: torch.Tensor
    attention: list[torch.Tensor]
    hidden: list[list[torch.Tensor]]
    token_hidden: torch.Tensor


class FrozenLMM(nn.Module):
    """A frozen LMM of any supported family that returns phrase→image attention maps and phrase
    hidden states."""

    def __init__(self, model: nn.Module, processor, family: Family, prompt: PromptConfig):
        super().__init__()
        family.check(model, processor)
        if not getattr(processor.tokenizer, "is_fast", True):
            raise ValueError("a fast tokenizer (tokenizer.json) is needed for offset mappings")
        self.family = family
        self.model = model.eval().requires_grad_(False)
        self.model.set_attn_implementation({"text_config": capture.register()})
        self.processor = processor
        self.prompt = prompt
        self.layout = PromptLayout(processor, prompt)
        text = model.config.text_config
        self.num_layers = text.num_hidden_layers
        self.num_heads = text.num_attention_heads
        self.hidden_size = text.hidden_size
        self.num_views = family.num_views
        self.merge = prompt.merge
        # None: capture every layer × head; else only these (layer, head) pairs (training-free
        # grounding, flmm.localization): maps then have V·K channels, K = len(capture_heads)
        self.capture_heads: tuple[tuple[int, int], ...] | None = None
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        prompt: PromptConfig | None = None,
        trust_remote_code: bool = False,
    ) -> FrozenLMM:
        """Load a hub id or local directory of any supported family (``flmm.families``), frozen,
        in ``dtype`` on ``device``. Hub kernels stay off: transformers would otherwise fetch kernel
        code from the Hub while loading (on a GPU, offline, that load fails) and swap it into
        the layers whose attention we capture."""
        config, _ = PretrainedConfig.get_config_dict(name_or_path)
        family = family_for(config.get("model_type", "(none)"))
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, use_kernels=False
        ).to(device)
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        return cls(model, processor, family, prompt or PromptConfig())

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def in_channels(self) -> int:
        """Channels of a phrase's maps: V·L·H, or V·K with ``capture_heads``."""
        if self.capture_heads is not None:
            return self.num_views * len(self.capture_heads)
        return self.num_views * self.num_layers * self.num_heads

    def image_inputs(self, image: torch.Tensor) -> ImageInputs:
        """image ``[H, W, 3]`` uint8 RGB (original frame) → the family's inputs for it."""
        return self.family.image_inputs(self.model, self.processor, image)

    def prepare(
        self, image: torch.Tensor, phrases: list[str], inputs: ImageInputs | None = None
    ) -> LMMSample:
        """image ``[H, W, 3]`` uint8 RGB (original frame); phrases non-empty strings.
        ``inputs``: the image's own inputs when already prepared, else made here."""
        inputs = inputs or self.image_inputs(image)
        prompt = build_prompt(self.layout, phrases, inputs.n_tokens)
        return LMMSample(inputs, prompt.input_ids, prompt.phrase_tokens)

    def prepare_text(
        self,
        image: torch.Tensor,
        text: str,
        inputs: ImageInputs | None = None,
        instruction: str | None = None,
    ) -> tuple[LMMSample, list[tuple[int, int]]]:
        """image ``[H, W, 3]`` uint8 RGB; a free text (caption, description, answer) whose every
        token is captured as one query group (``build_text_prompt``) → the sample, and each text
        token's ``[start, end)`` characters in ``text``. ``inputs``: the image's own inputs when
        already prepared (another sequence of the same image), else made here. ``instruction``:
        the user's turn the text answers (a question: the conversation image + question →
        answer, as ``answer`` generated it); None: the grounding prompt's."""
        inputs = inputs or self.image_inputs(image)
        layout = self.layout
        if instruction is not None:
            layout = PromptLayout(self.processor, PromptConfig(instruction, self.merge))
        prompt, offsets = build_text_prompt(layout, text, inputs.n_tokens)
        return LMMSample(inputs, prompt.input_ids, prompt.phrase_tokens), offsets

    def describe(
        self,
        images: list[torch.Tensor],
        max_new_tokens: int = 64,
        instruction: str | None = None,
    ) -> list[str]:
        """Greedy descriptions of images ``[H, W, 3]`` uint8 RGB (``answer``) under one
        ``instruction`` (default: the grounding prompt's, so that the description continues the
        prompt the heads read), whitespace runs collapsed to one space."""
        instructions = [instruction or self.prompt.instruction] * len(images)
        return [
            " ".join(text.split()) for text in self.answer(images, instructions, max_new_tokens)
        ]

    @torch.inference_mode()
    def answer(
        self, images: list[torch.Tensor], instructions: list[str], max_new_tokens: int = 64
    ) -> list[str]:
        """The LMM's greedy answers to one instruction per image ``[H, W, 3]`` uint8 RGB: one
        batched ``generate`` (KV cache, prompts left-padded) with the family's chat template;
        each answer's special tokens dropped and its ends stripped (line breaks kept)."""
        tok = self.processor.tokenizer
        inputs = [self.image_inputs(image) for image in images]
        layouts = {
            i: PromptLayout(self.processor, PromptConfig(i, self.merge)) for i in instructions
        }
        prompts = [
            LMMSample(x, torch.tensor(tok(layouts[i].expanded_prefix(x.n_tokens))["input_ids"]), [])
            for x, i in zip(inputs, instructions)
        ]
        batch = collate(prompts, tok.pad_token_id, "left", self.image_token_id)
        ids, length = batch["input_ids"], batch["input_ids"].shape[1]
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=batch["attention_mask"].to(self.device),
            **self._image_kwargs(inputs, ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        return [
            text.strip() for text in tok.batch_decode(out[:, length:], skip_special_tokens=True)
        ]

    def _image_kwargs(self, inputs: list[ImageInputs], ids: torch.Tensor) -> dict:
        """The batch's image tensors (on the model's device; floats in its dtype) and, for
        M-RoPE families, the token types the model derives positions from."""
        kwargs = {}
        for key, value in collate_image_tensors([x.tensors for x in inputs]).items():
            kwargs[key] = value.to(
                self.device, self.model.dtype if value.is_floating_point() else None
            )
        if self.family.mrope:
            kwargs["mm_token_type_ids"] = (ids == self.image_token_id).int().to(self.device)
        return kwargs

    def model_inputs(self, samples: list[LMMSample]) -> tuple[dict, dict]:
        """The collated batch (``collate``) and the keyword arguments of the model's forward for
        it (on the model's device): ids, mask, positions (M-RoPE families derive their own) and
        the images' tensors."""
        tok = self.processor.tokenizer
        batch = collate(samples, tok.pad_token_id, tok.padding_side, self.image_token_id)
        inputs = {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
            **self._image_kwargs([s.image for s in samples], batch["input_ids"]),
        }
        if not self.family.mrope:
            inputs["position_ids"] = batch["position_ids"].to(self.device)
        return batch, inputs

    def forward(self, samples: list[LMMSample]) -> LMMOutput:
        """One prefill over a padded batch of prepared samples."""
        batch, inputs = self.model_inputs(samples)
        cap = capture.AttentionCapture(
            batch["query_index"], batch["image_index"], self.capture_heads
        )
        recorder = HiddenRecorder(self.model.model.language_model, batch["query_index"])
        with recorder:
            self.model.model(**inputs, use_cache=False, flmm_capture=cap)
        token_maps = cap.stacked()
        hidden = recorder.stacked()  # [B, Q, L, D]
        attention, phrase_hidden = [], []
        for b, sample in enumerate(samples):
            slots = phrase_slots(sample.phrase_tokens)
            attention.append(self.merge_slots(token_maps[b], slots, sample.image))
            phrase_hidden.append([hidden[b, s] for s in slots])
        return LMMOutput(token_maps, attention, phrase_hidden, hidden)

    def in_place(
        self, out: LMMOutput, b: int, image: ImageInputs, slots: list[slice]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Phrases grounded in place in sample ``b``'s text prefill (``prepare_text``): ``slots``
        are their tokens' query slots (``flmm.prompt.span_slots``) → attention
        ``[P, V·L·H, h, w]`` (``merge_slots``) and per phrase hidden ``[n_tok, L, D]``."""
        hidden = [out.token_hidden[b, s] for s in slots]
        return self.merge_slots(out.token_maps[b], slots, image), hidden

    def merge_slots(
        self, maps: torch.Tensor, slots: list[slice], image: ImageInputs
    ) -> torch.Tensor:
        """maps ``[L, H, Q, N]`` → ``[P, V·L·H, h, w]`` on ``image``'s grids, merged per phrase
        (see the module; P may be 0)."""
        if not slots:
            return maps.new_zeros((0, self.in_channels, *image.grid), dtype=torch.float32)
        merged = []
        for view in image.views:
            grid = view.grid(maps)  # [L, H, Q, r, c]
            per_phrase = []
            for s in slots:
                rows = grid[:, :, s].float()  # one phrase's rows: merged in float32
                m = rows.mean(dim=2) if self.merge == "mean" else rows.amax(dim=2)
                per_phrase.append(m)
            out = torch.stack(per_phrase).flatten(1, 2)  # [P, L·H, r, c]
            if tuple(out.shape[-2:]) != image.grid:  # antialiased: a shrunk view loses no row
                out = F.interpolate(out, size=image.grid, mode="bilinear", antialias=True)
            merged.append(out / out.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-12))
        return torch.cat(merged, dim=1)


def collate_image_tensors(tensors: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-image input tensors → the batch's: concatenated on the leading dimension, other
    dimensions zero-padded to the largest (LLaVA-NeXT's tile counts differ per image)."""
    out = {}
    for key in tensors[0]:
        parts = [t[key] for t in tensors]
        shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
        padded = []
        for p in parts:
            pad = []
            for d in reversed(range(1, p.dim())):
                pad += [0, shape[d - 1] - p.shape[d]]
            padded.append(F.pad(p, pad) if any(pad) else p)
        out[key] = torch.cat(padded)
    return out


def phrase_slots(phrase_tokens: list[torch.Tensor]) -> list[slice]:
    """Query-slot ranges of each phrase: phrases' tokens are laid out back to back."""
    slots, start = [], 0
    for tokens in phrase_tokens:
        slots.append(slice(start, start + len(tokens)))
        start += len(tokens)
    return slots


def collate(
    samples: list[LMMSample], pad_id: int, padding_side: str, image_token_id: int
) -> dict[str, torch.Tensor]:
    """Pad a batch of token sequences on ``padding_side`` (the tokenizer's, or ``"left"`` for
    generation); shift token positions accordingly. A sample may have no phrases (a prompt to
    generate from).

    Returns input_ids / attention_mask / position_ids ``[B, T]``, query_index ``[B, Q]`` (all
    phrase-token positions, padded with 0) and image_index ``[B, N]`` (each row's image-token
    positions in order, padded with 0 to the most of any row). Image tensors are collated
    apart (``collate_image_tensors``).
    """
    length = max(len(s.input_ids) for s in samples)
    n_query = max(sum(len(t) for t in s.phrase_tokens) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    query = torch.zeros((len(samples), n_query), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        offset = length - n if padding_side == "left" else 0
        ids[b, offset : offset + n] = s.input_ids
        mask[b, offset : offset + n] = 1
        if s.phrase_tokens:  # (none: a prompt to generate from)
            positions = torch.cat(s.phrase_tokens) + offset
            query[b, : len(positions)] = positions
    positions = [torch.nonzero(row == image_token_id)[:, 0] for row in ids]
    image_index = torch.zeros((len(samples), max(len(p) for p in positions)), dtype=torch.long)
    for b, p in enumerate(positions):
        image_index[b, : len(p)] = p
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "query_index": query,
        "image_index": image_index,
    }


class HiddenRecorder:
    """Forward hooks that keep the hidden states of the query positions only, for every layer.

    Entry l is layer l's output; the last entry is taken after the final norm (transformers'
    ``hidden_states[1:]``). ``stacked()`` → ``[B, Q, L, D]``.
    """

    def __init__(self, language_model: nn.Module, query_index: torch.Tensor):
        self.modules = [*language_model.layers[:-1], language_model.norm]
        self.query_index = query_index
        self.rows: list[torch.Tensor] = []
        self.handles = []

    def _hook(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        index = self.query_index.to(hidden.device)
        self.rows.append(hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])))

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def stacked(self) -> torch.Tensor:
        return torch.stack(self.rows, dim=2)
