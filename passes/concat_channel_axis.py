"""concat_channel_axis (exact, bit-identical): Concat moved onto the channel axis, for targets that concatenate only
along it (DLA: IConcatenationLayer joins along the third-from-last axis only; the ViT class token is joined along
the token axis, Swin rolls along H and W).

    cat([x_i], d), x_i of shape (*pre, n_i, *post)
        -> reshape(cat([reshape(x_i, (P, n_i, Q, 1))], 1), output shape)      P = prod(pre), Q = prod(post)

In row-major order (P, n_i, Q) is x_i's own memory order, so every Reshape is free and the 4-D Concat is along
axis 1 = -3. Where Q exceeds the target's largest non-batch dimension it is split into two factors (P, n, Q1, Q2).
The allowed axes come from the profile's Concat axis rule (check 'axis_in'); targets without one are left alone.
"""
from __future__ import annotations

import math

import torch.fx as fx

from attn2conv.graph import Builder, aten, is_op, replace_uses, shape
from attn2conv.legality import concat_axis_legal, concat_axis_rule
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register

ID = "concat_channel_axis"


@register
class ConcatChannelAxis(GraphPass):
    id = ID
    exact = True
    removes = ()
    introduces = ("aten.reshape",)
    summary = "Concat along a non-channel axis -> Reshape to (P, n, Q, 1), Concat on axis 1, Reshape back"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        rule = concat_axis_rule(ctx.profile)
        if rule is None:
            result.notes.append("the target has no Concat axis rule; nothing to do")
            return result
        max_dim = _max_dim(ctx.profile)
        for node in list(gm.graph.nodes):
            if is_op(node, "aten.cat") and not _legal(node, rule):
                result.tally(node, _rewrite(gm, node, max_dim))
        return result


def _max_dim(profile) -> int:
    for r in profile.rules:
        if r.check == "tensor_dims_max" and "max" in r.params:
            return int(r.params["max"])
    return 2 ** 31 - 1


def _legal(node: fx.Node, params: dict) -> bool:
    out = shape(node)
    if out is None:
        return True  # nothing to reason about; the verifier will say
    return concat_axis_legal(params, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(out))


def _rewrite(gm: fx.GraphModule, node: fx.Node, max_dim: int) -> str | None:
    out, inputs = shape(node), list(node.args[0])
    shapes = [shape(x) for x in inputs]
    if out is None or any(s is None for s in shapes):
        return "input shapes unknown"
    d = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(out)
    pre, post = math.prod(out[:d]), math.prod(out[d + 1:])
    tail = _split(post, max_dim)
    if tail is None:
        return f"the trailing size {post} has no factorisation into two dims <= {max_dim}"
    b = Builder(gm, node)
    parts = [b.call(aten.reshape.default, x, [pre, s[d], *tail]) for x, s in zip(inputs, shapes)]
    new = b.call(aten.reshape.default, b.call(aten.cat.default, parts, 1), list(out))
    new.meta["val"] = node.meta.get("val")
    replace_uses(node, new)
    gm.graph.erase_node(node)
    return None


def _split(q: int, max_dim: int) -> list[int] | None:
    """(Q, 1), or (Q1, Q2) with Q1 * Q2 = Q, both <= max_dim, when Q itself is too large."""
    if q <= max_dim:
        return [q, 1]
    for q1 in range(min(max_dim, q), 0, -1):
        if q % q1 == 0 and q // q1 <= max_dim:
            return [q1, q // q1]
    return None
