"""Conv-only building blocks for fidelity="fast" conversions.

Every block maps (B, N, C) tokens to (B, N, C) and uses only ops that are in the trt-safe scope once the exact
passes have run (attention cores inside SRA/LSA/H-MHSA are rewritten by attention_to_conv):

    CSA                          NVIDIA DL4AGX convolutional self-attention (no softmax, no matmul)
    MHCA                         Next-ViT multi-head convolutional attention (grouped 3x3 conv)
    SpatialReductionAttention    E-MHSA / PVT SRA / Twins GSA (keys from a pooled or strided-conv grid, BN)
    LocallyGroupedAttention      Twins LSA (window attention)
    HierarchicalAttention        TransCNN H-MHSA (grid attention, then pooled-token attention)
"""
from attn2conv.modules.csa import CSA
from attn2conv.modules.hmhsa import HierarchicalAttention
from attn2conv.modules.mhca import MHCA
from attn2conv.modules.sra import LocallyGroupedAttention, SpatialReductionAttention

__all__ = ["CSA", "MHCA", "SpatialReductionAttention", "LocallyGroupedAttention", "HierarchicalAttention"]
