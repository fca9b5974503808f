"""attention_to_csa (architectural, not exact): attention blocks the plan makes convolution blocks become CSA or MHCA.

Which blocks: the per-block plan of attn2conv/modules/replace.py. Default (Next-ViT's hybrid strategy): in each stage
(consecutive blocks with the same token count and width) every 6th block and the last stay attention blocks (for
attention_to_sra) and the others become MHCA convolution blocks; with several stages the first is all convolution
(DeiT-S: MHCA x 5, SRA, MHCA x 5, SRA). Options {"attention_to_csa": {"every": N, "conv_kind": "mhca" | "csa",
"end_with_attention": bool, "first_stage_conv": bool, "unwindow": bool, "plan": {"blocks.3.attn": "csa",
"blocks.1[01].attn": "keep", ...}}}.
Windowed attention (Swin: roll + window partition, attention, window reverse + roll, layout ops only) is replaced as
a whole: the new block runs on the (B, H, W, C) map, with no partition or shift left (option unwindow, default on).

What a block becomes (maths in the module docstrings):
    csa   NVIDIA DL4AGX convolutional self-attention (attn2conv/modules/csa.py): v = Swish(BN(DWConv5x5(x))),
          bilinear reduction to S x S (S = min(7, H), option csa_reduced), q = BN(Conv1x1(v_)) with h*S^2 channels,
          per-head transpose "rotation" k, relation q * k, upsample, Sigmoid(BN(Conv1x1)) gate, gate * v, 1x1 proj.
    mhca  Next-ViT MHCA (attn2conv/modules/mhca.py): Conv1x1(ReLU(BN(GConv3x3, head_dim 32))).
Prefix tokens (class, distillation) read the grid through AvgPool(H x W) and the original V weights.
Reused weights: the attention's proj (and V for prefix tokens); the MLP is untouched. BatchNorm statistics are
calibrated on the block's inputs over ctx.calibration (or the example input and random inputs).

Ops introduced (ONNX): Conv, BatchNormalization, Sigmoid, Mul, Add, Resize (scales), AveragePool, Reshape,
Transpose, Relu (mhca); Slice and Concat when there are prefix tokens. trt-safe: all in scope but Slice/Concat
(warnings); no MatMul, no Softmax. The report marks the conversion "needs distillation" (attn2conv.distill).
"""
from __future__ import annotations

import torch.fx as fx

from attn2conv.modules.replace import CONV_KINDS, replace_blocks
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register


@register
class AttentionToCSA(GraphPass):
    id = "attention_to_csa"
    exact = False
    removes = ("aten.scaled_dot_product_attention", "aten.softmax", "aten.matmul", "aten.linear")
    introduces = ("aten.conv2d", "aten._native_batch_norm_legit_no_training", "aten.sigmoid", "aten.mul", "aten.add",
                  "aten.upsample_bilinear2d", "aten.avg_pool2d", "aten.relu", "aten.reshape", "aten.permute",
                  "aten.slice", "aten.cat")
    summary = "attention blocks -> NVIDIA CSA / Next-ViT MHCA convolution blocks (per-block plan; needs distillation)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return replace_blocks(gm, ctx, CONV_KINDS)
