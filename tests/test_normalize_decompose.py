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


def test_dla_divides_by_the_newton_rsqrt_of_the_clamped_sum():
    """DLA rejects Sqrt (and Pow, Reciprocal): F.normalize becomes x * rsqrt(max(s, e)) with layernorm_decompose's
    Newton form, a bare norm s * rsqrt(max(s, e)); exact for zero rows, tiny, unit and huge vectors."""
    net = Norms().eval()
    x = torch.randn(2, 5, 8)
    x[0, 1] = 0.0
    x[1, :, 3] = 0.0
    result = _convert(net, x, "dla")
    assert "1/sqrt by newton" in " ".join(result.report.passes[0].notes)
    counts = op_counts(result.module)
    for gone in ("aten.sqrt", "aten.rsqrt", "aten.pow", "aten.div", "aten.linalg_vector_norm", "aten.linalg_norm"):
        assert counts.get(gone, 0) == 0, gone
    assert counts["aten.clamp_min"] == 3  # the two F.normalize clamps and the bare norm's
    for scale in (1.0, 2.0 ** -19, 1e-3, 1e4, 1e5):  # ||x||^2 from ~2^-36 to ~1e11, inside [2^-40, 2^40]
        probe = scale * torch.randn_like(x)
        probe[0, 1] = 0.0
        y, ref = result.module(probe), net(probe)
        assert torch.isfinite(y).all() and rel_error(y, ref) <= 1e-6, scale
    assert not {"Sqrt", "Pow", "Reciprocal", "ReduceL2", "ReduceSum"} & _errors(result)


def test_swinv2_cosine_attention_certified_on_dla(tmp_path):
    """The whole dla preset on a small SwinV2: no Sqrt left in the ONNX (it was the one op DLA rejected)."""
    import onnx

    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, depths=[1, 1], num_heads=[2, 4],
                              embed_dim=32, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    result = attn2conv.convert(model, "dla", x, export=tmp_path / "swinv2.onnx")
    assert result.certified, result.report.extra["check"]["failing"][:3]
    by_id = {p.id: p for p in result.report.passes}
    assert by_id["normalize_decompose"].status == "applied" and by_id["normalize_decompose"].rewrites == 4
    assert by_id["normalize_decompose"].rel_error <= 1e-6
    ops = {n.op_type for n in onnx.load(str(tmp_path / "swinv2.onnx")).graph.node}
    assert not {"Sqrt", "Pow", "Reciprocal", "ReduceL2", "ReduceSum", "Expand"} & ops
    with torch.no_grad():
        assert rel_error(result.module(x), model(x)) <= 1e-5


def test_xcit_token_axis_normalize_on_dla():
    """XCiT normalises q, k over the token axis (not the last one): on DLA the Newton form, exact, no Sqrt."""
    model = timm.create_model("xcit_nano_12_p16_224", pretrained=False, depth=1, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    result = _convert(model, x, "dla", passes=("linear_to_conv", "attention_to_conv", "normalize_decompose"))
    assert result.report.passes[2].rewrites == 2
    assert op_counts(result.module).get("aten.sqrt", 0) == 0
    for probe in (x, torch.randn_like(x)):
        assert rel_error(result.module(probe), model(probe)) <= 1e-5
    assert not {"Sqrt", "ReduceL2", "ReduceSum", "MatMul"} & _errors(result)
