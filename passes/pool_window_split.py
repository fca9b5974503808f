"""pool_window_split (exact): a pooling window larger than the target allows, split into stages.

    avg_pool(x, k, stride k), k = f1 * f2 * ...  ->  avg_pool(... avg_pool(x, f1, f1) ..., fn, fn)
    max_pool(x, k, stride k)                     ->  the same with max_pool (bit-identical: a max of maxes)

Non-overlapping windows only (stride = kernel, no padding, the form the mean/pool rewrites emit, e.g. a ViT's
average over tokens): group i of the staged pools covers exactly the elements of window i, and the sizes agree
(floor(floor(L / f1) / f2) = floor(L / (f1 f2))). The mean of equal-size group means is the mean, up to float
rounding of the sums (~1e-7). A window with a prime factor above the limit that covers the whole axis (a global
mean over a prime number of tokens) becomes a depthwise Conv with weights 1/k instead (kernel <= the conv limit).
Limits come from the profile's pooling/conv 'kernel_shape' rules (DLA: pooling windows <= 8, conv kernels <= 32).

1-D pools (avg_pool1d / max_pool1d over (B, C, L): Next-ViT's E-MHSA key reduction) become 2-D ones over a
(B, C, 1, L) view where the profile allows only 2-D pooling (DLA: A2C-DLA-CONV-2D), and are then split like the rest;
the view itself is bit-identical (the same window over the same elements).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from attn2conv.graph import Builder, arg, aten, is_op, pair, replace_uses, shape
from attn2conv.legality import attr_max
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register


@register
class PoolWindowSplit(GraphPass):
    id = "pool_window_split"
    exact = True
    removes = ("aten.avg_pool1d", "aten.max_pool1d")
    introduces = ("aten.avg_pool2d", "aten.max_pool2d", "aten.conv2d", "aten.reshape")
    summary = "1-D pools -> 2-D; pooling windows above the target's limit -> staged pools (or a depthwise 1/k conv)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        pool_max, conv_max = attr_max(ctx.profile, "AveragePool", "kernel_shape"), attr_max(ctx.profile, "Conv", "kernel_shape")
        if pool_max is None:
            result.notes.append("the target has no pooling window limit; nothing to do")
            return result
        only_2d = _only_2d_pooling(ctx.profile)
        for node in list(gm.graph.nodes):
            if only_2d and is_op(node, "aten.avg_pool1d", "aten.max_pool1d"):
                pool2d = _pool_1d_as_2d(gm, node)
                result.tally(node, pool2d if isinstance(pool2d, str) else None)
                if isinstance(pool2d, str):
                    continue
                node = pool2d  # and split below when its window is too large
            if is_op(node, "aten.avg_pool2d", "aten.max_pool2d"):
                kernel = pair(arg(node, 1, "kernel_size"))
                if max(kernel) > pool_max:
                    result.tally(node, _split(gm, node, kernel, pool_max, conv_max))
        return result


def _only_2d_pooling(profile) -> bool:
    """The profile has a spatial_dims rule on AveragePool/MaxPool that rejects 1-D pooling (DLA: A2C-DLA-CONV-2D)."""
    return any(rule.check == "spatial_dims" and {"AveragePool", "MaxPool"} & set(rule.params.get("ops", ())) and
               1 not in rule.params.get("allowed", (1,)) for rule in getattr(profile, "rules", ()) or ())


def _pool_1d_as_2d(gm: fx.GraphModule, node: fx.Node) -> fx.Node | str:
    """avg_pool1d / max_pool1d over (B, C, L) -> reshape (B, C, 1, L), the 2-D pool with (1, k) windows, reshape
    back; returns the new 2-D pool node, or the reason it was left alone."""
    xs, ys = shape(node.args[0]), shape(node)
    if xs is None or ys is None or len(xs) != 3:
        return f"input shape {xs} is not (B, C, L)"
    is_max = is_op(node, "aten.max_pool1d")
    kernel = pair(arg(node, 1, "kernel_size"))[0]
    stride = pair(arg(node, 2, "stride", None) or kernel)[0]
    padding = pair(arg(node, 3, "padding", 0))[0]
    b = Builder(gm, node)
    x4 = b.call(aten.reshape.default, node.args[0], [xs[0], xs[1], 1, xs[2]])
    if is_max:
        dilation, ceil_mode = pair(arg(node, 4, "dilation", 1))[0], bool(arg(node, 5, "ceil_mode", False))
        pool = b.call(aten.max_pool2d.default, x4, [1, kernel], [1, stride], [0, padding], [1, dilation], ceil_mode)
    else:
        ceil_mode, include_pad = bool(arg(node, 4, "ceil_mode", False)), bool(arg(node, 5, "count_include_pad", True))
        pool = b.call(aten.avg_pool2d.default, x4, [1, kernel], [1, stride], [0, padding], ceil_mode, include_pad)
    y = b.call(aten.reshape.default, pool, list(ys))
    y.meta["val"] = node.meta.get("val")
    replace_uses(node, y)
    gm.graph.erase_node(node)
    return pool


def _factors(k: int, limit: int) -> list[int] | None:
    """k as a product of factors <= limit, largest first; None if a prime factor exceeds the limit."""
    out = []
    while k > 1:
        f = next((f for f in range(min(k, limit), 1, -1) if k % f == 0), None)
        if f is None:
            return None
        out.append(f)
        k //= f
    return out or [1]


def _split(gm: fx.GraphModule, node: fx.Node, kernel: list[int], pool_max: int, conv_max: int | None) -> str | None:
    stride = pair(arg(node, 2, "stride", None) or kernel)
    padding = pair(arg(node, 3, "padding", 0))
    is_max = is_op(node, "aten.max_pool2d")
    if stride != kernel or any(padding):
        return f"window {kernel} with stride {stride}, padding {padding}: only non-overlapping windows are split"
    if is_max and (any(d != 1 for d in pair(arg(node, 4, "dilation", 1))) or arg(node, 5, "ceil_mode", False)):
        return "dilated or ceil_mode max pool"
    if not is_max and (arg(node, 4, "ceil_mode", False) or arg(node, 6, "divisor_override", None) is not None):
        return "ceil_mode avg pool or one with a divisor_override"
    xs = shape(node.args[0])
    if xs is None or len(xs) != 4:
        return f"input shape {xs} is not 4-D"
    stages = [_factors(k, pool_max) for k in kernel]
    b = Builder(gm, node)
    x = node.args[0]
    for axis, fs in enumerate(stages):
        k, length = kernel[axis], xs[2 + axis]
        if fs is None:
            if is_max or length != k or conv_max is None or k > conv_max:
                return f"window {k} has a prime factor above {pool_max} and is not a global mean of <= {conv_max}"
            c = xs[1]
            window = [k, 1] if axis == 0 else [1, k]
            w = b.constant(torch.full((c, 1, *window), 1.0 / k), "pool_mean_weight")
            x = b.call(aten.conv2d.default, x, w, None, [1, 1], [0, 0], [1, 1], c)
            continue
        for f in fs:
            if f == 1:
                continue
            window = [f, 1] if axis == 0 else [1, f]
            x = b.call(aten.max_pool2d.default if is_max else aten.avg_pool2d.default, x, window, window)
    x.meta["val"] = node.meta.get("val")
    replace_uses(node, x)
    gm.graph.erase_node(node)
    return None
