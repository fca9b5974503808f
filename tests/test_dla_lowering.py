"""DLA lowering of a small timm ViT: the Sqrt-free 1/sqrt of layernorm_decompose and the passes
conv_stride_split, squeeze_to_reshape and concat_channel_axis, each exact on the real model, and the whole
dla preset certified (FP32 here; FP16/INT8 in test_precision.py)."""
import math

import onnxruntime as ort
import pytest
import timm
import torch
import torch.fx as fx

import attn2conv
from attn2conv.graph import Builder, op_kind, shape
from attn2conv.legality import op_counts

from conftest import rel_error


def _vit(**kw):
    # patch 16 on a 32 px image: the stride-16 patch embedding DLA cannot run (stride limit 8), a class token
    # concatenated on the token axis, qkv.unbind(0), five LayerNorms
    cfg = dict(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**cfg, **kw}).eval()


@pytest.fixture(scope="module")
def vit_dla(tmp_path_factory):
    torch.manual_seed(0)
    model, x = _vit(), torch.randn(2, 3, 32, 32)
    path = tmp_path_factory.mktemp("dla") / "vit.onnx"
    return model, x, path, attn2conv.convert(model, "dla", example_inputs=(x,), export=path)


def test_vit_dla_preset_certified_exact_and_runs_in_ort(vit_dla):
    model, x, path, res = vit_dla
    assert res.certified, res.report.extra["check"]["failing"][:3]
    by_id = {p.id: p for p in res.report.passes}
    for pass_id, n in (("layernorm_decompose", 5), ("conv_stride_split", 1), ("squeeze_to_reshape", 2),
                       ("concat_channel_axis", 1)):
        assert by_id[pass_id].status == "applied" and by_id[pass_id].rewrites == n, by_id[pass_id]
        assert by_id[pass_id].rel_error <= 1e-5
    for pass_id in ("conv_stride_split", "squeeze_to_reshape", "concat_channel_axis"):
        assert by_id[pass_id].rel_error == 0.0  # pure selections / layout: bit-identical
    counts = op_counts(res.module)
    for gone in ("aten.sqrt", "aten.rsqrt", "aten.pow", "aten.unbind", "aten.squeeze", "aten.unsqueeze"):
        assert counts.get(gone, 0) == 0, gone
    for node in res.module.graph.nodes:
        if op_kind(node) == "aten.cat":
            assert len(shape(node)) == 4 and node.args[1] % 4 == 1
        if op_kind(node) == "aten.conv2d":
            assert max(node.args[3] if len(node.args) > 3 else [1]) <= 8
    with torch.no_grad():
        ref = model(x)
        assert rel_error(res.module(x), ref) <= 1e-5
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert rel_error(torch.from_numpy(got), ref) <= 1e-5
    assert not {"Sqrt", "Pow", "Squeeze", "Unsqueeze"} & {n.op_type for n in __import__("onnx").load(str(path)).graph.node}


@pytest.mark.parametrize("pass_id", ["conv_stride_split", "squeeze_to_reshape", "concat_channel_axis"])
def test_each_layout_pass_alone_is_bit_exact_on_vit(pass_id):
    torch.manual_seed(1)
    model, x = _vit(), torch.randn(1, 3, 32, 32)
    res = attn2conv.convert(model, "dla", x, pipeline=attn2conv.Pipeline([pass_id]))
    assert res.report.passes[0].rewrites >= 1 and res.report.passes[0].rel_error == 0.0
    with torch.no_grad():
        assert torch.equal(res.module(x), model(x)) or rel_error(res.module(x), model(x)) <= 1e-6


def test_layout_passes_do_nothing_where_the_target_allows_the_ops():
    model, x = _vit(), torch.randn(1, 3, 32, 32)
    res = attn2conv.convert(model, "trt", x, pipeline=attn2conv.Pipeline(
        ["conv_stride_split", "squeeze_to_reshape", "concat_channel_axis"]))
    assert all(p.rewrites == 0 for p in res.report.passes)


def test_layernorm_form_follows_the_profile():
    """DLA: Sqrt and Pow are errors -> the Newton form; trt-safe keeps Sqrt + Div (warnings, cheaper)."""
    model, x = _vit(), torch.randn(1, 3, 32, 32)
    pipe = attn2conv.Pipeline(["layernorm_decompose"])
    dla = attn2conv.convert(model, "dla", x, pipeline=pipe)
    safe = attn2conv.convert(model, "trt-safe", x, pipeline=pipe)
    assert "1/sqrt by newton" in " ".join(dla.report.passes[0].notes)
    assert "1/sqrt by div" in " ".join(safe.report.passes[0].notes)
    assert op_counts(dla.module).get("aten.sqrt", 0) == 0 and op_counts(safe.module)["aten.sqrt"] == 5
    with torch.no_grad():
        assert rel_error(dla.module(x), model(x)) <= 1e-5


def _rsqrt_module(eps: float) -> fx.GraphModule:
    from attn2conv.convmath import newton_rsqrt

    class Identity(torch.nn.Module):
        def forward(self, z):
            return z + 0

    gm = fx.symbolic_trace(Identity())
    z, out = [n for n in gm.graph.nodes if n.op in ("placeholder", "output")]
    z.meta["val"] = torch.ones(1, 1, 1, 4)
    out.args = (newton_rsqrt(Builder(gm, out), z, eps),)
    gm.recompile()
    return gm


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_newton_rsqrt_float32_accuracy_over_18_decades(eps):
    z = torch.cat([torch.tensor([eps]), torch.logspace(math.log10(eps), 12, 20000)]).reshape(1, 1, 1, -1)
    got = _rsqrt_module(eps)(z).double()
    ref = z.double().rsqrt()
    assert ((got - ref) / ref).abs().max().item() < 3e-7  # measured 1.4e-7; torch's own fp32 rsqrt is ~6e-8


def test_newton_rsqrt_float16_has_no_overflow():
    """In FP16 (constants clamped to the FP16 range, as onnxruntime's float16 converter does) every intermediate stays
    finite over the normal FP16 range of variances, and the result is within a few FP16 ulps."""
    gm = _rsqrt_module(1e-6)
    with torch.no_grad():
        for buf in gm.buffers():
            tiny = (buf.abs() < 5.96e-8) & (buf != 0)
            buf.copy_(torch.where(tiny, 5.96e-8 * buf.sign(), buf).clamp(-65504, 65504))
    gm = gm.half()
    z = torch.logspace(-4.2, 4.8, 4000).half().reshape(1, 1, 1, -1)
    seen = []

    class Watch(torch.fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            if isinstance(r, torch.Tensor):
                seen.append(bool(torch.isfinite(r).all()))
            return r

    got = Watch(gm).run(z).double()
    assert all(seen)
    ref = z.double().rsqrt()
    assert ((got - ref) / ref).abs().max().item() < 2e-3  # measured 7.8e-4 (FP16 ulp: 9.8e-4)


class _Pools(torch.nn.Module):
    def forward(self, x):  # windows 16 = 8 x 2, 12 = 6 x 2 (max), and a global mean over 13 (prime) columns
        a = torch.nn.functional.avg_pool2d(x[..., :16], [1, 16], [1, 16])
        m = torch.nn.functional.max_pool2d(x[..., :24], [1, 12], [1, 12])
        g = torch.nn.functional.avg_pool2d(x[..., :13], [1, 13], [1, 13])
        return a, m, g


def test_pool_window_split_stages_and_prime_global_mean():
    x = torch.randn(2, 5, 3, 30)
    net = _Pools()
    res = attn2conv.convert(net, "dla", x, pipeline=attn2conv.Pipeline(["pool_window_split"]))
    assert res.report.passes[0].rewrites == 3
    for node in res.module.graph.nodes:
        if op_kind(node) in ("aten.avg_pool2d", "aten.max_pool2d"):
            assert max(node.args[1]) <= 8
    assert sum(op_kind(n) == "aten.conv2d" for n in res.module.graph.nodes) == 1  # the 13-wide global mean
    got, want = res.module(x), net(x)
    assert torch.equal(got[1], want[1])  # max of maxes: bit-identical
    assert rel_error(got[0], want[0]) <= 1e-6 and rel_error(got[2], want[2]) <= 1e-6


def test_beit_mean_pooled_head_certified_for_dla(tmp_path):
    """BEiT averages its patch tokens (an AveragePool of window 16 > DLA's 8) before the head."""
    torch.manual_seed(2)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, depth=1, img_size=64, embed_dim=48,
                              num_heads=2).eval()
    x = torch.randn(1, 3, 64, 64)
    res = attn2conv.convert(model, "dla", example_inputs=(x,), export=tmp_path / "beit.onnx", guard="final")
    assert res.certified, res.report.extra["check"]["failing"][:3]
    with torch.no_grad():
        assert rel_error(res.module(x), model(x)) <= 1e-5
