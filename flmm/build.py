"""Variant registry and builders for every model part of F-LMM.

All hyperparameters live here, one frozen dataclass per part and a small dict of named variants
(after segment-anything's ``build_sam.py``). Builders take a config, construct the modules from
their classes (constructor injection) and load checkpoints with an explicit key/shape check.

Sections:
  * SAM (paper, Method: "Visual Grounding with Mask Head", the Mask Refiner): the frozen SAM
    image encoder and the trainable SAM prompt encoder + mask decoder used by the refiner.
  * Heads: the U-Net mask decoder + refiner, sized from the frozen LMM; the whole F-LMM.
  * Tiny LLaVA: LLaVA-format checkpoints of the real classes at test sizes.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from flmm.checkpoint import load_file_into, load_state, read_metadata, read_state_dict
from flmm.convert import convert_flmm_state_dict, missing_sam_buffers
from flmm.heads import FLMMHeads, heads_dims
from flmm.lmm import FrozenLMM
from flmm.localization import LocalizationHeads, is_localization_file, read_localization
from flmm.mask_decoder import MaskDecoder as UNetMaskDecoder
from flmm.model import FLMM
from flmm.prompt import FLMM_INSTRUCTION, PROMPT_KEY
from flmm.refiner import SamRefiner
from flmm.sam import SamImageEncoder
from flmm.sam_variants import SAM_VARIANTS, SamConfig, sam_config  # noqa: F401 - re-exported
from flmm.selector import KeywordSelector, selector_state, split_selector
from flmm.tiny_llava import TinyLlavaConfig

# --------------------------------------------------------------------------------------------
# SAM (paper: Mask Refiner)
# --------------------------------------------------------------------------------------------


def _sam_image_encoder(cfg: SamConfig) -> ImageEncoderViT:
    return ImageEncoderViT(
        depth=cfg.encoder_depth,
        embed_dim=cfg.encoder_embed_dim,
        img_size=cfg.img_size,
        mlp_ratio=cfg.encoder_mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=cfg.encoder_norm_eps),
        num_heads=cfg.encoder_num_heads,
        patch_size=cfg.vit_patch_size,
        qkv_bias=True,
        use_rel_pos=cfg.encoder_use_rel_pos,
        global_attn_indexes=cfg.encoder_global_attn_indexes,
        window_size=cfg.encoder_window_size,
        out_chans=cfg.prompt_embed_dim,
    )


def _sam_prompt_encoder(cfg: SamConfig) -> PromptEncoder:
    grid = cfg.image_embedding_size
    return PromptEncoder(
        embed_dim=cfg.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(cfg.img_size, cfg.img_size),
        mask_in_chans=cfg.mask_in_chans,
    )


def _sam_mask_decoder(cfg: SamConfig) -> MaskDecoder:
    transformer = TwoWayTransformer(
        depth=cfg.decoder_depth,
        embedding_dim=cfg.prompt_embed_dim,
        mlp_dim=cfg.decoder_mlp_dim,
        num_heads=cfg.decoder_num_heads,
    )
    return MaskDecoder(
        num_multimask_outputs=cfg.num_multimask_outputs,
        transformer=transformer,
        transformer_dim=cfg.prompt_embed_dim,
        iou_head_depth=cfg.iou_head_depth,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )


def build_sam(config: SamConfig, checkpoint: str | Path | None = None) -> Sam:
    """Build SAM from its parts; load ``checkpoint`` (.safetensors or torch.save) if given.

    The checkpoint's keys and shapes must match the model exactly (an official SAM ``.pth``
    does); otherwise a ValueError lists the offending keys. Returned in eval mode.
    """
    sam = Sam(
        image_encoder=_sam_image_encoder(config),
        prompt_encoder=_sam_prompt_encoder(config),
        mask_decoder=_sam_mask_decoder(config),
        pixel_mean=list(config.pixel_mean),
        pixel_std=list(config.pixel_std),
    )
    if checkpoint is not None:
        load_file_into(sam, checkpoint)
    return sam.eval()


def build_image_encoder(sam: Sam) -> SamImageEncoder:
    """The frozen image half of ``sam`` (shares its modules)."""
    return SamImageEncoder(sam)


def build_refiner(sam: Sam, num_layers: int, hidden_size: int) -> SamRefiner:
    """The trainable refiner on ``sam``'s prompt encoder and mask decoder (shares the modules).

    num_layers, hidden_size: L and D of the LMM hidden states fed as text prompts.
    """
    return SamRefiner(
        prompt_encoder=sam.prompt_encoder,
        mask_decoder=sam.mask_decoder,
        num_layers=num_layers,
        hidden_size=hidden_size,
        image_size=sam.image_encoder.img_size,
    )


# --------------------------------------------------------------------------------------------
# Heads (paper: Mask Decoder + Mask Refiner) and the assembled F-LMM
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadsConfig:
    """The trainable heads for an LMM with L layers, H heads per layer and hidden size D, whose
    images' tokens lie on V views (the U-Net reads V·L·H attention channels)."""

    num_layers: int
    num_heads: int
    hidden_size: int
    unet_base_channels: int = 64
    unet_upsample_to: int = 64  # attention grids are upsampled to at least this side
    num_views: int = 1

    @classmethod
    def for_lmm(cls, lmm: FrozenLMM) -> HeadsConfig:
        return cls(lmm.num_layers, lmm.num_heads, lmm.hidden_size, num_views=lmm.num_views)


def build_heads(config: HeadsConfig, sam: Sam) -> FLMMHeads:
    """U-Net over L·H attention channels + refiner on ``sam``'s prompt encoder / mask decoder."""
    unet = UNetMaskDecoder(
        in_channels=config.num_views * config.num_layers * config.num_heads,
        base_channels=config.unet_base_channels,
        upsample_to=config.unet_upsample_to,
    )
    return FLMMHeads(unet, build_refiner(sam, config.num_layers, config.hidden_size))


def build_flmm(
    lmm: FrozenLMM,
    sam: Sam,
    heads_checkpoint: str | Path | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> FLMM:
    """The whole model: frozen ``lmm``, frozen SAM image encoder, heads (loaded if given);
    ``autocast_dtype``: see :class:`flmm.model.FLMM`.

    Without a heads checkpoint the refiner starts from ``sam``'s own prompt encoder and mask
    decoder and the U-Net (F-LMM's width, 64) from random init, as F-LMM's training does; with
    one, the U-Net is built as wide as the checkpoint's. A localization-heads file (``.json``,
    ``flmm.localization``) builds the training-free model instead (``build_localization``).
    """
    if heads_checkpoint is not None and is_localization_file(heads_checkpoint):
        return build_localization(lmm, sam, heads_checkpoint, autocast_dtype)
    config = HeadsConfig.for_lmm(lmm)
    if heads_checkpoint is None:
        heads = build_heads(config, sam)
    else:
        state_dict, selector = read_heads_file(heads_checkpoint)
        warn_if_other_prompt(heads_checkpoint, lmm.prompt.instruction)
        base = heads_dims(state_dict)["unet_base_channels"]
        heads = build_heads(dataclasses.replace(config, unet_base_channels=base), sam)
        _load_read_heads(heads, state_dict, selector)
    return FLMM(lmm, build_image_encoder(sam), heads, autocast_dtype)


def build_localization(
    lmm: FrozenLMM,
    sam: Sam,
    path: str | Path,
    autocast_dtype: torch.dtype | None = None,
) -> FLMM:
    """The training-free model: frozen ``lmm`` capturing only the file's chosen heads, frozen
    SAM (image encoder, prompt encoder, mask decoder). ValueError when the file was found on an
    LMM of other dimensions (layers, heads, views)."""
    config, _ = read_localization(path)
    found = (config.num_layers, config.num_heads, config.num_views)
    have = (lmm.num_layers, lmm.num_heads, lmm.num_views)
    if found != have:
        raise ValueError(
            f"{Path(path).name} was found on an LMM of {found[0]} layers x {found[1]} heads x "
            f"{found[2]} view(s); this LMM has {have[0]} x {have[1]} x {have[2]}"
        )
    warn_if_other_prompt(path, lmm.prompt.instruction)
    lmm.capture_heads = config.heads
    heads = LocalizationHeads(
        config, sam.prompt_encoder, sam.mask_decoder, sam.image_encoder.img_size
    )
    return FLMM(lmm, build_image_encoder(sam), heads, autocast_dtype)


def heads_prompt(path: str | Path) -> str | None:
    """The instruction heads were found or trained under: a ``.safetensors`` file's ``prompt``
    metadata, a localization-heads file's ``prompt`` (None if it does not say), F-LMM's for a
    release ``.pth``."""
    if is_localization_file(path):
        return read_localization(path)[1].get(PROMPT_KEY)
    if Path(path).suffix == ".safetensors":
        return read_metadata(path).get(PROMPT_KEY)
    return FLMM_INSTRUCTION


def warn_if_other_prompt(path: str | Path, instruction: str) -> None:
    """A warning when the heads at ``path`` were trained under another instruction than the
    LMM's prompt now uses (their attention maps are then off the heads' training distribution)."""
    trained = heads_prompt(path)
    if trained is not None and trained != instruction:
        warnings.warn(
            f"the heads {Path(path).name} were trained with the instruction {trained!r}, the LMM "
            f"is prompted with {instruction!r}: give --prompt {trained!r} to match",
            stacklevel=2,
        )


def read_heads_file(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], KeywordSelector | None]:
    """A heads checkpoint → (the heads' tensors under our keys, its keyword selector or None):
    our ``.safetensors`` as stored (the heads' keys, the selector's ``selector.*`` and its
    metadata), or an F-LMM release ``.pth`` converted (``flmm.convert``; no selector). A
    localization-heads file holds no tensors: ValueError."""
    if is_localization_file(path):
        raise ValueError(
            f"{path} is a localization-heads file (training-free grounding, no trained tensors): "
            "give a trained heads .safetensors or an F-LMM release .pth"
        )
    state_dict = read_state_dict(path)
    if Path(path).suffix == ".safetensors":
        return split_selector(state_dict, read_metadata(path))
    return split_selector(convert_flmm_state_dict(state_dict))


def load_heads(heads: FLMMHeads, path: str | Path) -> None:
    """Load a heads checkpoint into ``heads`` (every key and shape must match exactly). A
    keyword selector in the file replaces ``heads.selector`` (config and weights); a file
    without one leaves ``heads.selector`` as it is (None, or a fresh one to be trained)."""
    _load_read_heads(heads, *read_heads_file(path))


def _load_read_heads(
    heads: FLMMHeads, state_dict: dict[str, torch.Tensor], selector: KeywordSelector | None
) -> None:
    """``load_heads`` for a file already read (``read_heads_file``). SAM buffers the file lacks
    (an F-LMM release saved with trainable parameters only) keep the values ``heads`` holds, those
    of the SAM it was built from, with a warning (``jobs/convert.py --sam-checkpoint`` fills them
    once, from the SAM checkpoint)."""
    filled = list(missing_sam_buffers(state_dict))
    if filled:
        own = heads.state_dict()
        state_dict = {**state_dict, **{key: own[key] for key in filled}}
        warnings.warn(
            f"the heads file lacks SAM's {', '.join(filled)}: kept the one of the SAM the heads "
            "were built from",
            stacklevel=3,
        )
    if selector is not None:
        heads.selector = selector
    if heads.selector is not None:
        state_dict = {**state_dict, **selector_state(heads.selector)}
    load_state(heads, state_dict)


# --------------------------------------------------------------------------------------------
# Tiny LLaVA checkpoints (real classes; written by flmm.tiny_llava.write_tiny_llava)
# --------------------------------------------------------------------------------------------

TINY_LLAVA_VARIANTS: dict[str, TinyLlavaConfig] = {
    # Unit tests: 4×4 image-token grid, 2 layers × 4 heads (GQA 2 kv heads), hidden 64.
    "tiny": TinyLlavaConfig(
        image_size=56,
        patch_size=14,
        vision_hidden=32,
        vision_layers=2,
        vision_heads=2,
        text_hidden=64,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
        text_intermediate=128,
        vocab_size=400,
    ),
    # LLaVA-1.5's sequence shape (24×24 = 576 image tokens) at CPU size, for capture benchmarks.
    "bench-576": TinyLlavaConfig(
        image_size=336,
        patch_size=14,
        vision_hidden=32,
        vision_layers=2,
        vision_heads=2,
        text_hidden=1024,
        text_layers=8,
        text_heads=16,
        text_kv_heads=16,
        text_intermediate=2816,
        vocab_size=400,
    ),
    # LLaVA-1.5-7B's shapes: Llama-2-7B text (vocabulary padded to 32064 rows, as llava-hf's) and
    # CLIP ViT-L/14-336 vision, 576 image tokens. For bench/gpu.py with random weights, built in
    # memory on the GPU (never written); the tokenizer is still trained in process, on a corpus.
    "llava-1.5-7b": TinyLlavaConfig(
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
        vision_intermediate=4096,
        text_hidden=4096,
        text_layers=32,
        text_heads=32,
        text_kv_heads=32,
        text_intermediate=11008,
        vocab_size=400,
        embedding_rows=32064,
        max_positions=4096,
    ),
    # Toy world (toyworld/lmm.py pretrains it; shipped at models/toy/llava): 12x12 image tokens
    # (168 px / patch 14; an 8x8 grid left small objects a cell or less), 4 layers x 4 heads =
    # 16 attention channels, every world word one token.
    "toy": TinyLlavaConfig(
        image_size=168,
        patch_size=14,
        vision_hidden=128,
        vision_layers=4,
        vision_heads=4,
        text_hidden=128,
        text_layers=4,
        text_heads=4,
        text_kv_heads=4,
        text_intermediate=384,
        vocab_size=320,
    ),
}
