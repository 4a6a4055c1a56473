"""The frozen SAM image encoder of F-LMM's mask refiner.

Paper, Method: "Visual Grounding with Mask Head", Mask Refiner. SAM's ViT image encoder stays
frozen; it embeds each image once, and the embedding is reused by the trainable
:class:`flmm.refiner.SamRefiner` for every phrase of that image.

Frames:
  * original frame: H x W, the input image as given.
  * SAM input frame: S x S (S = ``img_size``, 1024 for real SAM); the image's longest side is
    resized to S (``ResizeLongestSide``), giving h1 x w1, then zero-padded at the bottom/right.
  * embedding frame: S/16 x S/16, the SAM input frame seen through 16 px patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn


class SamImageEncoder(nn.Module):
    """Frozen SAM ViT: uint8 image -> SAM input frame -> image embedding.

    Holds ``sam.image_encoder`` (shared, not copied), SAM's pixel mean/std and a
    ``ResizeLongestSide(S)`` transform. Parameters have ``requires_grad=False`` and the module
    stays in eval mode; callers pick ``torch.inference_mode()`` where they want it.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.image_encoder.requires_grad_(False)
        self.img_size: int = sam.image_encoder.img_size
        self.register_buffer("pixel_mean", sam.pixel_mean.detach().clone(), persistent=False)
        self.register_buffer("pixel_std", sam.pixel_std.detach().clone(), persistent=False)
        self.transform = ResizeLongestSide(self.img_size)
        self.eval()

    def train(self, mode: bool = True) -> SamImageEncoder:
        """The encoder is frozen: it stays in eval mode whatever ``mode`` says."""
        return super().train(False)

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(h1, w1): the size of an (H, W) image in the SAM input frame, before padding."""
        return self.transform.get_preprocess_shape(
            original_size[0], original_size[1], self.img_size
        )

    def preprocess(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Resize, normalise and pad one image into the SAM input frame.

        Args:
            image: uint8 [H, W, 3] RGB, original frame (any device).
        Returns:
            x: float32 [1, 3, S, S] on this module's device, SAM input frame: longest side
                resized to S (bilinear, antialiased), normalised with SAM's pixel mean/std,
                zero-padded bottom/right.
            input_size: (h1, w1), the resized size before padding.
        """
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected uint8 [H, W, 3] RGB, got {image.dtype} {list(image.shape)}")
        h1, w1 = self.input_size((image.shape[0], image.shape[1]))
        x = image.to(self.pixel_mean.device).permute(2, 0, 1)[None].float()
        # ResizeLongestSide.apply_image_torch reads H, W from the wrong dims of a BCHW tensor,
        # so the same resize is done here with the correct target size.
        x = F.interpolate(x, (h1, w1), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.pixel_mean) / self.pixel_std
        x = F.pad(x, (0, self.img_size - w1, 0, self.img_size - h1))
        return x, (h1, w1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed preprocessed images.

        Args:
            x: float [B, 3, S, S], SAM input frame (output of :meth:`preprocess`).
        Returns:
            [B, C, S/16, S/16] image embeddings (C = SAM's prompt_embed_dim), embedding frame.
        """
        return self.image_encoder(x)
