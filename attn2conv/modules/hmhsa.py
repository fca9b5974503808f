"""TransCNN / HAT-Net hierarchical multi-head self-attention (H-MHSA, rewrite-math.md section 7), BN as the norm
(TransCNN v1), on the H x W grid x (B, C, H, W) with G x G cells and pooling ratio r:

    local = softmax attention inside each G x G cell on (Conv1x1_q x, Conv1x1_k x, Conv1x1_v x)   (no projection)
    X1    = BN_g(x + local)
    q     = Conv1x1_q2(X1);   k, v = Conv1x1_k2, Conv1x1_v2 (BN_ds(AvgPool_r(X1)))   global step, N/r^2 keys
    out   = Conv1x1_proj(softmax(q k^T * scale) v + X1)

Prefix tokens skip the local step (X1 = BN_g(t)) and join the global step as queries and keys. Both q/k/v sets and
the projection start from the replaced attention's weights. ONNX ops: as SpatialReductionAttention (Conv, BN,
AveragePool, Add, Reshape, Transpose, Slice/Concat with prefix tokens, and attention cores that attention_to_conv
rewrites). ARCH: needs distillation.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from attn2conv.modules._tokens import TokenGrid, conv1x1, load_linear, pick_reduction
from attn2conv.modules.sra import heads_attention, load_qkv, pick_window, window_attention


class HierarchicalAttention(TokenGrid):
    kind = "hmhsa"

    def __init__(self, dim: int, grid: tuple[int, int], prefix: int = 0, heads: int = 1, window: int | None = None,
                 reduction: int | None = None, scale: float | None = None):
        super().__init__(dim, grid, prefix)
        self.heads = int(heads)
        self.window = int(window or pick_window(*self.grid, target=8))
        self.reduction = int(reduction or pick_reduction(*self.grid))
        for side in self.grid:
            if side % self.window or side % self.reduction:
                raise ValueError(f"window {self.window} / reduction {self.reduction} must divide the grid {self.grid}")
        self.scale = float(scale if scale is not None else (dim // self.heads) ** -0.5)
        self.q, self.k, self.v, self.proj = (conv1x1(dim, dim) for _ in range(4))
        self.q2, self.k2, self.v2 = (conv1x1(dim, dim) for _ in range(3))
        self.local_norm = nn.BatchNorm2d(dim)
        self.pool = nn.AvgPool2d(self.reduction, self.reduction) if self.reduction > 1 else nn.Identity()
        self.pool_norm = nn.BatchNorm2d(dim)

    def load_from(self, weights: dict) -> list[str]:
        used = load_qkv(self, weights)
        for name in ("q", "k", "v"):
            load_linear(getattr(self, f"{name}2"), weights.get(f"{name}_w"), weights.get(f"{name}_b"))
        return used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        pre, g = self.split(x)
        local = window_attention(self.q(g), self.k(g), self.v(g), self.grid, self.window, self.heads, self.scale)
        x1 = self.local_norm(g + local)
        keys = self.pool_norm(self.pool(x1))
        keys = keys.reshape(b, c, 1, keys.shape[2] * keys.shape[3])
        pre1 = self.local_norm(pre) if pre is not None else None
        if pre1 is not None:
            keys = torch.cat([pre1, keys], dim=3)
        x1_tokens = self.merge(pre1, x1).permute(0, 2, 1).reshape(b, c, 1, n)
        q = self.q2(x1_tokens).reshape(b, c, n)
        k = self.k2(keys).reshape(b, c, keys.shape[3])
        v = self.v2(keys).reshape(b, c, keys.shape[3])
        o = heads_attention(q, k, v, self.heads, self.scale).reshape(b, c, 1, n)
        return self.proj(o + x1_tokens).reshape(b, c, n).permute(0, 2, 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.heads}, window={self.window}, reduction={self.reduction}"
