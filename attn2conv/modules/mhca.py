"""Next-ViT multi-head convolutional attention (MHCA), a pure convolution block (rewrite-math.md section 2.1).

    y = Conv1x1_{C -> C}(ReLU(BN(GConv3x3(x))))        groups = C / head_dim (head_dim 32), padding 1

on the H x W grid (B, C, H, W); the 1x1 projection starts from the replaced attention's proj weights. Prefix tokens
read the grid through a fixed-kernel AveragePool: y_prefix = Conv1x1_proj(Conv1x1_v(t_prefix) + AvgPool(z)), where z
is the activation before the projection.

ONNX ops: Conv, BatchNormalization, Relu, Reshape, Transpose (+ AveragePool, Add, Slice, Concat with prefix tokens).
All in the trt-safe scope except Slice/Concat (warnings). ARCH: needs distillation.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from attn2conv.modules._tokens import TokenGrid, conv1x1, global_pool, load_linear


class MHCA(TokenGrid):
    kind = "mhca"

    def __init__(self, dim: int, grid: tuple[int, int], prefix: int = 0, head_dim: int = 32):
        super().__init__(dim, grid, prefix)
        groups = dim // math.gcd(dim, head_dim) if dim % head_dim else dim // head_dim
        self.group_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.proj = conv1x1(dim, dim)
        self.prefix_value = conv1x1(dim, dim) if prefix else None

    def load_from(self, weights: dict) -> list[str]:
        used = []
        if load_linear(self.proj, weights.get("proj_w"), weights.get("proj_b")):
            used.append("proj")
        if self.prefix_value is not None and load_linear(self.prefix_value, weights.get("v_w"), weights.get("v_b")):
            used.append("v (prefix tokens)")
        return used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre, g = self.split(x)
        z = torch.relu(self.norm(self.group_conv(g)))
        if pre is not None:
            pre = self.proj(self.prefix_value(pre) + global_pool(z))
        return self.merge(pre, self.proj(z))
