"""layernorm_to_batchnorm (architectural, not exact): LayerNorm over channels becomes a BatchNorm whose statistics are
measured on calibration batches, then folded.

    LayerNorm:  y = (x - mean_c(x)) / sqrt(var_c(x) + eps) * gamma + beta        statistics per token, at run time
    BatchNorm:  y = (x - mu) / sqrt(sigma^2 + eps) * gamma + beta = s * x + t    mu, sigma^2 per channel, fixed:
                s = gamma / sqrt(sigma^2 + eps),  t = beta - s * mu

mu and sigma^2 are the mean and (biased) variance of the LayerNorm's input per channel over every token of the
calibration batches (ctx.calibration; convert(..., calibration=data) fills it; without it the example input and 3
seeded random inputs). In eval form the BatchNorm is a per-channel affine, folded at once (Next-ViT's pre-BN fold,
rewrite-math.md 2.4):

    every consumer a Linear / 1x1 Conv with constant weights:  W' = W diag(s),  b' = b + W t   (float64) -> no op left
    otherwise:                                                  x * s + t   (Mul + Add by (C,) constants, trainable)

So in a ViT norm1/norm2 disappear into qkv/fc1 and the final norm becomes Mul + Add (trt-safe scope); no
ReduceMean, Sqrt or LayerNormalization is left. Only LayerNorms over the last axis alone are rewritten (others are
reported). Option: form ("fold" default | "affine": never fold into consumers). Needs distillation: the statistics
no longer follow each token (Next-ViT, LeViT and CSA train with BN from the start).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from attn2conv.graph import Builder, arg, aten, get_constant, is_op, nodes_of, replace_uses, shape, where
from attn2conv.modules.replace import calibration_inputs, lockstep
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register


@register
class LayerNormToBatchNorm(GraphPass):
    id = "layernorm_to_batchnorm"
    exact = False
    removes = ("aten.layer_norm", "aten.native_layer_norm")
    introduces = ("aten.mul", "aten.add")
    summary = "LayerNorm -> BatchNorm with calibrated statistics, folded into the next Linear or a Mul + Add"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        todo = []
        for node in nodes_of(gm, "aten.layer_norm"):
            xs = shape(node.args[0])
            normalized = list(node.args[1])
            if xs is None or normalized != [xs[-1]]:
                result.misses.append(f"{where(node)}: normalises over {normalized}, not over the last axis alone")
                continue
            todo.append(node)
        if not todo:
            return result
        # One sweep in graph order over all calibration batches: each LayerNorm's statistics are taken on inputs
        # that already went through the BatchNorms before it, as they will in the rewritten graph.
        stats: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook_for(node):
            def hook(_out, fetch):
                inputs = fetch(node.args[0])
                c = inputs[0].shape[-1]
                sample = torch.cat([v.double().reshape(-1, c) for v in inputs])
                mu, var = sample.mean(0), sample.var(0, unbiased=False)
                eps = float(arg(node, 4, "eps", 1e-5))
                gamma = _param(gm, arg(node, 2, "weight"), c, 1.0)
                beta = _param(gm, arg(node, 3, "bias"), c, 0.0)
                s = gamma / torch.sqrt(var + eps)
                stats[node] = (s, beta - s * mu)
                return [(v.double() * s + stats[node][1]).to(v.dtype) for v in inputs]
            return hook

        lockstep(gm, calibration_inputs(ctx, gm), {n: hook_for(n) for n in todo})
        fold = ctx.option(self.id, "form", "fold") == "fold"
        for node in todo:
            s, t = stats[node]
            how = self._fold(gm, node, s, t) if fold else "affine form requested"
            if how is not None:
                self._affine(gm, node, s, t)
                result.notes.append(f"{where(node)}: Mul + Add ({how})")
            result.rewrites += 1
        result.changed = result.rewrites > 0
        if result.changed:
            result.notes.append(f"{result.rewrites} LayerNorms -> BatchNorm statistics from calibration; "
                                "needs distillation")
        return result

    @staticmethod
    def _fold(gm: fx.GraphModule, node: fx.Node, s: torch.Tensor, t: torch.Tensor) -> str | None:
        users = list(node.users)
        for u in users:
            if not is_op(u, "aten.linear") or u.args[0] is not node or get_constant(gm, u.args[1]) is None:
                return f"a consumer is {u.name}, not a Linear with constant weights"
            b_node = arg(u, 2, "bias")
            if b_node is not None and get_constant(gm, b_node) is None:
                return f"{u.name} has a computed bias"
        for u in users:
            w = get_constant(gm, u.args[1])
            b_node = arg(u, 2, "bias")
            bias = get_constant(gm, b_node).double() if b_node is not None else torch.zeros(w.shape[0],
                                                                                             dtype=torch.float64)
            w64 = w.double()
            b = Builder(gm, u)
            new_w = b.constant((w64 * s).to(w.dtype), "bn_folded_weight", trainable=True)
            new_b = b.constant((bias + w64 @ t).to(w.dtype), "bn_folded_bias", trainable=True)
            new = b.call(aten.linear.default, node.args[0], new_w, new_b)
            replace_uses(u, new)
            gm.graph.erase_node(u)
        gm.graph.erase_node(node)
        return None

    @staticmethod
    def _affine(gm: fx.GraphModule, node: fx.Node, s: torch.Tensor, t: torch.Tensor) -> None:
        dtype = node.args[0].meta["val"].dtype
        b = Builder(gm, node)
        scale = b.constant(s.to(dtype), "bn_scale", trainable=True)
        shift = b.constant(t.to(dtype), "bn_shift", trainable=True)
        y = b.call(aten.add.Tensor, b.call(aten.mul.Tensor, node.args[0], scale), shift)
        replace_uses(node, y)
        gm.graph.erase_node(node)


def _param(gm: fx.GraphModule, node, c: int, fill: float) -> torch.Tensor:
    value = get_constant(gm, node) if node is not None else None
    return value.double() if value is not None else torch.full((c,), fill, dtype=torch.float64)
