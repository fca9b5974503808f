"""resize_to_scales (exact): interpolation to a fixed output size given as scale factors instead.

`F.interpolate(x, size=...)` (CrossViT resizes the image for its second branch, 120 -> 112 px) exports as Resize with
a `sizes` input, which the TensorRT safety scope and DLA reject (A2C-SAFE-RESIZE-SIZES, A2C-DLA-RESIZE-SIZES): they
accept Resize by constant scales only. Shapes are static, so the same resize is

    upsample_*2d.vec(x, None, align_corners, [out_h / in_h, out_w / in_w])

which torch.onnx exports as Resize with a constant `scales` input. Each factor is the float32 value s nearest to
out / in, nudged up to the first float32 with in * s >= out (PyTorch, ONNX Runtime and TensorRT compute the output
size as floor(in * scale), in float64 or float32). Linear and cubic modes then map coordinates by 1 / s instead of in / out: the same
number to float rounding. Nearest mode floors the mapped coordinate, where one ulp can pick another pixel, so it is
rewritten only when in / out or out / in is an integer (the mapping is then exact either way).
"""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from attn2conv.attention_match import eliminate_dead_code
from attn2conv.graph import Builder, arg, aten, is_op, replace_uses, shape
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register

UPSAMPLES = ("aten.upsample_nearest2d", "aten.upsample_bilinear2d", "aten.upsample_bicubic2d")


@register
class ResizeToScales(GraphPass):
    id = "resize_to_scales"
    exact = True
    removes = ()
    introduces = ()
    summary = "interpolate(size=...) -> the same resize by constant scale factors (Resize by sizes is not safe/DLA)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        for node in list(gm.graph.nodes):
            if is_op(node, *UPSAMPLES):
                reason = _rewrite(gm, node)
                if reason != "":
                    result.tally(node, reason)
        if result.changed:
            eliminate_dead_code(gm)
        return result


def _rewrite(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """None when rewritten, a reason when skipped, "" when there is nothing to do (already by scales)."""
    nearest = is_op(node, "aten.upsample_nearest2d")
    xs, outs = shape(node.args[0]), shape(node)
    vec = node.target in (aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec, aten.upsample_bicubic2d.vec)
    if vec and arg(node, 2 if nearest else 3, "scale_factors") is not None:
        return ""
    if xs is None or outs is None or len(xs) != 4:
        return "input or output shape unknown"
    explicit = [arg(node, i, name) for i, name in ((2, "scales_h"), (3, "scales_w"))] if nearest else \
        [arg(node, i, name) for i, name in ((3, "scales_h"), (4, "scales_w"))]
    if not vec and any(v is not None for v in explicit):
        return "explicit scales_h / scales_w already set (left as they are)"
    pairs = list(zip(xs[2:], outs[2:]))
    if nearest and any(o % i and i % o for i, o in pairs):
        return f"nearest resize {xs[2:]} -> {outs[2:]} by a non-integer ratio (one ulp could pick another pixel)"
    scales = [_scale(i, o) for i, o in pairs]
    b = Builder(gm, node)
    if nearest:
        new = b.call(aten.upsample_nearest2d.vec, node.args[0], None, scales)
    else:
        target = aten.upsample_bilinear2d.vec if is_op(node, "aten.upsample_bilinear2d") else \
            aten.upsample_bicubic2d.vec
        new = b.call(target, node.args[0], None, bool(arg(node, 2, "align_corners", False)), scales)
    if shape(new) is not None and shape(new) != outs:
        gm.graph.erase_node(new)
        return f"scales {scales} give {shape(new)}, not {outs}"
    new.meta["val"] = node.meta.get("val")
    replace_uses(node, new)
    gm.graph.erase_node(node)
    return None


def _scale(size_in: int, size_out: int) -> float:
    s = np.float32(size_out / size_in)
    while float(s) * size_in < size_out:  # exact in float64; then float32 products round to >= size_out as well
        s = np.nextafter(s, np.float32(np.inf))
    return float(s)
