import pytest
import timm
import torch

import attn2conv
from attn2conv.legality import op_counts

from conftest import rel_error

PIPE = ["layernorm_decompose", "linear_to_conv"]


@pytest.fixture(scope="module")
def vit():
    return timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, img_size=64).eval()


def _convert(model, x, target="trt-safe", passes=PIPE, options=None):
    return attn2conv.convert(model, target, x, pipeline=attn2conv.Pipeline(passes), options=options)


def test_vit_trt_safe_no_layernorm_no_reduce(vit):
    x = torch.randn(1, 3, 64, 64)
    result = _convert(vit, x)
    counts = op_counts(result.module)
    assert counts.get("aten.layer_norm", 0) == 0 and counts.get("aten.mean", 0) == 0
    assert counts["aten.sqrt"] == 5 and counts["aten.div"] == 5  # one per LayerNorm, the trt-safe choice
    assert result.report.passes[0].rewrites == 5
    for probe in (x, 3 * torch.randn_like(x)):
        assert rel_error(result.module(probe), vit(probe)) <= 1e-5
    flagged = {op["onnx_op"]: op["severity"] for op in result.report.illegal_ops}
    assert "LayerNormalization" not in flagged and "ReduceMean" not in flagged
    # norm1/norm2 feed Linears: their affine is folded, so no per-channel Mul remains for them; the final norm
    # feeds a token select, so it keeps Mul + Add.
    names = [n.target for n in result.module.graph.nodes if n.op == "get_attr"]
    assert sum("norm_scale" in t for t in names) == 1 and sum("norm_shift" in t for t in names) == 1


def test_unfolded_affine_and_rsqrt_form(vit):
    x = torch.randn(1, 3, 64, 64)
    result = _convert(vit, x, options={"layernorm_decompose": {"fold_affine": False, "norm": "rsqrt"}})
    counts = op_counts(result.module)
    assert counts.get("aten.layer_norm", 0) == 0 and counts["aten.rsqrt"] == 5 and counts.get("aten.div", 0) == 0
    assert rel_error(result.module(x), vit(x)) <= 1e-5


def test_trt_keeps_layernorm_unless_asked_then_uses_reducemean(vit):
    x = torch.randn(1, 3, 64, 64)
    kept = _convert(vit, x, target="trt")
    assert op_counts(kept.module)["aten.layer_norm"] == 5
    reduced = _convert(vit, x, target="trt", options={"layernorm_decompose": {"keep_legal": False}})
    counts = op_counts(reduced.module)
    assert counts.get("aten.layer_norm", 0) == 0 and counts["aten.mean"] == 10
    assert rel_error(reduced.module(x), vit(x)) <= 1e-5


class ChannelsFirstLN(torch.nn.Module):
    """Hugging Face ConvNext's channels_first LayerNorm, written with mean/pow/sqrt, then GroupNorm(1, C)."""

    def __init__(self, c=8):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(torch.randn(c)), torch.nn.Parameter(torch.randn(c))
        self.gn = torch.nn.GroupNorm(1, c)
        torch.nn.init.normal_(self.gn.weight)
        torch.nn.init.normal_(self.gn.bias)
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        x = self.weight[:, None, None] * x + self.bias[:, None, None]
        return self.gn(self.conv(x))


@pytest.mark.parametrize("target", ["trt-safe", "dla"])
def test_handwritten_channel_layernorm_and_groupnorm(target):
    net = ChannelsFirstLN().eval()
    x = torch.randn(2, 8, 6, 5) * 3 + 1
    result = _convert(net, x, target=target, passes=["layernorm_decompose"])
    counts = op_counts(result.module)
    for gone in ("aten.mean", "aten.pow", "aten.group_norm", "aten.native_group_norm"):
        assert counts.get(gone, 0) == 0, gone
    assert counts["aten.avg_pool2d"] == 2  # GroupNorm(1)'s spatial means
    assert rel_error(result.module(x), net(x)) <= 1e-5
    flagged = {op["onnx_op"] for op in result.report.illegal_ops if op["severity"] == "error"}
    assert not flagged & {"ReduceMean", "GroupNormalization", "Pow"}


def test_layernorm_on_channels_last_map():
    net = torch.nn.Sequential(torch.nn.LayerNorm(6), torch.nn.GELU()).eval()
    x = torch.randn(2, 4, 5, 6)
    result = _convert(net, x, passes=["layernorm_decompose"])
    assert op_counts(result.module).get("aten.layer_norm", 0) == 0
    assert rel_error(result.module(x), net(x)) <= 1e-5
