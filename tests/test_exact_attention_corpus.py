"""The exact-attention corpus at full size (issues 5 and 6 acceptance, `-m slow`).

For every model: `convert(model, target="trt-safe", export=path)` leaves no MatMul, Gemm, Einsum, SDPA or Softmax in
the FX graph and no op the trt-safe profile flags as an error (warnings remain for ops outside the publicly evidenced
safe set, such as Slice and Concat); the converted module matches the original within 1e-4 on three inputs; ONNX
Runtime matches torch within 1e-4; the file is certified and `attn2conv-check` exits 0 on it.

`python tests/test_exact_attention_corpus.py [NAME ...]` prints one line per model with the same numbers.
"""
import sys
import time

import pytest
import torch

import attn2conv
from attn2conv.check.cli import main as check_main
from attn2conv.legality import op_counts

from conftest import rel_error

ATTENTION_OPS = ("aten.matmul", "aten.bmm", "aten.mm", "aten.addmm", "aten.linear", "aten.einsum",
                 "aten.scaled_dot_product_attention", "aten.softmax", "aten._softmax")


def _timm(name, size=224, **kw):
    def make():
        import timm

        return timm.create_model(name, pretrained=False, **kw).eval(), torch.randn(1, 3, size, size)
    return make


def _hf(kind, size=224):
    def make():
        import transformers

        cfg = getattr(transformers, f"{kind}Config")()
        return getattr(transformers, f"{kind}Model")(cfg).eval(), torch.randn(1, 3, size, size)
    return make


CORPUS = {  # issue 5's list, then the exact-ops corpus of issue 4 (test_exact_ops_corpus.py, full size)
    "deit_tiny_patch16_224": _timm("deit_tiny_patch16_224"),
    "deit_small_patch16_224": _timm("deit_small_patch16_224"),
    "swin_tiny_patch4_window7_224": _timm("swin_tiny_patch4_window7_224"),
    "pvt_v2_b0": _timm("pvt_v2_b0"),
    "twins_pcpvt_small": _timm("twins_pcpvt_small"),
    "cait_xxs24_224": _timm("cait_xxs24_224"),
    "efficientformer_l1": _timm("efficientformer_l1"),
    "hf_ViTModel": _hf("ViT"),
    "hf_SwinModel": _hf("Swin"),
    "vit_small_patch16_224": _timm("vit_small_patch16_224"),
    "convnext_tiny": _timm("convnext_tiny"),
    "poolformer_s12": _timm("poolformer_s12"),
    "mobilevit_xs": _timm("mobilevit_xs", 256),
    "hf_ConvNextModel": _hf("ConvNext"),
}


def _first(y):
    if isinstance(y, torch.Tensor):
        return y
    if hasattr(y, "last_hidden_state"):
        return y.last_hidden_state
    return next(v for v in (y.values() if hasattr(y, "values") else y) if isinstance(v, torch.Tensor))


def convert_and_measure(name, out_dir):
    """Convert one corpus model with export; return (result, errors on three inputs, seconds)."""
    model, x = CORPUS[name]()
    start = time.perf_counter()
    result = attn2conv.convert(model, target="trt-safe", example_inputs=(x,), export=out_dir / f"{name}.onnx")
    seconds = time.perf_counter() - start
    probes = (x, torch.randn_like(x), 3 * torch.rand_like(x) - 1.5)
    with torch.no_grad():
        errors = [rel_error(_first(result.module(p)), _first(model(p))) for p in probes]
    return result, errors, seconds


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CORPUS))
def test_exact_attention_corpus(tmp_path, name):
    result, errors, _ = convert_and_measure(name, tmp_path)
    counts = op_counts(result.module)
    assert not {op: counts[op] for op in ATTENTION_OPS if counts.get(op)}, counts
    errors_left = [op for op in result.report.illegal_ops if op["severity"] == "error"]
    assert not errors_left, errors_left
    assert not result.report.rolled_back, result.report.to_table()
    assert max(errors) <= 1e-4, errors
    assert result.report.extra["export"]["parity_vs_original"] <= 1e-4
    assert result.certified is True, result.check.to_text(20)
    assert check_main([str(result.onnx_path), "--target", "trt-safe", "--format", "json",
                       "-o", str(tmp_path / "findings.json")]) == 0


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    for name in sys.argv[1:] or CORPUS:
        with tempfile.TemporaryDirectory() as tmp:
            result, errors, seconds = convert_and_measure(name, Path(tmp))
            warnings = sorted({op["onnx_op"] for op in result.report.illegal_ops if op["severity"] != "error"})
            errors_left = [op["onnx_op"] for op in result.report.illegal_ops if op["severity"] == "error"]
            print(f"{name}: rel.err {max(errors):.1e} (3 inputs), ORT parity "
                  f"{result.report.extra['export']['parity_vs_original']:.1e}, certified {result.certified}, "
                  f"FX errors {errors_left or 'none'}, warnings {','.join(warnings) or 'none'}, {seconds:.0f} s",
                  flush=True)
