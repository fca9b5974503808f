"""unfold_to_shift (exact, bit-identical): Im2Col and Tensor.unfold become one grouped conv with one-hot kernels.

Slide-Transformer's "row view": F.unfold(x, k, dilation, padding, stride) of x (B, C, H, W) is (B, C*kh*kw, L) with
row c*kh*kw + s (s = a*kw + b) holding channel c shifted by (a, b). That is

    conv2d(x, W, stride, padding, dilation, groups=C),  W (C*kh*kw, 1, kh, kw),  W[c*kh*kw + s, 0, a, b] = 1

followed by a reshape (B, C*kh*kw, L). Zero padding is the conv's own zero padding, as in unfold. Each output is one
input value times 1.0 plus zeros, so the result is bit-identical (except inf/NaN inputs, where 0*inf would leak).

Tensor.unfold(d, size, step) (patch extraction, x.unfold(2, k, s).unfold(3, k, s)) on any shape S: with
pre = prod(S[:d]) and post = prod(S[d+1:]), x viewed as (1, pre, S[d], post) goes through a grouped conv with a
(size, 1) one-hot kernel and stride (step, 1); the (pre*size, L', post) result is reshaped and permuted to
S[:d] + [L'] + S[d+1:] + [size]. A learnable depthwise path added to the shift (Slide's deformed shifting,
conv(x, W_shift) + conv(x, W_learn)) is then one sum of two convs over the same input with the same geometry, which
fold_reparam merges into a single conv (W_shift + W_learn, b0 + b1).

F.fold / Col2Im (VOLO's outlook attention) is unfold's adjoint: it scatters row c*kh*kw + s of (B, C*kh*kw, L) to
channel c shifted by (a, b) and sums where patches overlap. With the blocks viewed as (B, C*kh*kw, oh, ow), that is
the transposed conv with the same one-hot kernels,

    conv_transpose2d(x, W, stride, padding, output_padding, groups=C, dilation),   W as above,

with output_padding = H - ((oh - 1) * stride - 2 * padding + dilation * (kh - 1) + 1) (< stride) so that the output
is exactly output_size. Each output is a sum of the same input values as Col2Im's, in the conv's order: equal up to
fp32 rounding of the overlapping sums (no overlap, stride >= kernel: bit-identical). Col2Im is opset 18, which
trt-safe-8.6 (opset 17) cannot even express, and TensorRT 10 has no importer for it.
Produces aten.conv2d / aten.conv_transpose2d (+ aten.reshape, aten.permute): legal on trt (DLA: kernel <= 32,
groups <= 8192; a transposed conv with padding is a DLA error).
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
    removes = ("aten.im2col", "aten.unfold", "aten.col2im")
    introduces = ("aten.conv2d", "aten.conv_transpose2d", "aten.reshape", "aten.permute")
    summary = "F.unfold / Im2Col / Tensor.unfold -> one grouped conv with one-hot shift kernels; F.fold -> its transpose"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        for node in list(gm.graph.nodes):
            if is_op(node, "aten.im2col"):
                new = self._im2col(gm, node)
            elif is_op(node, "aten.unfold") and node.target == aten.unfold.default:
                new = self._unfold(gm, node)
            elif is_op(node, "aten.col2im"):
                new = self._col2im(gm, node)
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

    def _col2im(self, gm, node):
        x, output_size, kernel, dilation, padding, stride = node.args[:6]
        xs = shape(x)
        if xs is None or len(xs) not in (2, 3):
            return "input is not (B, C*kh*kw, L)"
        (kh, kw), (dh, dw), (ph, pw), (sh, sw) = (_pair(v) for v in (kernel, dilation, padding, stride))
        height, width = _pair(output_size)
        oh, ow = ((height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
        rows, blocks = xs[-2:]
        if rows % (kh * kw) or oh * ow != blocks:
            return f"{rows} rows / {blocks} blocks do not match kernel {kh}x{kw} and output {height}x{width}"
        extra = (height - ((oh - 1) * sh - 2 * ph + dh * (kh - 1) + 1), width - ((ow - 1) * sw - 2 * pw + dw * (kw - 1) + 1))
        if not (0 <= extra[0] < max(sh, dh) and 0 <= extra[1] < max(sw, dw)):
            return f"output {height}x{width} needs output_padding {extra}, outside what a transposed conv allows"
        channels = rows // (kh * kw)
        b = Builder(gm, node)
        x4 = b.call(aten.reshape.default, x, [xs[0] if len(xs) == 3 else 1, rows, oh, ow])
        w = b.constant(shift_kernels(channels, kh, kw, node.meta["val"].dtype), "shift_weight")
        y = b.call(aten.conv_transpose2d.input, x4, w, None, [sh, sw], [ph, pw], list(extra), channels, [dh, dw])
        return y if len(xs) == 3 else b.call(aten.reshape.default, y, list(shape(node)))

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
