"""rotate_to_linear (exact, bit-identical up to the sign of zeros): the "rotate" of rotary position embeddings as one
constant Linear over the last axis, for targets that flag its ops (DLA: Neg is RFE, stack exports to Unsqueeze + a
Concat off the channel axis).

RoPE multiplies x by cos and a rotated copy of x by sin. The rotation is a signed permutation of the last axis:

    rot(x)         = stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)   (EVA-02: [-x1, x0, -x3, x2, ...])
    rotate_half(x) = cat([-x2, x1], -1),  x1, x2 = x.chunk(2, -1)               ([-x3, -x4, -x5, x0, x1, x2])

Any tree of strided slices / chunks of the last axis, negations and products with a Python scalar, joined by a cat
on the last axis or a stack on a new last axis flattened back by a reshape, is y = x P^T for a constant matrix P
with one nonzero per row. It becomes aten.linear(x, P), which linear_to_conv turns into a 1x1 Conv: every output is
one product x_i * p plus exact zeros, so the numbers do not change. The index map is tracked symbolically (no
evaluation); the largest such tree is taken (roots in reverse order) and only where the profile flags its ops more
than the Conv + Transpose the Linear becomes.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from attn2conv.graph import eliminate_dead_code as fx_dead_code
from attn2conv.graph import Builder, arg, aten, is_op, replace_uses, shape
from attn2conv.legality import onnx_cost, onnx_ops_for
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register

ID = "rotate_to_linear"

# One output position of the last axis: (index into x's last axis, coefficient).
Column = list[tuple[int, float]]


@register
class RotateToLinear(GraphPass):
    id = ID
    exact = True
    removes = ("aten.neg", "aten.stack", "aten.cat")
    introduces = ("aten.linear",)
    summary = "RoPE rotate-half / rotate-pairs (strided slices, Neg, stack/cat on the last axis) -> one +-1 Linear"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        replacement_cost = onnx_cost(ctx.profile, ["Conv", "Transpose", "Reshape"])
        replaced: set[fx.Node] = set()  # trees already rewritten (their inner roots are dead now)
        for node in reversed(list(gm.graph.nodes)):
            if node in replaced or not node.users or not _is_root(node):
                continue
            tree: list[fx.Node] = []
            found = _track(node, tree)
            if found is None:
                continue
            x, columns = found
            if not any(is_op(n, "aten.neg", "aten.mul", "aten.stack") for n in tree):
                continue  # slices joined by a cat: concat_channel_axis moves the cat, no conv needed
            ops = [op for n in tree for op in (onnx_ops_for(n) or ())]
            if onnx_cost(ctx.profile, ops) <= replacement_cost:
                continue
            xs, ys = shape(x), shape(node)
            if xs is None or ys is None or ys[:-1] != xs[:-1] or len(columns) != ys[-1]:
                result.tally(node, f"result {ys} is not the input {xs} with a new last axis")
                continue
            weight = torch.zeros(len(columns), xs[-1], dtype=torch.float32)
            for row, column in enumerate(columns):
                for index, coefficient in column:
                    weight[row, index] += coefficient
            b = Builder(gm, node)
            y = b.call(aten.linear.default, x, b.constant(weight, "rotate_weight"))
            y.meta["val"] = node.meta.get("val")
            replace_uses(node, y)
            replaced.update(tree)
            result.tally(node, None)
        if result.changed:
            fx_dead_code(gm.graph)
        return result


def _is_root(node: fx.Node) -> bool:
    return _last_axis_cat(node) or (is_op(node, "aten.reshape", "aten.view") and _stack_flattened(node))


def _last_axis_cat(node: fx.Node) -> bool:
    if not is_op(node, "aten.cat"):
        return False
    ys = shape(node)
    return ys is not None and arg(node, 1, "dim", 0) % len(ys) == len(ys) - 1


def _stack_flattened(node: fx.Node) -> bool:
    """reshape(stack(pieces, -1), shape without the new axis, its last two dims merged)."""
    src = node.args[0]
    if not isinstance(src, fx.Node) or not is_op(src, "aten.stack"):
        return False
    ss, ys = shape(src), shape(node)
    if ss is None or ys is None or arg(src, 1, "dim", 0) % len(ss) != len(ss) - 1:
        return False
    return list(ys) == [*ss[:-2], ss[-2] * ss[-1]]


def _track(node: fx.Node, tree: list[fx.Node]) -> tuple[fx.Node, list[Column]] | None:
    """(x, columns) when `node` is a signed selection of x's last axis built from the ops above; else None."""
    ns = shape(node)
    if ns is None or not ns:
        return None
    last = len(ns) - 1
    if _last_axis_cat(node):
        parts = [_track(p, tree) for p in node.args[0]]
        return _same_source(parts, lambda cols: [c for col in cols for c in col], tree, node)
    if is_op(node, "aten.reshape", "aten.view") and _stack_flattened(node):
        stack = node.args[0]
        parts = [_track(p, tree) for p in stack.args[0]]
        tree.append(stack)
        return _same_source(parts, lambda cols: [col[j] for j in range(len(cols[0])) for col in cols], tree, node)
    if is_op(node, "aten.slice") and arg(node, 1, "dim", 0) % len(ns) == last:
        inner = _track_or_source(node.args[0], tree)
        start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
        if inner is None or not all(v is None or isinstance(v, int) for v in (start, end, step)):
            return None
        tree.append(node)
        return inner[0], inner[1][slice(start, end, step)]
    if node.target is operator.getitem and is_op(node.args[0], "aten.split", "aten.chunk", "aten.split_with_sizes"):
        return _split_item(node, tree)
    if is_op(node, "aten.neg") or (is_op(node, "aten.mul") and isinstance(node.args[1], (int, float))
                                   and isinstance(node.args[0], fx.Node)):
        factor = -1.0 if is_op(node, "aten.neg") else float(node.args[1])
        inner = _track_or_source(node.args[0], tree)
        if inner is None:
            return None
        tree.append(node)
        return inner[0], [[(i, c * factor) for i, c in col] for col in inner[1]]
    return None


def _track_or_source(node, tree: list[fx.Node]) -> tuple[fx.Node, list[Column]] | None:
    """A trackable node, or else the source x itself (identity columns)."""
    if not isinstance(node, fx.Node):
        return None
    found = _track(node, tree)
    if found is not None:
        return found
    ns = shape(node)
    return (node, [[(i, 1.0)] for i in range(ns[-1])]) if ns else None


def _split_item(node: fx.Node, tree: list[fx.Node]) -> tuple[fx.Node, list[Column]] | None:
    split = node.args[0]
    xs = shape(split.args[0])
    if xs is None or arg(split, 2, "dim", 0) % len(xs) != len(xs) - 1:
        return None
    sizes = arg(split, 1, "split_size" if not is_op(split, "aten.chunk") else "chunks", None)
    n = xs[-1]
    if is_op(split, "aten.chunk"):
        per = -(-n // sizes)
        bounds = list(range(0, n, per))
        sizes = [min(per, n - s) for s in bounds]
    elif isinstance(sizes, int):
        sizes = [min(sizes, n - s) for s in range(0, n, sizes)]
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    k = node.args[1]
    inner = _track_or_source(split.args[0], tree)
    if inner is None or k >= len(sizes):
        return None
    tree.extend((split, node))
    return inner[0], inner[1][offsets[k]:offsets[k] + sizes[k]]


def _same_source(parts, join, tree: list[fx.Node], node: fx.Node):
    if any(p is None for p in parts) or len({p[0] for p in parts}) != 1:
        return None
    tree.append(node)
    return parts[0][0], join([p[1] for p in parts])
