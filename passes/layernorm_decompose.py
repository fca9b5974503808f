"""layernorm_decompose (exact): LayerNorm over channels as convolutions and element-wise ops in (B, C, H, W) layout.

For x viewed channels-first (B, C, H, W) ((B, N, C) tokens become (B, C, 1, N), (B, C) becomes (B, C, 1, 1)):

    mu    = mean_c x                       centred = x - mu
    var   = mean_c centred^2  (biased)     y       = centred / sqrt(var + eps) * gamma_c + beta_c

Which ONNX ops carry each step is chosen from the target profile, least-flagged form first:

    step            target allows ReduceMean (no rule)        otherwise (trt-safe: ReduceMean is an error; DLA too)
    -mu             ReduceMean(axis 1) then Sub               1x1 Conv C->1 with constant weights -1/C, then Add
                                                              (broadcast over channels)
    var + eps       ReduceMean(centred * centred) + eps       1x1 Conv C->1, weights 1/C, bias eps, on Mul(c, c)
    1/sqrt(.)       Sqrt + Div (trt-safe: 2 warnings), or Sqrt + Reciprocal + Mul when a profile flags Div more
                    than Reciprocal. Where that form has an error (DLA through TensorRT 8.6: Sqrt is RFE, and so is
                    Pow; IElementWise on DLA is Sum/Prod/Max/Min/Sub), Pow(z, -0.5) if the profile allows Pow, else
                    the "newton" form: a chord-interpolated guess (Conv, Relu, Clip, Conv) and three Newton steps
                    (Mul, 1x1 Conv), exact to float32 rounding (1.4e-7 over z in [1e-6, 1e12]); convmath.newton_rsqrt
                    (shared with normalize_decompose).
    gamma, beta     folded into the consumers when every consumer is a Linear with constant weights
                    (W' = W diag(gamma), b' = b + W beta, computed in float64), else Mul + Add by (C, 1, 1) constants.

So on trt-safe a LayerNorm becomes Conv, Add, Mul, Conv, Sqrt, Div (+ Mul, Add): every op in the documented safety
scope but Sqrt and Div (warnings). On a target whose profile accepts LayerNormalization without comment (trt) the op
is left alone unless the option `keep_legal` is False: TensorRT's fused normalisation is faster and more accurate in
FP16 than the decomposition.

Also rewritten, for hand-written channel LayerNorms (Hugging Face ConvNext, timm `_layer_norm_cf`) and
GroupNorm(1, C) (PoolFormer): `aten.mean(x, [1], keepdim=True)` of a rank-4 tensor becomes the 1x1 Conv C->1 with
weights 1/C; `aten.pow(x, 2)` becomes `x * x`; `group_norm(x, 1, ...)` becomes channel mean by Conv followed by an
AveragePool over the whole (static) H x W map, for the mean and for the variance.

adaptive_avg_pool2d whose output size divides H and W becomes a fixed-kernel AveragePool the same way.
Any other mean (global average pooling over tokens or over H x W, e.g. the Swin/ConvNeXt heads) becomes, where the
target flags ReduceMean, a Transpose + Reshape to (1, kept, 1, reduced) and an AveragePool over the reduced axis.

Numbers: the Conv sums in a different order from PyTorch's LayerNorm kernel, so outputs differ by float rounding
(ViT-S blocks: ~1e-6 relative; the pipeline guard bounds it at 1e-4).
Options (ctx.option("layernorm_decompose", key)): keep_legal (True), fold_affine (True), mean ("auto" | "conv" |
"reduce"), norm ("auto" | "div" | "rsqrt" | "pow" | "newton").
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from attn2conv.convmath import rsqrt_form, times_rsqrt
from attn2conv.graph import Builder, arg, aten, get_constant, is_op, replace_uses, shape, to_channels_first
from attn2conv.legality import onnx_cost
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register

ID = "layernorm_decompose"


@register
class LayerNormDecompose(GraphPass):
    id = ID
    exact = True
    removes = ("aten.layer_norm", "aten.native_layer_norm", "aten.group_norm", "aten.native_group_norm",
               "aten.mean", "aten.pow", "aten.adaptive_avg_pool2d", "aten.adaptive_avg_pool1d")
    introduces = ("aten.conv2d", "aten.add", "aten.mul", "aten.sqrt", "aten.div", "aten.rsqrt", "aten.mean",
                  "aten.sub", "aten.avg_pool2d", "aten.permute", "aten.reshape", "aten.clamp", "aten.relu")
    summary = "LayerNorm / GroupNorm(1) / channel means -> 1x1 Conv means, Mul, Sqrt, Div (affine folded)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        modes = _choose_modes(ctx)
        if modes is None:
            result.notes.append("the target accepts LayerNormalization; left as is (option keep_legal=False "
                                "decomposes anyway)")
        else:
            result.notes.append(f"means by {modes['mean']}, 1/sqrt by {modes['norm']}")
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node.op != "call_function":
                continue
            reason = None
            if is_op(node, "aten.layer_norm", "aten.native_layer_norm"):
                if modes is None:
                    continue
                reason = self._layer_norm(gm, node, modes, ctx)
            elif is_op(node, "aten.group_norm", "aten.native_group_norm"):
                if modes is None:
                    continue
                reason = self._group_norm(gm, node, modes)
            elif is_op(node, "aten.mean") and _is_channel_mean(node):
                if modes is None or modes["mean"] != "conv":
                    continue
                reason = self._channel_mean(gm, node)
            elif is_op(node, "aten.mean") and node.target == aten.mean.dim and onnx_cost(ctx.profile, ["ReduceMean"]) > \
                    onnx_cost(ctx.profile, ["AveragePool", "Transpose", "Reshape"]):
                reason = self._pooled_mean(gm, node)
            elif is_op(node, "aten.adaptive_avg_pool1d") and list(node.args[1]) == [1] and \
                    onnx_cost(ctx.profile, ["ReduceMean"]) > onnx_cost(ctx.profile, ["AveragePool"]):
                reason = self._pooled_mean(gm, node, dims=[len(shape(node.args[0])) - 1])
            elif is_op(node, "aten.adaptive_avg_pool2d") and onnx_cost(ctx.profile, ["GlobalAveragePool"]) > \
                    onnx_cost(ctx.profile, ["AveragePool"]):
                reason = self._global_pool(gm, node)
            elif is_op(node, "aten.pow") and len(node.args) > 1 and node.args[1] == 2 and \
                    isinstance(node.args[0], fx.Node) and onnx_cost(ctx.profile, ["Pow"]) > 0:
                b = Builder(gm, node)
                square = b.call(aten.mul.Tensor, node.args[0], node.args[0])
                square.meta["val"] = node.meta.get("val")  # a later channel mean reads its shape
                replace_uses(node, square)
                gm.graph.erase_node(node)
            else:
                continue
            result.tally(node, reason)
        return result

    # --- LayerNorm over the last dim ----------------------------------------------------------------------------------
    def _layer_norm(self, gm: fx.GraphModule, node: fx.Node, modes: dict, ctx: PassContext) -> str | None:
        x, normalized = node.args[0], list(node.args[1])
        w_node, b_node = arg(node, 2, "weight"), arg(node, 3, "bias")
        eps = float(arg(node, 4, "eps", 1e-5))
        xs = shape(x)
        if xs is None or len(normalized) != 1 or xs[-1] != normalized[0] or len(xs) < 2:
            return f"normalises over {normalized}, not only the last (channel) dim of a {xs} tensor"
        out = node
        if is_op(node, "aten.native_layer_norm"):  # (y, mean, rstd): only y may be used
            users = [u for u in node.users if u.target is operator.getitem]
            if len(users) != len(node.users) or any(u.args[1] != 0 for u in users):
                return "the mean/rstd outputs of native_layer_norm are used"
            if len(users) != 1:
                return "native_layer_norm output is not read through one getitem"
            out = users[0]
        gamma = get_constant(gm, w_node) if w_node is not None else None
        beta = get_constant(gm, b_node) if b_node is not None else None
        if (w_node is not None and gamma is None) or (b_node is not None and beta is None):
            return "affine parameters are computed in the graph"
        c = xs[-1]
        fold = ctx.option(ID, "fold_affine", True) and (gamma is not None or beta is not None) and \
            _foldable_consumers(gm, out)
        b = Builder(gm, node)
        x4, back = to_channels_first(b, x, xs)
        y4 = _normalise(b, x4, c, eps, modes)
        if not fold:
            y4 = _affine(b, y4, gamma, beta, c)
        y = back(y4)
        y.meta["val"] = out.meta.get("val")  # a later rewrite in this sweep may read the shape
        replace_uses(out, y)
        if fold:
            _fold_affine_into_linears(gm, y, gamma, beta)
        if out is not node:
            gm.graph.erase_node(out)
        gm.graph.erase_node(node)
        return None

    # --- GroupNorm with one group ---------------------------------------------------------------------------------
    def _group_norm(self, gm: fx.GraphModule, node: fx.Node, modes: dict) -> str | None:
        if is_op(node, "aten.native_group_norm"):
            x, w_node, b_node, _n, c, _hw, groups, eps = node.args[:8]
            users = list(node.users)
            if any(u.target is not operator.getitem or u.args[1] != 0 for u in users) or len(users) != 1:
                return "the mean/rstd outputs of native_group_norm are used"
            out = users[0]
        else:
            x, groups = node.args[0], arg(node, 1, "num_groups")
            w_node, b_node, eps = arg(node, 2, "weight"), arg(node, 3, "bias"), float(arg(node, 4, "eps", 1e-5))
            out = node
        xs = shape(x)
        if groups != 1:
            return f"GroupNorm with {groups} groups (only one group, the LayerNorm over (C, H, W), is decomposed)"
        if xs is None or len(xs) != 4:
            return f"input {xs} is not (B, C, H, W)"
        gamma = get_constant(gm, w_node) if w_node is not None else None
        beta = get_constant(gm, b_node) if b_node is not None else None
        if (w_node is not None and gamma is None) or (b_node is not None and beta is None):
            return "affine parameters are computed in the graph"
        _, c, h, w = xs
        b = Builder(gm, node)
        if modes["mean"] == "reduce":
            mu = b.call(aten.mean.dim, x, [1, 2, 3], True)
            centred = b.call(aten.sub.Tensor, x, mu)
            var = b.call(aten.add.Tensor, b.call(aten.mean.dim, b.call(aten.mul.Tensor, centred, centred),
                                                 [1, 2, 3], True), float(eps))
        else:
            neg_mu = _spatial_mean(b, _channel_mean_conv(b, x, c, -1.0 / c, 0.0), h, w)
            centred = b.call(aten.add.Tensor, x, neg_mu)
            sq = b.call(aten.mul.Tensor, centred, centred)
            var = b.call(aten.add.Tensor, _spatial_mean(b, _channel_mean_conv(b, sq, c, 1.0 / c, 0.0), h, w),
                         float(eps))
        y = _scale(b, centred, var, modes, float(eps))
        y = _affine(b, y, gamma, beta, c)
        replace_uses(out, y)
        if out is not node:
            gm.graph.erase_node(out)
        gm.graph.erase_node(node)
        return None

    # --- hand-written channel means ---------------------------------------------------------------------------------
    def _channel_mean(self, gm: fx.GraphModule, node: fx.Node) -> str | None:
        x = node.args[0]
        c = shape(x)[1]
        b = Builder(gm, node)
        replace_uses(node, _channel_mean_conv(b, x, c, 1.0 / c, 0.0))
        gm.graph.erase_node(node)
        return None


    def _global_pool(self, gm: fx.GraphModule, node: fx.Node) -> str | None:
        """adaptive_avg_pool2d with an output size that divides H, W: a fixed AveragePool (GlobalAveragePool is an
        IReduce layer, an error on trt-safe and DLA)."""
        return _global_pool_impl(gm, node)

    # --- other means (global average pooling over tokens or H x W) ------------------------------------------------
    def _pooled_mean(self, gm: fx.GraphModule, node: fx.Node, dims: list[int] | None = None) -> str | None:
        x = node.args[0]
        xs = shape(x)
        if xs is None or node.kwargs.get("dtype") is not None:
            return "input shape unknown"
        if dims is None:  # aten.mean.dim; adaptive_avg_pool1d(x, 1) passes its last dim
            dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dims = sorted({d % len(xs) for d in dims})
        kept = [d for d in range(len(xs)) if d not in dims]
        n_red = math.prod(xs[d] for d in dims)
        n_kept = math.prod(xs[d] for d in kept)
        b = Builder(gm, node)
        # kept dims to the front, reduced ones to the back: (1, kept, 1, reduced) -> AveragePool(1 x reduced)
        y = x if kept + dims == list(range(len(xs))) else b.call(aten.permute.default, x, kept + dims)
        y = b.call(aten.reshape.default, y, [1, n_kept, 1, n_red])
        y = b.call(aten.avg_pool2d.default, y, [1, n_red], [1, n_red])
        y = b.call(aten.reshape.default, y, list(shape(node)))
        y.meta["val"] = node.meta.get("val")
        replace_uses(node, y)
        gm.graph.erase_node(node)
        return None


def _global_pool_impl(gm: fx.GraphModule, node: fx.Node) -> str | None:
    x, out = node.args[0], [int(v) for v in node.args[1]]
    xs = shape(x)
    if xs is None or len(xs) != 4 or xs[2] % out[0] or xs[3] % out[1]:
        return f"output size {out} does not divide the input {xs}"
    kh, kw = xs[2] // out[0], xs[3] // out[1]
    y = Builder(gm, node).call(aten.avg_pool2d.default, x, [kh, kw], [kh, kw])
    y.meta["val"] = node.meta.get("val")
    replace_uses(node, y)
    gm.graph.erase_node(node)
    return None


def _choose_modes(ctx: PassContext) -> dict | None:
    profile = ctx.profile
    if ctx.option(ID, "keep_legal", True) and profile is not None and onnx_cost(profile, ["LayerNormalization"]) == 0:
        return None
    mean = ctx.option(ID, "mean", "auto")
    if mean == "auto":
        mean = "reduce" if onnx_cost(profile, ["ReduceMean", "Sub"]) == 0 else "conv"
    norm = ctx.option(ID, "norm", "auto")
    if norm == "auto":
        norm = rsqrt_form(profile)
    return {"mean": mean, "norm": norm}


def _is_channel_mean(node: fx.Node) -> bool:
    """mean over dim 1 of a rank-4 tensor, keepdim=True: the channel mean of a hand-written channels-first LayerNorm."""
    xs = shape(node.args[0])
    if xs is None or len(xs) != 4 or node.target != aten.mean.dim:
        return False
    dims = [d % 4 for d in (node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]])]
    return dims == [1] and bool(arg(node, 2, "keepdim", False)) and node.kwargs.get("dtype") is None


def _channel_mean_conv(b: Builder, x4: fx.Node, c: int, weight: float, bias: float) -> fx.Node:
    """(B, C, H, W) -> (B, 1, H, W): a 1x1 convolution with every weight = `weight` (1/C: the channel mean)."""
    w = b.constant(torch.full((1, c, 1, 1), weight), "mean_weight")
    bias_node = b.constant(torch.tensor([bias]), "mean_bias") if bias else None
    return b.call(aten.conv2d.default, x4, w, bias_node)


def _spatial_mean(b: Builder, x4: fx.Node, h: int, w: int) -> fx.Node:
    """Mean over the whole static H x W map as an AveragePool (in the trt-safe scope, unlike GlobalAveragePool)."""
    if h == 1 and w == 1:
        return x4
    return b.call(aten.avg_pool2d.default, x4, [h, w], [h, w])


def _normalise(b: Builder, x4: fx.Node, c: int, eps: float, modes: dict) -> fx.Node:
    if modes["mean"] == "reduce":
        centred = b.call(aten.sub.Tensor, x4, b.call(aten.mean.dim, x4, [1], True))
        var = b.call(aten.add.Tensor, b.call(aten.mean.dim, b.call(aten.mul.Tensor, centred, centred), [1], True),
                     eps)
    else:
        centred = b.call(aten.add.Tensor, x4, _channel_mean_conv(b, x4, c, -1.0 / c, 0.0))
        # eps rides in the conv bias: var + eps costs no extra op
        var = _channel_mean_conv(b, b.call(aten.mul.Tensor, centred, centred), c, 1.0 / c, eps)
    return _scale(b, centred, var, modes, eps)


def _scale(b: Builder, centred: fx.Node, var_eps: fx.Node, modes: dict, eps: float) -> fx.Node:
    return times_rsqrt(b, centred, var_eps, modes["norm"], eps)


def _affine(b: Builder, y4: fx.Node, gamma, beta, c: int) -> fx.Node:
    if gamma is not None:
        y4 = b.call(aten.mul.Tensor, y4, b.constant(gamma.reshape(c, 1, 1), "norm_scale"))
    if beta is not None:
        y4 = b.call(aten.add.Tensor, y4, b.constant(beta.reshape(c, 1, 1), "norm_shift"))
    return y4


def _foldable_consumers(gm: fx.GraphModule, out: fx.Node) -> bool:
    """Every reader of the LayerNorm output is a Linear with constant weight and bias that reads it as its input."""
    users = list(out.users)
    if not users:
        return False
    for u in users:
        if not is_op(u, "aten.linear") or u.args[0] is not out or u.args[1] is out:
            return False
        if get_constant(gm, u.args[1]) is None:
            return False
        bias = arg(u, 2, "bias")
        if bias is not None and get_constant(gm, bias) is None:
            return False
    return True


def _fold_affine_into_linears(gm: fx.GraphModule, y: fx.Node, gamma, beta) -> None:
    for lin in list(y.users):
        w = get_constant(gm, lin.args[1])
        bias_node = arg(lin, 2, "bias")
        bias = get_constant(gm, bias_node).double() if bias_node is not None else torch.zeros(w.shape[0],
                                                                                              dtype=torch.float64)
        w64 = w.double()
        new_w = w64 * gamma.double()[None, :] if gamma is not None else w64
        new_b = bias + (w64 @ beta.double() if beta is not None else 0.0)
        b = Builder(gm, lin)
        w_c = b.constant(new_w.to(w.dtype), "ln_folded_weight", trainable=True)
        b_c = b.constant(new_b.to(w.dtype), "ln_folded_bias", trainable=True)
        new = b.call(aten.linear.default, y, w_c, b_c)
        new.meta["val"] = lin.meta.get("val")
        replace_uses(lin, new)
        gm.graph.erase_node(lin)
