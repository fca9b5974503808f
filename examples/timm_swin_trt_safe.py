"""timm Swin-T -> TensorRT safety mode (trt-safe): convert, export ONNX, certify, print the report.

    python examples/timm_swin_trt_safe.py                        # Swin-T at 224x224 -> out/swin_tiny_trt_safe.onnx
    python examples/timm_swin_trt_safe.py --small -o /tmp/s.onnx # a 2-stage, narrow Swin at 56x56 (seconds)

Same job from the shell:
    attn2conv convert timm:swin_tiny_patch4_window7_224 --target trt-safe -o out/swin.onnx --report out/swin.json

Weights are random (pretrained=False): load your checkpoint into `model` before converting. Exit status: 0 when the
ONNX is certified for trt-safe-8.6 (verifier clean at error severity and ONNX Runtime == torch within 1e-4), else 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch

import attn2conv


def build(small: bool):
    if small:
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=48,
                                  depths=(2, 2), num_heads=(2, 4))
        return model.eval(), torch.randn(1, 3, 56, 56)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval(), torch.randn(1, 3, 224, 224)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="out/swin_tiny_trt_safe.onnx")
    ap.add_argument("--small", action="store_true", help="a small Swin (2 stages, width 48, 56x56) for a quick run")
    args = ap.parse_args(argv)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model, x = build(args.small)
    # exact fidelity: window partition/roll become slices and concats, LayerNorm/GELU are decomposed, Linear -> 1x1
    # Conv, the window attention core (relative bias and shift mask included) -> broadcast Mul + grouped 1x1 Conv.
    result = attn2conv.convert(model, target="trt-safe", example_inputs=(x,), export=out)
    print(result.report.to_table())

    with torch.no_grad():  # the rewritten graph is a drop-in replacement for the model
        err = float((result.module(x) - model(x)).abs().max() / model(x).abs().max())
    print(f"rewritten graph vs timm model: relative error {err:.1e}")
    print(f"certificate: {result.report.extra['export']['certificate']}")
    out.with_suffix(".report.json").write_text(json.dumps(result.report.to_dict(), indent=2) + "\n")
    return 0 if result.certified else 1


if __name__ == "__main__":
    sys.exit(main())
