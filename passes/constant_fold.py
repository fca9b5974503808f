"""constant_fold (exact, bit-identical): subgraphs that read only parameters and constants are evaluated once.

A node is constant when it is a get_attr or a call whose every input node is constant (ops with no tensor input, such
as zeros/arange/full, are constant too). Each constant node read by a non-constant node (the frontier) is evaluated
with the module's own tensors, in the graph's order and with the same ATen ops, and replaced by a buffer registered
under its module path. Position-embedding interpolation, relative-position-bias gathers (Gather on a bias table),
Swin attention masks built in forward (Hugging Face), expanded class tokens and scale factors become Constants,
so no Gather/Range/Expand/Resize of constants reaches the exported graph. Random ops are never folded; results
larger than `max_elements` (option, default 2**24) are left in the graph. Introduces no op.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from attn2conv.graph import Builder, get_constant, op_kind, replace_uses, where
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register

NONDETERMINISTIC = ("rand", "randn", "randint", "randperm", "bernoulli", "dropout", "normal", "uniform", "empty")


@register
class ConstantFold(GraphPass):
    id = "constant_fold"
    exact = True
    removes = ("aten.index", "aten.select", "aten.arange", "aten.expand", "aten.upsample_bicubic2d",
               "aten.upsample_bilinear2d")
    introduces = ()
    summary = "evaluate parameter-only subgraphs (bias gathers, masks, pos-embed interpolation) at conversion time"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        limit = int(ctx.option(self.id, "max_elements", 2 ** 24))
        values: dict[fx.Node, object] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                values[node] = get_constant(gm, node)
                if values[node] is None:
                    del values[node]
            elif node.op == "call_function" and all(n in values for n in node.all_input_nodes) and \
                    not any(word in op_kind(node).split(".")[-1] for word in NONDETERMINISTIC):
                try:
                    with torch.no_grad():
                        values[node] = node.target(*map_arg(node.args, values.__getitem__),
                                                   **map_arg(node.kwargs, values.__getitem__))
                except Exception as exc:  # an op that cannot run eagerly here stays in the graph
                    result.misses.append(f"{where(node)}: cannot evaluate ({type(exc).__name__})")
        for node in list(values):
            if node.op != "call_function" or node.target is operator.getitem and not isinstance(values[node],
                                                                                              torch.Tensor):
                continue
            value = values[node]
            if not isinstance(value, torch.Tensor) or all(u in values for u in node.users):
                continue
            if value.numel() > limit:
                result.misses.append(f"{where(node)}: constant of {value.numel()} elements exceeds max_elements")
                continue
            const = Builder(gm, node).constant(value.detach().clone(), f"folded_{node.name}")
            replace_uses(node, const)
            result.rewrites += 1
        result.changed = result.rewrites > 0
        if result.changed:
            result.notes.append(f"{result.rewrites} constant subgraph outputs evaluated at conversion time")
        return result
