"""Word→image attention capture without S×S matrices (F-LMM §3.1, "attention maps as priors").

F-LMM reads the frozen LMM's attention weights from every layer and head, for the phrase tokens
(queries) over the image tokens (keys). Asking transformers for ``output_attentions`` forces eager
attention and materialises a ``[B, H, S, S]`` matrix per layer. Here a custom attention function
(registered in transformers' ``AttentionInterface``) computes the layer output with stock sdpa and,
in the same call, the softmax rows of only the requested query positions:

    scores[b, h, q, :] = query[b, h, qpos[b, q]] · key[b, h // G, :]ᵀ · scaling      (full key row)
    probs = softmax(scores + mask row)            (causal + padding, exactly as the layer sees it)
    kept  = probs[..., image positions]           → [B, H, Q, N]

The request travels as the ``flmm_capture`` keyword of ``model(...)``, which transformers hands down
to every attention call of the language model; the vision tower never receives it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "flmm_capture"


class AttentionCapture:
    """One forward's capture request and its results.

    Args:
        query_index: ``[B, Q]`` long, sequence positions whose attention rows are kept (padded
            slots may point anywhere; callers ignore them).
        key_index: ``[B, N]`` long, sequence positions of the image tokens (columns kept).
        heads: None (every head of every layer), or the (layer, head) pairs to keep: the other
            layers compute nothing beyond their stock attention, the kept layers only the
            kept heads' rows (training-free grounding reads a few heads, ``flmm.localization``).

    After the forward, ``maps[layer]`` is ``[B, H, Q, N]`` softmax probabilities (with
    ``heads``: ``[B, H_l, Q, N]``, that layer's kept heads in the order given), computed in
    float32 and kept in the layer's dtype (bfloat16 for a bf16 LMM: half of float32's memory;
    with every text token of a caption captured these rows are most of a prefill's memory).
    """

    def __init__(
        self,
        query_index: torch.Tensor,
        key_index: torch.Tensor,
        heads: tuple[tuple[int, int], ...] | None = None,
    ):
        self.query_index = query_index
        self.key_index = key_index
        self.heads = heads
        self.layer_heads: dict[int, list[int]] | None = None
        if heads is not None:
            self.layer_heads = {}
            for layer, head in heads:
                self.layer_heads.setdefault(layer, []).append(head)
        self.maps: dict[int, torch.Tensor] = {}

    def stacked(self) -> torch.Tensor:
        """``[B, L, H, Q, N]``: the captured maps of all layers, in layer order; with ``heads``,
        ``[B, 1, K, Q, N]``: the K kept heads as one pseudo-layer, in the order given. Moves the
        maps out of ``maps`` (left empty) one layer at a time, so the peak is one layer above
        the maps themselves, not twice them."""
        if self.heads is None:
            layers = sorted(self.maps)
            first = self.maps[layers[0]]
            out = first.new_empty((first.shape[0], len(layers), *first.shape[1:]))
            for i, layer in enumerate(layers):
                out[:, i] = self.maps.pop(layer)
            return out
        taken = {layer: 0 for layer in self.maps}
        rows = []
        for layer, _ in self.heads:
            rows.append(self.maps[layer][:, taken[layer]])
            taken[layer] += 1
        self.maps.clear()
        return torch.stack(rows, dim=1)[:, None]

    def record(self, layer_idx, query, key, attention_mask, scaling) -> None:
        """query ``[B, Hq, S, D]`` (post-RoPE), key ``[B, Hkv, S, D]`` (before GQA repeat)."""
        bsz, n_heads, _, dim = query.shape
        n_kv = key.shape[1]
        group = n_heads // n_kv
        qi = self.query_index.to(query.device)
        n_q = qi.shape[1]
        if self.layer_heads is not None:
            if layer_idx not in self.layer_heads:
                return
            kept = torch.tensor(self.layer_heads[layer_idx], device=query.device)
            query = query.index_select(1, kept)
            # head h reads kv head h // G (transformers' repeat_kv order): one kv row per head
            key = key.index_select(1, kept // group)
            n_heads, n_kv, group = len(kept), len(kept), 1
        q = query.gather(2, qi[:, None, :, None].expand(bsz, n_heads, n_q, dim)).float()
        # grouped-query attention: head h reads kv head h // G (transformers' repeat_kv order)
        q = q.view(bsz, n_kv, group, n_q, dim)
        scale = scaling if scaling is not None else dim**-0.5
        scores = (q @ key.float()[:, :, None].transpose(-1, -2)) * scale
        scores = scores.view(bsz, n_heads, n_q, -1) + self._mask_rows(attention_mask, qi, scores)
        probs = scores.softmax(dim=-1)
        ki = self.key_index.to(query.device)
        kept = probs.gather(3, ki[:, None, None, :].expand(-1, n_heads, n_q, -1))
        self.maps[layer_idx] = kept.to(query.dtype)

    @staticmethod
    def _mask_rows(attention_mask, qi, scores) -> torch.Tensor:
        """Additive ``[B, 1, Q, S]`` mask rows for the captured queries."""
        bsz, n_q = qi.shape
        kv_len = scores.shape[-1]
        if attention_mask is None:  # sdpa skipped the mask: plain causal, no padding
            keys = torch.arange(kv_len, device=qi.device)
            allowed = keys[None, None, None, :] <= qi[:, None, :, None]
        else:
            rows = attention_mask.gather(2, qi[:, None, :, None].expand(bsz, 1, n_q, kv_len))
            if rows.dtype != torch.bool:
                return rows.float()
            allowed = rows
        zero = torch.zeros((), device=qi.device)
        return torch.where(allowed, zero, torch.tensor(float("-inf"), device=qi.device))


def capture_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """sdpa attention that also fills ``kwargs["flmm_capture"]`` (if given) for this layer."""
    capture: AttentionCapture | None = kwargs.pop("flmm_capture", None)
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if capture is not None:
        capture.record(module.layer_idx, query, key, attention_mask, kwargs.get("scaling"))
    return out


def register() -> str:
    """Register the capture attention (and its mask builder, sdpa's) with transformers."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, capture_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
