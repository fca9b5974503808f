"""unfold_to_shift (exact, bit-identical): Im2Col and Tensor.unfold become one grouped conv with one-hot kernels.

Slide-Transformer's "row view": F.unfold(x, k, dilation, padding, stride) of x (B, C, H, W) is (B, C*kh*kw, L) with
row c*kh*kw + s (s = a*kw + b) holding channel c shifted by (a, b). That is

    conv2d(x, W, stride, padding, dilation, groups=C),  W (C*kh*kw, 1, kh, kw),  W[c*kh*kw + s, 0, a, b] = 1

followed by a reshape (B, C*kh*kw, L). Zero padding is the conv's own zero padding, as in unfold. Each output is one
input value times 1.0 plus zeros, so the result is bit-identical (except inf/NaN inputs, where 0*inf would leak).

Tensor.unfold(d, size, step) (patch extraction, x.unfold(2, k, s).unfold(3, k, s)) on any shape S: with
pre = prod(S[:d]) and post = prod(S[d+1:]), x viewed as (1, pre, S[d], post) goes through a grouped conv with a
(size, 1) one-hot kernel and stride (step, 1); the (pre*size, L', post) result is reshaped and permuted to
S[:d] + [L'] + S[d+1:] + [size]. F.fold / col2im is not rewritten (it sums overlapping patches; the exact inverse
would need a transposed conv, left for later). A learnable depthwise path added to the shift (Slide's deformed
shifting, conv(x, W_shift) + conv(x, W_learn)) is then one sum of two convs over the same input with the same
geometry, which fold_reparam merges into a single conv (W_shift + W_learn, b0 + b1).
Produces aten.conv2d (+ aten.reshape, aten.permute): legal on every target (DLA: kernel <= 32, groups <= 8192).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from attn2conv.graph import Builder, aten, is_op, replace_uses, shape, where
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register


def shift_kernels(channels: int, kh: int, kw: int, dtype=torch.float32) -> torch.Tensor:
    """(C*kh*kw, 1, kh, kw) one-hot kernels in unfold's channel order c*kh*kw + a*kw + b."""
    w = torch.zeros(channels, kh * kw, kh * kw, dtype=dtype)
    w[:, torch.arange(kh * kw), torch.arange(kh * kw)] = 1
    return w.reshape(channels * kh * kw, 1, kh, kw)


def _pair(v):
    return (int(v[0]), int(v[-1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


@register
class UnfoldToShift(GraphPass):
    id = "unfold_to_shift"
    exact = True
    removes = ("aten.im2col", "aten.unfold")
    introduces = ("aten.conv2d", "aten.reshape", "aten.permute")
    summary = "F.unfold / Im2Col / Tensor.unfold -> one grouped conv with fixed one-hot shift kernels"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        for node in list(gm.graph.nodes):
            if is_op(node, "aten.im2col"):
                new = self._im2col(gm, node)
            elif is_op(node, "aten.unfold") and node.target == aten.unfold.default:
                new = self._unfold(gm, node)
            else:
                continue
            if isinstance(new, str):
                result.misses.append(f"{where(node)}: {new}")
                continue
            new.meta["val"] = node.meta.get("val")
            replace_uses(node, new)
            gm.graph.erase_node(node)
            result.rewrites += 1
        result.changed = result.rewrites > 0
        return result

    def _im2col(self, gm, node):
        x, kernel, dilation, padding, stride = node.args[:5]
        xs = shape(x)
        if xs is None or len(xs) not in (3, 4):
            return "input is not (B, C, H, W)"
        b = Builder(gm, node)
        x4 = x if len(xs) == 4 else b.call(aten.reshape.default, x, [1, *xs])
        c = x4.meta["val"].shape[1] if x4 is x else xs[0]
        kh, kw = _pair(kernel)
        w = b.constant(shift_kernels(c, kh, kw, node.meta["val"].dtype), "shift_weight")
        y = b.call(aten.conv2d.default, x4, w, None, list(_pair(stride)), list(_pair(padding)),
                   list(_pair(dilation)), c)
        return b.call(aten.reshape.default, y, list(shape(node)))

    def _unfold(self, gm, node):
        x, d, size, step = node.args[:4]
        xs = shape(x)
        if xs is None:
            return "input shape unknown"
        d %= max(len(xs), 1)
        pre, length, post = math.prod(xs[:d]), xs[d], math.prod(xs[d + 1:])
        n_out = (length - size) // step + 1
        b = Builder(gm, node)
        x4 = b.call(aten.reshape.default, x, [1, pre, length, post])
        w = b.constant(shift_kernels(pre, size, 1, node.meta["val"].dtype), "shift_weight")
        y = b.call(aten.conv2d.default, x4, w, None, [step, 1], [0, 0], [1, 1], pre)  # (1, pre*size, n_out, post)
        y = b.call(aten.reshape.default, y, [*xs[:d], size, n_out, *xs[d + 1:]])
        rank = len(xs) + 1
        order = [i for i in range(rank) if i != d] + [d]  # move the window axis (at d) to the end
        return b.call(aten.permute.default, y, order)
