import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import attn2conv
from attn2conv.legality import op_counts

from conftest import rel_error


class WindowedSdpa(torch.nn.Module):
    """sdpa on (B, windows, heads, N, d) with a per-window mask, and on (B*heads, N, d) without one."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.randn(1, 3, 2, 5, 5))
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):  # x (B, 3, 2, 5, 4)
        x = self.proj(x)
        a = F.scaled_dot_product_attention(x, x * 0.5, x, attn_mask=self.mask.expand(x.shape[0], 3, 2, 5, 5))
        flat = a.reshape(-1, 5, 4)
        b = F.scaled_dot_product_attention(flat, flat, flat, is_causal=True)
        return b.reshape(x.shape)


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_sdpa_of_rank_5_and_3_exports_for_trt(tmp_path):
    net = WindowedSdpa().eval()
    x = torch.randn(2, 3, 2, 5, 4)
    path = tmp_path / "sdpa.onnx"
    result = attn2conv.convert(net, "trt", x, pipeline=attn2conv.Pipeline(["sdpa_rank4"]), export=path)
    assert result.report.passes[0].rewrites == 2
    ranks = [len(n.args[0].meta["val"].shape) for n in result.module.graph.nodes
             if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target)]
    assert ranks == [4, 4]
    assert op_counts(result.module)["aten.scaled_dot_product_attention"] == 2
    with torch.no_grad():
        ref = net(x)
    assert rel_error(result.module(x), ref) <= 1e-6  # reshapes only (sdpa may pick another kernel for 4-D)
    y = _ort(path, x)
    assert np.abs(y - ref.numpy()).max() / np.abs(ref.numpy()).max() <= 1e-5


def test_partially_broadcast_mask_is_left_with_a_reason():
    class Partial(torch.nn.Module):
        def forward(self, q):
            mask = torch.zeros(1, 3, 1, 5, 5)  # broadcasts over heads only
            return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    q = torch.randn(2, 3, 2, 5, 4)
    result = attn2conv.convert(Partial().eval(), "trt", q, pipeline=attn2conv.Pipeline(["sdpa_rank4"]))
    record = result.report.passes[0]
    assert record.rewrites == 0 and any("broadcasts over some leading dims" in m for m in record.misses)


@pytest.mark.slow
def test_twins_svt_exports_for_trt(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("twins_svt_small", pretrained=False, depths=[1, 1, 1, 1], img_size=64).eval()
    result = attn2conv.convert(model, "trt", torch.randn(1, 3, 64, 64), export=tmp_path / "twins.onnx")
    assert result.certified
