"""ONNX export: parity with torch through ONNX Runtime, provenance after the clean-up, certification, atomic writes."""
from __future__ import annotations

import ast
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper as h

import attn2conv
from attn2conv import export as ex
from attn2conv.check import check
from attn2conv.check.cli import main as check_main
from attn2conv.export import ExportError, export_onnx

timm = pytest.importorskip("timm")

VIT_KW = dict(depth=2, img_size=64, pretrained=False)


def ort_run(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def rel(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def small_vit():
    return timm.create_model("deit_tiny_patch16_224", **VIT_KW).eval()


def conv_bn_relu_net():
    """timm RepVGG-A0 without its pooled classifier head: Conv/BN/ReLU (and re-parameterisable branches) only."""
    return timm.create_model("repvgg_a0", pretrained=False, num_classes=0, global_pool="").eval()


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def scopes(node: onnx.NodeProto) -> str | None:
    return {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes")


@pytest.fixture(scope="module")
def converted_vit(tmp_path_factory):
    model = small_vit()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    path = tmp_path_factory.mktemp("vit") / "vit.onnx"
    result = attn2conv.convert(model, target="trt-safe", example_inputs=(x,), export=path)
    return model, x, ref, path, result


def test_converted_vit_matches_torch_in_onnx_runtime(converted_vit):
    model, x, ref, path, result = converted_vit
    assert result.onnx_path == str(path) and path.exists()
    exp = result.report.extra["export"]
    # ONNX Runtime against the converted torch graph on the example input, against the original on all three probes
    assert exp["parity"] <= 1e-4 and exp["parity_vs_original"] <= 1e-4 and exp["parity_inputs"] == 1
    assert len(exp["parity_vs_original_each"]) == 3 and max(exp["parity_vs_original_each"]) <= 1e-4
    # independently of the report: ONNX Runtime on a fresh input against the untouched original model
    x2 = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel(ort_run(path, x2), model(x2)) <= 1e-4
    assert rel(ort_run(path, x), ref) <= 1e-4
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    assert opset_of(m) == 17  # TensorRT 8.6 (trt-safe-8.6) parses opsets up to 17
    assert {p.key: p.value for p in m.metadata_props}["attn2conv.target"] == "trt-safe-8.6"


def test_converted_vit_keeps_provenance_and_certificate(converted_vit):
    _, _, _, path, result = converted_vit
    m = onnx.load(str(path), load_external_data=False)
    compute = [n for n in m.graph.node if n.op_type != "Constant"]
    missing = [n.name for n in compute if not scopes(n)]
    assert not missing, missing[:5]
    paths = " ".join(scopes(n) for n in compute)
    for module in ("blocks.0.attn", "blocks.1.attn", "blocks.0.mlp.fc1", "blocks.1.norm2", "head"):
        assert f"'{module}'" in paths, module
    # the certificate is the verifier's, for exactly these bytes
    cert = json.loads(path.with_name(path.name + ".cert.json").read_text())
    assert cert["verdict"] == result.check.verdict and cert["profile"]["id"] == "trt-safe-8.6"
    assert cert["model"]["sha256"] == check(path, "trt-safe").model_sha256
    assert result.certified == (result.check.ok and result.report.extra["export"]["parity_ok"])
    # whatever still fails names the block it comes from
    for f in result.check.failing:
        assert f.module and f.module.startswith(("blocks.", "head", "patch_embed", "norm")), f
    assert check_main([str(path), "--target", "trt-safe", "--format", "json", "-o", str(path) + ".json"]) == (
        0 if result.check.ok else 1)


@pytest.mark.parametrize("target,profile_id", [("trt-safe", "trt-safe-8.6"), ("dla", "dla-orin-8.6")])
def test_conv_bn_relu_model_is_certified(tmp_path, target, profile_id):
    model = conv_bn_relu_net()
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "repvgg.onnx"
    result = attn2conv.convert(model, target=target, example_inputs=(x,), export=path)
    assert result.certified is True, result.check.to_text(10)
    assert result.check.ok and result.check.profile.id == profile_id
    with torch.no_grad():
        assert rel(ort_run(path, x), model(x)) <= 1e-4
    assert json.loads((tmp_path / "repvgg.onnx.cert.json").read_text())["verdict"] == "pass"
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops <= {"Conv", "Relu", "Constant"}, ops  # re-parameterised: one conv per block
    assert check_main([str(path), "--target", target, "--format", "json", "-o", str(tmp_path / "r.json")]) == 0


def test_plain_export_findings_point_at_blocks(tmp_path):
    """The original model exported the plain way (no passes), through our clean-up: findings name blocks.N."""
    model = small_vit()
    info = export_onnx(model, (torch.randn(1, 3, 64, 64),), tmp_path / "plain.onnx", "trt-safe", certify=True)
    assert info.parity <= 1e-4
    res = info.check
    assert not res.ok and info.certificate_path
    by_op: dict[str, set] = {}
    for f in res.findings:
        by_op.setdefault(f.op, set()).add(f.module)
    assert by_op["Softmax"] == {"blocks.0.attn", "blocks.1.attn"}
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"} <= by_op["MatMul"]
    assert {"blocks.0.norm1", "blocks.1.norm2", "norm"} <= by_op["LayerNormalization"]
    assert by_op["Erf"] == {"blocks.0.mlp.act", "blocks.1.mlp.act"}
    assert all(f.source and ".py:" in f.source for f in res.findings if f.op == "Softmax")


def test_opset_follows_the_profile(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1)).eval()
    x = torch.randn(1, 3, 16, 16)
    for target, opset in (("trt-safe", 17), ("trt-10", 18)):
        info = export_onnx(net, (x,), tmp_path / f"{target}.onnx", target)
        m = onnx.load(info.path)
        assert opset_of(m) == opset == info.opset
        assert info.parity <= 1e-5
        # the down-converted ReduceMean must not keep opset-18 attributes (onnx.checker runs inside export_onnx)
        assert all(a.name != "noop_with_empty_axes" for n in m.graph.node for a in n.attribute) or opset >= 18


class _Chunks(torch.nn.Module):
    """torch.chunk/split export as opset-18 Split with `num_outputs` (uneven: 10 -> 4, 4, 2) or explicit sizes."""

    def forward(self, x):
        a, b, c = torch.chunk(x, 3, dim=1)
        d, e = torch.split(x, [3, 7], dim=1)
        return a * 2 + b[:, :2].sum() - c.mean(), d.sum() + e


def test_split_is_written_at_opset_17(tmp_path):
    x = torch.randn(1, 10, 4, 4)
    info = export_onnx(_Chunks().eval(), (x,), tmp_path / "split.onnx", "trt-safe")
    m = onnx.load(info.path)
    splits = [n for n in m.graph.node if n.op_type == "Split"]
    assert opset_of(m) == 17 and splits, "the Split must survive the down-conversion as a Split"
    assert all(n.domain == "" and len(n.input) == 2 for n in splits)
    assert all(a.name != "num_outputs" for n in splits for a in n.attribute)
    assert [o.domain for o in m.opset_import] == [""]
    assert info.parity <= 1e-5


def test_external_data_over_the_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "EXTERNAL_DATA_THRESHOLD", 1024)  # stands in for 2 GiB
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    info = export_onnx(net, (x,), tmp_path / "big.onnx", "trt-safe", certify=True)
    assert info.external_data and (tmp_path / "big.onnx.data").exists()
    assert info.parity <= 1e-5
    onnx.checker.check_model(str(tmp_path / "big.onnx"), full_check=True)
    m = onnx.load(str(tmp_path / "big.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    cert = json.loads((tmp_path / "big.onnx.cert.json").read_text())
    assert cert["model"]["external_data"][0]["location"] == "big.onnx.data"
    assert cert["model"]["external_data"][0]["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.cert.json", "big.onnx.data"]


def test_streamed_write_is_the_message_onnx_save_writes(tmp_path):
    """_write_model puts detached weights back while writing: the file parses to the same message, and the written
    graph sees its initializers in order (large ones detached, small ones kept in place, one from the numpy side)."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in [("w_big", (64, 32, 3, 3)), ("b_small", (64,)), ("w_mid", (300, 20))]]
    inits.append(h.make_tensor("ints", T.INT64, [3], [1, 2, 3]))  # int64_data, no raw_data
    nodes = [h.make_node("Conv", ["x", "w_big", "b_small"], ["y"], name="conv")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 32, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 64, 6, 6])], inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], producer_name="test")
    model.metadata_props.add(key="k", value="v")
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    weights = ex._detach_weights(model)
    assert sorted(weights) == ["w_big", "w_mid"]  # over 4 KiB
    ex._write_model(model, weights, tmp_path / "m.onnx")
    written = onnx.load(str(tmp_path / "m.onnx"))
    assert written == expected
    assert not model.graph.initializer[0].HasField("raw_data") and len(model.graph.initializer) == 4  # as it was
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    dest = tmp_path / "m.onnx"

    def broken(*args, **kwargs):
        raise onnx.checker.ValidationError("simulated")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(ExportError, match="onnx.checker"):
        export_onnx(net, (x,), dest, "trt-safe", certify=True)
    assert list(tmp_path.iterdir()) == []
    # an existing file is left as it was
    dest.write_bytes(b"old")
    with pytest.raises(ExportError):
        attn2conv.convert(net, "trt-safe", example_inputs=(x,), export=dest)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"] and dest.read_bytes() == b"old"


@pytest.mark.parametrize("bad,msg", [("no/such/dir/m.onnx", "does not exist"), ("m.txt", "must end in .onnx"),
                                     ("file/m.onnx", "not a folder"), (".", "is a folder")])
def test_bad_destinations_fail_before_converting(tmp_path, monkeypatch, bad, msg):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match=msg):
        attn2conv.convert(torch.nn.Conv2d(3, 4, 1), "trt-safe", example_inputs=(torch.randn(1, 3, 4, 4),), export=bad)


def test_cleanup_bypasses_identity_drops_dead_nodes_and_keeps_provenance():
    def node(op, ins, outs, name, scope):
        n = h.make_node(op, ins, outs, name=name)
        n.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(["", scope, op.lower()]))
        return n

    nodes = [node("Relu", ["x"], ["a"], "relu", "blocks.0"), node("Identity", ["a"], ["b"], "ident", "blocks.0"),
             node("Sigmoid", ["b"], ["y"], "sig", "blocks.1"), node("Relu", ["a"], ["dead"], "unused", "blocks.2")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 4])])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    saved = ex._provenance_by_name(model)
    cleaned = ex._clean(model)
    assert ex._restore_provenance(cleaned, saved) == 2
    assert [(n.op_type, list(n.input)) for n in cleaned.graph.node] == [("Relu", ["x"]), ("Sigmoid", ["a"])]
    assert [scopes(n) for n in cleaned.graph.node] == [repr(["", "blocks.0", "relu"]), repr(["", "blocks.1", "sigmoid"])]


# The exact-attention corpus at full size (issue 6 acceptance: certified, ORT parity, CLI exit 0) is in
# tests/test_exact_attention_corpus.py.


def test_converted_graph_is_translated_without_a_second_trace(converted_vit, tmp_path, monkeypatch):
    """A converted GraphModule is lifted into an ExportedProgram as it is (no torch.export re-trace); the file matches
    the one torch.export's trace gives: same ops in the same order, same parity, same module paths."""
    model, x, ref, path, result = converted_vit
    program = ex._lifted_program(result.module)
    kinds = {s.kind.name for s in program.graph_signature.input_specs}
    assert {"USER_INPUT", "PARAMETER"} <= kinds
    assert len(program.graph_signature.user_inputs) == 1 and len(program.graph_signature.user_outputs) == 1

    with monkeypatch.context() as patch:  # the fall-back: torch.export traces the converted graph again
        patch.setattr(ex, "_lifted_program", lambda module: None)
        traced = export_onnx(result.module, (x,), tmp_path / "traced.onnx", "trt-safe")
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: pytest.fail("re-traced the converted graph"))
    direct = export_onnx(result.module, (x,), tmp_path / "direct.onnx", "trt-safe")
    assert direct.parity <= 1e-4 and direct.nodes == traced.nodes
    a, b = onnx.load(tmp_path / "traced.onnx"), onnx.load(tmp_path / "direct.onnx")
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    paths = {p for n in b.graph.node if scopes(n) for p in ast.literal_eval(scopes(n))}
    assert {"blocks.0.attn", "blocks.1.attn", "blocks.0.mlp.fc1", "blocks.1.norm2", "head"} <= paths
    assert rel(ort_run(tmp_path / "direct.onnx", x), ref) <= 1e-4


class _Sizes(torch.nn.Module):
    def forward(self, x):
        a, b, c = torch.split(x, [2, 2, 2], dim=1)  # equal parts
        d, e = torch.split(x, [1, 5], dim=1)  # unequal parts
        y = a * b + c[:, :, 1:3].mean() + x[:, :, ::2].sum() + e[:, 1:].reshape(1, 4, 32).sum() + d.sum()
        return y.reshape(1, 2, 4, 2, 4) + x[:, -2:, :, ::2].reshape(1, 2, 4, 1, 4)


def test_static_sizes_are_translated_as_single_ops_and_the_rest_by_torchlib(tmp_path, monkeypatch):
    """Int-sized reshape, slice and equal-part split are written as one op each (torchlib's symbolic-size forms
    are not called for them); an unequal split still goes to torchlib. Same numbers as torch, opset 17 Split."""
    from onnxscript.function_libs.torch_lib.ops import core

    calls = []
    real_split = core.aten_split_with_sizes
    for name in ("aten_reshape", "aten_slice"):
        monkeypatch.setattr(core, name, lambda *a, _n=name, **k: pytest.fail(f"torchlib {_n} used for int sizes"))
    monkeypatch.setattr(core, "aten_split_with_sizes", lambda *a, **k: calls.append(a[1]) or real_split(*a, **k))
    x = torch.randn(1, 6, 4, 8)
    gm = attn2conv.capture(_Sizes().eval(), (x,))
    info = export_onnx(gm, (x,), tmp_path / "sizes.onnx", "trt-safe")
    assert calls == [[1, 5]]
    assert info.parity <= 1e-6
    m = onnx.load(info.path)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("Split") == 2 and "SplitToSequence" not in ops and "SequenceAt" not in ops
    assert opset_of(m) == 17
