"""Shared plumbing of the conv-only token mixers: tokens (B, N, C) <-> an NCHW grid plus prefix tokens.

A ViT block hands its attention (B, N, C) tokens: `prefix` leading tokens (class, distillation, register tokens)
followed by an H x W grid in row-major order. The mixers work on the grid as (B, C, H, W) and on the prefix tokens as
(B, C, 1, P), so every projection is a 1x1 Conv. The conversions cost one Transpose and Reshapes (trt-safe scope);
splitting off and re-attaching prefix tokens adds one Slice and one Concat (undocumented on trt-safe: warnings).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def resize_scale(src: int, dst: int) -> float:
    """A scale factor s with floor(src * s) == dst, so Resize by scale (never by size: trt-safe) lands on dst."""
    s = dst / src
    while math.floor(src * s) < dst:  # dst / src can round below the exact ratio
        s = math.nextafter(s, math.inf)
    return s


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize to a static size, expressed by scale factors (NVIDIA CSA: Resize by size is not in safe mode)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    return F.interpolate(x, scale_factor=(resize_scale(h, size[0]), resize_scale(w, size[1])), mode="bilinear",
                         align_corners=False)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # exports as Sigmoid * x (both in the trt-safe scope), unlike SiLU on some opsets


def conv1x1(c_in: int, c_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, bias=bias)


def load_linear(conv: nn.Conv2d, weight: torch.Tensor | None, bias: torch.Tensor | None = None) -> bool:
    """Copies a Linear's (out, in) weight (and bias) into a 1x1 conv when the shapes agree; returns whether it did."""
    if weight is None or tuple(weight.shape) != tuple(conv.weight.shape[:2]):
        return False
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(conv.weight.shape))
        if conv.bias is not None:
            conv.bias.copy_(bias if bias is not None else torch.zeros_like(conv.bias))
    return True


class TokenGrid(nn.Module):
    """Base class: (B, N, C) tokens with `prefix` leading tokens and an H x W grid, or, with `channels_last`, a
    (B, H, W, C) map (a Swin block's whole feature map once its window partition is dropped; no prefix tokens)."""

    def __init__(self, dim: int, grid: tuple[int, int], prefix: int = 0):
        super().__init__()
        self.dim, self.grid, self.prefix = int(dim), (int(grid[0]), int(grid[1])), int(prefix)
        self.channels_last = False

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(B, N, C) -> (prefix (B, C, 1, P) or None, grid (B, C, H, W))."""
        if self.channels_last:
            return None, x.permute(0, 3, 1, 2)
        b, _, c = x.shape
        h, w = self.grid
        xc = x.permute(0, 2, 1)
        if not self.prefix:
            return None, xc.reshape(b, c, h, w)
        pre = xc[:, :, : self.prefix].reshape(b, c, 1, self.prefix)
        return pre, xc[:, :, self.prefix:].reshape(b, c, h, w)

    def merge(self, pre: torch.Tensor | None, grid: torch.Tensor) -> torch.Tensor:
        """(prefix (B, C, 1, P) or None, grid (B, C, H, W)) -> (B, N, C)."""
        if self.channels_last:
            return grid.permute(0, 2, 3, 1)
        b, c, h, w = grid.shape
        tokens = grid.reshape(b, c, h * w)
        if pre is not None:
            tokens = torch.cat([pre.reshape(b, c, self.prefix), tokens], dim=2)
        return tokens.permute(0, 2, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid={self.grid}, prefix={self.prefix}" + (", channels_last" if self.channels_last
                                                                            else "")


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """Spatial mean of (B, C, H, W) as a fixed-kernel AveragePool (ReduceMean/GlobalAveragePool are not in safe mode)."""
    return F.avg_pool2d(x, tuple(x.shape[-2:]))


def pick_reduction(h: int, w: int, keys_side: int = 7) -> int:
    """Spatial-reduction ratio R (kernel = stride) leaving about keys_side^2 keys; R divides H and W (PVT: 56/8 = 7)."""
    g = math.gcd(h, w)
    divisors = [r for r in range(1, g + 1) if g % r == 0]
    want = min(h, w) / keys_side
    return min(divisors, key=lambda r: (abs(math.log(r / want)) if want > 0 else r, r))
