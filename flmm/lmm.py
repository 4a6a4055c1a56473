"""The frozen LMM adapter for the LLaVA family (F-LMM §3.1: frozen LMM, attention + hidden states).

``FrozenLlava`` wraps a ``LlavaForConditionalGeneration`` (llava-hf checkpoints or any local
directory in that format) that is never trained. For a batch of (image, phrases) it runs one
prefill and returns, per phrase:

- attention maps ``[L·H, h, w]`` (layer-major: channel = layer·H + head) of the phrase tokens over
  the image-token grid, merged over the phrase's tokens (mean or max) and normalised to sum 1;
- the phrase tokens' hidden states of every layer ``[n_tok, L, D]`` (the language cue of the
  refiner; entry l is the output of layer l, the last one after the final norm, as transformers'
  ``hidden_states[1:]``).

Frames: the *original* frame is the input image (H×W). LLaVA-1.5 pads it to a centred square of side
max(H, W) with the processor's mean colour (the *square* frame) and resizes that to the vision
tower's input; the h×w token grid covers the square frame. ``ImageGeometry`` maps back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration

from flmm import capture
from flmm.prompt import PromptConfig, PromptLayout, build_prompt, build_text_prompt


@dataclass(frozen=True)
class ImageGeometry:
    """Where the original image (height×width) sits inside LLaVA's padded square of side ``side``."""

    height: int
    width: int
    side: int
    left: int
    top: int

    @classmethod
    def of(cls, height: int, width: int) -> ImageGeometry:
        side = max(height, width)
        return cls(height, width, side, (side - width) // 2, (side - height) // 2)

    def crop(self, logits: torch.Tensor) -> torch.Tensor:
        """``[P, 1, h', w']`` logits in the square frame → the original image's region, same scale.

        Offsets round down and extents to nearest (F-LMM's unpadding); at least one pixel is kept.
        """
        hs, ws = logits.shape[-2:]
        y0, x0 = int(self.top * hs / self.side), int(self.left * ws / self.side)
        h = max(1, int(self.height * hs / self.side + 0.5))
        w = max(1, int(self.width * ws / self.side + 0.5))
        return logits[..., y0 : y0 + h, x0 : x0 + w]

    def to_original(self, logits: torch.Tensor) -> torch.Tensor:
        """``[P, 1, h', w']`` logits in the square frame → ``[P, 1, height, width]`` (original)."""
        crop = self.crop(logits).float()
        return F.interpolate(crop, size=(self.height, self.width), mode="bilinear")


@dataclass
class LMMSample:
    """One prepared (image, phrases) pair on CPU.

    pixel_values ``[3, S, S]`` (vision tower input); input_ids ``[T]``; phrase_tokens: for each
    phrase, the LongTensor of its token positions in input_ids; geometry: the original image.
    """

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    phrase_tokens: list[torch.Tensor]
    geometry: ImageGeometry


@dataclass
class LMMOutput:
    """Per-sample results of one batched prefill.

    token_maps ``[B, L, H, Q, N]`` float32: raw softmax rows of every captured query slot (Q = the
    longest sample's phrase-token count) over the N image tokens, before merging.
    attention: per sample ``[P, L·H, h, w]`` float32 maps, each summing to 1.
    hidden: per sample, per phrase ``[n_tok, L, D]`` hidden states (model dtype).
    token_hidden ``[B, Q, L, D]``: the hidden states of every captured query slot (a text's
    tokens in text mode, where the phrases are chosen after the prefill).
    """

    token_maps: torch.Tensor
    attention: list[torch.Tensor]
    hidden: list[list[torch.Tensor]]
    token_hidden: torch.Tensor


class FrozenLlava(nn.Module):
    """A frozen LLaVA that returns phrase→image attention maps and phrase hidden states."""

    def __init__(self, model: LlavaForConditionalGeneration, processor, prompt: PromptConfig):
        super().__init__()
        strategy = model.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r}: only 'default' (CLS dropped)"
            )
        if not getattr(processor.tokenizer, "is_fast", True):
            raise ValueError("a fast tokenizer (tokenizer.json) is needed for offset mappings")
        self.model = model.eval().requires_grad_(False)
        self.model.set_attn_implementation({"text_config": capture.register()})
        self.processor = processor
        self.layout = PromptLayout(processor, prompt)
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)
        text = model.config.text_config
        self.num_layers = text.num_hidden_layers
        self.num_heads = text.num_attention_heads
        self.hidden_size = text.hidden_size
        self.merge = prompt.merge

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        prompt: PromptConfig | None = None,
        trust_remote_code: bool = False,
    ) -> FrozenLlava:
        """Load a llava-hf hub id or local directory, frozen, in ``dtype`` on ``device``."""
        model = LlavaForConditionalGeneration.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
        ).to(device)
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        return cls(model, processor, prompt or PromptConfig())

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def in_channels(self) -> int:
        return self.num_layers * self.num_heads

    def prepare(self, image: torch.Tensor, phrases: list[str]) -> LMMSample:
        """image ``[H, W, 3]`` uint8 RGB (original frame); phrases non-empty strings."""
        pixel_values, geometry = llava_pixels(self.processor.image_processor, image)
        prompt = build_prompt(self.layout, phrases, self.grid[0] * self.grid[1])
        return LMMSample(pixel_values, prompt.input_ids, prompt.phrase_tokens, geometry)

    def prepare_text(
        self, image: torch.Tensor, text: str
    ) -> tuple[LMMSample, list[tuple[int, int]]]:
        """image ``[H, W, 3]`` uint8 RGB; a free text (caption, description) whose every token
        is captured as one query group (``build_text_prompt``) → the sample, and each text
        token's ``[start, end)`` characters in ``text``."""
        pixel_values, geometry = llava_pixels(self.processor.image_processor, image)
        prompt, offsets = build_text_prompt(self.layout, text, self.grid[0] * self.grid[1])
        return LMMSample(pixel_values, prompt.input_ids, prompt.phrase_tokens, geometry), offsets

    @torch.inference_mode()
    def describe(
        self,
        images: list[torch.Tensor],
        max_new_tokens: int = 64,
        instruction: str | None = None,
    ) -> list[str]:
        """Greedy descriptions of images ``[H, W, 3]`` uint8 RGB, one batched ``generate`` (KV
        cache) with the prompt's chat template and ``instruction`` (default: the grounding
        prompt's, so that the description continues the prompt the heads read)."""
        layout = self.layout
        if instruction is not None:
            layout = PromptLayout(self.processor, PromptConfig(instruction, self.merge))
        n_image = self.grid[0] * self.grid[1]
        prefix = layout.prefix.replace(layout.image_token, layout.image_token * n_image)
        # Every image has the same prompt: no padding, one row repeated.
        row = layout.tokenizer(prefix, return_tensors="pt")["input_ids"]
        ids = row.expand(len(images), -1)
        pixels = [llava_pixels(self.processor.image_processor, image)[0] for image in images]
        tok = self.processor.tokenizer
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=torch.ones_like(ids).to(self.device),
            pixel_values=torch.stack(pixels).to(self.device, self.model.dtype),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        texts = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]

    def forward(self, samples: list[LMMSample]) -> LMMOutput:
        """One prefill over a padded batch of prepared samples."""
        tok = self.processor.tokenizer
        batch = collate(
            samples, tok.pad_token_id, tok.padding_side, self.model.config.image_token_id
        )
        cap = capture.AttentionCapture(batch["query_index"], batch["image_index"])
        recorder = HiddenRecorder(self.model.model.language_model, batch["query_index"])
        with recorder:
            self.model.model(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
                position_ids=batch["position_ids"].to(self.device),
                pixel_values=batch["pixel_values"].to(self.device, self.model.dtype),
                use_cache=False,
                flmm_capture=cap,
            )
        token_maps = cap.stacked()
        hidden = recorder.stacked()  # [B, Q, L, D]
        attention, phrase_hidden = [], []
        for b, sample in enumerate(samples):
            slots = _phrase_slots(sample.phrase_tokens)
            attention.append(self.merge_slots(token_maps[b], slots))
            phrase_hidden.append([hidden[b, s] for s in slots])
        return LMMOutput(token_maps, attention, phrase_hidden, hidden)

    def merge_slots(self, maps: torch.Tensor, slots: list[slice]) -> torch.Tensor:
        """maps ``[L, H, Q, N]`` → ``[P, L·H, h, w]``, merged per phrase, each map summing to 1."""
        merged = []
        for s in slots:
            rows = maps[:, :, s]
            m = rows.mean(dim=2) if self.merge == "mean" else rows.amax(dim=2)
            merged.append(m / m.sum(dim=-1, keepdim=True).clamp(min=1e-12))
        out = torch.stack(merged)  # [P, L, H, N]
        return out.flatten(1, 2).unflatten(-1, self.grid)


def llava_pixels(image_processor, image: torch.Tensor) -> tuple[torch.Tensor, ImageGeometry]:
    """LLaVA-1.5 preprocessing of ``[H, W, 3]`` uint8 RGB → pixel_values ``[3, S, S]``, geometry.

    Pads to the centred square with the processor's mean colour, then the processor's own
    resize / rescale / normalise.
    """
    geometry = ImageGeometry.of(image.shape[0], image.shape[1])
    mean = torch.tensor([round(255 * m) for m in image_processor.image_mean], dtype=torch.uint8)
    square = mean.view(1, 1, 3).expand(geometry.side, geometry.side, 3).clone()
    top, left = geometry.top, geometry.left
    square[top : top + geometry.height, left : left + geometry.width] = image
    pixels = image_processor(images=square.permute(2, 0, 1), return_tensors="pt")["pixel_values"]
    return pixels[0], geometry


def _phrase_slots(phrase_tokens: list[torch.Tensor]) -> list[slice]:
    """Query-slot ranges of each phrase: phrases' tokens are laid out back to back."""
    slots, start = [], 0
    for tokens in phrase_tokens:
        slots.append(slice(start, start + len(tokens)))
        start += len(tokens)
    return slots


def collate(
    samples: list[LMMSample], pad_id: int, padding_side: str, image_token_id: int
) -> dict[str, torch.Tensor]:
    """Pad a batch on the tokenizer's padding side; shift token positions accordingly.

    Returns input_ids / attention_mask / position_ids ``[B, T]``, pixel_values ``[B, 3, S, S]``,
    query_index ``[B, Q]`` (all phrase-token positions, padded with 0) and image_index ``[B, N]``.
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
        positions = torch.cat(s.phrase_tokens) + offset
        query[b, : len(positions)] = positions
    image_index = torch.stack([torch.nonzero(row == image_token_id)[:, 0] for row in ids])
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "pixel_values": torch.stack([s.pixel_values for s in samples]),
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
