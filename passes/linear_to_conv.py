"""linear_to_conv (exact): every Linear on tokens becomes a 1x1 convolution in channels-first layout.

    x (B, N, C) --permute(0,2,1)--> (B, C, N) --unsqueeze(2)--> (B, C, 1, N) --conv1x1(W[:, :, None, None], b)-->
      (B, C', 1, N) --squeeze(2)--> (B, C', N) --permute(0,2,1)--> (B, N, C')

(B, C) inputs (class token, pooled features) are viewed as (B, C, 1, 1): a class token needs no spatial grid. Where
the target limits channels (trt-safe: 4096 from rank 3) and C' exceeds it (TinyViT's 21841-class head), the conv is
split along its output channels into convs of at most the limit, each viewed back as (B, C'_i), concatenated (rank 2).
A 1x1 conv gives the same values on any (H, W) with H * W = N, so where the tokens were reshaped from a
(B, H, W, C) or (B, C, H, W) map (through layout and unary element-wise ops: Swin's MLP on x.reshape(B, -1, C), and
the fc2 after it), the conv runs on (B, C, H, W) instead: the map's own layout, whose reshapes layout_cleanup then
cancels, so ONNX Runtime keeps its blocked NCHWc layout across the block (no Reshape between Conv nodes).
(B, H, W, C) inputs (ConvNeXt-style channels-last MLPs) are permuted to (B, C, H, W) and back. Higher ranks fold the
middle dims into N. The permutes around consecutive linears are inverse pairs that the layout clean-up can cancel.
The conv weight is the Linear weight viewed as (C', C, 1, 1), registered under the Linear's module path.

Patch merging. A Linear whose input is a (B, H/kh, W/kw, kh*kw*C) space-to-depth of a (B, H, W, C) or (B, C, H, W)
map made by layout ops only (Swin / Twins / Focal PatchMerging: reshape -> permute -> flatten -> Linear, with the
LayerNorm between folded by layernorm_to_batchnorm in fast conversions) is one kh x kw convolution of stride
(kh, kw) on the map, its weight the Linear's rearranged: W_conv[o, c, dh, dw] = W[o, index of (dh, dw, c)]. Same
sums, no gather: at 1024 px Swin-T's first merging moved 6.3M elements through two Transposes, one of them copied
element by element (ORT 103 ms of 3.2 s).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.fx as fx

from attn2conv.graph import Builder, aten, get_constant, nodes_of, replace_uses, shape
from attn2conv.legality import dim_limit
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register


@register
class LinearToConv(GraphPass):
    id = "linear_to_conv"
    exact = True
    removes = ("aten.linear",)
    introduces = ("aten.conv2d", "aten.permute", "aten.reshape")
    summary = "Linear -> 1x1 Conv in (B, C, 1, N) layout"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        self._max_channels = dim_limit(ctx.profile, 1)
        for node in nodes_of(gm, "aten.linear"):
            result.tally(node, self._rewrite(gm, node))
        return result

    def _rewrite(self, gm: fx.GraphModule, node: fx.Node) -> str | None:
        x, w_node = node.args[0], node.args[1]
        b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        xs = shape(x)
        if xs is None or len(xs) < 2:
            return "input rank is unknown or below 2"
        w = get_constant(gm, w_node)
        c_out, c_in = (w.shape if w is not None else shape(w_node))
        b = Builder(gm, node)
        weight = b.constant(w.reshape(c_out, c_in, 1, 1), "conv_weight", trainable=True) if w is not None else \
            b.call(aten.reshape.default, w_node, [c_out, c_in, 1, 1])
        merged = _space_to_depth(x, c_in) if w is not None else None
        if merged is not None:
            src, kernel, sizes_order, channels_last = merged
            order, sizes = sizes_order
            wk = w.reshape(c_out, *sizes).permute(0, *[1 + order.index(a) for a in ("c", "dh", "dw")])
            weight = b.constant(wk.contiguous(), "conv_weight", trainable=True)
            x4 = b.call(aten.permute.default, src, [0, 3, 1, 2]) if channels_last else src
            y4 = b.call(aten.conv2d.default, x4, weight, b_node, list(kernel))
            y = b.call(aten.reshape.default, b.call(aten.permute.default, y4, [0, 2, 3, 1]), [*xs[:-1], c_out])
            replace_uses(node, y)
            gm.graph.erase_node(node)
            return None
        rank = len(xs)
        limit = self._max_channels[0] if self._max_channels and self._max_channels[1] <= 4 else None
        if rank == 2 and w is not None and limit and c_out > limit:  # (B, C) -> k convs of <= limit channels
            bias = get_constant(gm, b_node) if isinstance(b_node, fx.Node) else None
            if b_node is not None and bias is None:
                return f"{c_out} output channels over the target's {limit}, with a computed bias"
            x4 = b.call(aten.reshape.default, x, [xs[0], c_in, 1, 1])
            parts = []
            for lo in range(0, c_out, limit):
                hi = min(lo + limit, c_out)
                wk = b.constant(w[lo:hi].reshape(hi - lo, c_in, 1, 1), "conv_weight", trainable=True)
                bk = b.constant(bias[lo:hi], "conv_bias", trainable=True) if bias is not None else None
                parts.append(b.call(aten.reshape.default, b.call(aten.conv2d.default, x4, wk, bk), [xs[0], hi - lo]))
            y = b.call(aten.cat.default, parts, 1)
        elif rank == 2:  # (B, C) -> (B, C, 1, 1)
            x4 = b.call(aten.reshape.default, x, [xs[0], c_in, 1, 1])
            y4 = b.call(aten.conv2d.default, x4, weight, b_node)
            y = b.call(aten.reshape.default, y4, [xs[0], c_out])
        elif rank == 4:  # (B, H, W, C) -> (B, C, H, W)
            x4 = b.call(aten.permute.default, x, [0, 3, 1, 2])
            y4 = b.call(aten.conv2d.default, x4, weight, b_node)
            y = b.call(aten.permute.default, y4, [0, 2, 3, 1])
        else:  # (B, N..., C) -> (B, C, 1, N), or (B, C, H, W) when the tokens come from an H x W map
            n = math.prod(xs[1:-1])
            x3 = x if rank == 3 else b.call(aten.reshape.default, x, [xs[0], n, c_in])
            grid = _token_grid(x, xs[0], n, c_in)
            x4 = b.call(aten.reshape.default, b.call(aten.permute.default, x3, [0, 2, 1]), [xs[0], c_in, *grid])
            y4 = b.call(aten.conv2d.default, x4, weight, b_node)
            y = b.call(aten.permute.default, b.call(aten.reshape.default, y4, [xs[0], c_out, n]), [0, 2, 1])
            if rank != 3:
                y = b.call(aten.reshape.default, y, [*xs[:-1], c_out])
        replace_uses(node, y)
        gm.graph.erase_node(node)
        return None


def _space_to_depth(x: fx.Node, k: int):
    """(source map, (kh, kw), (order, sizes) of the K axis, channels_last) when x (B, Ho, Wo, K) gathers each kh x kw
    patch of a rank-4 map reached through layout ops only (the farthest such map), else None."""
    from attn2conv.passes.layout_cleanup import index_map, is_layout

    ys = shape(x)
    if ys is None or len(ys) != 4 or ys[-1] != k:
        return None
    chain, node = [], x
    while is_layout(node):
        chain.append(node)
        node = node.args[0]
    chain.reverse()  # chain[i:] maps the input of chain[i] to x
    found = None
    for i, n in enumerate(chain):
        src = n.args[0]
        s = shape(src)
        if s is None or len(s) != 4 or s[0] != ys[0]:
            continue
        for channels_last in (True, False):
            b_, h, w_, c = s if channels_last else (s[0], s[2], s[3], s[1])
            if h % ys[1] or w_ % ys[2] or (h // ys[1]) * (w_ // ys[2]) * c != k or (h, w_) == ys[1:3]:
                continue
            kh, kw = h // ys[1], w_ // ys[2]
            got = None
            for order in itertools.permutations(("dh", "dw", "c")):
                want = _patch_index(s, channels_last, kh, kw, order)
                if got is None:
                    got = index_map(chain[i:], tuple(s))
                if torch.equal(got, want):
                    sizes = [{"dh": kh, "dw": kw, "c": c}[a] for a in order]
                    found = (src, (kh, kw), (list(order), sizes), channels_last)
                    break
            if found:
                return found
    return None


def _patch_index(s, channels_last: bool, kh: int, kw: int, order) -> torch.Tensor:
    """Flat source index of the space-to-depth of a map of shape s: (B, Ho, Wo, kh*kw*C), K ordered by `order`."""
    idx = torch.arange(math.prod(s))
    if channels_last:
        b_, h, w_, c = s
        idx = idx.reshape(b_, h // kh, kh, w_ // kw, kw, c)
        axes = {"dh": 2, "dw": 4, "c": 5}
    else:
        b_, c, h, w_ = s
        idx = idx.reshape(b_, c, h // kh, kh, w_ // kw, kw)
        axes = {"c": 1, "dh": 3, "dw": 5}
    lead = [0, 1, 3] if channels_last else [0, 2, 4]
    return idx.permute(*lead, *[axes[a] for a in order]).reshape(b_, h // kh, w_ // kw, kh * kw * c)


def _token_grid(x: fx.Node, batch: int, n: int, c: int) -> tuple[int, int]:
    """(H, W) of the nearest rank-4 map with H * W = n that x's tokens come from through layout and unary
    element-wise ops, else (1, n)."""
    from attn2conv.passes.layout_cleanup import UNARY, is_layout

    node = x
    for _ in range(12):
        s = shape(node)
        if s is not None and len(s) == 4 and s[0] == batch:
            if s[3] == c and s[1] * s[2] == n:
                return s[1], s[2]
            if s[1] == c and s[2] * s[3] == n:
                return s[2], s[3]
        if not isinstance(node, fx.Node) or not (is_layout(node) or node.target in UNARY) or \
                not isinstance(node.args[0], fx.Node):
            break
        node = node.args[0]
    return 1, n
