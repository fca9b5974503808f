"""attention_to_sra (architectural, not exact): attention blocks the plan keeps as attention get reduced keys.

Which blocks: the per-block plan of attn2conv/modules/replace.py (shared with attention_to_csa): by default every
6th block of a stage and its last one, none in the first of several stages (Next-ViT's [conv x N, attention]
rounds); windowed attention (Swin) becomes SRA over the whole map; options {"attention_to_sra": {"attention_kind":
"sra" | "gsa" | "lsa" | "hmhsa" | "twins", "reduction": R or {tokens: R} or {module glob: R}, "window": ws,
"plan": {...}}}. Run alone (without attention_to_csa), only the blocks planned as attention change.

What a block becomes (maths in attn2conv/modules/sra.py and hmhsa.py), with q, k, v, proj starting from the
replaced attention's weights (a fused qkv Linear is split in thirds) and the same heads and scale:
    sra    E-MHSA style: keys/values from BN(AvgPool_R(grid)) plus the prefix tokens; all tokens query.
           R = divisor of H and W leaving about 7 x 7 keys (14 x 14 -> R 2; 64 x 64 -> R 8; 8 x 8 -> R 1).
    gsa    PVT SRA / Twins GSA: BN(Conv_RxR stride R(grid)) instead of the pool (starts as the same average).
    lsa    Twins locally-grouped attention in ws x ws windows (ws: divisor of H and W closest to 7).
    hmhsa  TransCNN H-MHSA: window attention, residual + BN, then attention to BN(AvgPool_R) keys, proj.
    twins  lsa and gsa alternating over the attention blocks of a stage.
The attention cores stay softmax(q k^T) v; the exact pass attention_to_conv, later in the pipeline, makes them
broadcast Mul + constant grouped 1x1 Conv (softmax decomposed on trt-safe).

Ops introduced before attention_to_conv (ONNX): Conv, BatchNormalization, AveragePool, Add, Reshape, Transpose, an
attention core (MatMul + Softmax: removed by attention_to_conv), Slice/Concat with prefix tokens (trt-safe
warnings). Cost of a core falls from N^2 C to N M C, M = P + HW/R^2. Needs distillation.
"""
from __future__ import annotations

import torch.fx as fx

from attn2conv.modules.replace import ATTENTION_KINDS, replace_blocks
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register


@register
class AttentionToSRA(GraphPass):
    id = "attention_to_sra"
    exact = False
    removes = ()
    introduces = ("aten.conv2d", "aten._native_batch_norm_legit_no_training", "aten.avg_pool2d", "aten.add",
                  "aten.reshape", "aten.permute", "aten.slice", "aten.cat", "aten.scaled_dot_product_attention")
    summary = "attention blocks -> spatial-reduction / locally-grouped / hierarchical attention (needs distillation)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return replace_blocks(gm, ctx, ATTENTION_KINDS)
