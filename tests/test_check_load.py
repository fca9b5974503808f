"""Bad and hostile input: one-line errors, exit status 2, nothing read outside the model's folder."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto as T

from attn2conv.check import InputError, check
from attn2conv.check.cli import main

from _check_models import conv_net, model, unary, vi


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def _external_model(tmp_path: Path, location: str, length: int = 64) -> Path:
    m = conv_net()
    w = next(t for t in m.graph.initializer if t.name == "w")
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = T.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(length))):
        e = w.external_data.add()
        e.key, e.value = k, v
    path = tmp_path / "m" / "model.onnx"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(m.SerializeToString())
    return path


@pytest.fixture
def opened(monkeypatch):
    """Record every path opened for reading through builtins.open."""
    seen: list[str] = []
    real = builtins.open

    def spy(file, mode="r", *a, **k):
        if "r" in mode and isinstance(file, (str, os.PathLike)):
            seen.append(os.path.realpath(file))
        return real(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    return seen


def test_empty_random_truncated_directory(tmp_path, capsys):
    good = conv_net().SerializeToString()
    cases = {
        "empty.onnx": b"",
        "random.onnx": os.urandom(4096),
        "truncated.onnx": good[: len(good) // 2],
        "text.onnx": b"hello, I am not a model\n",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "dir.onnx").mkdir()
    for name in [*cases, "dir.onnx", "missing.onnx"]:
        code, err = _run(capsys, tmp_path / name)
        assert code == 2, (name, err)
        assert err.count("\n") == 1 and err.startswith("attn2conv-check: error:"), (name, err)
        assert "Traceback" not in err


def test_wrong_opset_is_an_input_error(tmp_path, capsys):
    m = unary("Relu")
    m.opset_import[0].version = 999
    p = tmp_path / "future.onnx"
    p.write_bytes(m.SerializeToString())
    code, err = _run(capsys, p)
    assert code == 2 and "opset 999" in err
    del m.opset_import[:]
    m.opset_import.add(domain="com.x", version=1)
    p.write_bytes(m.SerializeToString())
    code, err = _run(capsys, p)
    assert code == 2 and "default-domain" in err


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../x.bin", "..\\..\\win.ini"])
def test_external_data_outside_the_folder_is_refused(tmp_path, capsys, opened, location):
    path = _external_model(tmp_path, location)
    code, err = _run(capsys, path)
    assert code == 2 and "refused" in err and err.count("\n") == 1
    folder = os.path.realpath(path.parent)
    assert opened and all(p.startswith(folder) for p in opened), opened  # only the model file itself


def test_symlink_escape_is_refused(tmp_path, capsys):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"\0" * 64)
    path = _external_model(tmp_path, "w.bin")
    (path.parent / "w.bin").symlink_to(outside)
    code, err = _run(capsys, path)
    assert code == 2 and "resolves outside" in err


def test_over_2gib_external_weights_are_not_read(tmp_path, opened):
    # The weights file does not even exist: the check must not need it.
    path = _external_model(tmp_path, "weights.bin", length=3 * 1024**3)
    res = check(path, "trt-safe")
    assert res.ok and opened == [os.path.realpath(path)]
    assert res.loaded.external[0].length == 3 * 1024**3


def test_size_cap_and_nesting_cap(tmp_path):
    from attn2conv.check import _load

    p = tmp_path / "m.onnx"
    p.write_bytes(conv_net().SerializeToString())
    with pytest.raises(InputError, match="limit"):
        _load.read_model(p, max_bytes=100)
    # If inside If inside If ... deeper than the cap
    leaf = model([onnx.helper.make_node("Relu", ["x"], ["y"])], [], [vi("y", [1])]).graph
    body = leaf
    for _ in range(_load.MAX_GRAPH_DEPTH + 2):
        node = onnx.helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=leaf)
        body = model([node], [], [vi("y", [1])]).graph
    deep = model([onnx.helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=leaf)],
                 [vi("c", [], T.BOOL)], [vi("y", [1])])
    with pytest.raises(InputError, match="nested deeper"):
        check(deep)


def test_shape_inference_fills_missing_shapes_and_can_be_disabled():
    # A graph without intermediate shapes: the Relu output is 1 x 20000 x 8 x 8 only after inference.
    m = model([onnx.helper.make_node("Relu", ["x"], ["t"]), onnx.helper.make_node("Relu", ["t"], ["y"])],
              [vi("x", [1, 20000, 8, 8], T.FLOAT16)], [vi("y", None, T.FLOAT16)])
    auto = check(m, "trt-safe")
    assert sorted({f.tensor for f in auto.findings if f.rule == "A2C-SAFE-TENSOR-CHANNELS"}) == ["t", "x", "y"]
    never = check(m, "trt-safe", shape_inference="never")
    assert [f.tensor for f in never.findings if f.rule == "A2C-SAFE-TENSOR-CHANNELS"] == ["x"]


def test_model_proto_and_bytes_are_accepted():
    m = conv_net()
    assert check(m, "dla").ok and check(m.SerializeToString(), "dla").ok
    assert check(m, "dla").model_sha256 == check(m.SerializeToString(), "dla").model_sha256
