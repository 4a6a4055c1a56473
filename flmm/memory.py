"""The memory plan: bytes a batch of B images needs, estimated from configs alone.

Nothing is loaded: the model's shapes come from its configs (``flmm.shapes``: the LMM, SAM and
the heads built on the ``meta`` device, the processor run on a blank image of the planned size).

    peak(B) = weights + max over stages of activations(stage, B)

Weights are held once (LMM in its dtype, SAM and heads in float32). A stage's activations are
the tensors live at its peak: what earlier stages left (``inputs``, the LMM's outputs) plus the
stage's own working set. The stages are the model stage's (``pipeline.grounding``'s clock):

    generate  a greedy generation before grounding (descriptions, questions, LMM proposals):
              KV cache + one prefill without capture
    lmm       the grounding prefill(s): captured rows ``[B, L, H, Q, N]``, hidden rows
              ``[B, Q, L, D]``, one decoder layer's working set; merged maps ``[P, V·L·H, h, w]``
    sam       SAM's image encoder over the batch: a global-attention block ``[B·heads, n, n]``
    heads     the U-Net over all ``B·P`` phrases, the refiner over one image's ``P``, and the
              outputs ``coarse`` / ``refined`` ``[P, 1, H, W]`` of the images done

Every term is written as the tensors it counts (shapes in its docstring or comment); the counts of
copies live at once follow the code (``flmm.capture``, ``flmm.mask_decoder``, SAM's modules)
and are checked against measured peaks: ``flmm.peak``, ``tests/test_memory.py``,
``bench/NOTES.md``. SAM and the heads are counted in float32 also under bf16 autocast (an upper
bound: softmax and norms run in float32 there anyway).
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (annotations only: the plan's arithmetic imports no model code)
    from flmm.sam_variants import SamConfig
    from flmm.shapes import HeadsShape, LMMShape, VisionTower

F32 = 4  # bytes of a float32


# --------------------------------------------------------------------------------------------
# The workload (what each image asks) and the estimate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What each image of a batch asks. phrases: P grounded per image, of phrase_tokens tokens
    each; text_tokens: a text whose every token is captured in its own prefill (a caption, a
    description, an answer; 0: none), its phrases then grounded in a second prefill when
    ``listed``; new_tokens: tokens generated per image before grounding (0: no generation),
    from a prompt of prompt_extra tokens more than the grounding prompt (an instruction, a
    caption to propose from); image_size: (H, W) of the original images (the outputs' frame)."""

    phrases: int = 8
    phrase_tokens: int = 4
    text_tokens: int = 0
    listed: bool = True
    new_tokens: int = 0
    prompt_extra: int = 0
    image_size: tuple[int, int] = (1024, 1024)


@dataclass(frozen=True)
class Estimate:
    """Bytes of a batch of ``batch`` images: weights (held once) and, per stage, its terms
    (name → bytes) live at its peak; ``peak`` is weights + the largest stage's sum."""

    batch: int
    weights: int
    terms: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def stages(self) -> dict[str, int]:
        return {stage: sum(terms.values()) for stage, terms in self.terms.items()}

    @property
    def activations(self) -> int:
        return max(self.stages.values())

    @property
    def peak(self) -> int:
        return self.weights + self.activations


# --------------------------------------------------------------------------------------------
# Terms, stage by stage (bytes; B images, s = the LMM's dtype bytes)
# --------------------------------------------------------------------------------------------


def inputs_terms(lmm: LMMShape, heads: HeadsShape, batch: int) -> dict[str, int]:
    """Held through the whole batch: the LMM's image tensors (``pixel_values`` and the like, in
    its dtype) and SAM's prepared ``[B, 3, S, S]`` float32 pixels."""
    side = heads.sam.img_size
    return {
        "lmm_pixels": batch * lmm.pixel_bytes,
        "sam_pixels": batch * 3 * side * side * F32,
    }


def tower_bytes(tower: VisionTower, batch: int, s: int) -> int:
    """One vision tower's working set over B images: its layers' outputs ``[B, n, Dv]`` (all
    of them when it keeps them, else input and output) and the larger of an MLP's
    ``[B, n, Iv]`` ×2 + ``[B, n, Dv]`` ×3 and, for materialised global attention, its
    ``[B, heads, n, n]`` ×2 (the relative-position bias and the sum it is built from, handed to
    sdpa) beside the block's ``[B, n, Dv]`` ×8 (input, norm, qkv and its head-major copy)."""
    n = batch * tower.tokens
    kept = (tower.layers + 1) if tower.keeps_hidden else 2
    work = n * (2 * tower.intermediate + 3 * tower.hidden) * s
    attention = (2 * batch * tower.global_heads * tower.tokens**2 + 8 * n * tower.hidden) * s
    return n * tower.hidden * kept * s + max(work, attention * (tower.global_heads > 0))


def prefill_terms(
    lmm: LMMShape, batch: int, queries: int, tokens: int, phrases: int = 0
) -> dict[str, int]:
    """One prefill of B sequences of T ``tokens`` whose Q ``queries`` are captured (Q = 0: a
    generation's prefill, nothing captured). Held: the batch's image tensors (concatenated), the
    projected image features ``[B, N, D]``, the sequence ``[B, T, D]`` ×4 (embeddings, residual,
    layer output, norm), the mask ``[B, T, T]`` bool, the captured rows
    ``[B, L, H, Q, N]`` and hidden rows ``[B, Q, L, D]`` (all layers': the peak is the last);
    plus the larger working set of a decoder layer: its MLP ``[B, T, I]`` ×3 + ``[B, T, D]``, or
    its attention (q, k, v, roped copies, output) with the capture's float32
    ``[B, H, Q, T]`` ×2 (scores, softmax), mask rows ``[B, Q, T]``, keys ``[B, kv, T, hd]``
    and kept rows ``[B, H, Q, N]``; or, before the first layer, the vision towers; or, after the
    last, merging the ``phrases``' maps (``lmm_out_terms``' ``maps`` ×2: stacked, normalised)."""
    s, b, t, q, n = lmm.dtype_bytes, batch, tokens, queries, lmm.image_tokens
    per_layer = lmm.captured // lmm.layers
    kv = lmm.kv_heads * lmm.head_dim
    mlp = b * t * (3 * lmm.intermediate + lmm.hidden) * s
    attention = b * t * (3 * lmm.hidden + 3 * kv) * s
    if q:
        attention += b * per_layer * q * (2 * t + n + lmm.head_dim) * F32 + b * q * t * F32
        attention += b * kv * t * F32 * (s != F32)
    layer = max(mlp, attention)
    towers = sum(tower_bytes(tower, b, s) for tower in lmm.towers)
    merged = 2 * lmm_out_terms(lmm, b, q, phrases)["maps"]
    return {
        "lmm_batch": b * lmm.pixel_bytes,
        "image_features": b * n * lmm.hidden * s,
        "sequence": 4 * b * t * lmm.hidden * s,
        "mask": b * t * t,
        "captured_rows": b * lmm.captured * q * n * s,
        "hidden_rows": b * q * lmm.layers * lmm.hidden * s,
        "layer_towers_or_merge": max(layer, towers, merged),
    }


def lmm_out_terms(lmm: LMMShape, batch: int, queries: int, phrases: int) -> dict[str, int]:
    """What a grounding prefill leaves for SAM and the heads: the captured rows
    ``[B, L, H, Q, N]`` (s), the query tokens' hidden states ``[B, Q, L, D]`` (s) and each
    image's merged maps ``[P, V·L·H, h, w]`` float32."""
    s, h, w = lmm.dtype_bytes, *lmm.grid
    return {
        "captured_rows": batch * lmm.captured * queries * lmm.image_tokens * s,
        "hidden_rows": batch * queries * lmm.layers * lmm.hidden * s,
        "maps": batch * phrases * lmm.views * lmm.captured * h * w * F32,
    }


def sam_encoder_bytes(sam: SamConfig, batch: int) -> int:
    """SAM's ViT over B images, n = g² tokens (g = S / patch) of width E, float32: the larger of
    a global-attention block (``[B·heads, n, n]`` ×3: scores, scores + relative-position terms
    added one by one; their ``[B·heads, n, g]`` ×2; the block's input, norm and qkv
    ``[B, n, E·(1 + 1 + 3)]``), a windowed one (the same over ``[B·windows·heads, w², w²]``)
    and an MLP (``[B, n, E]`` ×2 + ``[B, n, mlp·E]`` ×2)."""
    g, e, heads = sam.image_embedding_size, sam.encoder_embed_dim, sam.encoder_num_heads
    n, w = g * g, sam.encoder_window_size
    windows = math.ceil(g / w) ** 2
    tokens = n * e * (5 + 3 * (batch > 1))  # (qkv's head-major copy is a view at B = 1)
    global_ = 3 * heads * n * n + 2 * heads * n * g + tokens
    windowed = windows * (3 * heads * w**4 + 2 * heads * w**3) + tokens * windows * w * w // n
    mlp = n * e * (2 + 2 * int(sam.encoder_mlp_ratio))
    return batch * max(global_, windowed, mlp) * F32


def unet_bytes(lmm: LMMShape, heads: HeadsShape, phrases: int) -> int:
    """The U-Net over ``phrases`` maps ``[V·L·H, h, w]`` float32 (C_in channels), upsampled to
    H' × W' (long side ``upsample_to``) and padded to A = Hp × Wp: the batch's maps
    ``[P, C_in, h, w]`` (concatenated, held throughout) and the largest of normalised +
    upsampled maps (``[P, C_in, h, w]`` + ``[P, C_in, H', W']``, preparing), upsampled + padded
    (padding), and the input ``[P, C_in, A]`` beside the last decoder level's working set: the
    skips ``[P, c·2^i, A / 4^i]`` (c·A·(2 - 2^(1-stages))), the deeper input ``c·A / 2``,
    upsampled, normalised and concatenated ``c·A·(1 + 1 + 2)``, a conv unit's ``c·A`` ×3."""
    if heads.unet_base is None:
        return 0
    c_in, (h, w) = lmm.views * lmm.captured, lmm.grid
    scale = max(1.0, heads.unet_upsample_to / max(h, w))
    up_h, up_w = math.floor(h * scale), math.floor(w * scale)
    multiple = 2 ** (heads.unet_stages - 1)
    area = math.ceil(up_h / multiple) * multiple * math.ceil(up_w / multiple) * multiple
    skips = 2 - 2 ** (1 - heads.unet_stages)
    decoder = heads.unet_base * area * (skips + 0.5 + 4 + 3)
    upsampled, padded = c_in * up_h * up_w, c_in * area * (area != up_h * up_w)
    prepare = max(c_in * h * w + upsampled, upsampled + padded, c_in * area + decoder)
    return int(phrases * F32 * (c_in * h * w + prepare))


def refiner_bytes(heads: HeadsShape, phrases: int, image_size: tuple[int, int]) -> int:
    """SAM's prompt encoder + mask decoder over one image's P phrases (per phrase, float32): its
    ``coarse`` logits ``[H, W]`` held, and the largest of the two-way transformer's image-side
    tensors (dense prompt and its copy, source, positions, keys and their sum, projections,
    attention output, norms: ~9.5 × ``[C, g²]``), the box's sigmoid and mask (``[H, W]`` ×1.25),
    the dense prompt's frames (``[S, S]`` ×3.25) and the output's (``[S, S]`` + ``[H, W]``)."""
    c, g, side = heads.sam.prompt_embed_dim, heads.sam.image_embedding_size, heads.sam.img_size
    frame, square = image_size[0] * image_size[1], side * side
    work = max(9.5 * c * g * g, 1.25 * frame, 3.25 * square, square + frame)
    return int(phrases * F32 * (frame + work))


def heads_terms(
    lmm: LMMShape, heads: HeadsShape, batch: int, phrases: int, image_size: tuple[int, int]
) -> dict[str, int]:
    """SAM's embeddings ``[B, C, g, g]`` and the larger of the U-Net over all B·P phrases and
    the refiner over the last image's P with the earlier images' ``coarse`` and ``refined``
    ``[P, 1, H, W]`` float32 held."""
    c, g = heads.sam.prompt_embed_dim, heads.sam.image_embedding_size
    outputs = 2 * (batch - 1) * phrases * image_size[0] * image_size[1] * F32
    refine = refiner_bytes(heads, phrases, image_size) + outputs
    return {
        "embeddings": batch * c * g * g * F32,
        "unet_or_refiner": max(unet_bytes(lmm, heads, batch * phrases), refine),
    }


def generate_terms(lmm: LMMShape, batch: int, prompt: int, new: int) -> dict[str, int]:
    """A greedy generation of ``new`` tokens after a ``prompt``-token prefill: the larger of its
    prefill (``prefill_terms`` with nothing captured) beside the KV cache of the prompt, and
    the full cache ``[B, L, 2, kv, T + new, hd]`` with one layer's copy (the cache grows by
    concatenation) and the step's float32 logits ``[B, V]`` ×3 (logits, scores, argmax's)."""
    kv_token = batch * lmm.layers * 2 * lmm.kv_heads * lmm.head_dim * lmm.dtype_bytes
    prefill = sum(prefill_terms(lmm, batch, 0, prompt).values()) + kv_token * prompt
    last = kv_token * (prompt + new) * (1 + 1 / lmm.layers) + 3 * batch * lmm.vocab * F32
    return {"kv_cache_or_prefill": int(max(prefill, last))}


def estimate(lmm: LMMShape, heads: HeadsShape, work: Workload, batch: int) -> Estimate:
    """The memory of a batch of ``batch`` images, each asking ``work``, stage by stage."""
    b, phrases = batch, work.phrases
    inputs = inputs_terms(lmm, heads, b)
    listed_q = phrases * work.phrase_tokens
    listed_t = lmm.prompt_tokens + phrases * (work.phrase_tokens + 1)  # " p1. p2."
    terms: dict[str, dict[str, int]] = {}
    if work.new_tokens:
        prompt = lmm.prompt_tokens + work.prompt_extra
        generate = generate_terms(lmm, b, prompt, work.new_tokens)  # (before SAM's pixels)
        terms["generate"] = {"lmm_pixels": inputs["lmm_pixels"], **generate}
    if work.text_tokens:  # the text's own prefill, every token captured
        text_t = lmm.prompt_tokens + work.text_tokens + 1
        lmm_stage = prefill_terms(lmm, b, work.text_tokens, text_t, phrases)
        out = lmm_out_terms(lmm, b, work.text_tokens, phrases)
        if work.listed:  # its phrases in a second prefill, the first's outputs still held
            held = {f"text_{k}": v for k, v in out.items()}
            second = {**held, **prefill_terms(lmm, b, listed_q, listed_t, phrases)}
            lmm_stage = max(lmm_stage, second, key=lambda t: sum(t.values()))
            out = {**held, **lmm_out_terms(lmm, b, listed_q, phrases)}
    else:
        lmm_stage = prefill_terms(lmm, b, listed_q, listed_t, phrases)
        out = lmm_out_terms(lmm, b, listed_q, phrases)
    terms["lmm"] = {**inputs, **lmm_stage}
    batch_pixels = inputs["sam_pixels"]  # the batch's copy, SAM's input
    terms["sam"] = {**inputs, **out, "sam_batch": batch_pixels}
    terms["sam"]["sam_encoder"] = sam_encoder_bytes(heads.sam, b)
    terms["heads"] = {**inputs, **out, "sam_batch": batch_pixels}
    terms["heads"].update(heads_terms(lmm, heads, b, phrases, work.image_size))
    weights = lmm.bytes + heads.sam_bytes + heads.heads_bytes
    return Estimate(batch, weights, terms)


# --------------------------------------------------------------------------------------------
# The plan: free memory, and the largest batch that fits
# --------------------------------------------------------------------------------------------

GIB = 1024**3
MARGIN = 0.10  # of the free memory, kept back: allocator fragmentation, the estimate's error
RESERVE = 1 * GIB  # per actor, kept back: its CUDA context and kernels' workspaces, or on CPU
# the Python process itself (torch, transformers, Ray's worker)
MAX_BATCH = 64


@dataclass(frozen=True)
class Budget:
    """The memory one model actor may use: ``free`` bytes on its ``device`` (``"cuda"`` /
    ``"cpu"``), as ``source`` says they were found; ``usable`` keeps ``MARGIN`` and ``RESERVE``
    back."""

    device: str
    free: int
    source: str

    @property
    def usable(self) -> int:
        return max(0, int(self.free * (1 - MARGIN)) - RESERVE)


def free_bytes(device: str, index: int = 0) -> int:
    """Free memory now: CPU ``MemAvailable`` (``/proc/meminfo``); CUDA device ``index``'s free
    bytes (``torch.cuda.mem_get_info``), read in a child process, so that the caller holds no
    CUDA context on the device its actors will use."""
    if device == "cpu":
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        raise OSError("/proc/meminfo has no MemAvailable")
    code = f"import torch; print(torch.cuda.mem_get_info({index})[0])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise OSError(f"cannot read CUDA memory: {run.stderr.strip().splitlines()[-1:]}")
    return int(run.stdout.split()[-1])


def fits(lmm: LMMShape, heads: HeadsShape, work: Workload, batch: int, budget: Budget) -> bool:
    """Whether the estimate of a batch of ``batch`` images is within the budget's usable bytes."""
    return estimate(lmm, heads, work, batch).peak <= budget.usable


def largest_batch(
    lmm: LMMShape, heads: HeadsShape, work: Workload, budget: Budget, cap: int = MAX_BATCH
) -> int:
    """The largest batch size up to ``cap`` whose estimate fits the budget (the estimate grows
    with the batch); 0 when not even one image fits."""
    batch = 0
    while batch < cap and fits(lmm, heads, work, batch + 1, budget):
        batch += 1
    return batch


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def describe(est: Estimate, budget: Budget | None = None) -> str:
    """One line: the batch, its peak (weights + its largest stage) and the budget."""
    stage = max(est.stages, key=est.stages.get)
    line = (
        f"batch {est.batch}: {gib(est.peak)} by the estimate (weights {gib(est.weights)} + "
        f"{stage} {gib(est.activations)})"
    )
    if budget is not None:
        line += f"; {gib(budget.usable)} usable of {gib(budget.free)} free ({budget.source})"
    return line
