"""FX-level legality: which ops of a captured graph the target profile would reject after export.

Each ATen op kind maps to the ONNX op types torch.onnx's exporter emits for it; the verifier's profile data
(attn2conv.targets) says which ONNX ops the target accepts. Nodes that depend only on constants are skipped: export
folds them. Shape-only ops with no ONNX node of their own (getitem, sym sizes) map to nothing.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch.fx as fx

from attn2conv.graph import arg, compute_nodes, module_path, op_kind

# ATen op kind -> ONNX op types the exporter produces for it. Ops whose ONNX form depends on arguments are handled in
# onnx_ops_for().
ATEN_TO_ONNX: dict[str, tuple[str, ...]] = {
    "aten.conv1d": ("Conv",), "aten.conv2d": ("Conv",), "aten.conv3d": ("Conv",), "aten.convolution": ("Conv",),
    "aten.conv_transpose2d": ("ConvTranspose",),
    "aten.linear": ("MatMul", "Add"), "aten.matmul": ("MatMul",), "aten.mm": ("MatMul",), "aten.bmm": ("MatMul",),
    "aten.addmm": ("Gemm",), "aten.baddbmm": ("MatMul", "Add"), "aten.einsum": ("Einsum",),
    "aten.scaled_dot_product_attention": ("MatMul", "Softmax"),
    "aten.layer_norm": ("LayerNormalization",), "aten.native_layer_norm": ("LayerNormalization",),
    "aten.group_norm": ("GroupNormalization",), "aten.native_group_norm": ("GroupNormalization",),
    "aten.instance_norm": ("InstanceNormalization",),
    "aten.batch_norm": ("BatchNormalization",), "aten._native_batch_norm_legit_no_training": ("BatchNormalization",),
    "aten.softmax": ("Softmax",), "aten._softmax": ("Softmax",), "aten.log_softmax": ("LogSoftmax",),
    "aten._log_softmax": ("LogSoftmax",),
    "aten.relu": ("Relu",), "aten.relu6": ("Clip",), "aten.sigmoid": ("Sigmoid",), "aten.tanh": ("Tanh",),
    "aten.silu": ("Sigmoid", "Mul"), "aten.hardswish": ("HardSwish",), "aten.hardsigmoid": ("HardSigmoid",),
    "aten.leaky_relu": ("LeakyRelu",), "aten.elu": ("Elu",), "aten.mish": ("Mish",), "aten.softplus": ("Softplus",),
    "aten.prelu": ("PRelu",), "aten.hardtanh": ("Clip",), "aten.clamp": ("Clip",), "aten.clamp_min": ("Max",),
    "aten.clamp_max": ("Min",), "aten.clip": ("Clip",),
    "aten.add": ("Add",), "aten.sub": ("Sub",), "aten.rsub": ("Sub",), "aten.mul": ("Mul",), "aten.div": ("Div",),
    "aten.neg": ("Neg",), "aten.abs": ("Abs",), "aten.exp": ("Exp",), "aten.log": ("Log",), "aten.sqrt": ("Sqrt",),
    "aten.rsqrt": ("Sqrt", "Reciprocal"), "aten.reciprocal": ("Reciprocal",), "aten.pow": ("Pow",),
    "aten.erf": ("Erf",), "aten.sin": ("Sin",), "aten.cos": ("Cos",), "aten.maximum": ("Max",),
    "aten.minimum": ("Min",), "aten.floor": ("Floor",), "aten.ceil": ("Ceil",), "aten.round": ("Round",),
    "aten.sign": ("Sign",), "aten.where": ("Where",), "aten.masked_fill": ("Where",),
    "aten.eq": ("Equal",), "aten.ne": ("Equal", "Not"), "aten.lt": ("Less",), "aten.gt": ("Greater",),
    "aten.le": ("LessOrEqual",), "aten.ge": ("GreaterOrEqual",), "aten.logical_and": ("And",),
    "aten.logical_or": ("Or",), "aten.logical_not": ("Not",),
    "aten.mean": ("ReduceMean",), "aten.sum": ("ReduceSum",), "aten.amax": ("ReduceMax",),
    "aten.amin": ("ReduceMin",), "aten.max": ("ReduceMax",), "aten.min": ("ReduceMin",), "aten.var": ("ReduceMean",),
    "aten.std": ("ReduceMean", "Sqrt"), "aten.argmax": ("ArgMax",), "aten.topk": ("TopK",),
    "aten.cumsum": ("CumSum",), "aten.norm": ("ReduceL2",), "aten.linalg_vector_norm": ("ReduceL2",),
    "aten.linalg_norm": ("ReduceL2",),
    "aten.max_pool2d": ("MaxPool",), "aten.max_pool2d_with_indices": ("MaxPool",), "aten.avg_pool2d": ("AveragePool",),
    "aten.avg_pool1d": ("AveragePool",), "aten.max_pool1d": ("MaxPool",),
    "aten.upsample_nearest2d": ("Resize",), "aten.upsample_bilinear2d": ("Resize",),
    "aten.upsample_bicubic2d": ("Resize",), "aten._upsample_bilinear2d_aa": ("Resize",),
    "aten.pixel_shuffle": ("DepthToSpace",), "aten.pixel_unshuffle": ("SpaceToDepth",),
    "aten.view": ("Reshape",), "aten.reshape": ("Reshape",), "aten._unsafe_view": ("Reshape",),
    "aten.flatten": ("Reshape",), "aten.unflatten": ("Reshape",), "aten.squeeze": ("Squeeze",),
    "aten.unsqueeze": ("Unsqueeze",), "aten.permute": ("Transpose",), "aten.transpose": ("Transpose",),
    "aten.t": ("Transpose",), "aten.expand": ("Expand",), "aten.repeat": ("Tile",), "aten.cat": ("Concat",),
    "aten.stack": ("Unsqueeze", "Concat"), "aten.slice": ("Slice",), "aten.narrow": ("Slice",),
    "aten.split": ("Split",), "aten.split_with_sizes": ("Split",), "aten.chunk": ("Split",),
    "aten.unbind": ("Split", "Squeeze"), "aten.select": ("Gather",), "aten.index": ("Gather",),
    "aten.index_select": ("Gather",), "aten.gather": ("GatherElements",), "aten.embedding": ("Gather",),
    "aten.roll": ("Slice", "Concat"), "aten.im2col": ("Im2Col",), "aten.col2im": ("Col2Im",),
    "aten.pad": ("Pad",), "aten.constant_pad_nd": ("Pad",), "aten.reflection_pad2d": ("Pad",),
    "aten.arange": ("Range",), "aten.scatter": ("ScatterElements",), "aten.index_put": ("ScatterND",),
    "aten._to_copy": ("Cast",), "aten.to": ("Cast",), "aten.type_as": ("Cast",),
    "aten.adaptive_avg_pool1d": ("ReduceMean",),
    # Ops that export to nothing (aliases, no-ops in eval mode).
    "aten.clone": (), "aten.alias": (), "aten.detach": (), "aten.contiguous": (), "aten.dropout": (),
    "aten.lift_fresh_copy": (), "aten.copy": (), "aten.sym_size": (), "_operator.getitem": (), "getitem": (),
}


def onnx_ops_for(node: fx.Node) -> tuple[str, ...] | None:
    """ONNX op types `node` becomes after export; None when the op kind is not in the table."""
    kind = op_kind(node)
    if kind == "aten.gelu":
        return ("Tanh", "Mul", "Add", "Pow") if arg(node, 1, "approximate", "none") == "tanh" else ("Erf",)
    if kind == "aten.adaptive_avg_pool2d":
        return ("GlobalAveragePool",) if tuple(arg(node, 1, "output_size")) == (1, 1) else ("AveragePool",)
    if kind == "aten.linear":
        x = node.args[0]
        rank = len(x.meta["val"].shape) if isinstance(x, fx.Node) and "val" in x.meta else 3
        return ("Gemm",) if rank == 2 else ATEN_TO_ONNX[kind]
    return ATEN_TO_ONNX.get(kind)


@dataclass(frozen=True)
class IllegalOp:
    op_kind: str
    onnx_op: str
    count: int
    modules: tuple[str, ...]  # up to a few source modules, for the report
    severity: str = "error"  # the profile rule's severity: error = known unsupported, warning = undocumented
    rule: str = ""  # the profile rule id, or "" for op kinds with no known ONNX mapping
    fix: str = ""


def illegal_ops(gm: fx.GraphModule, profile) -> list[IllegalOp]:
    """Op kinds left in `gm` that a rule of `profile` flags (error or warning), with the ONNX op it flags.

    Unmapped op kinds are listed with onnx_op '?' and severity 'warning' so they are never silently passed.
    """
    counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], list[str]] = {}
    for node in compute_nodes(gm):
        onnx_ops = onnx_ops_for(node)
        bad = ["?"] if onnx_ops is None else [op for op in onnx_ops if not profile.op_allowed(op)]
        for op in bad:
            key = (op_kind(node), op)
            counts[key] += 1
            where.setdefault(key, [])
            path = module_path(node) or "<root>"
            if path not in where[key] and len(where[key]) < 3:
                where[key].append(path)
    found = []
    for (kind, op), n in sorted(counts.items()):
        rule = profile.op_rule(op) if op != "?" else None
        found.append(IllegalOp(kind, op, n, tuple(where[(kind, op)]), rule.severity if rule else "warning",
                               rule.id if rule else "", rule.fix if rule else "add this op kind to the mapping"))
    return found


def op_counts(gm: fx.GraphModule) -> Counter[str]:
    """Counts of op kinds over nodes that depend on the input."""
    return Counter(op_kind(n) for n in compute_nodes(gm))


_SEVERITY_COST = {"error": 1000, "warning": 1, "note": 0}


def onnx_cost(profile, onnx_ops) -> int:
    """How badly `profile` flags a set of ONNX ops: 1000 per error, 1 per warning, 0 when legal (or no profile).

    Passes with several equivalent forms use this to pick the one the target flags least.
    """
    if profile is None:
        return 0
    total = 0
    for op in onnx_ops:
        rule = profile.op_rule(op)
        total += _SEVERITY_COST.get(rule.severity, 1) if rule is not None else 0
    return total


def attr_max(profile, op: str, attr: str) -> int | None:
    """The profile's upper bound on attribute `attr` of ONNX `op` (an `attr_range` rule), or None when it sets none."""
    for rule in getattr(profile, "rules", ()) if profile is not None else ():
        params = rule.params
        if rule.check == "attr_range" and op in params.get("ops", ()) and params.get("attr") == attr and "max" in params:
            return int(params["max"])
    return None


def batch_limit(profile) -> tuple[int, int] | None:
    """(the profile's limit on axis 0 of activations, the lowest rank it applies to), or None (trt-safe: 16, rank 3)."""
    return dim_limit(profile, 0)


def dim_limit(profile, axis: int) -> tuple[int, int] | None:
    """(the smallest error-severity `tensor_dims_max` limit on exactly axis `axis`, the lowest rank it applies to), or
    None when the profile sets none (trt-safe: batch 16 and channels 4096, from rank 3)."""
    best = None
    for rule in getattr(profile, "rules", ()) if profile is not None else ():
        if rule.check == "tensor_dims_max" and str(rule.params.get("axes")) == str(axis) and rule.severity == "error":
            cand = (int(rule.params["max"]), int(rule.params.get("min_rank", 1)))
            best = cand if best is None or cand[0] < best[0] else best
    return best


_SHAPE_CHECKS = ("tensor_dims_max", "tensor_rank_max", "tensor_batch_max", "tensor_volume_max")


def shape_breaks_rules(profile, dims) -> str | None:
    """The id of the first error-severity tensor rule of the profile (batch, channel, spatial, rank, volume limits)
    that an activation of shape `dims` would break, or None. Uses the verifier's own rule functions."""
    from attn2conv.check._rules import TENSOR_CHECKS

    for rule in getattr(profile, "rules", ()) if profile is not None else ():
        if rule.check not in _SHAPE_CHECKS or rule.severity != "error":
            continue
        if TENSOR_CHECKS[rule.check](None, list(dims), rule.params):
            return rule.id
    return None


def concat_axis_rule(profile) -> dict | None:
    """The params of the profile's error-severity rule on Concat's axis (check 'axis_in'; DLA: channel axis only)."""
    for r in getattr(profile, "rules", ()) if profile is not None else ():
        if r.check == "axis_in" and "Concat" in r.params.get("ops", ()) and r.severity == "error":
            return r.params
    return None


def concat_axis_legal(rule: dict | None, axis: int, rank: int) -> bool:
    """Whether a Concat along `axis` of rank-`rank` tensors keeps `rule` (see concat_axis_rule)."""
    if rule is None:
        return True
    needed = rule.get("rank")
    return axis % rank in {a % rank for a in rule.get("axes", ())} and (needed is None or rank == needed)


def axis_limit(profile, axis: int, rank: int) -> int | None:
    """The smallest error-severity `tensor_dims_max` limit on axis `axis` of a rank-`rank` activation, whatever form
    the rule's axes take ("1", "2:", "-3:"), or None when the profile sets none (trt-safe channels: 4096; DLA: 8192)."""
    from attn2conv.check._rules import _axes

    best = None
    for rule in getattr(profile, "rules", ()) if profile is not None else ():
        params = rule.params
        if rule.check != "tensor_dims_max" or rule.severity != "error" or rank < int(params.get("min_rank", 1)):
            continue
        if axis in _axes(str(params.get("axes")), rank):
            best = int(params["max"]) if best is None else min(best, int(params["max"]))
    return best
