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
