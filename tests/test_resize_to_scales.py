import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

import attn2conv


class Resizes(torch.nn.Module):
    def forward(self, x):  # x (1, 3, 30, 30)
        down = F.interpolate(x, size=(28, 28), mode="bicubic", align_corners=False)  # CrossViT: 240 -> 224 style
        up = F.interpolate(x, size=(37, 53), mode="bilinear", align_corners=True)
        twice = F.interpolate(x, size=(60, 15), mode="nearest")  # integer ratios: exact for nearest
        odd = F.interpolate(x, size=(37, 53), mode="nearest")  # non-integer nearest: left with a reason
        return down, up, twice, odd


def _resize_inputs(path):
    model = __import__("onnx").load(str(path))
    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type == "Resize":
            sizes = n.input[3] if len(n.input) > 3 else ""
            scales = n.input[2] if len(n.input) > 2 else ""
            out.append(("sizes" if sizes else "scales", bool(scales in inits | consts)))
    return out


def test_resizes_by_size_become_constant_scales(tmp_path):
    net = Resizes().eval()
    x = torch.randn(1, 3, 30, 30)
    path = tmp_path / "resize.onnx"
    result = attn2conv.convert(net, "trt-safe", x, pipeline=attn2conv.Pipeline(["resize_to_scales"]), export=path)
    record = result.report.passes[0]
    assert record.rewrites == 3 and len(record.misses) == 1 and "non-integer ratio" in record.misses[0]
    with torch.no_grad():
        refs = net(x)
    for y, ref in zip(result.module(x), refs):
        assert y.shape == ref.shape and (y - ref).abs().max() <= 1e-6 * ref.abs().max()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    for y, ref in zip(outs, refs):
        assert y.shape == tuple(ref.shape)
        assert np.abs(y - ref.numpy()).max() <= 1e-4 * np.abs(ref.numpy()).max()
    assert sorted(_resize_inputs(path)) == [("scales", True)] * 3 + [("sizes", False)]
    rules = {f.rule for f in result.check.failing}
    assert [f.rule for f in result.check.failing] == ["A2C-SAFE-RESIZE-SIZES"]  # the nearest one only
    assert rules == {"A2C-SAFE-RESIZE-SIZES"}
