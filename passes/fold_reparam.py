"""fold_reparam (exact): parallel branches over one input, summed, become one convolution.

Found by graph shape, not by class names. Every node gets a ConvForm when its value is an affine function of a single
input x that one convolution can compute:

    conv2d(x, W, b)                      constant W, b; zero padding; no dilation
    BatchNorm(f)   f * c   c * f         eval-mode BN, per-channel constant c
    f + g   f - g   f + x   x + f        f, g over the same x; x itself is the identity branch
    BatchNorm(x)                         a BN-only identity branch (RepVGG, MobileOne)

That covers RepVGG (3x3-BN + 1x1-BN + BN), MobileOne (k over-parameterised kxk-BN branches + 1x1-BN + BN), FastViT
RepMixer (x + gamma * (mixer(x) - norm(x))) and RepCPE (dwconv(x) + x), RepViT's RepVggDw (BN(conv(x) + conv1(x) + x)),
ReparamLargeKernelConv (large + small kernel), Slide-Transformer's fixed shift + learnable depthwise path, and
parallel Linear heads on (B, C) features that are summed or averaged (RepViT/LeViT distillation heads). Kernels
are zero-padded to the largest one around their centres (offset = merged padding - branch padding), groups are
reduced to the greatest common divisor, and the sum is done in float64.

A form is collapsed at its root (the node whose users need the value itself) when it holds a convolution and more
than the bare convolution.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from attn2conv.convmath import (ConvForm, batchnorm_info, combine, conv_form, identity_form, linear_form, output_hw,
                                per_channel)
from attn2conv.graph import Builder, aten, get_constant, is_op, replace_uses, shape, where
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register


def _hw(node: fx.Node) -> tuple[int, int] | None:
    s = shape(node)
    return (s[2], s[3]) if s is not None and len(s) == 4 else None


class FormAnalysis:
    """Computes the ConvForm of every node it can, in graph order, remembering why binary ops failed to merge."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.forms: dict[fx.Node, ConvForm] = {}
        self.misses: dict[fx.Node, str] = {}
        for node in gm.graph.nodes:
            form = self._form(node)
            if isinstance(form, ConvForm):
                self.forms[node] = form
            elif isinstance(form, str):
                self.misses[node] = form

    def _operand(self, node, partner: ConvForm | None) -> ConvForm | None:
        if node in self.forms:
            return self.forms[node]
        if partner is not None and node is partner.x and shape(node) is not None and len(shape(node)) == 4:
            return identity_form(node, shape(node)[1])
        return None

    def _form(self, node: fx.Node) -> ConvForm | str | None:
        if node.op != "call_function":
            return None
        form = conv_form(self.gm, node) or linear_form(self.gm, node)
        if form is not None:
            return form
        bn = batchnorm_info(self.gm, node.args[0]) if node.target.__name__ == "getitem" else None
        if bn is None and is_op(node, "aten.batch_norm"):
            bn = batchnorm_info(self.gm, node)
        if bn is not None and bn.output is node:
            inner = self.forms.get(bn.input)
            if inner is not None:
                return inner.scaled(bn.scale, bn.shift)
            s = shape(bn.input)
            if s is not None and len(s) == 4:
                return identity_form(bn.input, s[1]).scaled(bn.scale, bn.shift)
            return None
        if is_op(node, "aten.add", "aten.sub") and len(node.args) == 2:
            a, b = node.args
            alpha = float(node.kwargs.get("alpha", 1.0)) * (-1.0 if is_op(node, "aten.sub") else 1.0)
            if a in self.forms and not (isinstance(b, fx.Node) and (b in self.forms or b is self.forms[a].x)):
                return self._shifted(self.forms[a], b, alpha)
            if b in self.forms and not (isinstance(a, fx.Node) and (a in self.forms or a is self.forms[b].x)):
                form = self.forms[b]
                return self._shifted(form.scaled(torch.full((form.c_out,), alpha, dtype=torch.float64)), a, 1.0)
            if not all(isinstance(v, fx.Node) for v in (a, b)):
                return None
            fa = self.forms.get(a)
            fb = self.forms.get(b)
            fa = fa or self._operand(a, fb)
            fb = fb or self._operand(b, fa)
            if fa is None or fb is None:
                return None
            if fa.x is not fb.x:
                return None  # an ordinary residual add, not parallel branches
            if shape(a) != shape(b):
                return "branch outputs are broadcast against each other"
            merged = combine(fa, fb, alpha, _hw(node))
            return merged
        if is_op(node, "aten.mul", "aten.div") and len(node.args) == 2:
            a, b = node.args
            f, c = (self.forms.get(a), b) if a in self.forms else (self.forms.get(b), a)
            if f is None or (is_op(node, "aten.div") and a not in self.forms):
                return None
            value = get_constant(self.gm, c) if isinstance(c, fx.Node) else c
            scale = self._channel_constant(f, value)
            if scale is not None and is_op(node, "aten.div"):
                scale = 1.0 / scale if bool((scale != 0).all()) else None
            return f.scaled(scale) if scale is not None else "multiplier is not a per-channel constant"
        return None


    @staticmethod
    def _channel_constant(form: ConvForm, value) -> torch.Tensor | None:
        """A constant as one value per output channel: (C,1,1)-style for convs, scalars only for Linears."""
        if value is None:
            return None
        if form.linear:
            is_scalar = isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)
            return per_channel(float(value), form.c_out) if is_scalar else None
        return per_channel(value, form.c_out)

    def _shifted(self, form: ConvForm, c, alpha: float) -> ConvForm | str | None:
        """form + alpha * c for a per-channel constant c (MobileOne adds a literal 0 for a missing branch)."""
        value = get_constant(self.gm, c) if isinstance(c, fx.Node) else c
        shift = self._channel_constant(form, value)
        if shift is None:
            return None
        return form.scaled(torch.ones(form.c_out, dtype=torch.float64), alpha * shift)


@register
class FoldReparam(GraphPass):
    id = "fold_reparam"
    exact = True
    removes = ("aten.add", "aten.sub", "aten.mul", "aten._native_batch_norm_legit_no_training")
    introduces = ("aten.conv2d",)
    summary = "parallel conv/BN/identity branches over one input -> one conv (RepVGG, MobileOne, FastViT, RepViT)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        analysis = FormAnalysis(gm)
        result = PassResult(changed=False)
        forms = analysis.forms
        replaced: dict[fx.Node, fx.Node] = {}  # a root rewritten earlier may be the input of a later form
        for node, form in list(forms.items()):
            # A root is needed by something other than a larger form over the same input.
            is_root = _is_output(node) or any(u not in forms or forms[u].x is not form.x for u in node.users)
            if not is_root or form.convs == 0 or form.ops < 2:
                continue
            if not form.linear and output_hw(form) != _hw(node):
                result.misses.append(f"{where(node)}: merged convolution would change the output size")
                continue
            b = Builder(gm, node)
            wdtype = _weight_dtype(gm, node, form)
            weight = form.weight[:, :, 0, 0] if form.linear else form.weight
            weight = b.constant(weight.to(wdtype), "reparam_weight", trainable=True)
            bias = b.constant(form.bias.to(wdtype), "reparam_bias", trainable=True)
            x = replaced.get(form.x, form.x)
            if form.linear:
                merged = b.call(aten.linear.default, x, weight, bias)
            else:
                merged = b.call(aten.conv2d.default, x, weight, bias, list(form.stride), list(form.padding), [1, 1],
                                form.groups)
            replace_uses(node, merged)
            replaced[node] = merged
            result.rewrites += 1
            kind = "linear" if form.linear else f"conv {tuple(form.weight.shape[2:])} groups={form.groups}"
            result.notes.append(f"{where(node)}: {form.convs} branch(es) and {form.ops - form.convs} other op(s) "
                                f"-> {kind}")
        for node, reason in analysis.misses.items():
            result.misses.append(f"{where(node)}: {reason}")
        result.changed = result.rewrites > 0
        return result


def _is_output(node: fx.Node) -> bool:
    return any(u.op == "output" for u in node.users)


def _weight_dtype(gm: fx.GraphModule, node: fx.Node, form: ConvForm) -> torch.dtype:
    v = node.meta.get("val")
    return v.dtype if isinstance(v, torch.Tensor) and v.is_floating_point() else torch.float32
