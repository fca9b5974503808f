"""expand_to_broadcast (exact, bit-identical): Expand nodes dropped where the element-wise ops that read them broadcast
anyway, for targets that flag Expand (DLA through TensorRT 8.6: Expand is 'RFE').

    y = mul(value, expand(context, value.shape))   ->   y = mul(value, context)     (MobileViTv2's separable attention)

An expand(x, shape) is removed when every reader is a broadcasting element-wise op (add, sub, mul, div, maximum,
minimum) whose output shape stays the same with x in its place: broadcasting repeats x exactly as the Expand did.
An Expand to its own shape is an alias and is dropped whatever reads it. Any other Expand (read by a cat, a
reshape, a conv) is left and reported with its reader, so the finding names what to rewrite.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from attn2conv.graph import is_op, shape, where
from attn2conv.legality import onnx_cost
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register

BROADCASTING = ("aten.add", "aten.sub", "aten.mul", "aten.div", "aten.maximum", "aten.minimum")


@register
class ExpandToBroadcast(GraphPass):
    id = "expand_to_broadcast"
    exact = True
    removes = ("aten.expand", "aten.expand_as")
    introduces = ()
    summary = "Expand read only by broadcasting element-wise ops -> dropped (the ops broadcast the same way)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        if onnx_cost(ctx.profile, ["Expand"]) == 0:
            result.notes.append("the target accepts Expand; nothing to do")
            return result
        for node in list(gm.graph.nodes):
            if is_op(node, "aten.expand", "aten.expand_as") and isinstance(node.args[0], fx.Node):
                result.tally(node, _drop(gm, node))
        return result


def _drop(gm: fx.GraphModule, node: fx.Node) -> str | None:
    x = node.args[0]
    xs, ys = shape(x), shape(node)
    if xs is None or ys is None:
        return "shape unknown"
    if xs == ys:
        node.replace_all_uses_with(x)
        gm.graph.erase_node(node)
        return None
    for user in node.users:
        if not is_op(user, *BROADCASTING) or user.kwargs:
            return f"read by {where(user)}, which does not broadcast"
        others = [shape(a) if isinstance(a, fx.Node) else () for a in user.args if a is not node]
        if any(s is None for s in others):
            return "a reader's other operand has no known shape"
        try:
            broadcast = tuple(torch.broadcast_shapes(xs, *others))
        except RuntimeError:
            return f"{where(user)} would not broadcast {xs} against {others}"
        if broadcast != shape(user):
            return f"{where(user)} would produce {broadcast} instead of {shape(user)} without the Expand"
    node.replace_all_uses_with(x)
    gm.graph.erase_node(node)
    return None
