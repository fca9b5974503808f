import pytest
import timm
import torch
import torch.nn.functional as F

import attn2conv
from attn2conv.legality import op_counts

from conftest import rel_error


class Norms(torch.nn.Module):
    """F.normalize over the last and a middle axis, a bare L2 norm without keepdim, and a one-axis sum."""

    def forward(self, x):  # x (B, N, C)
        a = F.normalize(x, dim=-1)
        b = F.normalize(x, dim=1)
        n = torch.linalg.norm(x, dim=-1)  # (B, N)
        s = x.sum(dim=1, keepdim=True)  # (B, 1, C)
        return a + b + n[..., None] + s


def _convert(model, x, target, passes=("normalize_decompose",)):
    return attn2conv.convert(model, target, x, pipeline=attn2conv.Pipeline(list(passes)))


def _errors(result):
    return {op["onnx_op"] for op in result.report.illegal_ops if op["severity"] == "error"}


@pytest.mark.parametrize("target,sum_op,max_op", [("trt-safe", "aten.conv2d", "aten.relu"),
                                                  ("trt", "aten.sum", "aten.clamp_min")])
def test_norms_and_sums_exact_and_legal(target, sum_op, max_op):
    net = Norms().eval()
    x = torch.randn(2, 5, 8)
    x[0, 1] = 0.0  # an all-zero row: the eps clamp decides
    x[1, :, 3] = 0.0  # an all-zero column (normalised over dim 1)
    result = _convert(net, x, target)
    counts = op_counts(result.module)
    assert counts.get("aten.linalg_vector_norm", 0) == counts.get("aten.linalg_norm", 0) == counts.get("aten.expand", 0) == 0
    assert counts.get(sum_op, 0) >= 3 and counts.get(max_op, 0) == 2  # two F.normalize clamps
    if target == "trt-safe":
        assert counts.get("aten.sum", 0) == 0 and counts.get("aten.clamp_min", 0) == 0
    assert result.report.passes[0].rewrites == (4 if target == "trt-safe" else 3)  # trt keeps its ReduceSum
    for probe in (x, 5 * torch.randn_like(x)):
        y, ref = result.module(probe), net(probe)
        assert torch.isfinite(y).all() and rel_error(y, ref) <= 1e-6
    assert not {"ReduceL2", "ReduceSum"} & _errors(result)


def test_swinv2_cosine_attention_no_reduce_l2():
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, depths=[1, 1], num_heads=[2, 4],
                              embed_dim=32, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    for target in ("trt", "trt-safe"):
        result = _convert(model, x, target)
        assert result.report.passes[0].rewrites == 4  # q and k of two blocks
        assert op_counts(result.module).get("aten.linalg_vector_norm", 0) == 0
        assert "ReduceL2" not in _errors(result)
        assert rel_error(result.module(x), model(x)) <= 1e-5


def test_xcit_cross_covariance_attention_fully_converted_for_trt_safe():
    """XCiT: q, k normalised over tokens, scores scaled by a per-head temperature tensor; the matcher replays the
    tensor scale, normalize_decompose removes the ReduceL2: no MatMul, Softmax or Reduce left."""
    model = timm.create_model("xcit_nano_12_p16_224", pretrained=False, depth=1, img_size=32).eval()
    with torch.no_grad():
        for blk in model.blocks:  # a temperature per head that differs from 1, so a dropped scale would show
            blk.attn.temperature.copy_(torch.linspace(0.5, 2.0, blk.attn.temperature.numel()).reshape_as(
                blk.attn.temperature))
    x = torch.randn(1, 3, 32, 32)
    result = _convert(model, x, "trt-safe", passes=("linear_to_conv", "attention_to_conv", "normalize_decompose"))
    attention = result.report.passes[1]
    assert attention.rewrites == 3 and not attention.misses  # one XCA block + two class-attention blocks
    counts = op_counts(result.module)
    for kind in ("aten.matmul", "aten.softmax", "aten.linalg_vector_norm"):
        assert counts.get(kind, 0) == 0, kind
    for probe in (x, torch.randn_like(x)):
        assert rel_error(result.module(probe), model(probe)) <= 1e-5
    assert not {"MatMul", "ReduceL2", "ReduceSum"} & _errors(result)
