"""Small helpers over torch.fx graphs captured by torch.export: provenance, constants, shapes, op names.

Passes use these so that every node they create keeps the link back to the user's code (`nn_module_stack`,
`stack_trace`, `torch_fn`), which the report and the exported ONNX use to name `blocks.3.attn`.
"""
from __future__ import annotations

import contextlib
import math
import operator
import re
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.fx as fx

aten = torch.ops.aten

PROVENANCE_KEYS = ("nn_module_stack", "stack_trace", "torch_fn", "from_node")


# --- names -----------------------------------------------------------------------------------------------------------

def op_kind(node: fx.Node) -> str:
    """'aten.linear' for aten.linear.default: the op kind the report and the legality query count."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    return getattr(target, "__name__", str(target))


def is_op(node: fx.Node, *kinds: str) -> bool:
    """True when `node` calls one of `kinds` (short names such as 'linear' or 'aten.linear')."""
    if node.op != "call_function":
        return False
    kind = op_kind(node)
    short = kind.split(".", 1)[-1]
    return any(k == kind or k == short for k in kinds)


def module_path(node: fx.Node) -> str:
    """Innermost source module of a node ('blocks.0.attn.qkv'), '' for the root module."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    # torch.export records paths like "L['self'].blocks[0].attn" in some versions, and "blocks.0.attn" in others.
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def where(node: fx.Node) -> str:
    """'blocks.0.attn.qkv (linear_3)': how findings and pass notes name a node."""
    path = module_path(node)
    return f"{path or '<root>'} ({node.name})"


# --- shapes and values -----------------------------------------------------------------------------------------------

def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape(node: Any) -> tuple[int, ...] | None:
    v = val(node)
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def get_constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor behind a get_attr node (a parameter, buffer or lifted constant); None for anything computed."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = _getattr_path(gm, node.target)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _getattr_path(obj: Any, target: str) -> Any:
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def refresh_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Recompute node.meta['val'] for every node by running the graph on fake copies of the inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in _flat_inputs(example_inputs)]
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)


def _flat_inputs(example_inputs: tuple) -> list:
    flat, _ = torch.utils._pytree.tree_flatten(example_inputs)
    return flat


# --- building nodes --------------------------------------------------------------------------------------------------

def copy_provenance(src: fx.Node, dst: fx.Node) -> None:
    for key in PROVENANCE_KEYS:
        if key in src.meta and key not in dst.meta:
            dst.meta[key] = src.meta[key]


class Builder:
    """Creates nodes before `anchor`, each carrying the anchor's provenance.

    >>> b = Builder(gm, anchor=linear_node)
    >>> y = b.call(aten.conv2d.default, x, w)
    """

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node):
        self.gm, self.anchor = gm, anchor
        self.created: list[fx.Node] = []

    def call(self, target, *args, **kwargs) -> fx.Node:
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.call_function(target, args, kwargs)
        copy_provenance(self.anchor, node)
        if "val" not in node.meta:
            node.meta["val"] = _fake_value(target, args, kwargs)
        self.created.append(node)
        return node

    def constant(self, tensor: torch.Tensor, name: str, trainable: bool = False) -> fx.Node:
        """Registers `tensor` under the anchor's module path (e.g. 'blocks.0.attn.qkv.conv_weight') and reads it."""
        qualname = add_tensor(self.gm, module_path(self.anchor), name, tensor, trainable)
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.get_attr(qualname)
        copy_provenance(self.anchor, node)
        node.meta["val"] = tensor
        self.created.append(node)
        return node


def _fake_value(target, args, kwargs):
    """The output's fake tensor, computed from the inputs' meta values, so later rewrites in the same pass see
    shapes; None when an input has no value (the pipeline re-infers every shape after the pass anyway)."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    def value(a):
        if isinstance(a, fx.Node):
            v = a.meta.get("val")
            if v is None:
                raise LookupError(a.name)
            return v
        return a

    try:
        flat_args = map_structure(value, (args, kwargs))
    except Exception:
        return None
    if target is operator.getitem and isinstance(flat_args[0][0], (list, tuple)):  # one output of a split
        try:
            return flat_args[0][0][flat_args[0][1]]
        except (IndexError, TypeError):
            return None
    fast = _meta_value(target, flat_args)
    if fast is not None:
        return fast
    try:
        mode = detect_fake_mode(torch.utils._pytree.tree_leaves(flat_args)) or FakeTensorMode(
            allow_non_fake_inputs=True)
        with mode:
            fake = torch.utils._pytree.tree_map(
                lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) and not
                isinstance(t, torch._subclasses.FakeTensor) else t, flat_args)
            return target(*fake[0], **fake[1])
    except Exception:  # shape inference is best-effort here
        return None


_META_MODE = None


def _meta_value(target, flat_args):
    """The op run on meta tensors of the inputs' layouts, the result wrapped as a fake tensor (as the guard's shape
    recorder does). Fake-tensor dispatch computes the same through the same meta kernels but converts every real
    constant and caches per call, ~10x the cost; None where the op has no meta kernel (the caller falls back)."""
    global _META_MODE
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    if not isinstance(target, torch._ops.OpOverload):
        return None
    devices, modes = set(), []

    def to_meta(t):
        if isinstance(t, torch.Tensor):
            devices.add(t.device)
            if isinstance(t, FakeTensor):
                modes.append(t.fake_mode)
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        return t

    try:
        meta_args = map_structure(to_meta, flat_args)
        # a layout pass leaves plain meta tensors in meta['val']: they say nothing about the device
        kinds = {d.type for d in devices}
        if not devices or not kinds <= {"cpu", "meta"} or len(devices - {torch.device("meta")}) > 1:
            return None
        out = target(*meta_args[0], **meta_args[1])
    except Exception:  # noqa: BLE001 - no meta kernel, or one that needs real data
        return None
    if _META_MODE is None:
        _META_MODE = FakeTensorMode(allow_non_fake_inputs=True)
    mode = modes[0] if modes else _META_MODE  # the inputs' mode, so later fake dispatch can mix them
    device = next((d for d in devices if d.type == "cpu"), torch.device("meta"))

    def fake(obj):
        if isinstance(obj, torch.Tensor):
            return FakeTensor(mode, obj, device)
        return obj if isinstance(obj, (int, float, bool)) else None

    return map_structure(fake, out)


def add_tensor(gm: fx.GraphModule, module: str, name: str, tensor: torch.Tensor, trainable: bool = False) -> str:
    """Registers a parameter (trainable) or buffer on `gm` at `module.name`, making the name unique; returns it."""
    owner = gm
    for atom in [a for a in module.split(".") if a]:
        if not hasattr(owner, atom) or not isinstance(getattr(owner, atom), torch.nn.Module):
            owner.add_module(atom, torch.nn.Module())
        owner = getattr(owner, atom)
    base, i = name, 1
    while hasattr(owner, name):
        i += 1
        name = f"{base}_{i}"
    tensor = tensor.detach().contiguous()
    if trainable and tensor.is_floating_point():
        owner.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=True))
    else:
        owner.register_buffer(name, tensor)
    return f"{module}.{name}" if module else name


def replace_uses(old: fx.Node, new: fx.Node) -> None:
    """Points every user of `old` at `new`; `new` inherits provenance it lacks."""
    copy_provenance(old, new)
    old.replace_all_uses_with(new)


def users_of(node: fx.Node) -> list[fx.Node]:
    return list(node.users)


def getitem_users(node: fx.Node, index: int) -> list[fx.Node]:
    import operator

    return [u for u in node.users if u.target is operator.getitem and u.args[1] == index]


# --- clean-up --------------------------------------------------------------------------------------------------------

def eliminate_dead_code(graph: fx.Graph) -> bool:
    """fx's dead-code elimination with each ATen op's purity asked once, not once per node (Node.is_impure inspects
    the schema every time: half of a sweep on converted Swin-T's ~2,500 nodes)."""
    known: dict = {}

    def impure(node: fx.Node) -> bool:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            return node.is_impure()
        if node.target not in known:
            known[node.target] = node.is_impure()
        return known[node.target]

    return graph.eliminate_dead_code(is_impure_node=impure)


def cleanup(gm: fx.GraphModule, recompile: bool = True) -> None:
    """Dead-code elimination, removal of tensors no node reads any more, lint and (unless told not to) recompile."""
    eliminate_dead_code(gm.graph)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used:
            owner_path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            if attr in owner._parameters:
                del owner._parameters[attr]
            elif attr in owner._buffers:
                del owner._buffers[attr]
    gm.graph.lint()
    if recompile:
        gm.recompile()


def compute_nodes(gm: fx.GraphModule) -> Iterator[fx.Node]:
    """call_function nodes that depend on a graph input (nodes of constants only are folded at export)."""
    live: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            live.add(node)
        elif node.op in ("call_function", "call_module", "call_method"):
            if any(a in live for a in node.all_input_nodes):
                live.add(node)
                if node.op == "call_function":
                    yield node


@contextlib.contextmanager
def no_grad_eval() -> Iterator[None]:
    with torch.no_grad():
        yield


def flat_tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def map_structure(fn: Callable[[Any], Any], obj: Any) -> Any:
    """`fn` applied to every leaf of nested lists (fx's immutable_list too, rebuilt as list), plain tuples and
    dicts: the structures of node arguments and op results. torch's pytree does this at ~10x the cost, which adds
    up over the thousands of nodes a pass creates."""
    if isinstance(obj, list):
        return [map_structure(fn, o) for o in obj]
    if type(obj) is tuple:
        return tuple(map_structure(fn, o) for o in obj)
    if isinstance(obj, dict):
        return {k: map_structure(fn, v) for k, v in obj.items()}
    return fn(obj)


def leaves(obj: Any) -> Iterator[Any]:
    """The leaves of `obj` in the sense of map_structure."""
    if isinstance(obj, (list, dict)) or type(obj) is tuple:
        for o in obj.values() if isinstance(obj, dict) else obj:
            yield from leaves(o)
    else:
        yield obj


def nodes_of(gm: fx.GraphModule, *kinds: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_op(n, *kinds)]


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node, with the op schema's default when absent."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def pair(v: Any) -> list[int]:
    """A 2-D conv/pool size argument (int, or a 1- or 2-element sequence) as [h, w]."""
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return v * 2 if len(v) == 1 else v


def all_inputs(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    return {i for n in nodes for i in n.all_input_nodes}


# --- channels-first layout (B, C, H, W) / (B, C, 1, N) -----------------------------------------------------------------

def to_channels_first(b: "Builder", x: fx.Node, xs: tuple[int, ...]):
    """Views a channels-last tensor (..., C) as a 4-D channels-first one; returns (x4, back) with back(y4) -> (..., C').

    (B, C) -> (B, C, 1, 1); (B, N, C) -> permute + reshape -> (B, C, 1, N); (B, H, W, C) -> permute -> (B, C, H, W);
    higher ranks fold the middle dims into N. The wrappers are the ones linear_to_conv emits, so consecutive ops'
    back/forth pairs are exact inverses that layout_cleanup cancels.
    """
    rank, c = len(xs), xs[-1]
    if rank == 2:
        x4 = b.call(aten.reshape.default, x, [xs[0], c, 1, 1])
        return x4, lambda y4, c_out=None: b.call(aten.reshape.default, y4, [xs[0], c_out or c])
    if rank == 4:
        x4 = b.call(aten.permute.default, x, [0, 3, 1, 2])
        return x4, lambda y4, c_out=None: b.call(aten.permute.default, y4, [0, 2, 3, 1])
    n = math.prod(xs[1:-1])
    x3 = x if rank == 3 else b.call(aten.reshape.default, x, [xs[0], n, c])
    x4 = b.call(aten.reshape.default, b.call(aten.permute.default, x3, [0, 2, 1]), [xs[0], c, 1, n])

    def back(y4, c_out=None):
        c2 = c_out or c
        y = b.call(aten.permute.default, b.call(aten.reshape.default, y4, [xs[0], c2, n]), [0, 2, 1])
        return y if rank == 3 else b.call(aten.reshape.default, y, [*xs[:-1], c2])

    return x4, back


# --- index maps as reshape -> slice -> permute -> reshape ------------------------------------------------------------

MAX_LAYOUT_RANK = 8  # ranks the exporters and TensorRT take for Reshape/Transpose

def express_index_map(src_shape, idx: torch.Tensor, max_lead: int | None = None) -> list[tuple] | None:
    """Ops ('reshape', shape) / ('slice', dim, start, end) / ('permute', dims) that turn a tensor of shape `src_shape`
    into y with y = x.flatten()[idx] (idx: the flat source index of every output element); None if there is none.

    The output's flat index is decomposed into mixed-radix digits, each an arithmetic run in the source (size r,
    stride s). Sorted by stride, the digits factorise the source, with fixed 'gap' factors where a slice skips
    elements. Digits are split at the axis boundaries of both shapes, so every factor lies inside one source axis and
    one target axis: the intermediates' leading axes are factors of the source's or the target's leading axis (a
    leading 1 is added when that is still above `max_lead`, e.g. a batch of 1 in front of channels). The plan is
    checked by applying it to the source's indices."""
    src_shape, tgt_shape = [int(v) for v in src_shape], [int(v) for v in idx.shape]
    total = math.prod(src_shape)
    m = idx.reshape(-1).long()
    if m.numel() == 0 or m.numel() != math.prod(tgt_shape):
        return None
    flat = m.numpy()
    offset = int(flat[0])
    # 1. digits of the target: (size, source stride, target axis), collected inner first. A digit is the longest
    # arithmetic run f[0], f[blk], f[2 blk], ... whose length divides what is left of the axis.
    digits, tstride = [], 1
    for ax in range(len(tgt_shape) - 1, -1, -1):
        n = tgt_shape[ax]
        if n > 1:
            f = flat[np.arange(n) * tstride] - offset
            blk = 1
            while blk < n:
                step, rest = int(f[blk]), n // blk
                if step <= 0:
                    return None
                ks = np.arange(rest)
                arithmetic = f[ks * blk] == ks * step
                run = rest if arithmetic.all() else int(np.argmin(arithmetic))
                best = max((r for r in range(2, run + 1) if rest % r == 0), default=1)
                if best == 1:
                    return None
                digits.append((best, step, ax))
                blk *= best
        tstride *= n
    # 2. split digits at the source's axis boundaries (inner first still)
    bounds = sorted({math.prod(src_shape[a:]) for a in range(len(src_shape) + 1)})
    split = []
    for size, stride, ax in digits:
        while True:
            cut = next((p for p in bounds if stride < p < stride * size), None)
            if cut is None:
                split.append((size, stride, ax))
                break
            if cut % stride or size % (cut // stride):
                return None
            split.append((cut // stride, stride, ax))
            size, stride = size // (cut // stride), cut
    digits = split[::-1]  # outer to inner in target order: list position = target order
    # 3. factorise the source by stride, inner first: digit factors and gap factors (fixed index)
    factors = []  # dicts: size, digit (target-order position or None), lo (source stride of the factor)

    def add_gaps(lo, hi):
        for c in [p for p in bounds if lo < p < hi] + [hi]:
            factors.append({"size": c // lo, "digit": None, "lo": lo})
            lo = c

    by_stride = sorted(range(len(digits)), key=lambda i: digits[i][1])
    unit = 1
    for pos, i in enumerate(by_stride):
        size, stride, _ = digits[i]
        if stride < unit or stride % unit:
            return None
        if stride > unit:
            add_gaps(unit, stride)
        nxt = digits[by_stride[pos + 1]][1] if pos + 1 < len(by_stride) else total
        upper = min([p for p in bounds if p >= stride * size] + [nxt])
        if upper < stride * size or upper % stride:
            return None
        factors.append({"size": upper // stride, "digit": i, "lo": stride})
        unit = upper
    if unit < total:
        if total % unit:
            return None
        add_gaps(unit, total)
    factors = factors[::-1]  # outer first
    # 4. the offset, factor by factor; each factor keeps [start, start + length)
    rem = offset
    for f in reversed(factors):
        f["start"], rem = rem % f["size"], rem // f["size"]
        f["length"] = 1 if f["digit"] is None else digits[f["digit"]][0]
        f["owner"] = next(a for a in range(len(src_shape)) if f["lo"] >= math.prod(src_shape[a + 1:]))
        if f["start"] + f["length"] > f["size"]:
            return None
    if rem:
        return None
    # 5. merge neighbours that stay neighbours (same source and target axis, unsliced) to keep ranks low
    merged = [factors[0]] if factors else []
    for f in factors[1:]:
        g = merged[-1]
        if g["digit"] is not None and f["digit"] == g["digit"] + 1 and g["owner"] == f["owner"] and \
                digits[g["digit"]][2] == digits[f["digit"]][2] and \
                (g["start"], g["length"]) == (0, g["size"]) and (f["start"], f["length"]) == (0, f["size"]):
            g["size"] *= f["size"]
            g["length"] = g["size"]
            continue
        merged.append(f)
    factors = merged
    # 6. the plan: reshape to the factors, slice, permute to target order (gaps first), reshape to the target
    fshape = [f["size"] for f in factors]
    perm = [k for k, f in enumerate(factors) if f["digit"] is None] + \
        sorted((k for k, f in enumerate(factors) if f["digit"] is not None), key=lambda k: factors[k]["digit"])
    first_after = factors[perm[0]]["length"] if perm else 1
    lead = int(max_lead is not None and bool(fshape) and (fshape[0] > max_lead or first_after > max_lead))
    plan = []
    if [1] * lead + fshape != src_shape:
        plan.append(("reshape", [1] * lead + fshape))
    for k, f in enumerate(factors):
        if (f["start"], f["length"]) != (0, f["size"]):
            plan.append(("slice", lead + k, f["start"], f["start"] + f["length"]))
    perm = [0] * lead + [lead + p for p in perm]
    if perm != list(range(len(perm))):
        plan.append(("permute", perm))
    now = [1] * lead + [f["length"] for f in factors]
    if [now[p] for p in perm] != tgt_shape:
        plan.append(("reshape", tgt_shape))
    if any(op in ("reshape", "permute") and len(v[0]) > MAX_LAYOUT_RANK for op, *v in plan):
        return None
    # 7. proof
    x = torch.arange(total).reshape(src_shape)
    for op, *val in plan:
        x = x.reshape(val[0]) if op == "reshape" else x.permute(val[0]) if op == "permute" else \
            x.narrow(val[0], val[1], val[2] - val[1])
    return plan if tuple(x.shape) == tuple(tgt_shape) and torch.equal(x, idx.long()) else None
