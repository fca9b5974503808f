"""window_ops (exact, bit-identical): Swin-style cyclic shifts, padding and static gathers as Slice/Concat/Reshape.

    roll(x, s, d)          -> cat([x[.., n-s:, ..], x[.., :n-s, ..]], d)        per rolled dim (s taken mod n)
    pad(x, 0...)           -> x                                                 (Swin pads by 0 when H, W divide)
    constant_pad_nd(x, p, v) -> cat([full(v), x, full(v)], d) per padded dim    (constant blocks, no Pad op)
    select(x, d, i)        -> reshape(slice(x, d, i, i+1))                      (class-token pick: Slice, not Gather)
    index(x, [.., idx])    -> slice(x, d, a, b, step) when idx is a constant arithmetic progression

Window partition/reverse chains (rank-6 reshape/permute) are left as they are: every profile accepts rank-6
Shuffle layers, and layout_cleanup fuses them with the surrounding layout ops. Attention masks and
relative-position-bias gathers read only buffers: constant_fold evaluates them. Produces aten.slice, aten.cat,
aten.reshape (ONNX Slice, Concat, Reshape): in scope on DLA (Concat off the channel axis is a DLA error: Swin rolls
H and W of (B, H, W, C)); warnings on trt-safe (the conservative scope lists neither Slice nor Concat), against
Gather/Pad warnings before (DLA: errors).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from attn2conv.graph import Builder, arg, aten, get_constant, is_op, replace_uses, shape, where
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register


@register
class WindowOps(GraphPass):
    id = "window_ops"
    exact = True
    removes = ("aten.roll", "aten.pad", "aten.constant_pad_nd", "aten.select", "aten.index")
    introduces = ("aten.slice", "aten.cat", "aten.reshape")
    summary = "roll -> Slice+Concat, zero pads removed, constant pads -> Concat, static gathers -> Slice"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            xs = shape(node.args[0]) if node.args else None
            if is_op(node, "aten.roll", "aten.pad", "aten.constant_pad_nd", "aten.select", "aten.index") and \
                    xs is None:
                result.misses.append(f"{where(node)}: input shape unknown")
                continue
            b = Builder(gm, node)
            if is_op(node, "aten.roll"):
                new = _roll(b, node, xs)
            elif is_op(node, "aten.pad", "aten.constant_pad_nd"):
                new = _pad(b, node, xs)
            elif is_op(node, "aten.select") and node.target == aten.select.int:
                d, i = node.args[1] % len(xs), node.args[2] % xs[node.args[1]]
                sl = b.call(aten.slice.Tensor, node.args[0], d, i, i + 1)
                new = b.call(aten.reshape.default, sl, list(shape(node)))
            elif is_op(node, "aten.index") and get_constant(gm, node.args[0]) is None:
                new = _index(gm, b, node, xs)
            else:
                continue
            if isinstance(new, str):
                result.misses.append(f"{where(node)}: {new}")
                continue
            if new is not node.args[0]:
                new.meta["val"] = node.meta.get("val")  # later rewrites in this sweep read the shape
            replace_uses(node, new)
            gm.graph.erase_node(node)
            result.rewrites += 1
        result.changed = result.rewrites > 0
        return result


def _roll(b: Builder, node: fx.Node, xs) -> fx.Node | str:
    shifts, dims = list(node.args[1]), list(arg(node, 2, "dims", []))
    if not dims or len(shifts) != len(dims):
        return "roll over the flattened tensor"
    x = node.args[0]
    for s, d in zip(shifts, dims):
        d %= len(xs)
        n = xs[d]
        s %= n
        if s == 0:
            continue
        tail = b.call(aten.slice.Tensor, x, d, n - s, n)
        head = b.call(aten.slice.Tensor, x, d, 0, n - s)
        x = b.call(aten.cat.default, [tail, head], d)
    return x


def _pad(b: Builder, node: fx.Node, xs) -> fx.Node | str:
    pads = list(node.args[1])
    mode = arg(node, 2, "mode", "constant") if is_op(node, "aten.pad") else "constant"
    value = arg(node, 3, "value", None) if is_op(node, "aten.pad") else arg(node, 2, "value", 0.0)
    value = 0.0 if value is None else float(value)
    if mode != "constant":
        return f"{mode} padding"
    if any(p < 0 for p in pads):
        return "negative padding (a crop)"
    x, cur = node.args[0], list(xs)
    dtype = node.meta["val"].dtype
    for i in range(0, len(pads), 2):
        d = len(xs) - 1 - i // 2
        before, after = pads[i], pads[i + 1]
        if before == 0 and after == 0:
            continue
        parts = []
        for width in (before, None, after):
            if width is None:
                parts.append(x)
            elif width:
                block = list(cur)
                block[d] = width
                parts.append(b.constant(torch.full(block, value, dtype=dtype), "pad_block"))
        x = b.call(aten.cat.default, parts, d)
        cur[d] += before + after
    return x


def _index(gm, b: Builder, node: fx.Node, xs) -> fx.Node | str:
    indices = list(node.args[1])
    live = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(live) != 1:
        return "advanced indexing over several dims"
    d, idx_node = live[0]
    while isinstance(idx_node, fx.Node) and is_op(idx_node, "aten.lift_fresh_copy", "aten.clone", "aten.alias"):
        idx_node = idx_node.args[0]  # torch.tensor([...]) literals arrive as a copy of a lifted constant
    idx = get_constant(gm, idx_node)
    if idx is None or idx.dim() != 1 or idx.dtype == torch.bool or idx.numel() == 0:
        return "indices are not a constant 1-D integer tensor"
    idx = idx % xs[d]
    step = int(idx[1] - idx[0]) if idx.numel() > 1 else 1
    if step <= 0 or not torch.equal(idx, idx[0] + step * torch.arange(idx.numel())):
        return "indices are not an increasing arithmetic progression"
    start = int(idx[0])
    return b.call(aten.slice.Tensor, node.args[0], d, start, start + step * (idx.numel() - 1) + 1, step)
