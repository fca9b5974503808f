"""Real torch.onnx (dynamo) exports: a timm DeiT fails trt-safe naming its blocks; a conv/BN/ReLU net passes."""

from __future__ import annotations

import warnings

import pytest

from attn2conv.check import check

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")


def _export(module, x, path, opset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), dynamo=True, opset_version=opset, verbose=False)
    return path


@pytest.fixture(scope="module")
def deit(tmp_path_factory):
    m = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=64, pretrained=False)
    return _export(m, torch.randn(1, 3, 64, 64), tmp_path_factory.mktemp("deit") / "deit.onnx", 18)


def test_deit_fails_trt_safe_with_module_paths(deit):
    res = check(deit, "trt-safe")
    assert not res.ok
    by_rule = {}
    for f in res.findings:
        by_rule.setdefault(f.rule, []).append(f)
    ops = {f.op for f in res.findings}
    assert {"MatMul", "Gemm", "LayerNormalization", "Erf", "Softmax"} <= ops
    assert len(by_rule["A2C-SAFE-OP-MATMUL"]) == 13  # per block 4 linears + 2 attention matmuls, plus the head Gemm
    softmax = [f for f in res.findings if f.op == "Softmax"]
    assert [f.module for f in softmax] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(f.source and f.source.split(":")[0].endswith(".py") for f in softmax)
    assert {f.module for f in res.findings if f.op == "Erf"} == {"blocks.0.mlp.act", "blocks.1.mlp.act"}
    assert "blocks.0.norm1" in {f.module for f in res.findings if f.op == "LayerNormalization"}
    assert "blocks.0.attn.qkv" in {f.module for f in by_rule["A2C-SAFE-OP-MATMUL"]}
    # external weights were not needed
    assert res.loaded.external and all(r.location == "deit.onnx.data" for r in res.loaded.external)


def test_conv_bn_relu_net_passes_safe_and_dla(tmp_path):
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
    )
    path = _export(net, torch.randn(1, 3, 32, 32), tmp_path / "cnn.onnx", 17)
    for target in ("trt-safe", "dla-orin-8.6", "trt-8.6"):
        res = check(path, target)
        assert res.ok, (target, [f"{f.rule}: {f.reason}" for f in res.findings])
        assert res.counts()["error"] == 0


@pytest.mark.parametrize("kernel,stride,rule", [(33, 1, "A2C-DLA-CONV-KERNEL"), (3, 9, "A2C-DLA-CONV-STRIDE")])
def test_dla_conv_limits(tmp_path, kernel, stride, rule):
    net = torch.nn.Conv2d(4, 8, kernel, stride=stride)
    path = _export(net, torch.randn(1, 4, 80, 80), tmp_path / "c.onnx", 17)
    res = check(path, "dla-orin-8.6")
    assert not res.ok and [f.rule for f in res.failing] == [rule]
    assert check(path, "trt-8.6").ok
