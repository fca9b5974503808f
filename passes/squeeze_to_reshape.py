"""squeeze_to_reshape (exact, bit-identical): Squeeze/Unsqueeze/unbind as Reshape and Slice, for targets that flag
Squeeze and Unsqueeze (DLA through TensorRT 8.6: both 'RFE', only Reshape and Transpose run as IShuffle).

    unbind(x, d)[i]   -> reshape(slice(x, d, i, i+1), shape without d)     (was Split + Squeeze)
    squeeze(x, ...)   -> reshape(x, output shape)
    unsqueeze(x, d)   -> reshape(x, output shape)
    stack(xs, d)      -> cat([reshape(x, shape with a 1 at d) for x in xs], d)     (was Unsqueeze x n + Concat;
                         concat_channel_axis then moves a Concat off the channel axis)

Static shapes only (every captured graph has them). Runs only where the target profile flags Squeeze or Unsqueeze
more than Slice + Reshape, so other targets keep the exporter's own forms.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from attn2conv.graph import Builder, aten, is_op, replace_uses, shape
from attn2conv.legality import onnx_cost
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register


@register
class SqueezeToReshape(GraphPass):
    id = "squeeze_to_reshape"
    exact = True
    removes = ("aten.unbind", "aten.squeeze", "aten.unsqueeze", "aten.stack")
    introduces = ("aten.slice", "aten.reshape", "aten.cat")
    summary = "unbind / squeeze / unsqueeze / stack -> Slice, Reshape (+ Concat) where the target flags (Un)Squeeze"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        if onnx_cost(ctx.profile, ["Squeeze", "Unsqueeze"]) <= onnx_cost(ctx.profile, ["Slice", "Reshape"]):
            result.notes.append("the target accepts Squeeze/Unsqueeze; nothing to do")
            return result
        for node in list(gm.graph.nodes):
            if is_op(node, "aten.unbind"):
                result.tally(node, _unbind(gm, node))
            elif is_op(node, "aten.stack"):
                result.tally(node, _stack(gm, node))
            elif is_op(node, "aten.squeeze", "aten.unsqueeze"):
                out = shape(node)
                if out is None:
                    result.tally(node, "output shape unknown")
                    continue
                new = Builder(gm, node).call(aten.reshape.default, node.args[0], list(out))
                new.meta["val"] = node.meta.get("val")
                replace_uses(node, new)
                gm.graph.erase_node(node)
                result.tally(node, None)
        return result


def _unbind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    xs = shape(node.args[0])
    if xs is None:
        return "input shape unknown"
    d = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(xs)
    users = list(node.users)
    if any(u.target is not operator.getitem for u in users):
        return "the unbound tuple is used whole, not through its items"
    out_shape = [s for i, s in enumerate(xs) if i != d]
    for user in users:
        i = user.args[1]
        b = Builder(gm, user)
        piece = b.call(aten.reshape.default, b.call(aten.slice.Tensor, node.args[0], d, i, i + 1), out_shape)
        piece.meta["val"] = user.meta.get("val")
        replace_uses(user, piece)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    return None


def _stack(gm: fx.GraphModule, node: fx.Node) -> str | None:
    ys = shape(node)
    pieces = node.args[0]
    if ys is None or any(shape(p) is None for p in pieces):
        return "shape unknown"
    d = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(ys)
    b = Builder(gm, node)
    views = [b.call(aten.reshape.default, p, [*ys[:d], 1, *ys[d + 1:]]) for p in pieces]
    y = b.call(aten.cat.default, views, d)
    y.meta["val"] = node.meta.get("val")
    replace_uses(node, y)
    gm.graph.erase_node(node)
    return None
