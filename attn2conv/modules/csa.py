"""Convolutional self-attention (CSA), after NVIDIA DL4AGX `Block_Conv_SelfAttn` (rewrite-math.md section 6).

For the H x W grid x (B, C, H, W), S = reduced grid side, P = S^2, h = heads:

    v  = Swish(BN(DWConv_kxk(x)))                      (B, C, H, W)      depthwise values, k = 5, groups C
    v_ = Resize_bilinear(v, scale S/H, S/W)             (B, C, S, S)      spatial reduction (by scale, never by size)
    q  = BN(Conv1x1_{C -> h*P}(v_))                     (B, h*P, S, S)    one channel per reduced-grid position
    k  = q viewed (B, h, P, P), last two axes swapped, viewed back      "rotation": K_h[c, pi] = Q_h[pi, c]
    r  = q * k                                          Hadamard relation map: no softmax, no matmul
    g  = Sigmoid(BN(Conv1x1_{h*P -> C}(Resize_bilinear(r, scale H/S, W/S))))      sigmoid gating
    y  = Conv1x1_{C -> C}(g * v)                        the projection (the replaced attention's proj weights)

With `mlp_ratio` set, the last line is NVIDIA's expansion instead: y = Conv1x1(Swish(BN(Conv1x1_{C -> rC}(g * v)))).
Prefix tokens (class / distillation / register) have no grid position; they read the grid's gated values through
a fixed-kernel AveragePool: y_prefix = Conv1x1_proj(Conv1x1_v(t_prefix) + AvgPool_{HxW}(g * v)).

ONNX ops: Conv, BatchNormalization, Sigmoid, Mul, Resize (scales), Reshape, Transpose, AveragePool, Add: all in the
trt-safe scope (the model NVIDIA builds in TensorRT 8.6 restricted mode uses exactly these). Prefix tokens add one
Slice and one Concat (trt-safe: undocumented, warnings). This is an ARCH change: it needs distillation.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from attn2conv.modules._tokens import TokenGrid, conv1x1, global_pool, load_linear, resize, swish


class CSA(TokenGrid):
    kind = "csa"

    def __init__(self, dim: int, grid: tuple[int, int], prefix: int = 0, heads: int = 1, reduced: int = 7,
                 kernel: int = 5, mlp_ratio: float | None = None):
        super().__init__(dim, grid, prefix)
        self.heads, self.reduced = int(heads), int(reduced)
        p = self.reduced ** 2
        self.value = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=False)
        self.value_bn = nn.BatchNorm2d(dim)
        self.query = conv1x1(dim, self.heads * p, bias=False)
        self.query_bn = nn.BatchNorm2d(self.heads * p)
        self.gate = conv1x1(self.heads * p, dim, bias=False)
        self.gate_bn = nn.BatchNorm2d(dim)
        if mlp_ratio:
            hidden = int(round(dim * mlp_ratio))
            self.proj = nn.Sequential(conv1x1(dim, hidden, bias=False), nn.BatchNorm2d(hidden), _Swish(),
                                      conv1x1(hidden, dim))
        else:
            self.proj = conv1x1(dim, dim)
        self.prefix_value = conv1x1(dim, dim) if prefix else None
        with torch.no_grad():  # start the depthwise value conv as identity: v = Swish(BN(x))
            self.value.weight.zero_()
            self.value.weight[:, 0, kernel // 2, kernel // 2] = 1.0

    def load_from(self, weights: dict) -> list[str]:
        """Reuses the replaced attention's weights where shapes allow: proj, and V for the prefix tokens."""
        used = []
        if isinstance(self.proj, nn.Conv2d) and load_linear(self.proj, weights.get("proj_w"), weights.get("proj_b")):
            used.append("proj")
        if self.prefix_value is not None and load_linear(self.prefix_value, weights.get("v_w"), weights.get("v_b")):
            used.append("v (prefix tokens)")
        return used

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> gated values g * v (B, C, H, W)."""
        b, _, h, w = x.shape
        s, p, nh = self.reduced, self.reduced ** 2, self.heads
        v = swish(self.value_bn(self.value(x)))
        q = self.query_bn(self.query(resize(v, (s, s))))
        k = q.reshape(b, nh, p, p).transpose(2, 3).reshape(b, nh * p, s, s)
        relation = resize(q * k, (h, w))
        gate = torch.sigmoid(self.gate_bn(self.gate(relation)))
        return gate * v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre, g = self.split(x)
        mixed = self.mix(g)
        out = self.proj(mixed)
        if pre is not None:
            pre = self.proj(self.prefix_value(pre) + global_pool(mixed))
        return self.merge(pre, out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.heads}, reduced={self.reduced}"


class _Swish(nn.Module):
    def forward(self, x):
        return swish(x)
