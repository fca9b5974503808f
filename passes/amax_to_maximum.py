"""amax_to_maximum (exact): a max over one short static axis as a tree of element-wise maximums of its slices.

Hiera pools its queries with `q.view(B, heads, stride, -1, d).max(dim=2)` (torch.export: aten.amax over an axis of
size 4), which exports as ReduceMax: an IReduceLayer, rejected in the TensorRT safety scope (A2C-SAFE-OP-REDUCE) and
on DLA. For an axis of size k the same values are

    amax(x, d) = maximum(maximum(x[d=0], x[d=1]), maximum(x[d=2], x[d=3]))     (k - 1 Max, k Slice; exact)

then reshaped to amax's output shape. Rewritten only where the target flags ReduceMax more than Max + Slice, and
for axes of at most `max_axis` elements (option, default 16) so the graph stays small.
"""
from __future__ import annotations

import torch.fx as fx

from attn2conv.attention_match import eliminate_dead_code
from attn2conv.graph import Builder, arg, aten, is_op, replace_uses, shape
from attn2conv.legality import onnx_cost
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register

ID = "amax_to_maximum"


@register
class AmaxToMaximum(GraphPass):
    id = ID
    exact = True
    removes = ("aten.amax",)
    introduces = ("aten.slice", "aten.maximum", "aten.reshape")
    summary = "amax over one short axis -> element-wise Max of its slices (ReduceMax is not safe/DLA)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        if onnx_cost(ctx.profile, ["ReduceMax"]) <= onnx_cost(ctx.profile, ["Max", "Slice"]):
            result.notes.append("the target accepts ReduceMax: left as is")
            return result
        max_axis = int(ctx.option(ID, "max_axis", 16))
        for node in list(gm.graph.nodes):
            if is_op(node, "aten.amax"):
                result.tally(node, _rewrite(gm, node, max_axis))
        if result.changed:
            eliminate_dead_code(gm)
        return result


def _rewrite(gm: fx.GraphModule, node: fx.Node, max_axis: int) -> str | None:
    x = node.args[0]
    xs, outs = shape(x), shape(node)
    dims = arg(node, 1, "dim", [])
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if xs is None or outs is None or len(dims) != 1:
        return f"amax over {dims or 'all axes'} (one axis of a known shape is rewritten)"
    d = dims[0] % len(xs)
    k = xs[d]
    if k > max_axis:
        return f"axis of {k} elements > max_axis {max_axis}"
    b = Builder(gm, node)
    parts = [b.call(aten.slice.Tensor, x, d, i, i + 1) for i in range(k)]
    while len(parts) > 1:  # a balanced tree: depth log2(k)
        parts = [b.call(aten.maximum.default, parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    y = b.call(aten.reshape.default, parts[0], list(outs))
    y.meta["val"] = node.meta.get("val")
    replace_uses(node, y)
    gm.graph.erase_node(node)
    return None
