"""Matcher shapes beyond plain softmax(q k^T) v: tensor-scaled scores and gated / re-normalised probabilities."""
import timm
import torch

import attn2conv
from attn2conv.attention_match import find_attention
from attn2conv.capture import capture
from attn2conv.legality import op_counts

from conftest import rel_error


class GatedAttention(torch.nn.Module):
    """ConViT-style: per-head scale tensor on the scores, probabilities gated with a positional map and
    re-normalised by their own sum before the matmul with v."""

    def __init__(self, heads=2, n=6, d=4):
        super().__init__()
        self.temperature = torch.nn.Parameter(torch.linspace(0.5, 2.0, heads).reshape(heads, 1, 1))
        self.gate = torch.nn.Parameter(torch.linspace(-1.0, 1.0, heads).reshape(1, heads, 1, 1))
        self.register_buffer("pos", torch.softmax(torch.randn(1, heads, n, n), -1))
        self.heads, self.d = heads, d

    def forward(self, q, k, v):
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        attn = attn.softmax(-1)
        g = torch.sigmoid(self.gate)
        attn = (1.0 - g) * attn + g * self.pos
        attn = attn / attn.sum(-1).unsqueeze(-1)
        return attn @ v


def test_gated_renormalised_attention_matches_as_replayed_region():
    net = GatedAttention().eval()
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    gm = capture(net, (q, k, v))
    matches, misses = find_attention(gm)
    assert not misses and len(matches) == 1
    match = matches[0]
    assert match.replay and match.n == match.m == 6 and match.d == match.dv == 4
    # the post region is a DAG: gate mul, add, sum, unsqueeze, division (and the constant-gate ops before it)
    assert {"aten.sum", "aten.div", "aten.add"} <= {f"aten.{n.target._opname}" for n in match.post}
    for target in ("trt-safe", "dla"):
        result = attn2conv.convert(net, target, (q, k, v), pipeline=attn2conv.Pipeline(
            ["constant_fold", "attention_to_conv", "normalize_decompose"]))
        counts = op_counts(result.module)
        assert counts.get("aten.matmul", 0) == 0 and counts.get("aten.sum", 0) == 0
        assert rel_error(result.module(q, k, v), net(q, k, v)) <= 1e-6


def test_probabilities_read_outside_the_attention_are_a_miss():
    class Leaky(torch.nn.Module):
        def forward(self, q, k, v):
            attn = (q @ k.transpose(-2, -1)).softmax(-1)
            return attn @ v, attn * 2.0

    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    matches, misses = find_attention(capture(Leaky().eval(), (q, k, v)))
    assert not matches and len(misses) == 1 and "feeds output" in misses[0][1]  # the leak is not rewritten


def test_convit_gpsa_fully_converted_for_trt_safe():
    model = timm.create_model("convit_tiny", pretrained=False, depth=2, local_up_to_layer=1, img_size=32).eval()
    with torch.no_grad():
        model.blocks[0].attn.gating_param.copy_(torch.linspace(-2.0, 2.0, model.blocks[0].attn.gating_param.numel()))
    x = torch.randn(1, 3, 32, 32)
    result = attn2conv.convert(model, "trt-safe", x, pipeline=attn2conv.Pipeline(
        ["constant_fold", "linear_to_conv", "attention_to_conv", "normalize_decompose"]))
    attention = result.report.passes[2]
    assert attention.rewrites == 2 and not attention.misses  # the GPSA block and the MHSA block
    counts = op_counts(result.module)
    assert counts.get("aten.matmul", 0) == 0 and counts.get("aten.sum", 0) == 0
    for probe in (x, torch.randn_like(x)):
        assert rel_error(result.module(probe), model(probe)) <= 1e-5
    errors = {op["onnx_op"] for op in result.report.illegal_ops if op["severity"] == "error"}
    assert not {"MatMul", "ReduceSum", "Gemm"} & errors


def test_mvitv2_pooling_attention_with_in_place_rel_pos_is_matched():
    """MViTv2 adds its decomposed relative position (computed from q) with attn[:, :, 0:, 0:] = ..., which torch.export
    writes as copy(scores, scores + rel_pos): the matcher follows the copy, the bias stays in the graph."""
    model = timm.create_model("mvitv2_tiny", pretrained=False, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    result = attn2conv.convert(model, "trt-safe", x, guard="final",
                               pipeline=attn2conv.Pipeline(["constant_fold", "attention_to_conv"]))
    attention = result.report.passes[1]
    assert attention.rewrites == 10 and not attention.misses  # every block of depths (1, 2, 5, 2)
    counts = op_counts(result.module)
    assert counts.get("aten.matmul", 0) == 0 and counts.get("aten.softmax", 0) == 0 and counts["aten.einsum"] == 20
    for probe in (x, torch.randn_like(x)):
        assert rel_error(result.module(probe), model(probe)) <= 1e-5
