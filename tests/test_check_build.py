"""attn2conv-check --build: without TensorRT or a GPU it says so in one line and skips (the check's verdict stands);
a failed build makes the exit status 1. The real build path needs the trt extra and a GPU (not in CI)."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh

from attn2conv import trt_build
from attn2conv.check.cli import main


def _model(tmp_path, op="Add"):
    x = oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4])
    y = oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4])
    w = onnx.numpy_helper.from_array(np.ones((1, 4, 4), np.float32), "w")
    g = oh.make_graph([oh.make_node(op, ["x", "w"], ["y"], name="n")], "g", [x], [y], [w])
    path = tmp_path / f"{op}.onnx"
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)]), str(path))
    return str(path)


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, installed or not


def test_build_skips_without_tensorrt_text(tmp_path, capsys, no_tensorrt):
    assert main([_model(tmp_path), "--target", "trt-safe", "--build"]) == 0
    out = capsys.readouterr().out.rstrip("\n").splitlines()
    assert out[-1].startswith("TensorRT build: skipped: the TensorRT Python package is not installed")
    assert sum("TensorRT build" in line for line in out) == 1


def test_build_skip_keeps_the_check_verdict(tmp_path, capsys, no_tensorrt):
    assert main([_model(tmp_path, "MatMul"), "--target", "trt-safe", "--build"]) == 1
    assert "A2C-SAFE-OP-MATMUL" in capsys.readouterr().out


def test_build_skip_in_json_and_sarif(tmp_path, capsys, no_tensorrt):
    model = _model(tmp_path)
    assert main([model, "--format", "json", "--build"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["trt_build"]["status"] == "skipped" and "not installed" in doc["trt_build"]["message"]
    assert main([model, "--format", "sarif", "--build"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["version"] == "2.1.0"  # SARIF stays schema-clean
    assert captured.err.count("\n") == 1 and "TensorRT build: skipped" in captured.err


def test_build_skips_with_tensorrt_but_no_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    monkeypatch.setattr(trt_build, "cuda_device_count", lambda: 0)
    assert main([_model(tmp_path), "--build"]) == 0
    assert "TensorRT build: skipped: TensorRT 8.6.1 is installed but no CUDA GPU is visible" in capsys.readouterr().out


def test_failed_build_makes_exit_status_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trt_build, "build_engine",
                        lambda path, profile: trt_build.BuildVerdict("failed", "parser: unsupported op", "safety"))
    assert main([_model(tmp_path), "--build"]) == 1
    assert "TensorRT build: failed: parser: unsupported op" in capsys.readouterr().out


def test_without_build_no_build_line(tmp_path, capsys):
    assert main([_model(tmp_path)]) == 0
    assert "TensorRT build" not in capsys.readouterr().out


def test_cuda_device_count_is_an_int():
    assert trt_build.cuda_device_count() >= 0  # no driver here: 0, never an exception
