"""gelu_decompose (exact to fp32 rounding): GELU and other activations the target lacks, from Relu/Sigmoid/Mul/Add/Div.

GELU(x) = x * Phi(x). Where the target accepts Erf (trt: the exporter's Erf pattern, which TensorRT fuses) the op
is left alone. Elsewhere (trt-safe: Erf is a warning; DLA: an error) it becomes the Erf-free form

    a = |x| / sqrt(2) = relu(x / sqrt(2)) + relu(-x / sqrt(2))
    Q(|x|) = erfc(a) / 2 ~= t * (c1 + t*(c2 + t*(c3 + t*(c4 + t*c5)))) * exp(-a^2),   t = 1 / (1 + p*a)
    exp(-u) = sigmoid(-u) / sigmoid(u)                                               (exact identity)
    GELU(x) = relu(x) - |x| * Q(|x|)

with the Abramowitz-Stegun 7.1.26 constants (p = 0.3275911, c_i = a_i / 2; |error of erfc| <= 1.5e-7 by A&S).
Ops: Relu, Mul, Add, Sigmoid and two Div (the t and the exp quotient). trt-safe: all in the documented scope but
Div (a warning); DLA: Div is native from TensorRT 8.6.12 (warning). Measured max |error| against torch's exact GELU
over [-12, 12] in fp32: see tests/test_gelu_decompose.py (about 5e-7; the tanh form is 4.7e-4). For |x| > ~13 the
sigmoid of -a^2 underflows to 0 and the form returns relu(x), which is GELU(x) to fp32 precision.

GELU(approximate='tanh') maps exactly: 0.5 x (1 + tanh(z)) = x * sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3)
(Mul, Add, Sigmoid only). Hardswish(x) = x * (6 - relu(6 - relu(x + 3))) / 6 and Hardsigmoid(x) =
(6 - relu(6 - relu(x + 3))) / 6 (Relu, Mul, Add; the nested relu keeps min(., 6) exact for large x) where the target
flags HardSwish/HardSigmoid. Tanh(x) = 2 sigmoid(2x) - 1 where
the target flags Tanh more than Sigmoid/Mul/Add (trt-safe; absolute error ~1e-7 near 0, e.g. the HF ViT pooler).
SiLU exports as Sigmoid * x, legal wherever Sigmoid is, and is left alone.
Options: form ("auto" | "erf_free" | "keep").
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from attn2conv.graph import Builder, arg, aten, is_op, replace_uses, where
from attn2conv.legality import onnx_cost
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register

ID = "gelu_decompose"
AS_P = 0.3275911
AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


@register
class GeluDecompose(GraphPass):
    id = ID
    exact = True
    removes = ("aten.gelu", "aten.hardswish", "aten.hardsigmoid", "aten.tanh")
    introduces = ("aten.relu", "aten.mul", "aten.add", "aten.div", "aten.sigmoid")
    summary = "GELU (erf) -> Erf-free Relu/Sigmoid/Mul/Add/Div form; GELU(tanh) -> x*sigmoid(2z); hard activations"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        form = ctx.option(ID, "form", "auto")
        keep_erf = form == "keep" or (form == "auto" and onnx_cost(ctx.profile, ["Erf"]) == 0)
        if keep_erf:
            result.notes.append("the target accepts Erf: GELU(erf) left as is")
        for node in list(gm.graph.nodes):
            if is_op(node, "aten.gelu"):
                approx = arg(node, 1, "approximate", "none")
                if approx == "tanh":
                    if form == "keep" or (form == "auto" and onnx_cost(ctx.profile, ["Tanh", "Pow"]) == 0):
                        continue
                    new = _gelu_tanh(Builder(gm, node), node.args[0])
                elif approx == "none":
                    if keep_erf:
                        continue
                    new = gelu_erf_free(Builder(gm, node), node.args[0])
                else:
                    result.misses.append(f"{where(node)}: unknown approximate={approx!r}")
                    continue
            elif is_op(node, "aten.tanh"):
                if form == "keep" or (form == "auto" and onnx_cost(ctx.profile, ["Tanh"]) <=
                                      onnx_cost(ctx.profile, ["Sigmoid", "Mul", "Add"])):
                    continue
                b = Builder(gm, node)
                sig = b.call(aten.sigmoid.default, b.call(aten.mul.Tensor, node.args[0], 2.0))
                new = b.call(aten.add.Tensor, b.call(aten.mul.Tensor, sig, 2.0), -1.0)  # tanh(x) = 2 sigmoid(2x) - 1
            elif is_op(node, "aten.hardswish", "aten.hardsigmoid"):
                onnx_op = "HardSwish" if is_op(node, "aten.hardswish") else "HardSigmoid"
                if form == "keep" or (form == "auto" and onnx_cost(ctx.profile, [onnx_op]) == 0):
                    continue
                new = _hard(Builder(gm, node), node.args[0], swish=onnx_op == "HardSwish")
            else:
                continue
            new.meta["val"] = node.meta.get("val")
            replace_uses(node, new)
            gm.graph.erase_node(node)
            result.rewrites += 1
        result.changed = result.rewrites > 0
        return result


def gelu_erf_free(b: Builder, x: fx.Node) -> fx.Node:
    """relu(x) - |x| Q(|x|) with Q from A&S 7.1.26 and exp(-u) = sigmoid(-u)/sigmoid(u); see the module docstring."""
    mul, add = aten.mul.Tensor, aten.add.Tensor
    r = b.call(aten.relu.default, x)
    xs = b.call(mul, x, 1.0 / math.sqrt(2.0))
    a = b.call(add, b.call(aten.relu.default, xs), b.call(aten.relu.default, b.call(mul, xs, -1.0)))
    one = b.constant(torch.ones(()), "one")
    t = b.call(aten.div.Tensor, one, b.call(add, b.call(mul, a, AS_P), 1.0))
    # Horner in t with the constants halved and negated: poly = -erfc(a)/2 / exp(-a^2)
    c = [-v / 2.0 for v in AS_A]
    poly = b.call(add, b.call(mul, t, c[4]), c[3])
    for coeff in (c[2], c[1], c[0]):
        poly = b.call(add, b.call(mul, poly, t), coeff)
    poly = b.call(mul, poly, t)
    u = b.call(mul, a, a)
    exp_neg_u = b.call(aten.div.Tensor, b.call(aten.sigmoid.default, b.call(mul, u, -1.0)),
                       b.call(aten.sigmoid.default, u))
    neg_q = b.call(mul, poly, exp_neg_u)  # -Q(|x|)
    abs_x = b.call(mul, a, math.sqrt(2.0))
    return b.call(add, r, b.call(mul, abs_x, neg_q))


def _gelu_tanh(b: Builder, x: fx.Node) -> fx.Node:
    mul = aten.mul.Tensor
    k = 2.0 * math.sqrt(2.0 / math.pi)
    x2 = b.call(mul, x, x)
    inner = b.call(aten.add.Tensor, b.call(mul, x2, 0.044715 * k), k)  # 2z / x
    return b.call(mul, x, b.call(aten.sigmoid.default, b.call(mul, inner, x)))


def _hard(b: Builder, x: fx.Node, swish: bool) -> fx.Node:
    mul, add, relu = aten.mul.Tensor, aten.add.Tensor, aten.relu.default
    r = b.call(relu, b.call(add, x, 3.0))
    relu6 = b.call(add, b.call(mul, b.call(relu, b.call(add, b.call(mul, r, -1.0), 6.0)), -1.0), 6.0)
    gate = b.call(mul, relu6, 1.0 / 6.0)
    return b.call(mul, x, gate) if swish else gate
