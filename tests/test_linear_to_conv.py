import pytest
import timm
import torch

import attn2conv
from attn2conv.legality import op_counts

from conftest import rel_error


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit_tiny_patch16_224"])
def test_no_linear_left_in_vit(name):
    model = timm.create_model(name, pretrained=False, depth=2).eval()
    result = attn2conv.convert(model, target="trt-safe", pipeline=attn2conv.Pipeline(["linear_to_conv"]))
    counts = op_counts(result.module)
    assert counts.get("aten.linear", 0) == 0
    assert counts["aten.conv2d"] == 1 + 2 * 4 + 1  # patch embed, 4 linears per block, head
    x = result.example_inputs[0]
    assert tuple(x.shape) == (1, 3, 224, 224)
    for probe in (x, torch.randn_like(x)):
        assert rel_error(result.module(probe), model(probe)) <= 1e-5
    assert result.report.passes[0].rel_error <= 1e-5


def test_linear_ranks_2_to_5():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (torch.nn.Linear(6, 6) for _ in range(4))

        def forward(self, x):  # x: (B, H, W, C)
            y4 = self.a(x)
            y3 = self.b(y4.flatten(1, 2))
            y2 = self.c(y3.mean(1))
            y5 = self.d(x.unsqueeze(1).expand(-1, 2, -1, -1, -1))
            return y4.sum() + y3.sum(1) + y2 + y5.mean((1, 2, 3))

    net = Net().eval()
    x = torch.randn(2, 3, 4, 6)
    result = attn2conv.convert(net, "trt-safe", x, pipeline=attn2conv.Pipeline(["linear_to_conv"]))
    assert result.report.passes[0].rewrites == 4
    assert op_counts(result.module).get("aten.linear", 0) == 0
    assert rel_error(result.module(x), net(x)) < 1e-5


def test_head_over_the_channel_limit_is_split_for_trt_safe(tmp_path):
    """A 9000-class head: one 1x1 conv would have 9000 channels (trt-safe: <= 4096, A2C-SAFE-TENSOR-CHANNELS)."""
    from attn2conv.coverage import run_target
    from attn2conv.graph import nodes_of, shape

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(32, 9000)).eval()
    x = torch.randn(1, 3, 8, 8)
    tr = run_target(net, (x,), "trt-safe", tmp_path / "head.onnx")
    assert tr.certified, tr.reason  # before: 1x Conv (A2C-SAFE-TENSOR-CHANNELS)
    assert tr.rel_error <= 1e-6 and tr.parity <= 1e-5
    res = attn2conv.convert(net, "trt-safe", x, pipeline=attn2conv.Pipeline(["linear_to_conv"]))
    convs = [shape(n)[1] for n in nodes_of(res.module, "aten.conv2d")][1:]
    assert convs == [4096, 4096, 808]
    assert torch.allclose(res.module(x), net(x), rtol=0, atol=1e-5 * net(x).abs().max().item())
    trt = attn2conv.convert(net, "trt", x, pipeline=attn2conv.Pipeline(["linear_to_conv"]))  # no limit: one conv
    assert [shape(n)[1] for n in nodes_of(trt.module, "aten.conv2d")][1:] == [9000]


class _Merging(torch.nn.Module):
    """Swin's PatchMerging without its norm (as after layernorm_to_batchnorm folds it): 2x2 patches gathered by
    reshape -> permute -> flatten, then a Linear 4C -> 2C; `order` is the permute of the (dh, dw, c) axes."""

    def __init__(self, c=6, order=(4, 2, 5), channels_first=False):
        super().__init__()
        self.reduction, self.order, self.channels_first = torch.nn.Linear(4 * c, 2 * c), order, channels_first

    def forward(self, x):
        if self.channels_first:  # (B, C, H, W) map, e.g. a conv's output
            x = x.permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, *self.order).flatten(3)
        return self.reduction(x)


@pytest.mark.parametrize("order, channels_first", [((4, 2, 5), False), ((2, 4, 5), False), ((5, 2, 4), False),
                                                   ((4, 2, 5), True)])
def test_patch_merging_becomes_one_strided_conv(order, channels_first):
    """The gather + Linear is one 2x2 stride-2 conv (weights rearranged), no 6-D permute left; same outputs."""
    net = _Merging(order=order, channels_first=channels_first).eval()
    x = torch.randn(2, 6, 8, 12) if channels_first else torch.randn(2, 8, 12, 6)
    result = attn2conv.convert(net, "trt-safe", x, pipeline=attn2conv.Pipeline(["linear_to_conv"]))
    convs = [n for n in result.module.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert len(convs) == 1 and list(convs[0].args[1].meta["val"].shape) == [12, 6, 2, 2]
    assert list(convs[0].args[3]) == [2, 2]
    assert not [n for n in result.module.graph.nodes if n.target is torch.ops.aten.permute.default
                and len(n.args[1]) > 4]
    assert rel_error(result.module(x), net(x)) <= 1e-5


def test_a_gather_that_is_not_a_patch_stays_a_1x1_conv():
    class Shuffled(_Merging):
        def forward(self, x):  # rows and columns swapped inside the patch, then the patch axis flipped: not a patch
            b, h, w, c = x.shape
            x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 3, 1, 4, 2, 5).flatten(3)
            return self.reduction(x)

    net = Shuffled().eval()
    x = torch.randn(1, 8, 8, 6)
    result = attn2conv.convert(net, "trt-safe", x, pipeline=attn2conv.Pipeline(["linear_to_conv"]))
    convs = [n for n in result.module.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert len(convs) == 1 and list(convs[0].args[1].meta["val"].shape)[2:] == [1, 1]
    assert rel_error(result.module(x), net(x)) <= 1e-5
