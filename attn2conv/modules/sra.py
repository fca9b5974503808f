"""Spatial-reduction attention (E-MHSA / PVT SRA / Twins GSA) and Twins' locally-grouped attention (LSA).

Softmax attention stays in these blocks; the exact pass attention_to_conv then turns each core into broadcast Mul
and constant grouped 1x1 Convs (softmax decomposed on trt-safe), so the blocks are legal wherever those are.

**SpatialReductionAttention** (rewrite-math.md sections 2.2, 3.2, 4). Tokens t (B, N, C) = prefix (P) + H x W grid x:

    q      = Conv1x1_q(t)                                  all N tokens are queries
    x'     = BN(AvgPool_R(x))        reduction="avgpool"  (Next-ViT E-MHSA on a square window; BN, not LN)
           = BN(Conv_{RxR, stride R}(x))   reduction="conv"  (PVT SRA / Twins GSA, BN instead of LN; starts as the
                                                               same average)
    kv_src = [prefix tokens, x' flattened]                 M = P + (H/R)(W/R) keys
    k, v   = Conv1x1_k(kv_src), Conv1x1_v(kv_src)
    out    = Conv1x1_proj(softmax(q k^T * scale) v)        per head; q/k/v/proj start from the replaced weights

Cost O(N M C) instead of O(N^2 C). R defaults to the divisor of H and W leaving about 7 x 7 keys (PVT: 56/8 = 28/4 =
14/2 = 7); R = 1 keeps full attention (Next-ViT's last stage).

**LocallyGroupedAttention** (Twins LSA, section 3.1): the grid is cut into ws x ws windows (ws divides H and W) and
softmax attention runs inside each window; prefix tokens read the grid through a fixed-kernel AveragePool.

ONNX ops before attention_to_conv: Conv, BatchNormalization, AveragePool, Reshape, Transpose, Slice/Concat (prefix
tokens) and the attention core (MatMul, Softmax), which attention_to_conv removes. ARCH: needs distillation.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from attn2conv.modules._tokens import TokenGrid, conv1x1, global_pool, load_linear, pick_reduction


def heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Multi-head softmax attention on channels-first tokens: q (L, C, N), k/v (L, C, M) -> (L, C, N)."""
    lead, c, n = q.shape
    m, d = k.shape[-1], c // heads
    qh = q.reshape(lead, heads, d, n).transpose(2, 3)
    kh = k.reshape(lead, heads, d, m).transpose(2, 3)
    vh = v.reshape(lead, heads, d, m).transpose(2, 3)
    o = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)  # (L, h, N, d)
    return o.transpose(2, 3).reshape(lead, c, n)


def load_qkv(module: nn.Module, weights: dict) -> list[str]:
    used = []
    for name in ("q", "k", "v", "proj"):
        conv = getattr(module, name, None)
        if conv is not None and load_linear(conv, weights.get(f"{name}_w"), weights.get(f"{name}_b")):
            used.append(name)
    return used


class SpatialReductionAttention(TokenGrid):
    kind = "sra"

    def __init__(self, dim: int, grid: tuple[int, int], prefix: int = 0, heads: int = 1, reduction: int | None = None,
                 mode: str = "avgpool", scale: float | None = None):
        super().__init__(dim, grid, prefix)
        if mode not in ("avgpool", "conv"):
            raise ValueError(f"reduction mode {mode!r}: use 'avgpool' or 'conv'")
        self.heads, self.mode = int(heads), mode
        self.reduction = int(reduction or pick_reduction(*self.grid))
        if self.grid[0] % self.reduction or self.grid[1] % self.reduction:
            raise ValueError(f"reduction {self.reduction} does not divide the grid {self.grid}")
        self.scale = float(scale if scale is not None else (dim // self.heads) ** -0.5)
        self.q, self.k, self.v, self.proj = (conv1x1(dim, dim) for _ in range(4))
        if self.reduction > 1:
            r = self.reduction
            self.reduce = nn.AvgPool2d(r, r) if mode == "avgpool" else nn.Conv2d(dim, dim, r, stride=r)
            if mode == "conv":  # start as the average: the same keys as the avgpool form
                with torch.no_grad():
                    self.reduce.weight.zero_()
                    self.reduce.weight[torch.arange(dim), torch.arange(dim)] = 1.0 / (r * r)
                    self.reduce.bias.zero_()
            self.reduce_norm = nn.BatchNorm2d(dim)
        else:
            self.reduce = self.reduce_norm = None

    def load_from(self, weights: dict) -> list[str]:
        return load_qkv(self, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre, g = self.split(x)
        b, c = g.shape[:2]
        n = x.shape[1] if not self.channels_last else g.shape[2] * g.shape[3]
        tokens = (x.permute(0, 2, 1) if not self.channels_last else g).reshape(b, c, 1, n)
        if self.reduce is not None:
            g = self.reduce_norm(self.reduce(g))
        keys = g.reshape(b, c, 1, g.shape[2] * g.shape[3])
        if pre is not None:
            keys = torch.cat([pre, keys], dim=3)
        q = self.q(tokens).reshape(b, c, n)
        k = self.k(keys).reshape(b, c, keys.shape[3])
        v = self.v(keys).reshape(b, c, keys.shape[3])
        o = heads_attention(q, k, v, self.heads, self.scale).reshape(b, c, 1, n)
        if self.channels_last:
            return self.merge(None, self.proj(o).reshape(b, c, *self.grid))
        return self.proj(o).reshape(b, c, n).permute(0, 2, 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.heads}, reduction={self.reduction}, mode={self.mode}"


def pick_window(h: int, w: int, target: int = 7) -> int:
    """The divisor of H and W closest to `target` (Twins ws = 7, TransCNN G = 8/7)."""
    g = math.gcd(h, w)
    return min((r for r in range(1, g + 1) if g % r == 0), key=lambda r: (abs(math.log(r / target)), -r))


def window_attention(q, k, v, grid, window, heads, scale):
    """Softmax attention inside ws x ws windows of (B, C, H, W) maps; returns (B, C, H, W)."""
    b, c, h, w = q.shape
    ws, gh, gw = window, grid[0] // window, grid[1] // window

    def windows(t):  # (B, C, H, W) -> (B*Gh*Gw, C, ws*ws)
        t = t.reshape(b, c, gh, ws, gw, ws).permute(0, 2, 4, 1, 3, 5)
        return t.reshape(b * gh * gw, c, ws * ws)

    o = heads_attention(windows(q), windows(k), windows(v), heads, scale)  # (B*G, C, ws*ws)
    o = o.reshape(b, gh, gw, c, ws, ws).permute(0, 3, 1, 4, 2, 5)
    return o.reshape(b, c, h, w)


class LocallyGroupedAttention(TokenGrid):
    kind = "lsa"

    def __init__(self, dim: int, grid: tuple[int, int], prefix: int = 0, heads: int = 1, window: int | None = None,
                 scale: float | None = None):
        super().__init__(dim, grid, prefix)
        self.heads = int(heads)
        self.window = int(window or pick_window(*self.grid))
        if self.grid[0] % self.window or self.grid[1] % self.window:
            raise ValueError(f"window {self.window} does not divide the grid {self.grid}")
        self.scale = float(scale if scale is not None else (dim // self.heads) ** -0.5)
        self.q, self.k, self.v, self.proj = (conv1x1(dim, dim) for _ in range(4))

    def load_from(self, weights: dict) -> list[str]:
        return load_qkv(self, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre, g = self.split(x)
        o = window_attention(self.q(g), self.k(g), self.v(g), self.grid, self.window, self.heads, self.scale)
        if pre is not None:
            pre = self.proj(self.v(pre) + global_pool(o))
        return self.merge(pre, self.proj(o))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.heads}, window={self.window}"
