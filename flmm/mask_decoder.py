"""U-Net mask head that turns frozen-LMM attention maps into mask logits.

Implements the "Mask Decoder" of F-LMM §3 (Method), "Visual Grounding with Mask Head": the
word-image attention maps of every layer and head of the frozen LMM are stacked as channels,
normalised, upsampled and decoded by a small U-Net (the mmseg ``UNet`` layout of the paper's
release) into coarse mask logits, which the SAM-based "Mask Refiner" then sharpens.

Data path of :meth:`MaskDecoder.forward`::

    attn [B, C_in, h, w]
      -> normalise each channel to sum 1 over (h, w)
      -> bilinear upsample by max(1, upsample_to / max(h, w))      [B, C_in, H', W']
      -> zero-pad right/bottom to a multiple of 2**(num_stages-1)
      -> U-Net encoder / decoder                                   [B, base, H'+pad, W'+pad]
      -> conv_seg, crop the padding                                [B, 1, H', W'] logits

The attribute names are a contract with :mod:`flmm.convert` and saved checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvUnit(nn.Module):
    """Conv (no bias) -> GroupNorm(1 group) -> ReLU; keeps the spatial size.

    Maps [B, in_channels, H, W] -> [B, out_channels, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.norm = nn.GroupNorm(num_groups=1, num_channels=out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, in_channels, H, W] -> [B, out_channels, H, W]."""
        # in place: the norm's output is not kept for its backward, and one fewer large buffer
        # per unit matters on CPU (fresh allocations of a few MB page-fault)
        return F.relu(self.norm(self.conv(x)), inplace=True)


class ConvBlock(nn.Module):
    """Two 3×3 :class:`ConvUnit` s (mmseg ``BasicConvBlock`` with ``num_convs=2``).

    Maps [B, in_channels, H, W] -> [B, out_channels, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            ConvUnit(in_channels, out_channels), ConvUnit(out_channels, out_channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, in_channels, H, W] -> [B, out_channels, H, W]."""
        return self.convs(x)


class UpBlock(nn.Module):
    """One decoder level: upsample the deeper feature, concat the skip, fuse with two convs.

    ``up`` is bilinear ×2 (computed in float32, as the F-LMM release patches mmseg's ``Upsample``)
    followed by a 1×1 :class:`ConvUnit` (mmseg ``InterpConv``); ``convs`` fuse ``[skip, up]``
    (skip first on the channel axis) as in mmseg ``UpConvBlock``. The 1×1 conv (no bias) runs
    before the upsampling: both are linear, one over channels and one over space, so they
    commute, and at the low resolution the conv costs a quarter and the upsampling moves half
    the channels. The norm and ReLU come after both, as in mmseg.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = ConvUnit(in_channels, out_channels, kernel_size=1)
        self.convs = nn.Sequential(
            ConvUnit(2 * out_channels, out_channels), ConvUnit(out_channels, out_channels)
        )

    def forward(self, skip: Tensor, x: Tensor) -> Tensor:
        """skip: [B, out, 2h, 2w]; x: [B, in, h, w] -> [B, out, 2h, 2w] (out/in: channel counts)."""
        unit = self.up
        x = unit.conv(x)
        up = F.interpolate(x.float(), scale_factor=2.0, mode="bilinear", align_corners=False)
        x = F.relu(unit.norm(up.to(x.dtype)), inplace=True)
        return self.convs(torch.cat([skip, x], dim=1))


class MaskDecoder(nn.Module):
    """F-LMM mask head: attention maps [B, C_in, h, w] -> mask logits [B, 1, H', W'].

    Args:
        in_channels: C_in, the number of attention maps per object (layers · heads, layer-major).
        base_channels: width of U-Net level 0; level i has ``base_channels * 2**i`` channels.
        num_stages: number of U-Net levels (encoder stages); the input is padded to a multiple of
            ``2**(num_stages - 1)``.
        upsample_to: the long side of the attention grid is upsampled towards this size (never
            downsampled): scale factor ``max(1, upsample_to / max(h, w))``.
    """

    def __init__(
        self,
        in_channels: int,
        base_channels: int = 64,
        num_stages: int = 4,
        upsample_to: int = 64,
    ) -> None:
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        self.num_stages = num_stages
        self.upsample_to = upsample_to
        widths = [base_channels * 2**i for i in range(num_stages)]
        # encoder[0] projects C_in; encoder[i>0] runs after a parameter-free 2×2 max-pool.
        self.encoder = nn.ModuleList(
            ConvBlock(in_channels if i == 0 else widths[i - 1], widths[i])
            for i in range(num_stages)
        )
        # decoder[i] maps level i+1 -> level i; applied for i = num_stages-2, ..., 0.
        self.decoder = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i]) for i in range(num_stages - 1)
        )
        self.conv_seg = nn.Conv2d(base_channels, 1, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C_in, h, w] attention maps (any h, w) -> [B, 1, H', W'] mask logits.

        H', W' = floor(h · s), floor(w · s) with s = max(1, upsample_to / max(h, w)), i.e. the
        upsampled attention grid; the output dtype is the input dtype.
        """
        x = self.prepare(x)
        height, width = x.shape[-2:]
        x = self._pad_to_multiple(x)
        logits = self.conv_seg(self.unet(x))
        return logits[..., :height, :width]

    def prepare(self, x: Tensor) -> Tensor:
        """Normalise and upsample: [B, C_in, h, w] -> [B, C_in, H', W'] in the input dtype.

        Each channel is divided by its sum over (h, w) (clamped at 1e-12, so an all-zero map stays
        zero); upsampling is bilinear (align_corners=False), computed in float32.
        """
        x = x / x.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-12)
        scale = max(1.0, self.upsample_to / max(x.shape[-2:]))
        if scale == 1.0:
            return x
        up = F.interpolate(x.float(), scale_factor=scale, mode="bilinear", align_corners=False)
        return up.to(x.dtype)

    def unet(self, x: Tensor) -> Tensor:
        """x: [B, C_in, H, W] with H, W multiples of 2**(num_stages-1) -> [B, base, H, W]."""
        skips = []
        for i, stage in enumerate(self.encoder):
            if i > 0:
                x = F.max_pool2d(x, kernel_size=2)
            x = stage(x)
            skips.append(x)
        for i in reversed(range(self.num_stages - 1)):
            x = self.decoder[i](skips[i], x)
        return x

    def _pad_to_multiple(self, x: Tensor) -> Tensor:
        """Zero-pad right/bottom: [B, C, H, W] -> [B, C, ceil(H/m)·m, ceil(W/m)·m].

        m = 2**(num_stages - 1), so every max-pool halves an even size.
        """
        multiple = 2 ** (self.num_stages - 1)
        height, width = x.shape[-2:]
        pad_h = -height % multiple
        pad_w = -width % multiple
        if pad_h == 0 and pad_w == 0:
            return x
        return F.pad(x, (0, pad_w, 0, pad_h))
