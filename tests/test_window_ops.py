import pytest
import timm
import torch

import attn2conv
from attn2conv.legality import op_counts

from conftest import rel_error

GONE = ("aten.roll", "aten.pad", "aten.constant_pad_nd", "aten.select", "aten.index")


def _swin_timm():
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(2, 2), num_heads=(2, 4),
                             embed_dim=48, img_size=112).eval(), torch.randn(1, 3, 112, 112)


def _swin_hf():
    from transformers import SwinConfig, SwinModel

    cfg = SwinConfig(image_size=56, patch_size=4, embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=7)
    return SwinModel(cfg).eval(), torch.randn(1, 3, 56, 56)


@pytest.mark.parametrize("make", [_swin_timm, _swin_hf], ids=["timm", "hf"])
def test_swin_rolls_pads_gathers_gone(make):
    model, x = make()
    result = attn2conv.convert(model, "dla", x, pipeline=attn2conv.Pipeline(["constant_fold", "window_ops"]))
    counts = op_counts(result.module)
    assert not any(counts.get(k, 0) for k in GONE), counts
    assert counts["aten.cat"] >= 4  # two rolls per shifted block, each over H and W
    assert result.report.passes[1].rewrites >= 4 and result.report.passes[1].rel_error == 0.0
    ref, got = model(x), result.module(x)
    for r, g in zip(ref.values() if isinstance(ref, dict) else [ref], got.values() if isinstance(got, dict) else [got]):
        assert rel_error(g, r) <= 1e-6  # the pass itself is bit-exact (rel_error 0 above) vs the captured graph


def test_roll_pad_select_index_unit():
    class Net(torch.nn.Module):
        def forward(self, x):
            y = torch.roll(x, shifts=(-3, 2), dims=(1, 2))
            y = torch.nn.functional.pad(y, (0, 0, 1, 2, 0, 1), value=0.5)
            return y[:, 0] + y[:, -1], y[:, :, torch.tensor([0, 2, 4])]

    net = Net()
    x = torch.randn(2, 5, 6, 3)
    result = attn2conv.convert(net, "trt-safe", x, pipeline=attn2conv.Pipeline(["window_ops"]))
    assert not any(op_counts(result.module).get(k, 0) for k in GONE)
    for got, want in zip(result.module(x), net(x)):
        assert torch.equal(got, want)
