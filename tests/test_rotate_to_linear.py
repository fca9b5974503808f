"""rotate_to_linear: RoPE rotations (timm rot / rotate_half) as one constant +-1 Linear, bit-exact, where the target
flags Neg / stack (DLA); EVA-02 certified on dla with the whole preset."""
import onnx
import timm
import torch

import attn2conv
from attn2conv.legality import op_counts
from attn2conv.pipeline import Pipeline

from conftest import rel_error


class Rotations(torch.nn.Module):
    """timm's rot (pairs), rope_rotate_half and a scaled chunk cat, on a (B, heads, N, D) tensor."""

    def forward(self, x, sin, cos):
        pairs = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
        x1, x2 = x.chunk(2, dim=-1)
        half = torch.cat([-x2, x1], dim=-1)
        scaled = torch.cat([x2 * 0.5, -x1], dim=-1)
        return x * cos + pairs * sin + half * sin + scaled


class TwoSources(torch.nn.Module):
    def forward(self, x, z):
        return torch.cat([-x[..., 1:], z[..., :1]], dim=-1)  # not a rotation of one tensor


def _inputs():
    torch.manual_seed(0)
    return torch.randn(1, 2, 5, 8), torch.randn(5, 8), torch.randn(5, 8)


def test_rotations_become_one_linear_each_bit_exact_on_dla():
    net, inputs = Rotations().eval(), _inputs()
    res = attn2conv.convert(net, "dla", inputs, pipeline=Pipeline(["rotate_to_linear"]))
    record = res.report.passes[0]
    assert record.status == "applied" and record.rewrites == 3 and record.rel_error == 0.0
    counts = op_counts(res.module)
    assert counts["aten.linear"] == 3
    for gone in ("aten.neg", "aten.stack", "aten.cat", "aten.chunk", "aten.split"):
        assert counts.get(gone, 0) == 0, gone
    probe = (100 * torch.randn(1, 2, 5, 8), torch.randn(5, 8), torch.randn(5, 8))
    assert torch.equal(res.module(*probe), net(*probe))
    weights = [w for name, w in res.module.named_buffers() if "rotate_weight" in name]
    assert len(weights) == 3 and all(((w != 0).sum(1) == 1).all() for w in weights)  # one entry per row


def test_rotations_left_alone_where_the_target_accepts_them():
    net, inputs = Rotations().eval(), _inputs()
    res = attn2conv.convert(net, "trt", inputs, pipeline=Pipeline(["rotate_to_linear"]))
    assert res.report.passes[0].rewrites == 0 and op_counts(res.module).get("aten.linear", 0) == 0


def test_cat_of_two_tensors_is_not_a_rotation():
    x, z = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    res = attn2conv.convert(TwoSources().eval(), "dla", (x, z), pipeline=Pipeline(["rotate_to_linear"]))
    assert res.report.passes[0].rewrites == 0 and op_counts(res.module)["aten.neg"] == 1


def test_eva02_rotary_certified_on_dla(tmp_path):
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1, img_size=28).eval()
    x = torch.randn(1, 3, 28, 28)
    res = attn2conv.convert(model, "dla", x, export=tmp_path / "eva.onnx")
    assert res.certified, res.report.extra["check"]["failing"][:3]
    record = next(p for p in res.report.passes if p.id == "rotate_to_linear")
    assert record.rewrites == 2 and record.rel_error == 0.0  # q and k of the block
    ops = {n.op_type for n in onnx.load(str(tmp_path / "eva.onnx")).graph.node}
    assert not {"Neg", "Unsqueeze", "Squeeze", "Expand"} & ops
    with torch.no_grad():
        assert rel_error(res.module(x), model(x)) <= 1e-5
