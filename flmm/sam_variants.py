"""The SAM variants (paper: Mask Refiner): one frozen dataclass of hyperparameters per variant and
the registry of named variants, apart from ``flmm.build``'s builders so that code which only
names or checks a variant (a job's driver, ``pipeline.spec.ModelSpec``) imports no model code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamConfig:
    """Hyperparameters of one SAM variant. Defaults are the values shared by vit_h/l/b."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    encoder_window_size: int = 14
    encoder_mlp_ratio: float = 4.0
    encoder_norm_eps: float = 1e-6
    encoder_use_rel_pos: bool = True
    img_size: int = 1024  # S: side of SAM's square input frame
    vit_patch_size: int = 16
    prompt_embed_dim: int = 256  # C: channels of image embedding and prompt tokens
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    @property
    def image_embedding_size(self) -> int:
        """Side of the image embedding grid, S / patch (64 for real SAM)."""
        return self.img_size // self.vit_patch_size


SAM_VARIANTS: dict[str, SamConfig] = {
    "vit_h": SamConfig(
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
    "vit_l": SamConfig(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_b": SamConfig(
        encoder_embed_dim=768,
        encoder_depth=12,
        encoder_num_heads=12,
        encoder_global_attn_indexes=(2, 5, 8, 11),
    ),
    # For tests: real classes, 128 px input, 8x8 embedding grid; builds and runs in milliseconds.
    "tiny": SamConfig(
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        encoder_window_size=4,
        img_size=128,
        prompt_embed_dim=32,
        # 16 as in real SAM: the mask path's first LayerNorm2d has mask_in_chans // 4 channels,
        # and over a single channel it outputs zeros (no dense prompt, no gradient).
        mask_in_chans=16,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    ),
    # Toy world (toyworld/sam.py pretrains it; shipped at models/toy/sam.safetensors): scenes are
    # 96-256 px, so a 256 px frame keeps them at scale; 16x16 embedding, 64x64 low-res masks.
    "toy": SamConfig(
        encoder_embed_dim=96,
        encoder_depth=6,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(5,),
        encoder_window_size=8,
        img_size=256,
        prompt_embed_dim=128,
        mask_in_chans=16,
        decoder_mlp_dim=256,
        decoder_num_heads=4,
        iou_head_hidden_dim=128,
    ),
}


def sam_config(name: str) -> SamConfig:
    """Return the SAM variant ``name``; KeyError lists the known variants."""
    if name not in SAM_VARIANTS:
        raise KeyError(f"unknown SAM variant {name!r}; known variants: {sorted(SAM_VARIANTS)}")
    return SAM_VARIANTS[name]
