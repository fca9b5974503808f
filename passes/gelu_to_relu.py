"""gelu_to_relu (architectural, not exact): GELU becomes ReLU (Next-ViT, sampleSafeMNIST), or SiLU as x * sigmoid(x).

    GELU(x) = x * Phi(x)   ->   ReLU(x) = max(x, 0)          |GELU(x) - ReLU(x)| <= 0.17, largest at x ~ -0.75
                            ->   SiLU(x) = x * sigmoid(x)     option to="silu"; differs from GELU by up to ~0.2

Both ends agree for large |x|; around 0 they differ, so the swap needs distillation (TransCNN trains with SiLU,
Next-ViT with ReLU). Unlike gelu_decompose (exact, 2 Div and 5 Relu/Sigmoid/Mul chains per GELU) this costs one
op. ONNX ops: Relu (to="relu"), or Sigmoid + Mul (to="silu"); all in the trt-safe and DLA scopes. Matches every
aten.gelu, both approximate="none" (Erf) and "tanh".
"""
from __future__ import annotations

import torch.fx as fx

from attn2conv.graph import Builder, aten, nodes_of, replace_uses
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register


@register
class GeluToRelu(GraphPass):
    id = "gelu_to_relu"
    exact = False
    removes = ("aten.gelu",)
    introduces = ("aten.relu", "aten.sigmoid", "aten.mul")
    summary = "GELU -> ReLU (or SiLU); needs distillation"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        to = ctx.option(self.id, "to", "relu")
        if to not in ("relu", "silu"):
            raise ValueError(f"gelu_to_relu: option to={to!r}, use 'relu' or 'silu'")
        result = PassResult(changed=False)
        for node in nodes_of(gm, "aten.gelu"):
            b = Builder(gm, node)
            x = node.args[0]
            y = b.call(aten.relu.default, x) if to == "relu" else b.call(aten.mul.Tensor, x,
                                                                          b.call(aten.sigmoid.default, x))
            replace_uses(node, y)
            gm.graph.erase_node(node)
            result.rewrites += 1
        result.changed = result.rewrites > 0
        if result.changed:
            result.notes.append(f"{result.rewrites} GELU -> {to}; needs distillation")
        return result
