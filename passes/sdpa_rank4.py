"""sdpa_rank4 (exact): scaled_dot_product_attention on 3-D or 5-D+ tensors viewed as 4-D.

torch.onnx's exporter translates aten.scaled_dot_product_attention for 4-D q, k, v only ("only 4D query, key, and
value are supported"), so a model that calls F.scaled_dot_product_attention on (B, windows, heads, N, d) tensors
(timm Twins-SVT's locally-grouped attention, Hiera's mask units) cannot be exported at all. The leading dims are only
batch dims of the attention, so

    sdpa(q (L..., N, d), k, v, mask) = sdpa(q.reshape(L0, prod(L1...), N, d), ...).reshape(L..., N, dv)

(rank 3: (L0, 1, N, d)). A mask is reshaped the same way when it has the full leading dims or none (it broadcasts
over them); other broadcasting masks are left as they are, with the reason. Reshapes only: no arithmetic changes.
"""
from __future__ import annotations

import math

import torch.fx as fx

from attn2conv.attention_match import eliminate_dead_code
from attn2conv.graph import Builder, arg, aten, is_op, replace_uses, shape
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register


@register
class SdpaRank4(GraphPass):
    id = "sdpa_rank4"
    exact = True
    removes = ()
    introduces = ("aten.reshape",)
    summary = "scaled_dot_product_attention on 3-D / 5-D tensors -> 4-D views (the ONNX exporter takes 4-D only)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        for node in list(gm.graph.nodes):
            if is_op(node, "aten.scaled_dot_product_attention"):
                qs = shape(node.args[0])
                if qs is not None and len(qs) != 4:
                    result.tally(node, _rewrite(gm, node))
        if result.changed:
            eliminate_dead_code(gm)
        return result


def _rewrite(gm: fx.GraphModule, node: fx.Node) -> str | None:
    q, k, v = node.args[:3]
    qs, ks, vs, outs = shape(q), shape(k), shape(v), shape(node)
    if None in (ks, vs, outs) or len(qs) < 3 or not (len(qs) == len(ks) == len(vs)) or qs[:-2] != ks[:-2] or \
            ks[:-2] != vs[:-2]:
        return f"q {qs}, k {ks}, v {vs} do not share their leading dims"
    lead = qs[:-2]
    view = (lead[0], math.prod(lead[1:]))  # rank 3: (L0, 1)
    mask = arg(node, 3, "attn_mask")
    b = Builder(gm, node)
    new_mask = mask
    if isinstance(mask, fx.Node):
        ms = shape(mask)
        if ms is None:
            return "attn_mask has no known shape"
        if len(ms) == len(qs) and tuple(ms[:-2]) == lead:
            new_mask = b.call(aten.reshape.default, mask, [*view, *ms[-2:]])
        elif len(ms) > 2 and any(s != 1 for s in ms[:-2]):
            return f"attn_mask {ms} broadcasts over some leading dims of {lead} only"
        elif len(ms) > 2:
            new_mask = b.call(aten.reshape.default, mask, list(ms[-2:]))
    args = list(node.args)
    args[:3] = [b.call(aten.reshape.default, t, [*view, *s[-2:]]) for t, s in ((q, qs), (k, ks), (v, vs))]
    kwargs = dict(node.kwargs)
    if len(args) > 3:
        args[3] = new_mask
    if "attn_mask" in kwargs:
        kwargs["attn_mask"] = new_mask
    attention = b.call(aten.scaled_dot_product_attention.default, *args, **kwargs)
    out = b.call(aten.reshape.default, attention, list(outs))
    out.meta["val"] = node.meta.get("val")
    replace_uses(node, out)
    gm.graph.erase_node(node)
    return None
