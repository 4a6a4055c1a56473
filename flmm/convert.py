"""Convert F-LMM's released checkpoints to this package's parameter names, and back.

The trainable heads of F-LMM §3 (Method), "Visual Grounding with Mask Head" — the U-Net "Mask
Decoder" and the SAM-based "Mask Refiner" with its text projection — are stored by the paper's
release under mmseg / segment-anything wrapper names. :data:`KEY_TABLE` lists every accepted key
pattern on their side next to ours; both directions use the same table, a key that no row matches
is an error, and SAM's image encoder (loaded from the SAM checkpoint instead) is dropped and
reported.

A release may also lack SAM's buffer (F-LMM can save trainable parameters only): :data:`SAM_BUFFERS`
names where a segment-anything SAM checkpoint holds it. And a release does not say which LMM its
heads were trained on: :func:`release_shape` works the views, layers and heads out of the U-Net's
input channels, from the LMM's config, its family, or (with neither) the head dim F-LMM's LMMs share.

Placeholders in the patterns: ``{i}``, ``{j}`` any index; ``{s}`` a downsampling encoder stage
(index >= 1, whose index 0 in F-LMM's ``nn.Sequential`` is the parameter-free MaxPool); ``{p}``
``weight`` or ``bias``; ``{rest}`` any dotted remainder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from flmm.families import family_for

# (F-LMM release key, our key); ``None`` on our side means "dropped on conversion".
KEY_TABLE: tuple[tuple[str, str | None], ...] = (
    # U-Net mask decoder: encoder stage 0 (no MaxPool in front, so their block sits at index 0).
    ("mask_head.encoder.0.0.convs.{j}.conv.weight", "mask_decoder.encoder.0.convs.{j}.conv.weight"),
    ("mask_head.encoder.0.0.convs.{j}.gn.{p}", "mask_decoder.encoder.0.convs.{j}.norm.{p}"),
    # Encoder stages >= 1: their index 0 is the MaxPool, the block is index 1.
    (
        "mask_head.encoder.{s}.1.convs.{j}.conv.weight",
        "mask_decoder.encoder.{s}.convs.{j}.conv.weight",
    ),
    ("mask_head.encoder.{s}.1.convs.{j}.gn.{p}", "mask_decoder.encoder.{s}.convs.{j}.norm.{p}"),
    # Decoder levels: fuse convs, then the 1×1 conv after the ×2 upsample.
    (
        "mask_head.decoder.{i}.conv_block.convs.{j}.conv.weight",
        "mask_decoder.decoder.{i}.convs.{j}.conv.weight",
    ),
    (
        "mask_head.decoder.{i}.conv_block.convs.{j}.gn.{p}",
        "mask_decoder.decoder.{i}.convs.{j}.norm.{p}",
    ),
    (
        "mask_head.decoder.{i}.upsample.interp_upsample.1.conv.weight",
        "mask_decoder.decoder.{i}.up.conv.weight",
    ),
    (
        "mask_head.decoder.{i}.upsample.interp_upsample.1.gn.{p}",
        "mask_decoder.decoder.{i}.up.norm.{p}",
    ),
    ("mask_head.conv_seg.{p}", "mask_decoder.conv_seg.{p}"),
    # Mask refiner: text-embedding path and SAM's prompt encoder / mask decoder.
    ("text_layer_weights", "refiner.text_layer_weights"),
    ("text_proj.{p}", "refiner.text_proj.{p}"),
    ("sam.model.prompt_encoder.{rest}", "refiner.prompt_encoder.{rest}"),
    ("sam.model.mask_decoder.{rest}", "refiner.mask_decoder.{rest}"),
    # SAM's image encoder comes from the SAM checkpoint, not from F-LMM's.
    ("sam.model.image_encoder.{rest}", None),
)

_PLACEHOLDERS = {"i": r"\d+", "j": r"\d+", "s": r"[1-9]\d*", "p": "weight|bias", "rest": r".+"}
_CHECKPOINT_WRAPPERS = ("state_dict", "model")


@dataclass(frozen=True)
class Conversion:
    """Result of a conversion: the renamed tensors and the source keys that were dropped."""

    state_dict: dict[str, Tensor]
    dropped: list[str] = field(default_factory=list)


def _compile(template: str) -> re.Pattern[str]:
    """Turn a table template such as ``a.{i}.b.{p}`` into an anchored regex with named groups."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(
        re.escape(part) if n % 2 == 0 else f"(?P<{part}>{_PLACEHOLDERS[part]})"
        for n, part in enumerate(parts)
    )
    return re.compile(regex)


_Rules = list[tuple[re.Pattern[str], str | None]]  # (pattern on the source side, target template)

_THEIRS: _Rules = [(_compile(theirs), ours) for theirs, ours in KEY_TABLE]
_OURS: _Rules = [(_compile(ours), theirs) for theirs, ours in KEY_TABLE if ours is not None]


def _rename(key: str, rules: _Rules) -> tuple[bool, str | None]:
    """Map ``key`` through the one rule that matches it.

    Returns (matched, new_key); new_key is None for a matched key that is dropped.
    """
    hits = [(m, target) for pattern, target in rules if (m := pattern.fullmatch(key))]
    if len(hits) > 1:
        raise RuntimeError(f"key {key!r} matches {len(hits)} rows of KEY_TABLE")
    if not hits:
        return False, None
    match, target = hits[0]
    return True, None if target is None else target.format(**match.groupdict())


def _convert(sd: Mapping[str, Tensor], rules: _Rules, direction: str) -> Conversion:
    """Rename every key of ``sd`` through ``rules``; unknown keys raise ValueError."""
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, value in sd.items():
        matched, new_key = _rename(key, rules)
        if not matched:
            unknown.append(key)
        elif new_key is None:
            dropped.append(key)
        else:
            out[new_key] = value
    if unknown:
        raise ValueError(f"{len(unknown)} keys not in the {direction} table: {sorted(unknown)}")
    return Conversion(state_dict=out, dropped=dropped)


def unwrap_checkpoint(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """Return the flat ``{name: tensor}`` dict of a checkpoint.

    Accepts a flat state dict, or one nested under "state_dict" (mmengine) or "model"; anything
    else, or a non-tensor value, raises ValueError.
    """
    for wrapper in _CHECKPOINT_WRAPPERS:
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    not_tensors = sorted(k for k, v in obj.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise ValueError(f"checkpoint entries that are not tensors: {not_tensors}")
    return dict(obj)


def convert_flmm_checkpoint(obj: Mapping[str, Any]) -> Conversion:
    """F-LMM release checkpoint (flat or wrapped) -> our keys plus the list of dropped keys.

    Tensors are passed through unchanged (same objects); only the names change.
    """
    return _convert(unwrap_checkpoint(obj), _THEIRS, "F-LMM -> ours")


def convert_flmm_state_dict(sd: Mapping[str, Any]) -> dict[str, Tensor]:
    """F-LMM release state dict (flat or wrapped) -> ``{our key: tensor}``.

    SAM image-encoder keys are dropped; use :func:`convert_flmm_checkpoint` to see which.
    """
    return convert_flmm_checkpoint(sd).state_dict


def to_flmm_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`convert_flmm_state_dict`: ``{our key: tensor}`` -> F-LMM release keys.

    Dropped keys (SAM's image encoder) cannot be restored; keys outside the table raise ValueError.
    """
    return _convert(sd, _OURS, "ours -> F-LMM").state_dict


# --------------------------------------------------------------------------------------------
# What a release leaves out: SAM's buffer, and the LMM it was trained on
# --------------------------------------------------------------------------------------------

# SAM buffers a release saved without them lacks: our key -> the key of a segment-anything SAM
# checkpoint (``sam_vit_l_0b3195.pth``) it is filled from. Fixed at SAM's init, never trained.
SAM_BUFFERS: dict[str, str] = {
    "refiner.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    ),
}


def missing_sam_buffers(state_dict: Mapping[str, Tensor]) -> dict[str, str]:
    """The rows of :data:`SAM_BUFFERS` whose buffer ``state_dict`` (our keys) lacks."""
    return {ours: sam for ours, sam in SAM_BUFFERS.items() if ours not in state_dict}


def fill_sam_buffers(state_dict: dict[str, Tensor], sam_state: Mapping[str, Tensor]) -> list[str]:
    """Copy the missing SAM buffers into ``state_dict`` from ``sam_state`` (a SAM state dict, or
    just its buffers); returns our keys filled. KeyError if ``sam_state`` lacks one."""
    missing = missing_sam_buffers(state_dict)
    for ours, sam in missing.items():
        state_dict[ours] = sam_state[sam]
    return list(missing)


# Attention head dim of every LMM of a supported family that F-LMM released heads for (Vicuna /
# LLaMA-2, Mistral, DeepSeek-LLM: 128; its MiniGemini-2B's Gemma has 256, a family not read here).
FLMM_HEAD_DIM = 128

# F-LMM's releases for supported families (its README): (release, model_type, V, L, H, D).
FLMM_RELEASES: tuple[tuple[str, str, int, int, int, int], ...] = (
    ("LLaVA-1.5-7B", "llava", 1, 32, 32, 4096),
    ("LLaVA-NeXT-Vicuna-7B / -Mistral-7B", "llava_next", 2, 32, 32, 4096),
    ("DeepSeek-VL-1.3B", "deepseek_vl", 1, 24, 16, 2048),
    ("DeepSeek-VL-7B", "deepseek_vl_hybrid", 1, 30, 32, 4096),
)


@dataclass(frozen=True)
class ReleaseShape:
    """The LMM a release's heads were trained on, as far as the heads need it: its images' tokens
    on V views, L layers × H heads per layer (the U-Net reads V·L·H channels), hidden size D; its
    family's model_type where that is known (None: the shape fits several); ``how``: how these
    were found, in words."""

    num_views: int
    num_layers: int
    num_heads: int
    hidden_size: int
    family: str | None
    how: str

    @property
    def in_channels(self) -> int:
        return self.num_views * self.num_layers * self.num_heads


def release_shape(
    dims: Mapping[str, int],
    *,
    model_type: str | None = None,
    lmm_config: Any = None,
    num_heads: int | None = None,
) -> ReleaseShape:
    """The shape of the LMM behind a release of dimensions ``dims`` (``flmm.heads.heads_dims``):
    read from ``lmm_config`` (a transformers config), or the views of ``model_type``'s family
    with H = in_channels / (V·L), or with neither H = D / :data:`FLMM_HEAD_DIM` and V =
    in_channels / (L·H). ``num_heads`` overrides H but not an LMM config's. ValueError, naming
    the numbers, when the U-Net's channels are not V·L·H or the LMM's L or D differ."""
    if lmm_config is not None:
        shape = _from_lmm_config(dims, lmm_config)
    elif model_type is not None:
        shape = _from_family(dims, model_type, num_heads)
    else:
        shape = _from_channels(dims, num_heads)
    if shape.in_channels != dims["in_channels"]:
        raise ValueError(
            f"the release's U-Net reads {dims['in_channels']} channels, not {shape.num_views} "
            f"view(s) x {shape.num_layers} layers x {shape.num_heads} heads = "
            f"{shape.in_channels} ({shape.how})"
        )
    return shape


def _from_lmm_config(dims: Mapping[str, int], config: Any) -> ReleaseShape:
    """V from the config's model_type, L, H and D from its text config (as ``FrozenLMM``)."""
    family = family_for(config.model_type)
    text = config.text_config
    L, D = text.num_hidden_layers, text.hidden_size
    if (dims["num_layers"], dims["hidden_size"]) != (L, D):
        raise ValueError(
            f"the release's heads are for {dims['num_layers']} layers of width "
            f"{dims['hidden_size']}; the {config.model_type} LMM has {L} layers of width {D}"
        )
    how = f"the LMM's config ({config.model_type}: {family.num_views} view(s))"
    return ReleaseShape(family.num_views, L, text.num_attention_heads, D, config.model_type, how)


def _from_family(dims: Mapping[str, int], model_type: str, num_heads: int | None) -> ReleaseShape:
    views, L = family_for(model_type).num_views, dims["num_layers"]
    H = num_heads or max(dims["in_channels"] // (views * L), 1)
    how = f"family {model_type} ({views} view(s)), H " + (
        "given" if num_heads else f"= channels {dims['in_channels']} / (V {views} x L {L})"
    )
    return ReleaseShape(views, L, H, dims["hidden_size"], model_type, how)


def _from_channels(dims: Mapping[str, int], num_heads: int | None) -> ReleaseShape:
    """V = in_channels / (L·H), H = D / 128 unless given; the family where V names one."""
    C, L, D = dims["in_channels"], dims["num_layers"], dims["hidden_size"]
    if not num_heads and D % FLMM_HEAD_DIM:
        raise ValueError(
            f"the release's hidden size D {D} is not a multiple of {FLMM_HEAD_DIM}, the head dim of "
            "F-LMM's LMMs: its heads per layer are not known"
        )
    H = num_heads or D // FLMM_HEAD_DIM
    views = max(round(C / (L * H)), 1)
    how = "the release: H " + ("given" if num_heads else f"= D {D} / head dim {FLMM_HEAD_DIM}")
    how += f", V = channels {C} / (L {L} x H {H})"
    families = sorted({r[1] for r in releases_of(views)})
    if not families:
        raise ValueError(f"{how} = {C / (L * H):g}: F-LMM's heads read 1 or 2 views")
    family = families[0] if len(families) == 1 else None
    return ReleaseShape(views, L, H, D, family, how)


def releases_of(num_views: int) -> list[tuple[str, str, int, int, int, int]]:
    """F-LMM's releases of ``num_views`` views (a shape alone cannot tell their families apart)."""
    return [r for r in FLMM_RELEASES if r[2] == num_views]


def read_lmm_config(name_or_path: str) -> Any:
    """The transformers config of a local LMM directory or a hub id already in the cache (nothing
    downloaded, no remote code); ValueError for a model_type no family reads."""
    from transformers import AutoConfig, PretrainedConfig

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name_or_path, local_files_only=True)
    except OSError as error:
        raise OSError(
            f"no config of the LMM {name_or_path!r} here: not a local directory nor in the Hugging "
            "Face cache (nothing is downloaded)"
        ) from error
    family_for(config_dict.get("model_type", "(none)"))
    return AutoConfig.from_pretrained(name_or_path, local_files_only=True, trust_remote_code=False)
