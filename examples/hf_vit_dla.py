"""Hugging Face ViT -> NVIDIA DLA on Orin (TensorRT 8.6 profile dla-orin-8.6): convert, export, certify.

    python examples/hf_vit_dla.py                         # ViT-B/16 config at 224x224 -> out/hf_vit_dla.onnx
    python examples/hf_vit_dla.py --small -o /tmp/v.onnx  # 2 layers, width 64, 32x32 (seconds)

Same job from the shell:
    attn2conv convert hf:ViTConfig --target dla -o out/hf_vit_dla.onnx

The model is built from its config (random weights; nothing is downloaded); with a checkpoint use
`ViTModel.from_pretrained(path)` instead. DLA has no MatMul between two computed tensors, no Gather, Erf or
ReduceMean, and limits kernels and tensor shapes, so the report ends with what the DLA profile still rejects, if
anything: those layers would fall back to the GPU (GPU fallback) or the build fails with fallback off. Exit status 0
when certified for dla-orin-8.6, else 1 (the listing says which ops and which modules block it).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
import transformers

import attn2conv


def build(small: bool):
    if small:
        cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128)
    else:
        cfg = transformers.ViTConfig()  # the ViT-B/16 geometry of google/vit-base-patch16-224
    model = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    return model, torch.randn(1, 3, cfg.image_size, cfg.image_size)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="out/hf_vit_dla.onnx")
    ap.add_argument("--small", action="store_true", help="a 2-layer ViT at 32x32 for a quick run")
    args = ap.parse_args(argv)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model, x = build(args.small)
    result = attn2conv.convert(model, target="dla", example_inputs=(x,), export=out)
    print(result.report.to_table())

    # What the verifier says about the file, as DLA sees it: rules broken at error severity, nodes per rule.
    check = result.check
    for rule, count in Counter(f.rule for f in check.failing).most_common():
        print(f"  {rule}: {count} node(s)  (attn2conv-check --explain {rule})")
    if result.certified:
        print(f"certified for {check.profile.id}: every layer can run on the DLA cores")
    else:
        blocked = sorted({f"{f.op} ({f.module or f.node})" for f in check.failing})[:10]
        print(f"NOT certified for {check.profile.id}; first blockers: {', '.join(blocked)}")
    return 0 if result.certified else 1


if __name__ == "__main__":
    sys.exit(main())
