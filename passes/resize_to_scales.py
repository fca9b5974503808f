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

Where the target has no cubic resize at all (DLA resizes nearest or linear only: A2C-DLA-RESIZE-MODE), a bicubic
resize becomes what it is on a static shape, a separable linear map: y = A_h x A_w^T, two Linears with constant
(out, in) matrices (then 1x1 Convs by linear_to_conv) and two Transposes. The matrices are the op itself applied to
one-hot images (constant along the other axis, which a resize whose weights sum to one keeps constant), so every
output is the same four-tap sum with the same coefficients, plus exact zeros (float rounding of the sum only).
"""
from __future__ import annotations

import numpy as np
import torch
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
    introduces = ("aten.linear", "aten.permute")
    summary = ("interpolate(size=...) -> the same resize by constant scale factors (Resize by sizes is not safe/DLA); "
               "bicubic -> two constant Linears where the target has no cubic resize (DLA)")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        no_cubic = any(rule.check == "dla_resize" for rule in getattr(ctx.profile, "rules", ()) or ())
        for node in list(gm.graph.nodes):
            if no_cubic and is_op(node, "aten.upsample_bicubic2d"):
                result.tally(node, _separable_linear(gm, node))
            elif is_op(node, *UPSAMPLES):
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


def _separable_linear(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """A resize on a static (B, C, H, W) shape as A_h x A_w^T: Linear over W, transpose, Linear over H, transpose."""
    x = node.args[0]
    xs, outs = shape(x), shape(node)
    if xs is None or outs is None or len(xs) != 4:
        return "input or output shape unknown"
    (h, w), (ho, wo) = xs[2:], outs[2:]
    rest = tuple(node.args[1:])

    def resize(basis: torch.Tensor) -> torch.Tensor:
        return node.target(basis, *rest, **node.kwargs)

    # in x's dtype, so the taps are the very coefficients the op computes (its float32 source coordinates are off
    # by up to ~1e-5 relative at 100 px; float64 taps would be truer but farther from the model)
    dtype = x.meta["val"].dtype
    eye_w = torch.eye(w, dtype=dtype).reshape(w, 1, 1, w).expand(w, 1, h, w).contiguous()
    eye_h = torch.eye(h, dtype=dtype).reshape(h, 1, h, 1).expand(h, 1, h, w).contiguous()
    a_w, a_h = resize(eye_w)[:, 0, 0, :].T, resize(eye_h)[:, 0, :, 0].T  # (wo, w), (ho, h)
    if a_w.shape != (wo, w) or a_h.shape != (ho, h):
        return f"the resize of one-hot images gives {tuple(a_h.shape)} x {tuple(a_w.shape)}, not {outs[2:]}"
    b = Builder(gm, node)
    y = b.call(aten.linear.default, x, b.constant(a_w.contiguous(), "resize_w_weight"))
    y = b.call(aten.permute.default, y, [0, 1, 3, 2])
    y = b.call(aten.linear.default, y, b.constant(a_h.contiguous(), "resize_h_weight"))
    y = b.call(aten.permute.default, y, [0, 1, 3, 2])
    y.meta["val"] = node.meta.get("val")
    replace_uses(node, y)
    gm.graph.erase_node(node)
    return None
