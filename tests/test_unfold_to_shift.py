import pytest
import torch
import torch.nn.functional as F

import attn2conv
from attn2conv.graph import arg, is_op
from attn2conv.legality import op_counts

from conftest import rel_error


class SlideLocalAttention(torch.nn.Module):
    """Slide-Transformer-style local attention written with F.unfold (the Im2Col form the paper starts from)."""

    def __init__(self, dim=16, heads=2, k=3):
        super().__init__()
        self.heads, self.k = heads, k
        self.qkv = torch.nn.Conv2d(dim, 3 * dim, 1)
        self.proj = torch.nn.Conv2d(dim, dim, 1)
        self.rpb = torch.nn.Parameter(torch.randn(1, heads, 1, k * k, 1) * 0.1)

    def forward(self, x):
        b, c, h, w = x.shape
        d, kk = c // self.heads, self.k * self.k
        q, k, v = self.qkv(x).chunk(3, dim=1)
        q = q.reshape(b, self.heads, d, 1, h * w) * d ** -0.5
        k = F.unfold(k, self.k, padding=self.k // 2).reshape(b, self.heads, d, kk, h * w)
        v = F.unfold(v, self.k, padding=self.k // 2).reshape(b, self.heads, d, kk, h * w)
        attn = ((q * (k + self.rpb)).sum(2, keepdim=True)).softmax(3)
        out = (attn * v).sum(3).reshape(b, c, h, w)
        return self.proj(out)


def test_slide_local_attention_unfold_becomes_one_grouped_conv_each():
    net = SlideLocalAttention().eval()
    x = torch.randn(2, 16, 7, 9)
    result = attn2conv.convert(net, "dla", x, pipeline=attn2conv.Pipeline(["unfold_to_shift"]))
    counts = op_counts(result.module)
    assert counts.get("aten.im2col", 0) == 0
    shift_convs = [n for n in result.module.graph.nodes if is_op(n, "aten.conv2d") and arg(n, 6, "groups", 1) == 16]
    assert len(shift_convs) == 2  # one grouped conv per unfold (k and v), groups = channels
    w = result.module.get_buffer(shift_convs[0].args[1].target)
    assert tuple(w.shape) == (16 * 9, 1, 3, 3) and torch.equal(w.sum((1, 2, 3)), torch.ones(144))
    assert torch.equal(result.module(x), net(x))  # one-hot kernels: bit-identical
    assert not any(op["onnx_op"] == "Im2Col" for op in result.report.illegal_ops)


def test_strided_dilated_unfold_and_tensor_unfold_patches():
    class Net(torch.nn.Module):
        def forward(self, x):
            cols = F.unfold(x, (2, 3), dilation=(2, 1), padding=(1, 2), stride=(2, 1))
            patches = x.unfold(2, 4, 2).unfold(3, 3, 3)  # (B, C, 3, 2, 4, 3)
            return cols, patches

    net = Net()
    x = torch.randn(2, 3, 8, 6)
    result = attn2conv.convert(net, "trt-safe", x, pipeline=attn2conv.Pipeline(["unfold_to_shift"]))
    counts = op_counts(result.module)
    assert counts.get("aten.im2col", 0) == 0 and counts.get("aten.unfold", 0) == 0 and counts["aten.conv2d"] == 3
    for got, want in zip(result.module(x), net(x)):
        assert torch.equal(got, want)


def test_deformed_shift_merges_with_learnable_path():
    """Slide's deformed shifting: fixed shift conv + learnable conv of the same geometry -> one conv."""

    class Deformed(torch.nn.Module):
        def __init__(self, c=8, k=3):
            super().__init__()
            from attn2conv.passes.unfold_to_shift import shift_kernels

            self.shift = torch.nn.Conv2d(c, c * k * k, k, padding=k // 2, groups=c)
            self.shift.weight.data = shift_kernels(c, k, k)
            self.learn = torch.nn.Conv2d(c, c * k * k, k, padding=k // 2, groups=c)

        def forward(self, x):
            return self.shift(x) + self.learn(x)

    net = Deformed().eval()
    x = torch.randn(1, 8, 6, 6)
    result = attn2conv.convert(net, "dla", x, pipeline=attn2conv.Pipeline(["unfold_to_shift", "fold_reparam"]))
    assert op_counts(result.module)["aten.conv2d"] == 1
    assert rel_error(result.module(x), net(x)) < 1e-6


class Fold(torch.nn.Module):
    def __init__(self, size, **kw):
        super().__init__()
        self.size, self.kw = size, kw

    def forward(self, x):
        return F.fold(x * 1.5, self.size, **self.kw)


@pytest.mark.parametrize("size, kw, c", [
    ((28, 28), dict(kernel_size=3, padding=1, stride=2), 4),  # VOLO's outlook attention: output_padding 1
    ((9, 7), dict(kernel_size=(3, 2), padding=(1, 0), stride=1, dilation=(2, 1)), 3),
    ((8, 8), dict(kernel_size=2, stride=2), 5),  # no overlap: bit-identical
])
def test_fold_becomes_a_transposed_shift_conv(size, kw, c):
    k = kw["kernel_size"]
    kh, kwid = (k, k) if isinstance(k, int) else k
    unfolded = F.unfold(torch.zeros(1, c, *size), kernel_size=k, **{n: v for n, v in kw.items() if n != "kernel_size"})
    x = torch.randn(2, c * kh * kwid, unfolded.shape[-1])
    net = Fold(size, **kw).eval()
    result = attn2conv.convert(net, "trt", x, pipeline=attn2conv.Pipeline(["unfold_to_shift"]))
    counts = op_counts(result.module)
    assert counts.get("aten.col2im", 0) == 0 and counts.get("aten.conv_transpose2d", 0) == 1
    out, ref = result.module(x), net(x)
    if kw.get("stride", 1) == kh:
        assert torch.equal(out, ref)
    else:
        assert rel_error(out, ref) <= 1e-6


def test_volo_certifies_on_trt_without_col2im(tmp_path):
    from timm.models.volo import VOLO

    torch.manual_seed(0)
    model = VOLO(layers=[1, 1, 1, 1], embed_dims=[64, 128, 128, 128], num_heads=[2, 4, 4, 4], img_size=64,
                 num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    result = attn2conv.convert(model, "trt", x, export=str(tmp_path / "volo.onnx"))
    assert result.certified, [f for f in result.check.findings if f.severity == "error"][:3]
    assert result.report.rel_error <= 1e-5
