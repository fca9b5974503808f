import timm
import torch

import attn2conv
from attn2conv.graph import is_op

from conftest import rel_error


def test_swin_bias_gathers_and_masks_become_constants():
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(2, 2), num_heads=(2, 4),
                              embed_dim=48, img_size=112).eval()
    x = torch.randn(1, 3, 112, 112)
    result = attn2conv.convert(model, "trt-safe", x, pipeline=attn2conv.Pipeline(["constant_fold"]))
    gm = result.module
    # every relative-position-bias gather (Gather on a parameter table) is evaluated at conversion time
    assert not [n for n in gm.graph.nodes if is_op(n, "aten.index")]
    assert result.report.passes[0].rewrites >= 4
    assert torch.equal(gm(x), model(x))


def test_interpolated_position_embedding_is_folded():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = torch.nn.Parameter(torch.randn(1, 8, 4, 4))
            self.table = torch.nn.Parameter(torch.randn(10, 8))
            self.register_buffer("idx", torch.tensor([3, 1, 4, 1, 5, 9]))

        def forward(self, x):
            pos = torch.nn.functional.interpolate(self.pos, size=x.shape[-2:], mode="bicubic", align_corners=False)
            bias = self.table[self.idx].t().reshape(1, 8, 2, 3).mean(-1, keepdim=True)
            return x + pos + bias[..., :1, :] * torch.arange(6.0).reshape(1, 1, 6, 1)[..., :1, :]

    net = Net().eval()
    x = torch.randn(2, 8, 6, 6)
    result = attn2conv.convert(net, "dla", x, pipeline=attn2conv.Pipeline(["constant_fold"]))
    kinds = {str(n.target) for n in result.module.graph.nodes if n.op == "call_function"}
    assert kinds == {"aten.add.Tensor"}, kinds
    assert rel_error(result.module(x), net(x)) == 0.0
