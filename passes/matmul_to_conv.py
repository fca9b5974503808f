"""matmul_to_conv (exact): a MatMul of two activations becomes broadcast multiplies and constant-weight convolutions.

What attention_to_conv leaves: products of two computed tensors that are not a softmax attention core, above all
linear attention, whose first product contracts over the tokens,

    CoaT factorised attention      kv = softmax_over_tokens(k)^T @ v   (B, h, d, dv);   out = q @ kv
    EfficientViT-MIT ReLU attention kv = relu(k)^T @ pad(v, 1)          (B, h, d, dv+1); out = q @ kv, then / last column

(and any other, e.g. VOLO's outlook attention `attn @ v` over 3x3 windows). Both are plain matrix products of
activations, which TensorRT's safety scope rejects (IMatrixMultiply) and DLA takes only with a constant second input.

Maths. C = A @ B with A (L..., P, R), B (L..., R, Q), C (L..., P, Q): the leading dims L become a batch axis (L[0],
where the target's batch limit allows it; else 1) and g channel groups (the rest). Per group, the product
A[p, r] * B[r, q] is one broadcast Mul with the contracted index r on channels, and the sum over r is a grouped
1x1 convolution with weights one (one output per group), as in attention_to_conv:

    A' (Bt, g*R, 1, P) = A permuted to (L..., R, P), reshaped         (free when A is a transpose, e.g. k^T)
    B' (Bt, g*R, Q, 1) = B reshaped                                   (free)
    C^T (Bt, g, Q, P)  = Conv1x1_groups=g( A' * B', weight = ones(g, R, 1, 1) ),   then permuted to (L..., P, Q)

with the longer of P and Q as the innermost axis of the product (ONNX Runtime's broadcast Mul runs along it; for
q @ kv that is the N queries, for k^T @ v both are head dims), the other one on H (then C needs no permute).

Chunks: the product holds Bt*g*R*P*Q elements (CoaT-Lite Tiny at 224 px, first stage: 8 heads x 3137 tokens x 8 x 8
= 1.6M) and g*R channels (25 096 there), above the target's channel limit (trt-safe: 4096, DLA: 8192, also for the
reshaped operands). So A and B are cut, in their natural (Bt, g, R, .) layout where channels are only g, into
chunks of whole groups, and a group whose R alone is too large into pieces of R whose partial sums are added (the
sum over tokens as several channel sums). Each chunk's product holds at most `max_broadcast_elems` elements
(ctx.option("matmul_to_conv", ...), default attention_to_conv's DEFAULT_MAX_BROADCAST, 1M: a chunk and the conv
reading it stay in cache) and at most the channel limit; group chunks are concatenated on the channel axis.

Numbers: the same products, summed in another order (float rounding only).

Ops introduced: aten.mul (Mul), aten.conv2d (Conv, constant weights), aten.reshape (Reshape), aten.permute
(Transpose), aten.add (Add: partial sums; ONNX Runtime's half sums, see attention_to_conv), aten.split_with_sizes
(Split) and aten.cat (Concat, channel axis) for chunks. Left alone: targets that accept MatMul of two activations
(trt), products with a constant operand (a linear map: a 1x1 convolution with those weights is far cheaper; reported
where the target flags it), operands of rank < 2 or with different leading dims (reported).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from attn2conv.attention_match import MATMULS, constant_value, eliminate_dead_code
from attn2conv.graph import Builder, aten, is_op, replace_uses, shape, where
from attn2conv.legality import axis_limit, batch_limit
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register
from attn2conv.passes.attention_to_conv import (DEFAULT_MAX_BROADCAST, _cat, _channel_sum, _even_sizes,
                                                _matmul_of_activations_allowed, _pieces)

ID = "matmul_to_conv"


@register
class MatmulToConv(GraphPass):
    id = ID
    exact = True
    removes = ("aten.matmul", "aten.bmm", "aten.mm")
    introduces = ("aten.mul", "aten.conv2d", "aten.reshape", "aten.permute", "aten.add", "aten.split_with_sizes",
                  "aten.cat")
    summary = "MatMul of two activations (linear attention k^T v, q kv) -> broadcast Mul + grouped 1x1 Conv of ones"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        if _matmul_of_activations_allowed(ctx.profile):
            result.notes.append(f"{ctx.profile.id} accepts MatMul of two activations: left as they are")
            return result
        limits = _Limits(ctx.profile, int(ctx.option(ID, "max_broadcast_elems", DEFAULT_MAX_BROADCAST)))
        peak = 0
        for node in list(gm.graph.nodes):
            if not is_op(node, *MATMULS, "aten.mm"):
                continue
            outcome = _rewrite(gm, node, limits)
            if isinstance(outcome, str):
                result.misses.append(f"{where(node)}: {outcome}")
                continue
            result.rewrites += 1
            peak = max(peak, outcome.peak)
            if outcome.chunks > 1:
                result.notes.append(f"{where(node)}: {outcome.chunks} chunks ({outcome.groups} groups x "
                                    f"{outcome.contracted} of {outcome.total} contracted channels)")
        result.changed = result.rewrites > 0
        if result.changed:
            eliminate_dead_code(gm)
            result.notes.append(f"peak broadcast tensor {peak} elements ({peak * 4 / 2**20:.1f} MiB fp32), budget "
                                f"{limits.budget}, channels <= {limits.channels}")
        return result


class _Limits:
    """The element budget of one product and the target's limits on the batch axis and on channels (rank 4)."""

    def __init__(self, profile, budget: int):
        self.budget = budget
        batch = batch_limit(profile)
        self.batch = batch[0] if batch else None
        self.channels = axis_limit(profile, 1, 4) or 1 << 30


class _Outcome:
    def __init__(self, peak: int, chunks: int, groups: int, contracted: int, total: int):
        self.peak, self.chunks, self.groups, self.contracted, self.total = peak, chunks, groups, contracted, total


def _rewrite(gm: fx.GraphModule, node: fx.Node, limits: _Limits) -> _Outcome | str:
    a, b_op = node.args[:2]
    as_, bs, outs = shape(a), shape(b_op), shape(node)
    if as_ is None or bs is None or outs is None:
        return "an operand has no known shape"
    for operand in (a, b_op):
        if constant_value(gm, operand) is not None:
            return (f"operand {operand.name} is a constant: a linear map, left for a 1x1 convolution with its weights "
                    f"(linear_to_conv)")
    if len(as_) < 2 or len(bs) < 2:
        return f"operands {as_} @ {bs}: a vector operand (rank 1) is not supported"
    if as_[:-2] != bs[:-2]:
        return f"operands {as_} @ {bs} have different leading dims (broadcasting matmul is not supported)"
    lead, (p, r), q = as_[:-2], as_[-2:], bs[-1]
    batch = lead[0] if lead and (limits.batch is None or lead[0] <= limits.batch) else 1
    groups = math.prod(lead) // batch
    if groups > limits.channels:
        return f"{groups} matrices per image exceed the target's {limits.channels} channels"
    queries_inner = p > q  # the longer output axis innermost (see the module docstring)
    # chunk sizes: contracted channels per piece, then whole groups per chunk when a group fits in one piece
    per_r = batch * p * q
    piece = max(1, min(r, limits.channels, limits.budget // per_r))
    group_chunk = max(1, min(groups, limits.channels // r, limits.budget // (per_r * r))) if piece == r else 1
    group_sizes, r_sizes = _even_sizes(groups, group_chunk), _even_sizes(r, piece)

    bld = Builder(gm, node)
    a_t = bld.call(aten.permute.default, bld.call(aten.reshape.default, a, [batch, groups, p, r]), [0, 1, 3, 2])
    b_n = bld.call(aten.reshape.default, b_op, [batch, groups, r, q])
    ones: dict[tuple[int, int], fx.Node] = {}
    rows = []
    for a_g, b_g, gc in zip(_pieces(bld, a_t, 1, group_sizes), _pieces(bld, b_n, 1, group_sizes), group_sizes):
        total = None
        for a_r, b_r, rc in zip(_pieces(bld, a_g, 2, r_sizes), _pieces(bld, b_g, 2, r_sizes), r_sizes):
            if queries_inner:  # (Bt, gc*rc, 1, P) * (Bt, gc*rc, Q, 1) -> (Bt, gc*rc, Q, P)
                x = bld.call(aten.mul.Tensor, bld.call(aten.reshape.default, a_r, [batch, gc * rc, 1, p]),
                             bld.call(aten.reshape.default, b_r, [batch, gc * rc, q, 1]))
            else:  # (Bt, gc*rc, P, 1) * (Bt, gc*rc, 1, Q) -> (Bt, gc*rc, P, Q)
                x = bld.call(aten.mul.Tensor, bld.call(aten.reshape.default, a_r, [batch, gc * rc, p, 1]),
                             bld.call(aten.reshape.default, b_r, [batch, gc * rc, 1, q]))
            if (gc, rc) not in ones:
                ones[(gc, rc)] = bld.constant(torch.ones(gc, rc, 1, 1, dtype=x.meta["val"].dtype), "matmul_sum_weight")
            part = _channel_sum(bld, x, gc, rc, ones[(gc, rc)])
            total = part if total is None else bld.call(aten.add.Tensor, total, part)
        rows.append(total)
    c = _cat(bld, rows, 1)  # (Bt, g, Q, P) or (Bt, g, P, Q)
    if queries_inner:
        c = bld.call(aten.permute.default, c, [0, 1, 3, 2])
    c = bld.call(aten.reshape.default, c, list(outs))
    replace_uses(node, c)
    gm.graph.erase_node(node)
    chunks = len(group_sizes) * len(r_sizes)
    return _Outcome(batch * max(group_sizes) * max(r_sizes) * p * q, chunks, max(group_sizes), max(r_sizes), r)
