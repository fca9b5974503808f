"""fold_batchnorm (exact): eval-mode BatchNorm folded into the convolution or linear next to it.

    Conv -> BN            W' = W * s[o],            b' = s * b + t                  (s, t: BN as y = s*x + t)
    BN -> 1x1 Conv        W'[o, i] = W[o, i] * s[i], b' = b + sum_i W[o, i] * t[i]  (groups respected)
    BN -> Linear          same, for (B, C) inputs where BN's channel axis is the Linear's input axis

BN before a padded kxk convolution is not folded: the padded zeros would have to become -t/s at the borders. BN
after anything else stays (TensorRT maps it to a Scale layer, legal on every target); fold_reparam also folds BN
that closes a group of parallel branches.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from attn2conv.convmath import BatchNormInfo, batchnorm_info, conv_form, pair
from attn2conv.graph import Builder, arg, aten, get_constant, is_op, replace_uses, shape, where
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register


@register
class FoldBatchNorm(GraphPass):
    id = "fold_batchnorm"
    exact = True
    removes = ("aten._native_batch_norm_legit_no_training", "aten.batch_norm")
    introduces = ()
    summary = "Conv->BN, BN->1x1 Conv and BN->Linear folded into the convolution or linear"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or not is_op(node, "aten._native_batch_norm_legit_no_training",
                                                       "aten.batch_norm"):
                continue
            bn = batchnorm_info(gm, node)
            if bn is None:
                result.misses.append(f"{where(node)}: statistics or affine parameters are not constants")
                continue
            reason = self._into_producer(gm, bn)
            if reason:
                reason2 = self._into_consumers(gm, bn)
                if reason2:
                    result.misses.append(f"{where(node)}: {reason}; {reason2}")
                    continue
            result.rewrites += 1
        result.changed = result.rewrites > 0
        return result

    def _into_producer(self, gm: fx.GraphModule, bn: BatchNormInfo) -> str | None:
        conv = bn.input
        form = conv_form(gm, conv) if isinstance(conv, fx.Node) else None
        if form is None:
            return "input is not a convolution with constant weights"
        if len(conv.users) != 1:
            return "the convolution's output is also used without the BN"
        folded = form.scaled(bn.scale, bn.shift)
        b = Builder(gm, bn.output)
        dtype = get_constant(gm, conv.args[1]).dtype
        weight = b.constant(folded.weight.to(dtype), "folded_weight", trainable=True)
        bias = b.constant(folded.bias.to(dtype), "folded_bias", trainable=True)
        new = b.call(aten.conv2d.default, conv.args[0], weight, bias, list(form.stride), list(form.padding),
                     [1, 1], form.groups)
        replace_uses(bn.output, new)
        return None

    def _into_consumers(self, gm: fx.GraphModule, bn: BatchNormInfo) -> str | None:
        users = list(bn.output.users)
        if not users:
            return "output unused"
        for user in users:
            reason = _consumer_reason(gm, bn, user)
            if reason:
                return reason
        for user in users:
            w_node = user.args[1]
            w = get_constant(gm, w_node).double()
            bias_node = arg(user, 2, "bias")
            bias = get_constant(gm, bias_node).double() if bias_node is not None else torch.zeros(w.shape[0],
                                                                                                   dtype=torch.float64)
            groups = int(arg(user, 6, "groups", 1)) if is_op(user, "aten.conv2d") else 1
            c_out, per_group = w.shape[0], w.shape[1]
            # input channel index seen by each (o, i) weight entry
            channel = (torch.arange(c_out)[:, None] // (c_out // groups)) * per_group + torch.arange(per_group)
            w2 = w.reshape(c_out, per_group)
            new_w = (w2 * bn.scale[channel]).reshape(w.shape)
            new_b = bias + (w2 * bn.shift[channel]).sum(1)
            b = Builder(gm, user)
            dtype = get_constant(gm, w_node).dtype
            weight = b.constant(new_w.to(dtype), "folded_weight", trainable=True)
            bias_c = b.constant(new_b.to(dtype), "folded_bias", trainable=True)
            args = list(user.args)
            args[0], args[1] = bn.input, weight
            if len(args) > 2:
                args[2] = bias_c
            else:
                args.append(bias_c)
            new = b.call(user.target, *args, **{k: v for k, v in user.kwargs.items() if k != "bias"})
            replace_uses(user, new)
            gm.graph.erase_node(user)
        return None


def _consumer_reason(gm: fx.GraphModule, bn: BatchNormInfo, user: fx.Node) -> str | None:
    if is_op(user, "aten.conv2d") and user.target == aten.conv2d.default:
        w = get_constant(gm, user.args[1])
        if user.args[0] is not bn.output or w is None or tuple(w.shape[2:]) != (1, 1):
            return "a consumer is not a 1x1 convolution with constant weights"
        if pair(arg(user, 4, "padding", [0, 0])) != (0, 0):
            return "a 1x1 consumer convolution pads its input"
        bias = arg(user, 2, "bias")
        if bias is not None and get_constant(gm, bias) is None:
            return "a consumer's bias is computed in the graph"
        return None
    if is_op(user, "aten.linear"):
        w = get_constant(gm, user.args[1])
        s = shape(bn.output)
        if user.args[0] is not bn.output or w is None or s is None or len(s) != 2:
            return "a consumer Linear does not read (B, C) features with constant weights"
        bias = arg(user, 2, "bias")
        if bias is not None and get_constant(gm, bias) is None:
            return "a consumer's bias is computed in the graph"
        return None
    return f"a consumer is {user.target} (only 1x1 convolutions and Linear absorb a preceding BN)"
