"""pool_window_split (exact): a pooling window larger than the target allows, split into stages.

    avg_pool(x, k, stride k), k = f1 * f2 * ...  ->  avg_pool(... avg_pool(x, f1, f1) ..., fn, fn)
    max_pool(x, k, stride k)                     ->  the same with max_pool (bit-identical: a max of maxes)

Non-overlapping windows only (stride = kernel, no padding, the form the mean/pool rewrites emit, e.g. a ViT's
average over tokens): group i of the staged pools covers exactly the elements of window i, and the sizes agree
(floor(floor(L / f1) / f2) = floor(L / (f1 f2))). The mean of equal-size group means is the mean, up to float
rounding of the sums (~1e-7). A window with a prime factor above the limit that covers the whole axis (a global
mean over a prime number of tokens) becomes a depthwise Conv with weights 1/k instead (kernel <= the conv limit).
Limits come from the profile's pooling/conv 'kernel_shape' rules (DLA: pooling windows <= 8, conv kernels <= 32).
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
    removes = ()
    introduces = ("aten.avg_pool2d", "aten.max_pool2d", "aten.conv2d")
    summary = "pooling windows above the target's limit -> staged pools (or a depthwise 1/k conv)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        pool_max, conv_max = attr_max(ctx.profile, "AveragePool", "kernel_shape"), attr_max(ctx.profile, "Conv", "kernel_shape")
        if pool_max is None:
            result.notes.append("the target has no pooling window limit; nothing to do")
            return result
        for node in list(gm.graph.nodes):
            if is_op(node, "aten.avg_pool2d", "aten.max_pool2d"):
                kernel = pair(arg(node, 1, "kernel_size"))
                if max(kernel) > pool_max:
                    result.tally(node, _split(gm, node, kernel, pool_max, conv_max))
        return result


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
