"""Convert F-LMM's released checkpoints to this package's parameter names, and back.

The trainable heads of F-LMM §3 (Method), "Visual Grounding with Mask Head" — the U-Net "Mask
Decoder" and the SAM-based "Mask Refiner" with its text projection — are stored by the paper's
release under mmseg / segment-anything wrapper names. :data:`KEY_TABLE` lists every accepted key
pattern on their side next to ours; both directions use the same table, a key that no row matches
is an error, and SAM's image encoder (loaded from the SAM checkpoint instead) is dropped and
reported.

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
