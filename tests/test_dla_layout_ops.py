"""DLA layout fixes, each exact on real small models: expand_to_broadcast (MobileViTv2's separable attention),
stack -> Reshape + Concat in squeeze_to_reshape (CrossViT's head average), 1-D pools as 2-D in pool_window_split
(Next-ViT's E-MHSA key reduction)."""
import torch
import torch.nn.functional as F

import attn2conv
from attn2conv.legality import op_counts
from attn2conv.pipeline import Pipeline

from conftest import rel_error


class Gate(torch.nn.Module):
    def forward(self, v, ctx):  # v (B, C, P, N), ctx (B, C, P, 1)
        shared = v * ctx.expand_as(v)  # broadcasts: dropped
        same = ctx.expand(ctx.shape) + 1  # an alias: dropped
        kept = torch.cat([ctx.expand(-1, -1, -1, 2), v[..., :2]], 1)  # read by a cat: kept, reported
        return shared, same, kept


def test_expand_read_by_broadcasting_ops_is_dropped_bit_exact():
    net, v, ctx = Gate().eval(), torch.randn(1, 4, 3, 5), torch.randn(1, 4, 3, 1)
    dla = attn2conv.convert(net, "dla", (v, ctx), pipeline=Pipeline(["expand_to_broadcast"]))
    record = dla.report.passes[0]
    assert record.rewrites == 2 and len(record.misses) == 1 and "does not broadcast" in str(record.misses[0])
    assert op_counts(dla.module)["aten.expand"] == 1
    for got, ref in zip(dla.module(v, ctx), net(v, ctx)):
        assert torch.equal(got, ref)
    trt = attn2conv.convert(net, "trt", (v, ctx), pipeline=Pipeline(["expand_to_broadcast"]))
    assert trt.report.passes[0].rewrites == 0  # TensorRT runs Expand: left alone


def test_mobilevitv2_has_no_expand_on_dla():
    import timm

    model = timm.create_model("mobilevitv2_050", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    res = attn2conv.convert(model, "dla", x, guard="each")  # whole forwards: the error is against the graph before
    record = next(p for p in res.report.passes if p.id == "expand_to_broadcast")
    # six broadcasts (the ONNX Expands) and three expands to their own shape (the last stage's 4 x 1 map)
    assert record.rewrites == 9 and record.rel_error == 0.0
    assert op_counts(res.module).get("aten.expand", 0) == 0
    assert "Expand" not in {op["onnx_op"] for op in res.report.illegal_ops}
    with torch.no_grad():
        assert rel_error(res.module(x), model(x)) <= 1e-5


class Stacks(torch.nn.Module):
    def forward(self, a, b):  # (B, K) logits of two heads, averaged like CrossViT's
        return torch.stack([a, b]).mean(0), torch.stack([a, b], dim=-1)


def test_stack_becomes_reshape_and_concat_bit_exact():
    net, a, b = Stacks().eval(), torch.randn(1, 10), torch.randn(1, 10)
    res = attn2conv.convert(net, "dla", (a, b), pipeline=Pipeline(["squeeze_to_reshape"]))
    assert res.report.passes[0].rewrites == 2
    counts = op_counts(res.module)
    assert counts.get("aten.stack", 0) == 0 and counts["aten.cat"] == 2
    for got, ref in zip(res.module(a, b), net(a, b)):
        assert torch.equal(got, ref)
    assert not {"Unsqueeze"} & {op["onnx_op"] for op in res.report.illegal_ops}


class Pools1d(torch.nn.Module):
    def forward(self, x):  # (B, C, L)
        return F.avg_pool1d(x, 16, 16), F.max_pool1d(x, 4, 4), F.avg_pool1d(x, 3, 2, 1, count_include_pad=False)


def test_1d_pools_become_2d_and_are_split_exact():
    net, x = Pools1d().eval(), torch.randn(2, 8, 64)
    res = attn2conv.convert(net, "dla", x, pipeline=Pipeline(["pool_window_split"]))
    counts = op_counts(res.module)
    assert counts.get("aten.avg_pool1d", 0) == counts.get("aten.max_pool1d", 0) == 0
    assert counts["aten.avg_pool2d"] == 3 and counts["aten.max_pool2d"] == 1  # the window of 16 as 8 then 2
    for node in res.module.graph.nodes:
        if node.op == "call_function" and "pool2d" in str(node.target):
            assert max(node.args[1]) <= 8
    for got, ref in zip(res.module(x), net(x)):
        assert got.shape == ref.shape and rel_error(got, ref) <= 1e-6
    trt = attn2conv.convert(net, "trt", x, pipeline=Pipeline(["pool_window_split"]))
    assert op_counts(trt.module)["aten.avg_pool1d"] == 2  # TensorRT pools 1-D: left alone


class Bicubic(torch.nn.Module):
    def forward(self, x):  # CrossViT's 120 -> 112 px resize for its second branch, and a 2x upsample
        return (F.interpolate(x, size=(112, 112), mode="bicubic", align_corners=False),
                F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=True))


def test_bicubic_resize_becomes_two_constant_linears_on_dla():
    net, x = Bicubic().eval(), torch.randn(1, 3, 120, 120)
    dla = attn2conv.convert(net, "dla", x, pipeline=Pipeline(["resize_to_scales", "linear_to_conv"]))
    assert dla.report.passes[0].rewrites == 2
    counts = op_counts(dla.module)
    assert counts.get("aten.upsample_bicubic2d", 0) == 0 and counts["aten.conv2d"] == 4
    for probe in (x, 10 * torch.randn_like(x)):
        for got, ref in zip(dla.module(probe), net(probe)):
            assert got.shape == ref.shape and rel_error(got, ref) <= 2e-6  # measured 9.2e-7: four-tap sums reordered
    safe = attn2conv.convert(net, "trt-safe", x, pipeline=Pipeline(["resize_to_scales"]))
    assert op_counts(safe.module)["aten.upsample_bicubic2d"] == 2  # TensorRT resizes cubic: kept (by scales)
