"""A model of your own, with its own attention, -> trt-safe. Nothing here is timm or Hugging Face.

    python examples/custom_attention.py                        # width 128, 4 blocks, 64x64 input
    python examples/custom_attention.py --width 32 --depth 1 --img 32   # a few seconds

Or from the shell, through the factory below:
    attn2conv convert examples/custom_attention.py:make_model --target trt-safe -o out/custom.onnx
    attn2conv convert 'examples/custom_attention.py:make_model?width=32&depth=1' --target dla -o out/custom_dla.onnx

The attention is written by hand the way many in-house models do it: one fused qkv Linear, heads split with
reshape/permute, `q @ k.transpose(-2, -1) * scale`, a learned relative-position bias added before the softmax, then
`attn @ v`. attn2conv matches it semantically (the softmax between two matmuls, walked out through the reshapes to the
projections), not by class name, so no registration or annotation is needed. Exit status 0 when certified, else 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class MyAttention(nn.Module):
    """Multi-head self-attention over an h x w grid with a learned (2h-1)(2w-1) relative-position bias."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int]):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        h, w = grid
        self.rel_bias = nn.Parameter(torch.randn(heads, (2 * h - 1) * (2 * w - 1)) * 0.02)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
        rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
        self.register_buffer("rel_index", (rel[0] + h - 1) * (2 * w - 1) + rel[1] + w - 1, persistent=False)

    def forward(self, x):  # x: (B, N, C)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn + self.rel_bias[:, self.rel_index]  # (heads, N, N), broadcast over the batch
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, grid: tuple[int, int]):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), MyAttention(dim, heads, grid)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MyNet(nn.Module):
    """Conv stem (stride 8, with BatchNorm) -> transformer blocks on the token grid -> mean-pooled linear head."""

    def __init__(self, width: int = 128, depth: int = 4, heads: int = 4, img: int = 64, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width // 2, 3, 2, 1), nn.BatchNorm2d(width // 2), nn.ReLU(),
                                  nn.Conv2d(width // 2, width, 3, 4, 1), nn.BatchNorm2d(width))
        grid = (img // 8, img // 8)
        self.blocks = nn.ModuleList(Block(width, heads, grid) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)  # (B, N, C)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(dim=1))


def make_model(width: int = 128, depth: int = 4, heads: int = 4, img: int = 64):
    """Factory for `attn2conv convert examples/custom_attention.py:make_model`: (model, example input)."""
    torch.manual_seed(0)
    model = MyNet(width, depth, heads, img).eval()
    for m in model.modules():  # non-trivial BN statistics, as a trained model would have
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(1, 3, img, img)


def main(argv=None) -> int:
    import attn2conv

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--img", type=int, default=64, help="input size (a multiple of 8)")
    ap.add_argument("--target", default="trt-safe")
    ap.add_argument("-o", "--output", default="out/custom_attention.onnx")
    args = ap.parse_args(argv)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)

    model, x = make_model(args.width, args.depth, img=args.img)
    result = attn2conv.convert(model, target=args.target, example_inputs=(x,), export=out)
    print(result.report.to_table())
    with torch.no_grad():
        ref = model(x)
        err = float((result.module(x) - ref).abs().max() / ref.abs().max())
    print(f"rewritten graph vs MyNet: relative error {err:.1e}")
    left = sorted({op["onnx_op"] for op in result.report.illegal_ops if op["severity"] == "error"})
    print(f"ops {result.check.profile.id} rejects: {', '.join(left) or 'none'}; certified: {result.certified}")
    return 0 if result.certified else 1


if __name__ == "__main__":
    sys.exit(main())
