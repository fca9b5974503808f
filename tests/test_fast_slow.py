"""Slow: the digits example end to end, and DeiT-S through convert(fidelity="fast") to a certified ONNX."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch

import attn2conv

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_digits_example_distilled_student_within_one_point_of_the_teacher():
    spec = importlib.util.spec_from_file_location("digits_fast_distill", ROOT / "examples" / "digits_fast_distill.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main([])
    assert result["legal"]
    assert result["teacher"] >= 95.0
    assert result["student_after"] >= result["teacher"] - 1.0, result
    assert result["seconds"] < 600


@pytest.mark.slow
def test_deit_small_fast_trt_safe_exports_and_is_certified(tmp_path):
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    result = attn2conv.convert(model, "trt-safe", fidelity="fast", export=tmp_path / "deit_s_fast.onnx")
    rep = result.report
    assert rep.needs_distillation and rep.legal, rep.to_table()
    assert result.check is not None and result.check.ok, result.check
    assert result.certified, rep.extra.get("export")
    ops = set(rep.op_counts_after)
    assert not ops & {"aten.linear", "aten.layer_norm", "aten.gelu", "aten.scaled_dot_product_attention",
                      "aten.matmul", "aten.softmax"}
