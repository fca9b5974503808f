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
