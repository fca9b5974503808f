"""normalize_decompose (exact): L2 norms (F.normalize, torch.linalg.norm) and sums over one axis as ops the target allows.

Cosine attention (SwinV2, XCiT) normalises q and k with F.normalize, which torch.export writes as

    n = linalg_vector_norm(x, 2, [dim], keepdim=True);  y = x / expand(clamp_min(n, eps), x.shape)

and which exports to ReduceL2 (rejected by the TensorRT 10 parser, an IReduceLayer error in the safety scope and on
DLA). Rewritten as

    s = sum_dim x * x                       ReduceSum where the target accepts it (trt), else a 1x1 Conv with weights
                                            one over `dim` moved onto channels (the channels-first view linear_to_conv
                                            uses, so layout_cleanup cancels the permutes): Conv is legal everywhere
    y = x / max(sqrt(s), eps)               broadcast Div (no Expand); max(a, eps) as Max where the target accepts it
                                            without comment, else Relu(a - eps) + eps (Relu, Add: in the safety scope)

Where Sqrt is an error (DLA through TensorRT 8.6: Sqrt, Pow and Reciprocal are RFE, Div a warning) the division
becomes a product with z^(-1/2) in the form convmath.rsqrt_form picks for the profile (the layernorm_decompose one):

    y = x * rsqrt(max(s, e))                max(sqrt(s), eps) = sqrt(max(s, eps^2)); the Newton form (Conv, Relu, Clip,
                                            Mul) is exact on z >= 2^-40, so e = max(eps^2, 2^-40): equal to F.normalize
                                            for every x with ||x|| >= 2^-20 (~1e-6) or x = 0; a nonzero x shorter than
                                            that comes out as x * 2^20 instead of a unit vector (and below FP16's range)

A norm read by anything else becomes sqrt(s) (squeezed when keepdim=False); on DLA s * rsqrt(max(s, e)), which is
sqrt(s) for s >= e and 0 at s = 0. `aten.sum` over one axis (ConViT's
re-normalisation of gated attention, attn / attn.sum(-1)) becomes the same Conv where the target flags ReduceSum.

Numbers: the sums run in another order than PyTorch's reduction (float rounding only); Relu(a - eps) + eps equals
max(a, eps) exactly unless a is within a few orders of magnitude of eps (1e-12), i.e. for all-but-zero vectors.
Only ord=2 norms over one axis (any axes where ReduceSum is allowed) are rewritten; others are reported as skipped.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from attn2conv.attention_match import eliminate_dead_code
from attn2conv.convmath import newton_floor, rsqrt_form, times_rsqrt
from attn2conv.graph import Builder, arg, aten, is_op, replace_uses, shape, to_channels_first
from attn2conv.legality import onnx_cost
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register

ID = "normalize_decompose"


@register
class NormalizeDecompose(GraphPass):
    id = ID
    exact = True
    removes = ("aten.linalg_vector_norm", "aten.linalg_norm", "aten.norm", "aten.sum")
    introduces = ("aten.mul", "aten.sum", "aten.conv2d", "aten.sqrt", "aten.div", "aten.clamp_min", "aten.relu",
                  "aten.add", "aten.permute", "aten.reshape", "aten.rsqrt", "aten.pow", "aten.clamp")
    summary = "L2 norm / F.normalize / sum over one axis -> x*x, ReduceSum or 1x1 Conv, Sqrt, Div (no ReduceL2)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        use_reduce = onnx_cost(ctx.profile, ["ReduceSum"]) == 0
        use_max = onnx_cost(ctx.profile, ["Max"]) <= onnx_cost(ctx.profile, ["Relu", "Add"])
        form = ctx.option(ID, "norm", "auto")
        form = rsqrt_form(ctx.profile) if form == "auto" else form
        result.notes.append(f"sums by {'ReduceSum' if use_reduce else '1x1 Conv'}, "
                            f"max(., eps) by {'Max' if use_max else 'Relu + Add'}, 1/sqrt by {form}")
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node.op != "call_function":
                continue
            if is_op(node, "aten.linalg_vector_norm", "aten.linalg_norm", "aten.norm"):
                if onnx_cost(ctx.profile, ["ReduceL2"]) == 0 and ctx.option(ID, "keep_legal", True):
                    continue
                reason = _norm(gm, node, use_reduce, use_max, form)
            elif is_op(node, "aten.sum") and not use_reduce:
                reason = _sum(gm, node)
            else:
                continue
            result.tally(node, reason)
        if result.changed:
            eliminate_dead_code(gm)
        return result


def _dims(node: fx.Node, rank: int, index: int, name: str) -> list[int] | None:
    dims = arg(node, index, name)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(rank))
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return sorted({int(d) % rank for d in dims})


def _norm(gm: fx.GraphModule, node: fx.Node, use_reduce: bool, use_max: bool, form: str) -> str | None:
    x = node.args[0]
    xs = shape(x)
    if xs is None or not xs:
        return "input shape unknown"
    if node.kwargs.get("dtype") is not None:
        return "norm with a dtype cast"
    dims = _dims(node, len(xs), 2, "dim")
    if is_op(node, "aten.linalg_norm"):  # ord None: the vector 2-norm, or the Frobenius norm over two axes
        order = arg(node, 1, "ord")
        order = 2 if order is None or order == "fro" or (order in (2, 2.0) and len(dims) == 1) else order
    else:
        order = arg(node, 1, "ord" if is_op(node, "aten.linalg_vector_norm") else "p", 2)
    if order not in (2, 2.0):
        return f"ord={order} norm (only the L2 / Frobenius norm is decomposed)"
    keepdim = bool(arg(node, 3, "keepdim", False))
    if not use_reduce and len(dims) != 1:
        return f"L2 norm over axes {dims}: only one axis can be summed by a convolution on this target"
    b = Builder(gm, node)

    def squares_sum(t, t_shape, keep=True):  # sum over `dims` of t * t: ReduceSum, or a 1x1 Conv over channels
        if use_reduce:
            return b.call(aten.sum.dim_IntList, b.call(aten.mul.Tensor, t, t), dims, keep)
        return _channel_sum(b, b.call(aten.mul.Tensor, t, t), t_shape)

    divisions = _normalize_divisions(node, x, xs) if keepdim else None
    if divisions is not None:  # F.normalize: the whole x / max(norm, eps) in one place, without the Expand
        eps, divs = divisions
        if use_reduce:
            y = _unit(b, x, squares_sum(x, None), eps, use_max, form)
        else:
            x4, back, moved = _channels_first(b, x, xs, dims[0])
            y = moved(back(_unit(b, x4, squares_sum(x4, xs[dims[0]]), eps, use_max, form)))
        y.meta["val"] = divs[0].meta.get("val")
        for div in divs:
            replace_uses(div, y)
        return None
    if use_reduce:
        n = _root(b, squares_sum(x, None, keepdim), use_max, form)
    else:
        x4, back, moved = _channels_first(b, x, xs, dims[0])
        n = moved(back(_root(b, squares_sum(x4, xs[dims[0]]), use_max, form), 1))
        if not keepdim:
            n = b.call(aten.reshape.default, n, list(shape(node)))
    n.meta["val"] = node.meta.get("val")
    replace_uses(node, n)
    return None


def _unit(b: Builder, x: fx.Node, s: fx.Node, eps: float, use_max: bool, form: str) -> fx.Node:
    """x / max(sqrt(s), eps), s the sum of squares: Sqrt + Div where the target has them, else
    x * rsqrt(max(s, eps^2)) in `form` (the Newton form clamps at max(eps^2, 2^-40), the smallest z it is exact on)."""
    if form == "div":
        return b.call(aten.div.Tensor, x, _max_eps(b, b.call(aten.sqrt.default, s), eps, use_max))
    floor = newton_floor(eps * eps) if form == "newton" else eps * eps
    return times_rsqrt(b, x, _max_eps(b, s, floor, use_max), form, floor)


def _root(b: Builder, s: fx.Node, use_max: bool, form: str) -> fx.Node:
    """sqrt(s): Sqrt where the target has it, else s * rsqrt(max(s, floor)) (0 at s = 0)."""
    if form == "div":
        return b.call(aten.sqrt.default, s)
    floor = newton_floor(0.0)
    return times_rsqrt(b, s, _max_eps(b, s, floor, use_max), form, floor)


def _sum(gm: fx.GraphModule, node: fx.Node) -> str | None:
    x = node.args[0]
    xs = shape(x)
    if xs is None or not xs or node.target != aten.sum.dim_IntList or node.kwargs.get("dtype") is not None:
        return "not a sum over given axes of a known shape"
    if not x.meta["val"].is_floating_point():
        return "integer sum"
    dims = _dims(node, len(xs), 1, "dim")
    if len(dims) != 1:
        return f"sum over axes {dims}: only one axis can be summed by a convolution"
    keepdim = bool(arg(node, 2, "keepdim", False))
    b = Builder(gm, node)
    x4, back, moved = _channels_first(b, x, xs, dims[0])
    s = moved(back(_channel_sum(b, x4, xs[dims[0]]), 1))
    if not keepdim:
        s = b.call(aten.reshape.default, s, list(shape(node)))
    s.meta["val"] = node.meta.get("val")
    replace_uses(node, s)
    return None


def _normalize_divisions(norm: fx.Node, x: fx.Node, xs) -> tuple[float, list[fx.Node]] | None:
    """(eps, the divisions x / expand(clamp_min(norm, eps))) when every use of the norm is F.normalize's; else None."""
    users = list(norm.users)
    if len(users) != 1 or not is_op(users[0], "aten.clamp_min") or users[0].args[0] is not norm:
        return None
    clamp = users[0]
    eps = clamp.args[1]
    if not isinstance(eps, (int, float)) or eps < 0:
        return None
    divs = []
    for u in clamp.users:
        denominators = [u]
        if is_op(u, "aten.expand") and shape(u) == xs:
            denominators = list(u.users)
        elif not is_op(u, "aten.div"):
            return None
        for d in denominators:
            if not is_op(d, "aten.div") or d.args[0] is not x or d.kwargs.get("rounding_mode") is not None or \
                    len(d.args) != 2 or shape(d) != xs:
                return None
            divs.append(d)
    return (float(eps), divs) if divs else None


def _channels_first(b: Builder, x: fx.Node, xs, dim: int):
    """x with axis `dim` as the channels of a 4-D channels-first view: (x4, back, moved), where back(y4, c_out) returns
    to the (axis-last) layout and moved(y) undoes the permute that brought `dim` last."""
    rank = len(xs)
    if dim == rank - 1:
        x4, back = to_channels_first(b, x, xs)
        return x4, back, lambda y: y
    order = [d for d in range(rank) if d != dim] + [dim]
    inverse = [order.index(d) for d in range(rank)]
    xt = b.call(aten.permute.default, x, order)
    x4, back = to_channels_first(b, xt, tuple(xs[d] for d in order))
    return x4, back, lambda y: b.call(aten.permute.default, y, inverse)


def _channel_sum(b: Builder, x4: fx.Node, shape_c: int) -> fx.Node:
    """(B, C, H, W) -> (B, 1, H, W): a 1x1 convolution with weights one."""
    return b.call(aten.conv2d.default, x4, b.constant(torch.ones(1, shape_c, 1, 1), "sum_weight"))


def _max_eps(b: Builder, a: fx.Node, eps: float, use_max: bool) -> fx.Node:
    if use_max or eps == 0:
        return b.call(aten.clamp_min.default, a, eps) if eps else a
    return b.call(aten.add.Tensor, b.call(aten.relu.default, b.call(aten.add.Tensor, a, -eps)), eps)

