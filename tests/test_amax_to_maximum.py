import timm
import torch

import attn2conv
from attn2conv.legality import op_counts


def _convert(model, x, target):
    return attn2conv.convert(model, target, x, pipeline=attn2conv.Pipeline(["amax_to_maximum"]))


def test_hiera_query_pooling_max_becomes_element_wise_maximum():
    model = timm.create_model("hiera_tiny_224", pretrained=False, img_size=[64, 64], stages=[1, 1, 1, 1]).eval()
    x = torch.randn(1, 3, 64, 64)
    result = _convert(model, x, "trt-safe")
    assert result.report.passes[0].rewrites == 6  # 3 mask-unit pools + 3 query pools
    counts = op_counts(result.module)
    assert counts.get("aten.amax", 0) == 0 and counts["aten.maximum"] == 6 * 3  # axes of 4: 3 Max each
    for probe in (x, torch.randn_like(x)):
        assert torch.equal(result.module(probe), model(probe))  # max is exact
    assert "ReduceMax" not in {op["onnx_op"] for op in result.report.illegal_ops}


def test_long_axis_and_trt_are_left_alone():
    class Pool(torch.nn.Module):
        def forward(self, x):
            return x.amax(dim=1) + x.amax(dim=2, keepdim=True).sum()

    x = torch.randn(2, 40, 3)
    safe = _convert(Pool().eval(), x, "trt-safe")
    record = safe.report.passes[0]
    assert record.rewrites == 1 and any("40 elements > max_axis 16" in m for m in record.misses)
    assert torch.equal(safe.module(x), Pool()(x))
    assert _convert(Pool().eval(), x, "trt").report.passes[0].rewrites == 0  # trt accepts ReduceMax
