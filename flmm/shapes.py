"""The model as the memory plan sees it (``flmm.memory``), read from configs without weights.

The LMM is built on the ``meta`` device (its parameters' bytes, its config), its processor is run
on a blank image of the planned size (image tokens, grids, pixel tensors) and its chat template
gives the prompt's length; SAM and the heads are built on ``meta`` too (a heads file is read for
its U-Net width and keyword selector).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from flmm.build import HeadsConfig, SamConfig, build_heads, build_sam, read_heads_file
from flmm.families import family_for
from flmm.heads import heads_dims
from flmm.localization import is_localization_file, read_localization
from flmm.peak import module_bytes
from flmm.prompt import FLMM_INSTRUCTION, PromptConfig, PromptLayout


@dataclass(frozen=True)
class VisionTower:
    """One vision encoder of the LMM, as it runs on one image: ``tokens`` positions of width
    ``hidden`` (MLP ``intermediate``), ``layers`` deep; ``keeps_hidden``: all its layers' outputs
    are kept (LLaVA picks layer -2 from them); ``global_heads``: heads of materialised
    ``[heads, tokens, tokens]`` attention (DeepSeek-VL hybrid's SAM tower; 0: sdpa, none)."""

    tokens: int
    hidden: int
    intermediate: int
    layers: int
    keeps_hidden: bool = False
    global_heads: int = 0


@dataclass(frozen=True)
class LMMShape:
    """The frozen LMM as the estimate sees it. bytes: parameters + buffers; dtype_bytes: s;
    layers L, heads H, kv_heads, hidden D, intermediate I, head_dim; captured: heads captured
    per layer·layer (L·H, or K chosen heads); views V; grid (h, w) of the merged maps;
    image_tokens N; prompt_tokens T0: the grounding prompt with the image's tokens expanded,
    before any answer; pixel_bytes: the image's tensors in the model's dtype; towers: its
    vision encoders; vocab: logits' width."""

    bytes: int
    dtype_bytes: int
    layers: int
    heads: int
    kv_heads: int
    hidden: int
    intermediate: int
    head_dim: int
    captured: int
    views: int
    grid: tuple[int, int]
    image_tokens: int
    prompt_tokens: int
    pixel_bytes: int
    towers: tuple[VisionTower, ...]
    vocab: int


@dataclass(frozen=True)
class HeadsShape:
    """SAM (its config, parameter bytes) and the heads (parameter bytes; U-Net base width,
    upsampling side and stages; None for localization heads, which have no U-Net)."""

    sam: SamConfig
    sam_bytes: int
    heads_bytes: int
    unet_base: int | None = 64
    unet_upsample_to: int = 64
    unet_stages: int = 4


def lmm_shape(
    path: str,
    dtype: torch.dtype = torch.float32,
    image_size: tuple[int, int] = (1024, 1024),
    instruction: str = FLMM_INSTRUCTION,
    captured_heads: int | None = None,
    trust_remote_code: bool = False,
) -> LMMShape:
    """The LMM at ``path`` (hub id or directory) in ``dtype``, for images of ``image_size``
    (H, W): built on the meta device (no weights read), its processor run on a blank image (the
    family's tokens, grids and pixel tensors), its prompt under ``instruction`` tokenised.
    ``captured_heads``: K chosen (layer, head) pairs captured instead of all (localization
    heads)."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    family = family_for(config.model_type)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    inputs = family.image_inputs(model, processor, torch.zeros((*image_size, 3), dtype=torch.uint8))
    prefix = PromptLayout(processor, PromptConfig(instruction)).expanded_prefix(inputs.n_tokens)
    text, s = config.text_config, torch.tensor([], dtype=dtype).element_size()
    pixel_bytes = sum(
        t.numel() * (s if t.is_floating_point() else 8) for t in inputs.tensors.values()
    )
    return LMMShape(
        bytes=module_bytes(model),
        dtype_bytes=s,
        layers=text.num_hidden_layers,
        heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        captured=captured_heads or text.num_hidden_layers * text.num_attention_heads,
        views=family.num_views,
        grid=inputs.grid,
        image_tokens=inputs.n_tokens,
        prompt_tokens=len(processor.tokenizer(prefix)["input_ids"]),
        pixel_bytes=pixel_bytes,
        towers=vision_towers(config, inputs.tensors),
        vocab=text.vocab_size,
    )


def vision_towers(config, tensors: dict[str, torch.Tensor]) -> tuple[VisionTower, ...]:
    """The vision encoders of an LMM of ``config`` as they run on one image's ``tensors``:
    Qwen's over its patches; LLaVA's CLIP over each tile (LLaVA-NeXT: base + tiles), CLS
    included, every layer's output kept; DeepSeek-VL's SigLIP, and the hybrid's SAM tower
    (every layer's output kept, global attention materialised)."""
    vision, kind = config.vision_config, config.model_type
    if kind.startswith("qwen"):
        width = getattr(vision, "embed_dim", None) or vision.hidden_size  # Qwen2-VL: embed_dim
        mlp = getattr(vision, "intermediate_size", None) or int(width * vision.mlp_ratio)
        return (VisionTower(tensors["pixel_values"].shape[0], width, mlp, vision.depth),)
    side = vision.image_size // vision.patch_size
    if kind in ("llava", "llava_next"):
        tiles = tensors["pixel_values"].shape[1] if kind == "llava_next" else 1
        tokens = tiles * (side * side + 1)
        layers = vision.num_hidden_layers
        return (VisionTower(tokens, vision.hidden_size, vision.intermediate_size, layers, True),)
    towers = [
        VisionTower(
            side * side, vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers
        )
    ]
    if kind == "deepseek_vl_hybrid":
        sam = config.high_res_vision_config
        grid = sam.image_size // sam.patch_size
        towers.append(
            VisionTower(
                grid * grid, sam.hidden_size, sam.mlp_dim, sam.num_hidden_layers, True,
                sam.num_attention_heads,
            )
        )  # fmt: skip
    return tuple(towers)


def heads_shape(sam: SamConfig, heads: str | Path | None, lmm: LMMShape) -> HeadsShape:
    """SAM of ``sam`` and the heads of the file ``heads`` (None: fresh heads, F-LMM's U-Net
    width; a localization-heads ``.json``: no U-Net) for ``lmm``, built on the meta device."""
    base, selector_bytes = 64, 0
    if heads is not None and is_localization_file(heads):
        base = None
    elif heads is not None:
        state_dict, selector = read_heads_file(heads)
        base = heads_dims(state_dict)["unet_base_channels"]
        selector_bytes = module_bytes(selector) if selector is not None else 0
    with torch.device("meta"):
        model = build_sam(sam)
        parts = torch.nn.ModuleList([model])
        if base is not None:
            config = HeadsConfig(lmm.layers, lmm.heads, lmm.hidden, base, num_views=lmm.views)
            parts.append(build_heads(config, model))
    sam_bytes = module_bytes(model)
    return HeadsShape(sam, sam_bytes, module_bytes(parts) - sam_bytes + selector_bytes, base)


def model_shapes(
    lmm: str,
    sam: SamConfig,
    heads: str | Path | None,
    dtype: torch.dtype,
    instruction: str = FLMM_INSTRUCTION,
    image_size: tuple[int, int] = (1024, 1024),
) -> tuple[LMMShape, HeadsShape]:
    """``lmm_shape`` and ``heads_shape`` of one F-LMM (a localization-heads file: its K chosen
    heads are all the LMM captures)."""
    captured = None
    if heads is not None and is_localization_file(heads):
        captured = len(read_localization(heads)[0].heads)
    shape = lmm_shape(lmm, dtype, image_size, instruction, captured)
    return shape, heads_shape(sam, heads, shape)
