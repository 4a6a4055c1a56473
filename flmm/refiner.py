"""SAM-based mask refiner of F-LMM (trainable).

Paper, Method: "Visual Grounding with Mask Head", Mask Refiner. The U-Net's coarse mask logits
become SAM prompts, and SAM's prompt encoder + mask decoder (both trainable) predict refined
logits on top of the frozen image embedding:
  * dense prompt: the coarse logits, mapped into the SAM input frame;
  * box prompt: the tight box around ``sigmoid(coarse) > 0.5``;
  * text prompt: the phrase tokens' LMM hidden states, a learned softmax mix over layers
    projected to SAM's prompt dim, appended to the box's two sparse tokens.

Frames (see :mod:`flmm.sam`): original frame H x W; SAM input frame S x S (resized to h1 x w1,
padded bottom/right); embedding frame He x We = S/16 x S/16; mask-input frame 4He x 4We.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

# ---------------------------------------------------------------------------------------------
# Prompt helpers (pure functions)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def mask_logits_to_boxes(logits: torch.Tensor) -> torch.Tensor:
    """Tight boxes around ``sigmoid(logits) > 0.5``; a non-differentiable selection.

    Args:
        logits: [P, 1, H, W] mask logits, original frame.
    Returns:
        float32 [P, 4] XYXY pixels, original frame: x1, y1 = first foreground column/row,
        x2, y2 = last foreground column/row + 1. An empty mask gives the full box (0, 0, W, H).
    """
    fg = torch.sigmoid(logits.detach().float())[:, 0] > 0.5  # [P, H, W]
    h, w = fg.shape[-2:]
    rows, cols = fg.any(dim=2), fg.any(dim=1)  # [P, H], [P, W]
    y1 = rows.float().argmax(dim=1)
    y2 = h - rows.flip(1).float().argmax(dim=1)
    x1 = cols.float().argmax(dim=1)
    x2 = w - cols.flip(1).float().argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    full = torch.tensor([0.0, 0.0, w, h], device=boxes.device)
    return torch.where(rows.any(dim=1, keepdim=True), boxes, full)


def pad_to_input_frame(
    logits: torch.Tensor, input_size: tuple[int, int], image_size: int
) -> torch.Tensor:
    """Map coarse logits from the original frame into the SAM input frame.

    Args:
        logits: [P, 1, H, W] mask logits, original frame.
        input_size: (h1, w1), the resized image size in the SAM input frame.
        image_size: S.
    Returns:
        [P, 1, S, S] logits, SAM input frame: bilinearly resized to (h1, w1) and padded
        bottom/right with each phrase's ``min(-1, min logit)`` (a constant: no gradient).
    """
    h1, w1 = input_size
    resized = F.interpolate(logits, (h1, w1), mode="bilinear", align_corners=False)
    pad_value = logits.detach().amin(dim=(1, 2, 3)).clamp(max=-1.0).view(-1, 1, 1, 1)
    padded = F.pad(resized, (0, image_size - w1, 0, image_size - h1))
    inside = torch.zeros(image_size, image_size, dtype=torch.bool, device=logits.device)
    inside[:h1, :w1] = True
    return torch.where(inside, padded, pad_value.to(padded.dtype))


def postprocess_masks(
    low_res: torch.Tensor,
    image_size: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> torch.Tensor:
    """SAM's ``Sam.postprocess_masks``: decoder logits back to the original frame.

    Args:
        low_res: [P, 1, 4He, 4We] logits, mask-input frame (a scaled SAM input frame).
    Returns:
        [P, 1, H, W] logits, original frame: upsampled to (S, S), cropped to (h1, w1), resized.
    """
    masks = F.interpolate(low_res, (image_size, image_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)


def group_by_length(lengths: list[int]) -> list[list[int]]:
    """Indices grouped by equal length, groups in order of first appearance."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(lengths):
        groups[n].append(i)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------
# The refiner
# ---------------------------------------------------------------------------------------------


class SamRefiner(nn.Module):
    """Refines coarse mask logits with SAM's prompt encoder + mask decoder (all trainable).

    State-dict keys (a contract with the checkpoint converter): ``text_layer_weights``,
    ``text_proj.weight``, ``text_proj.bias``, ``prompt_encoder.*``, ``mask_decoder.*``.

    Args:
        prompt_encoder, mask_decoder: SAM's modules (e.g. from ``build_sam``), injected.
        num_layers: L, LMM layers whose hidden states are mixed into text tokens.
        hidden_size: D, LMM hidden size.
        image_size: S, side of SAM's input frame.
    """

    def __init__(
        self,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        num_layers: int,
        hidden_size: int,
        image_size: int,
    ) -> None:
        super().__init__()
        self.text_layer_weights = nn.Parameter(torch.ones(num_layers))
        self.text_proj = nn.Linear(hidden_size, prompt_encoder.embed_dim)
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = image_size
        self.transform = ResizeLongestSide(image_size)

    def text_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n_tok, L, D] LMM hidden states -> [n_tok, C] prompt tokens (softmax mix over L)."""
        if hidden.shape[1:] != (self.text_layer_weights.numel(), self.text_proj.in_features):
            raise ValueError(
                f"phrase hidden states must be [n_tok, {self.text_layer_weights.numel()}, "
                f"{self.text_proj.in_features}], got {list(hidden.shape)}"
            )
        weights = self.text_layer_weights.softmax(dim=0)
        mixed = torch.einsum("tld,l->td", hidden.to(weights.dtype), weights)
        return self.text_proj(mixed)

    def encode_prompts(
        self,
        coarse_logits: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Box and dense prompts of every phrase.

        Args:
            coarse_logits: [P, 1, H, W] mask logits, original frame.
        Returns:
            sparse: [P, 2, C] box-corner tokens (box in the SAM input frame).
            dense: [P, C, He, We] mask-prompt embedding.
        """
        boxes = self.transform.apply_boxes_torch(mask_logits_to_boxes(coarse_logits), original_size)
        masks = pad_to_input_frame(coarse_logits, input_size, self.image_size)
        masks = F.interpolate(
            masks, self.prompt_encoder.mask_input_size, mode="bilinear", align_corners=False
        )
        return self.prompt_encoder(points=None, boxes=boxes, masks=masks)

    def decode(
        self,
        image_embedding: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
    ) -> torch.Tensor:
        """[1, C, He, We] embedding + [G, N, C] sparse + [G, C, He, We] dense -> [G, 1, 4He, 4We]."""
        low_res, _ = self.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return low_res

    def forward(
        self,
        image_embedding: torch.Tensor,
        coarse_logits: torch.Tensor,
        phrase_hidden: list[torch.Tensor],
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        """Refine the coarse masks of all P phrases of one image.

        Args:
            image_embedding: [1, C, He, We] from :class:`flmm.sam.SamImageEncoder`, embedding frame.
            coarse_logits: [P, 1, H, W] U-Net mask logits, original frame.
            phrase_hidden: P tensors [n_tok_p, L, D], hidden states of every LMM layer for the
                phrase's tokens.
            input_size: (h1, w1), the image's size in the SAM input frame before padding.
            original_size: (H, W).
        Returns:
            [P, 1, H, W] refined mask logits, original frame.

        SAM's two-way transformer has no padding mask, so phrases are decoded in groups of equal
        n_tok (one decoder call per group); the output keeps the phrase order.
        """
        if image_embedding.shape[0] != 1 or len(phrase_hidden) != coarse_logits.shape[0]:
            raise ValueError(
                f"expected one image embedding and one hidden tensor per phrase, got "
                f"{image_embedding.shape[0]} embeddings, {len(phrase_hidden)} hidden tensors, "
                f"{coarse_logits.shape[0]} coarse masks"
            )
        box_tokens, dense = self.encode_prompts(coarse_logits, input_size, original_size)
        text = [self.text_tokens(h) for h in phrase_hidden]
        order, low_res = [], []
        for idx in group_by_length([t.shape[0] for t in text]):
            sparse = torch.cat([box_tokens[idx], torch.stack([text[i] for i in idx])], dim=1)
            low_res.append(self.decode(image_embedding, sparse, dense[idx]))
            order.extend(idx)
        inverse = torch.argsort(torch.tensor(order, device=coarse_logits.device))
        low_res_all = torch.cat(low_res)[inverse]
        return postprocess_masks(low_res_all, self.image_size, input_size, original_size)
