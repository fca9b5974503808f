"""Slow: the digits example end to end, and DeiT-S through convert(fidelity="fast") to a certified ONNX."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm

import attn2conv
from attn2conv.graph import is_op
from attn2conv.legality import module_path

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


@pytest.mark.slow
def test_swin_tiny_fast_trt_safe_exports_and_is_certified_without_windows(tmp_path):
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    result = attn2conv.convert(model, "trt-safe", fidelity="fast", export=tmp_path / "swin_t_fast.onnx",
                               guard="final")
    rep = result.report
    assert rep.needs_distillation and rep.legal, rep.to_table()
    assert result.certified, (result.check, rep.extra.get("export"))
    plan = result.module.meta["attn2conv_plan"]
    # windowed models: attention in the last stage only (attention_stages="last"), MHCA conv blocks before it
    assert list(plan.values()).count("sra") == 1 and list(plan.values()).count("mhca") == 11, plan
    assert plan["layers.3.blocks.1.attn"] == "sra", plan
    # every block runs on the whole map: no window shift (roll, or its Slice + Concat form) left
    notes = [n for p in rep.passes if p.id in ("attention_to_csa", "attention_to_sra") for n in p.notes]
    assert sum("whole map" in n for n in notes) == 12 - 2, notes  # the last stage (7 x 7) is one window
    assert "aten.roll" not in rep.op_counts_after
    # a Concat left is attention_to_conv's chunk join inside the SRA block, not a window roll's Slice + Concat
    cats = [module_path(n) for n in result.module.graph.nodes if is_op(n, "aten.cat")]
    assert all(p.startswith("layers.3.blocks.1.attn") for p in cats), cats
