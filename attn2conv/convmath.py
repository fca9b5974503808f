"""Convolution algebra shared by the folding passes, in float64 so a fold adds no rounding of its own.

Also the 1/sqrt forms shared by layernorm_decompose and normalize_decompose (rsqrt_form, times_rsqrt), including
the Sqrt-, Pow- and Div-free Newton form for DLA (newton_rsqrt).

A ConvForm is "this tensor equals conv2d(x, weight, bias, stride, padding, groups=groups)" for some graph node x.
Sums, differences, per-channel scales and BatchNorms of ConvForms over the same x are again ConvForms, which is
what lets RepVGG / MobileOne / RepMixer / Slide-style parallel branches collapse into one convolution.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace

import torch
import torch.fx as fx

from attn2conv.graph import Builder, arg, aten, get_constant, is_op, shape
from attn2conv.legality import onnx_cost


@dataclass(frozen=True)
class ConvForm:
    x: fx.Node
    weight: torch.Tensor  # (C_out, C_in / groups, kh, kw), float64
    bias: torch.Tensor  # (C_out,), float64
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    convs: int = 0  # convolution (or Linear) leaves folded into this form
    ops: int = 1  # graph nodes this form replaces
    linear: bool = False  # a Linear on (B, C) features, kept as a Linear: weight is (C_out, C_in, 1, 1)

    @property
    def c_out(self) -> int:
        return self.weight.shape[0]

    @property
    def c_in(self) -> int:
        return self.weight.shape[1] * self.groups

    def scaled(self, scale: torch.Tensor, shift: torch.Tensor | None = None) -> "ConvForm":
        """Per-output-channel affine map applied after the convolution."""
        shift = torch.zeros_like(self.bias) if shift is None else shift
        return replace(self, weight=self.weight * scale.view(-1, 1, 1, 1), bias=self.bias * scale + shift,
                       ops=self.ops + 1)


def pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[-1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def conv_form(gm: fx.GraphModule, node: fx.Node) -> ConvForm | None:
    """ConvForm of an aten.conv2d with constant weights, zero padding and no dilation; None otherwise."""
    if not is_op(node, "aten.conv2d") or node.target != torch.ops.aten.conv2d.default:
        return None
    w = get_constant(gm, node.args[1])
    bias_node = arg(node, 2, "bias")
    b = get_constant(gm, bias_node) if bias_node is not None else None
    if w is None or w.dim() != 4 or (bias_node is not None and b is None):
        return None
    if pair(arg(node, 5, "dilation", [1, 1])) != (1, 1):
        return None
    w = w.double()
    b = b.double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return ConvForm(node.args[0], w, b, pair(arg(node, 3, "stride", [1, 1])), pair(arg(node, 4, "padding", [0, 0])),
                    int(arg(node, 6, "groups", 1)), convs=1, ops=1)


def linear_form(gm: fx.GraphModule, node: fx.Node) -> ConvForm | None:
    """A Linear on (B, C) features with constant weights, as a 1x1 ConvForm (its output channel is the last axis)."""
    if not is_op(node, "aten.linear"):
        return None
    x_shape = shape(node.args[0])
    w = get_constant(gm, node.args[1])
    bias_node = arg(node, 2, "bias")
    b = get_constant(gm, bias_node) if bias_node is not None else None
    if x_shape is None or len(x_shape) != 2 or w is None or (bias_node is not None and b is None):
        return None
    w = w.double()[:, :, None, None]
    b = b.double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return ConvForm(node.args[0], w, b, (1, 1), (0, 0), 1, convs=1, ops=1, linear=True)


def identity_form(x: fx.Node, channels: int) -> ConvForm:
    w = torch.ones(channels, 1, 1, 1, dtype=torch.float64)
    return ConvForm(x, w, torch.zeros(channels, dtype=torch.float64), (1, 1), (0, 0), channels, convs=0, ops=0)


def regroup(form: ConvForm, groups: int) -> ConvForm:
    """The same convolution with fewer groups (`groups` divides form.groups): zero-filled dense blocks."""
    if groups == form.groups:
        return form
    c_out, c_in, g = form.c_out, form.c_in, form.groups
    per_old, per_new = c_in // g, c_in // groups
    w = torch.zeros(c_out, per_new, *form.weight.shape[2:], dtype=torch.float64)
    out_old, out_new = c_out // g, c_out // groups
    for o in range(c_out):
        offset = (o // out_old) * per_old - (o // out_new) * per_new
        w[o, offset:offset + per_old] = form.weight[o]
    return replace(form, weight=w, groups=groups)


def align(form: ConvForm, padding: tuple[int, int], kernel: tuple[int, int]) -> torch.Tensor:
    """The form's kernel embedded in a larger kernel with larger padding, so both read the same input pixels."""
    kh, kw = form.weight.shape[2:]
    oh, ow = padding[0] - form.padding[0], padding[1] - form.padding[1]
    w = torch.zeros(*form.weight.shape[:2], *kernel, dtype=torch.float64)
    w[:, :, oh:oh + kh, ow:ow + kw] = form.weight
    return w


def combine(a: ConvForm, b: ConvForm, alpha: float = 1.0, out_hw: tuple[int, int] | None = None) -> ConvForm | str:
    """a + alpha * b as one ConvForm, or the reason it cannot be one."""
    if a.x is not b.x:
        return "branches read different inputs"
    if a.linear != b.linear:
        return "a Linear branch and a convolution branch"
    if a.stride != b.stride:
        return f"branches have different strides {a.stride} and {b.stride}"
    if a.c_out != b.c_out or a.c_in != b.c_in:
        return "branches have different channel counts"
    groups = math.gcd(a.groups, b.groups)
    a, b = regroup(a, groups), regroup(b, groups)
    padding = (max(a.padding[0], b.padding[0]), max(a.padding[1], b.padding[1]))
    kernel = tuple(
        max(padding[d] - f.padding[d] + f.weight.shape[2 + d] for f in (a, b)) for d in range(2)
    )
    weight = align(a, padding, kernel) + alpha * align(b, padding, kernel)
    merged = ConvForm(a.x, weight, a.bias + alpha * b.bias, a.stride, padding, groups, a.convs + b.convs,
                      a.ops + b.ops + 1, a.linear)
    if out_hw is not None and output_hw(merged) != out_hw:
        return f"merged kernel {kernel} with padding {padding} would give a different output size"
    return merged


def output_hw(f: ConvForm) -> tuple[int, int] | None:
    hw = shape(f.x)
    if hw is None or len(hw) != 4:
        return None
    k = f.weight.shape[2:]
    return tuple((hw[2 + d] + 2 * f.padding[d] - k[d]) // f.stride[d] + 1 for d in range(2))


# --- BatchNorm ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchNormInfo:
    node: fx.Node  # the batch_norm call
    input: fx.Node
    output: fx.Node  # the node whose value is the normalised tensor (getitem 0 for the native op)
    scale: torch.Tensor  # float64, per channel
    shift: torch.Tensor


def batchnorm_info(gm: fx.GraphModule, node: fx.Node) -> BatchNormInfo | None:
    """Eval-mode BatchNorm as y = scale * x + shift, when its statistics and affine parameters are constants."""
    if is_op(node, "aten._native_batch_norm_legit_no_training"):
        (x, w, b, mean, var), eps = node.args[:5], node.args[6]
        outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if len(outs) != 1 or any(u.args[1] != 0 for u in node.users if u.target is operator.getitem and u.users):
            return None
        output = outs[0]
    elif is_op(node, "aten.batch_norm") and not node.args[5]:
        (x, w, b, mean, var), eps = node.args[:5], node.args[7]
        output = node
    else:
        return None
    mean, var = get_constant(gm, mean), get_constant(gm, var)
    if mean is None or var is None:
        return None
    gamma = get_constant(gm, w) if w is not None else torch.ones_like(mean)
    beta = get_constant(gm, b) if b is not None else torch.zeros_like(mean)
    if gamma is None or beta is None:
        return None
    scale = gamma.double() / torch.sqrt(var.double() + eps)
    return BatchNormInfo(node, x, output, scale, beta.double() - mean.double() * scale)


def per_channel(t: torch.Tensor | float, channels: int) -> torch.Tensor | None:
    """A constant that broadcasts as one value per channel of an NCHW tensor, as a (channels,) float64 vector."""
    if isinstance(t, (int, float)):
        return torch.full((channels,), float(t), dtype=torch.float64)
    if not isinstance(t, torch.Tensor):
        return None
    squeezed = t.double()
    while squeezed.dim() > 1 and squeezed.shape[0] == 1:
        squeezed = squeezed[0]
    if squeezed.dim() == 3 and squeezed.shape[1:] == (1, 1):
        squeezed = squeezed[:, 0, 0]
    if squeezed.dim() == 0 or (squeezed.dim() == 1 and squeezed.numel() == 1 and t.dim() <= 1 and t.numel() == 1):
        return torch.full((channels,), float(squeezed.reshape(-1)[0]), dtype=torch.float64)
    if squeezed.dim() == 1 and squeezed.numel() == channels and (t.dim() >= 3 or t.dim() == 1 and channels == 1):
        return squeezed
    return None


# --- z^(-1/2) in the form the target allows ------------------------------------------------------------------------

ERROR_COST = 1000  # onnx_cost of one error-severity op
RSQRT_FORM_OPS = {"div": ["Sqrt", "Div"], "rsqrt": ["Sqrt", "Reciprocal", "Mul"], "pow": ["Pow", "Mul"],
                  "newton": ["Conv", "Relu", "Clip", "Mul", "Add"]}


def rsqrt_form(profile) -> str:
    """How to scale by z^(-1/2) on `profile`: "div" (x / Sqrt(z)), "rsqrt" (x * Reciprocal(Sqrt(z))), "pow"
    (x * Pow(z, -0.5)) or "newton" (x * newton_rsqrt(z)): the least-flagged form, Sqrt forms first, and only where
    those have an error (DLA through TensorRT 8.6: Sqrt and Pow are RFE) Pow or the Sqrt-free Newton form; ties go
    to the earlier (cheaper) form."""
    form = "div" if onnx_cost(profile, ["Sqrt", "Div"]) <= onnx_cost(profile, ["Sqrt", "Reciprocal"]) else "rsqrt"
    if onnx_cost(profile, RSQRT_FORM_OPS[form]) >= ERROR_COST:
        form = min((form, "pow", "newton"), key=lambda f: onnx_cost(profile, RSQRT_FORM_OPS[f]))
    return form


def times_rsqrt(b: Builder, x: fx.Node, z: fx.Node, form: str, eps: float) -> fx.Node:
    """x * z^(-1/2) in `form` (see rsqrt_form), for z >= eps (the Newton form: z >= newton_floor(eps))."""
    if form == "rsqrt":
        return b.call(aten.mul.Tensor, x, b.call(aten.rsqrt.default, z))
    if form == "pow":
        return b.call(aten.mul.Tensor, x, b.call(aten.pow.Tensor_Scalar, z, -0.5))
    if form == "newton":
        return b.call(aten.mul.Tensor, x, newton_rsqrt(b, z, eps))
    return b.call(aten.div.Tensor, x, b.call(aten.sqrt.default, z))


def newton_floor(eps: float) -> float:
    """The smallest z newton_rsqrt(., eps) is exact on: eps, but at least 2^-40 (its knots span down to there)."""
    return max(float(eps), 2.0 ** -40)


NEWTON_MAX = 2.0 ** 40  # z above ~3x this makes Newton diverge (variances of 1e12, activations of ~1e6)
NEWTON_STEPS = 3
FP16_SAFE_KNOT = 2.0 ** 14  # knots up to here use the relu form, whose values stay below 2 * knot (FP16 max 65504)


def newton_rsqrt(b: Builder, z: fx.Node, eps: float) -> fx.Node:
    """z^(-1/2) for z >= eps without Sqrt, Pow or Div (DLA runs none of them through TensorRT 8.6).

    Initial guess: the chord interpolation of f(z) = z^(-1/2) between knots a_k = eps * 2^k (up to NEWTON_MAX),
    written as a sum of non-negative terms (no cancellation):
        r0 = f(a_K) + sum_k (f(a_k) - f(a_k+1)) * u_k,   u_k = clip(2 - z / a_k, 0, 1)
    u_k is computed in a form whose every intermediate stays small in FP16 as well (the FP16 graph must not overflow):
    knots <= 2^14: min(relu(2 a_k - z) / a_k, 1) (values <= 2 a_k); larger knots: clip(2 - z / a_k) (|.| <= 2 for
    FP16 z). That is Conv, Relu, Clip and Conv ops: within 4.6 % of z^(-1/2) on [eps, NEWTON_MAX]. Then NEWTON_STEPS
    steps of r <- r * (1.5 - 0.5 * (r z) r), which square the relative error each time (4.6e-2 -> 3.3e-3 ->
    1.6e-5 -> 4e-10): the result is z^(-1/2) to float32 rounding (measured: 1.6e-7 over [1e-6, 1e12]).
    """
    a0 = newton_floor(eps)
    k = max(1, math.ceil(math.log2(NEWTON_MAX / a0)))
    knots = torch.tensor([a0 * 2.0 ** i for i in range(k + 1)], dtype=torch.float64)
    f = knots.rsqrt()
    chord = f[:-1] - f[1:]
    small = int((knots[:-1] <= FP16_SAFE_KNOT).sum())
    r = None
    terms = []
    if small:
        a = knots[:small]
        gap = b.call(aten.relu.default, b.call(aten.conv2d.default, z,
                     b.constant(torch.full((small, 1, 1, 1), -1.0), "rsqrt_knot_weight"),
                     b.constant((2 * a).float(), "rsqrt_knot_bias")))
        u = b.call(aten.conv2d.default, gap, b.constant((1 / a).reshape(small, 1, 1, 1).float(), "rsqrt_knot_scale"),
                   None, [1, 1], [0, 0], [1, 1], small)
        terms.append((b.call(aten.clamp.default, u, 0.0, 1.0), chord[:small]))
    if small < k:
        a = knots[small:-1]
        u = b.call(aten.conv2d.default, z, b.constant((-1 / a).reshape(-1, 1, 1, 1).float(), "rsqrt_knot_weight_hi"),
                   b.constant(torch.full((len(a),), 2.0), "rsqrt_knot_bias_hi"))
        terms.append((b.call(aten.clamp.default, u, 0.0, 1.0), chord[small:]))
    for i, (u, c) in enumerate(terms):
        bias = b.constant(f[-1:].float(), "rsqrt_chord_bias") if i == 0 else None
        term = b.call(aten.conv2d.default, u, b.constant(c.reshape(1, -1, 1, 1).float(), "rsqrt_chord_weight"), bias)
        r = term if i == 0 else b.call(aten.add.Tensor, r, term)
    step_w = b.constant(torch.full((1, 1, 1, 1), -0.5), "rsqrt_newton_weight")
    step_b = b.constant(torch.tensor([1.5]), "rsqrt_newton_bias")
    for _ in range(NEWTON_STEPS):
        t = b.call(aten.mul.Tensor, b.call(aten.mul.Tensor, r, z), r)  # (r z) r: r z = z^(1/2) never overflows
        r = b.call(aten.mul.Tensor, r, b.call(aten.conv2d.default, t, step_w, step_b))  # 1.5 - 0.5 t as a 1x1 conv
    return r
