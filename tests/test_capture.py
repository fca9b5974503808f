import pytest
import timm
import torch
import torch.nn as nn

import attn2conv
from attn2conv.capture import capture, default_example_inputs
from attn2conv.errors import CaptureError
from attn2conv.graph import is_op, module_path

from conftest import rel_error, state_checksum


def test_default_input_from_timm_cfg():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1)
    (x,) = default_example_inputs(model)
    assert tuple(x.shape) == (1, 3, 224, 224)


def test_default_input_from_hf_config():
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=48, patch_size=16, num_channels=2, hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=64)
    (x,) = default_example_inputs(ViTModel(cfg))
    assert tuple(x.shape) == (1, 2, 48, 48)


def test_no_shape_source_says_to_pass_example_inputs():
    with pytest.raises(CaptureError, match="pass example_inputs"):
        capture(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_capture_matches_model_and_keeps_provenance():
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, img_size=64)
    x = torch.randn(1, 3, 64, 64)
    gm = capture(model, x)
    assert rel_error(gm(x), model.eval()(x)) == 0.0
    linears = [n for n in gm.graph.nodes if is_op(n, "aten.linear")]
    assert len(linears) == 9
    assert {module_path(n) for n in linears} >= {"blocks.0.attn.qkv", "blocks.1.mlp.fc2", "head"}
    for n in linears:
        assert {"nn_module_stack", "stack_trace", "torch_fn"} <= set(n.meta)
        assert n.meta["val"].shape[-1] == gm.get_parameter(n.args[1].target).shape[0]
    # functional graph: no in-place ops, no dropout
    assert not any(str(n.target).endswith("_.Tensor") or is_op(n, "aten.dropout") for n in gm.graph.nodes)


def test_user_model_is_not_mutated():
    model = timm.create_model("repvgg_a0", pretrained=False).train()
    before = state_checksum(model)
    result = attn2conv.convert(model, target="trt-safe", example_inputs=torch.randn(1, 3, 32, 32))
    assert result.report.passes[0].rewrites > 0
    assert state_checksum(model) == before
    assert model.training, "convert must not switch the user's model to eval mode"
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Branchy()

    def forward(self, x):
        return self.inner(x) + 1


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not capturable with static shapes
            return x * 2
        return x


def test_export_failure_names_the_module_in_one_line():
    with pytest.raises(CaptureError) as info:
        capture(_DataDependent(), torch.randn(1, 3, 8, 8))
    message = str(info.value)
    assert "'inner'" in message and "\n" not in message


def test_functional_export_skips_the_decomposition_retrace(monkeypatch):
    """Swin's graph (dropout, flatten, contiguous on windows) needs nothing from run_decompositions: capture rewrites
    those few ops itself, the graph matches the decomposed capture's outputs bit for bit."""
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1), num_heads=(1, 2),
                              embed_dim=16, img_size=56).eval()
    x = torch.randn(1, 3, 56, 56)
    reference = capture(model, x)
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions",
                        lambda *a, **k: pytest.fail("decomposed a graph that was functional already"))
    gm = capture(model, x)
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not ops & {"aten.dropout.default", "aten.flatten.using_ints", "aten.contiguous.default"}
    assert "aten.clone.default" in ops  # contiguous became the clone decomposition gives
    with torch.no_grad():
        assert torch.equal(gm(x), reference(x)) and rel_error(gm(x), model(x)) == 0.0


class _CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)  # a buffer written in place: only functionalisation makes this a graph output
        return self.conv(x).relu_()


def test_in_place_ops_still_take_the_decomposition(monkeypatch):
    import importlib

    calls = []
    decompose = torch.export.ExportedProgram.run_decompositions
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions",
                        lambda self, *a, **k: calls.append(1) or decompose(self, *a, **k))
    model = _CountsCalls().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = capture(model, x)
    assert calls and not importlib.import_module("attn2conv.capture")._functional_already(
        torch.export.export(_CountsCalls().eval(), (x,), strict=False).graph_module)
    assert not any(str(n.target).endswith("_.Tensor") or str(n.target) == "aten.relu_.default"
                   for n in gm.graph.nodes)
    with torch.no_grad():
        assert rel_error(gm(x), model(x)) == 0.0
