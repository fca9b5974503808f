"""conv_stride_split (exact, bit-identical): a convolution whose stride exceeds the target's limit becomes a
convolution with a smaller stride followed by a 1x1-window MaxPool that keeps every f-th output.

    conv(x, w, stride s)  ->  max_pool(conv(x, w, stride s / f), kernel 1, stride f)

Output j of the stride-s/f conv starts at input j * s / f; the pool keeps j = o * f, i.e. the windows starting at
o * s: the original outputs, bit for bit (a 1x1 max pool only selects). Sizes agree because
floor(floor(M / s1) / f) = floor(M / (s1 f)). Cost: f^2 times the conv's outputs (a ViT patch embedding, 16x16
stride 16 on DLA with its stride limit 8: one conv of 4x the outputs, about 1 % of a ViT's MACs).
The limits come from the profile's Conv and pooling stride rules (check 'attr_range' on 'strides').
"""
from __future__ import annotations

import torch.fx as fx

from attn2conv.graph import Builder, arg, aten, is_op, pair, replace_uses
from attn2conv.legality import attr_max
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register


@register
class ConvStrideSplit(GraphPass):
    id = "conv_stride_split"
    exact = True
    removes = ()
    introduces = ("aten.conv2d", "aten.max_pool2d")
    summary = "conv with stride above the target's limit -> conv with a legal stride + 1x1 MaxPool subsampling"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        conv_max, pool_max = attr_max(ctx.profile, "Conv", "strides"), attr_max(ctx.profile, "MaxPool", "strides")
        if conv_max is None:
            result.notes.append("the target has no Conv stride limit; nothing to do")
            return result
        for node in list(gm.graph.nodes):
            if is_op(node, "aten.conv2d"):
                stride = pair(arg(node, 3, "stride", [1, 1]))
                if max(stride) > conv_max:
                    result.tally(node, _split(gm, node, stride, conv_max, pool_max))
        return result


def _split(gm: fx.GraphModule, node: fx.Node, stride: list[int], conv_max: int, pool_max: int | None) -> str | None:
    inner, outer = [], []
    for s in stride:
        s1 = next((c for c in range(min(s, conv_max), 0, -1) if s % c == 0), 1)
        if pool_max is not None and s // s1 > pool_max:
            return f"stride {s} is not a product of a conv stride <= {conv_max} and a pool stride <= {pool_max}"
        inner.append(s1)
        outer.append(s // s1)
    x, w = node.args[0], node.args[1]
    bias = arg(node, 2, "bias")
    padding, dilation, groups = arg(node, 4, "padding", [0, 0]), arg(node, 5, "dilation", [1, 1]), arg(node, 6, "groups", 1)
    if isinstance(padding, str):
        return f"padding={padding!r} (only explicit paddings are rewritten)"
    b = Builder(gm, node)
    conv = b.call(aten.conv2d.default, x, w, bias, inner, padding, dilation, groups)
    new = b.call(aten.max_pool2d.default, conv, [1, 1], outer)
    new.meta["val"] = node.meta.get("val")
    replace_uses(node, new)
    gm.graph.erase_node(node)
    return None
