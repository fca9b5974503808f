"""The predicates behind profile rules.

A rule in a profile names its predicate with ``check = "<name>"``; the other keys of the rule are the predicate's
parameters. Each predicate returns ``None`` when the rule holds, or a dict of values that fill the rule's reason
(``{value}``, ``{op}``, ...) when it is broken. There are four kinds:

- op level (``op``, ``op_not_in_matrix``, ``op_outside_scope``, ``custom_op``): resolved once per op type through
  :meth:`Profile.op_rule`, so the node loop does one dict lookup per node;
- node (``NODE_CHECKS``): attributes and inputs of one node, run only for the op types the rule names;
- tensor (``TENSOR_CHECKS``): the element type and dims of one tensor, run once per distinct tensor type;
- graph (``GRAPH_CHECKS``): once per model.
"""

from __future__ import annotations

from operator import methodcaller
from typing import Any, Callable

import onnx

DTYPE_NAMES = {v: k for k, v in onnx.TensorProto.DataType.items()}
DTYPE_CODES = dict(onnx.TensorProto.DataType.items())
# Short names used by the op matrices in the profiles.
SHORT_DTYPES = {
    "F32": "FLOAT", "F16": "FLOAT16", "BF16": "BFLOAT16", "I32": "INT32", "I64": "INT64", "I8": "INT8", "U8": "UINT8",
    "B": "BOOL", "FP8": "FLOAT8E4M3FN", "I4": "INT4",
}
_A = onnx.AttributeProto
_SERIALIZE = methodcaller("SerializeToString")
_MISSING = object()

Dims = tuple  # of int (static), str (symbolic) or None (unknown)


def decode_type(tp: onnx.TypeProto) -> tuple[int, Dims | None] | None:
    """(elem_type, dims) of a tensor type; dims None when the rank is unknown. None for non-tensor types."""
    if not tp.HasField("tensor_type"):
        return None
    tt = tp.tensor_type
    if not tt.HasField("shape"):
        return tt.elem_type, None
    dims = []
    for d in tt.shape.dim:
        v = d.dim_value
        if v > 0 or (v == 0 and d.HasField("dim_value")):
            dims.append(v)
        else:
            dims.append(d.dim_param or None)
    return tt.elem_type, tuple(dims)


# Attribute types the predicates rely on; a node that breaks them is malformed ONNX (an input error).
_EXPECTED_ATTR = {
    "kernel_shape": _A.INTS, "strides": _A.INTS, "pads": _A.INTS, "dilations": _A.INTS, "group": _A.INT,
    "axis": _A.INT, "training_mode": _A.INT, "mode": _A.STRING, "coordinate_transformation_mode": _A.STRING,
    "nearest_mode": _A.STRING,
}


class MalformedNode(ValueError):
    pass


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        t = a.type
        want = _EXPECTED_ATTR.get(a.name)
        if want is not None and t != want:
            raise MalformedNode(f"attribute {a.name!r} has type {_A.AttributeType.Name(t) if t in _A.AttributeType.values() else t}, expected {_A.AttributeType.Name(want)}")
        if t == _A.INT:
            out[a.name] = a.i
        elif t == _A.INTS:
            out[a.name] = list(a.ints)
        elif t == _A.FLOAT:
            out[a.name] = a.f
        elif t == _A.STRING:
            out[a.name] = a.s.decode("utf-8", "replace")
        elif t == _A.FLOATS:
            out[a.name] = list(a.floats)
        else:
            out[a.name] = t  # graphs/tensors: presence is enough for the rules here
    return out


class Context:
    """What node predicates may ask about the graph; every table is built on first use only."""

    def __init__(self, graphs: list[onnx.GraphProto], indexes: list | None = None):
        self._graphs = graphs
        self._indexes = indexes  # GraphIndex per graph (names and serialized types already read), or None
        self._types: dict[str, Any] | None = None  # name -> TypeProto or its serialized bytes
        self._decoded: dict[str, Any] = {}
        self._by_key: dict[bytes, Any] = {}
        self._inits: dict[str, tuple[int, tuple[int, ...]]] | None = None
        self.constants: set[str] = set()  # outputs of Constant nodes, filled by the node loop (topological order)
        self._attrs: dict[tuple[bytes, ...], dict[str, Any]] = {}

    def attrs(self, node: onnx.NodeProto) -> dict[str, Any]:
        """node_attrs(node), decoded (and validated) once per distinct attribute list. Shared: do not mutate."""
        key = tuple(map(_SERIALIZE, node.attribute))
        hit = self._attrs.get(key)
        if hit is None:
            hit = self._attrs[key] = node_attrs(node)
        return hit

    def _init_table(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        if self._inits is None:
            self._inits = {t.name: (t.data_type, tuple(t.dims)) for g in self._graphs for t in g.initializer}
        return self._inits

    def initializer_names(self):
        return self._init_table().keys()

    def is_const(self, name: str) -> bool:
        return name in self.constants or name in self._init_table()

    def tensor(self, name: str) -> tuple[int, Dims | None] | None:
        """(elem_type, dims) of a tensor by name, from initializers, graph I/O and value_info."""
        hit = self._decoded.get(name, _MISSING)
        if hit is not _MISSING:
            return hit
        init = self._init_table().get(name)
        if init is not None:
            self._decoded[name] = init
            return init
        if self._types is None:
            self._types = {}
            for i, g in enumerate(self._graphs):
                for field_name in ("input", "output", "value_info"):
                    if self._indexes is not None:  # later entries win, as in the loop below
                        idx = self._indexes[i]
                        self._types.update(zip(idx.names(field_name), idx.type_keys(field_name)))
                    else:
                        for v in getattr(g, field_name):
                            self._types[v.name] = v.type
        tp = self._types.get(name)
        if tp is None:
            out = None
        elif isinstance(tp, bytes):
            if tp not in self._by_key:
                self._by_key[tp] = decode_type(onnx.TypeProto.FromString(tp))
            out = self._by_key[tp]
        else:
            out = decode_type(tp)
        self._decoded[name] = out
        return out

    def dims(self, name: str) -> Dims | None:
        t = self.tensor(name) if name else None
        return t[1] if t else None

    def const_array(self, name: str):
        """The value of an initializer or Constant output as a numpy array (None if it is not a constant)."""
        return _graph_tables(self._graphs).const_array(name)

    def producer(self, name: str) -> onnx.NodeProto | None:
        return _graph_tables(self._graphs).producer.get(name)

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return _graph_tables(self._graphs).consumers.get(name, [])


class _Tables:
    """Producers, consumers, constants and element types of a model's graphs, built once per check on demand
    (only the precision rules need them, and only on graphs that hold FP16, INT8 or Q/DQ)."""

    def __init__(self, graphs: list[onnx.GraphProto]):
        self.graphs = graphs
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self._const: dict[str, Any] = {}
        self.types: dict[str, int] = {}
        for g in graphs:
            for t in g.initializer:
                self._const[t.name] = t
                self.types[t.name] = t.data_type
            for seq in (g.input, g.output, g.value_info):
                for v in seq:
                    if v.type.HasField("tensor_type"):
                        self.types.setdefault(v.name, v.type.tensor_type.elem_type)
            for n in g.node:
                for o in n.output:
                    self.producer[o] = n
                for i in n.input:
                    if i:
                        self.consumers.setdefault(i, []).append(n)
                if n.op_type == "Constant":
                    for a in n.attribute:
                        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                            self._const[n.output[0]] = a.t
                            self.types[n.output[0]] = a.t.data_type

    def const_array(self, name: str):
        t = self._const.get(name)
        if t is None:
            return None
        if not isinstance(t, onnx.TensorProto):
            return t
        try:
            from onnx import numpy_helper

            arr = numpy_helper.to_array(t) if not t.external_data else None
        except Exception:  # noqa: BLE001 - a malformed tensor is judged elsewhere
            arr = None
        self._const[name] = arr
        return arr

    def is_const(self, name: str) -> bool:
        return name in self._const


_TABLES: dict[int, tuple[Any, _Tables]] = {}


def release_tables() -> None:
    _TABLES.clear()


def _graph_tables(graphs: list[onnx.GraphProto]) -> _Tables:
    key = id(graphs[0])
    hit = _TABLES.get(key)
    if hit is None or hit[0] is not graphs[0]:
        _TABLES.clear()  # one model at a time
        hit = _TABLES[key] = (graphs[0], _Tables(graphs))
    return hit[1]


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _spatial_rank(ctx: Context, node: onnx.NodeProto, attrs: dict[str, Any]) -> int | None:
    if "kernel_shape" in attrs:
        return len(attrs["kernel_shape"])
    if node.op_type in ("Conv", "ConvTranspose"):
        w = ctx.dims(_input(node, 1))
        if w is not None:
            return len(w) - 2
    x = ctx.dims(_input(node, 0))
    return len(x) - 2 if x is not None else None


def _kernel(ctx: Context, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[int] | None:
    if "kernel_shape" in attrs:
        return list(attrs["kernel_shape"])
    w = ctx.dims(_input(node, 1)) if node.op_type in ("Conv", "ConvTranspose") else None
    if w is not None and all(isinstance(d, int) for d in w[2:]):
        return list(w[2:])
    return None


# -- node predicates -------------------------------------------------------------------------------------------------
_ATTR_DEFAULTS = {"strides": 1, "dilations": 1, "pads": 0, "group": 1}


def attr_range(ctx: Context, node, attrs, p):
    name = p["attr"]
    value = attrs.get(name)
    if value is None:
        if name == "kernel_shape":
            value = _kernel(ctx, node, attrs)
        elif name in _ATTR_DEFAULTS:
            value = _ATTR_DEFAULTS[name]
        if value is None:
            return None
    values = value if isinstance(value, list) else [value]
    bad = [v for v in values if not (p["min"] <= v <= p["max"])]
    if bad:
        return {"value": value if isinstance(value, list) else value}
    return None


def attr_in(ctx, node, attrs, p):
    value = attrs.get(p["attr"], p.get("default"))
    if value is not None and value not in p["values"]:
        return {"value": value}
    return None


def spatial_dims(ctx, node, attrs, p):
    n = _spatial_rank(ctx, node, attrs)
    if n is not None and n not in p["allowed"]:
        return {"n": n}
    return None


def io_rank_in(ctx, node, attrs, p):
    """The data input and the first output have a rank in `allowed` (shapes unknown: no finding)."""
    for name in (_input(node, 0), node.output[0] if node.output else ""):
        dims = ctx.dims(name)
        if dims is not None and len(dims) not in p["allowed"]:
            return {"rank": len(dims)}
    return None


def pad_lt_kernel(ctx, node, attrs, p):
    pads = attrs.get("pads")
    kernel = _kernel(ctx, node, attrs)
    if not pads or not kernel or len(pads) != 2 * len(kernel):
        return None
    k = len(kernel)
    if any(pads[i] >= kernel[i % k] for i in range(2 * k)):
        return {"pads": pads, "kernel": kernel}
    return None


def input_const(ctx, node, attrs, p):
    for i in p["inputs"].get(node.op_type, ()):
        name = _input(node, i)
        if name and not ctx.is_const(name):
            return {"index": i, "input": name}
    return None


def input_absent(ctx, node, attrs, p):
    name = _input(node, p["index"])
    if not name:
        return None
    dims = ctx.dims(name)
    if dims is not None and len(dims) == 1 and dims[0] == 0:  # an empty tensor counts as absent
        return None
    return {"input": name}


def outputs_max(ctx, node, attrs, p):
    used = sum(1 for o in node.output if o)
    if used > p["max"]:
        return {"n": used}
    return None


def inputs_max(ctx, node, attrs, p):
    n = sum(1 for i in node.input if i)
    if n > p["max"]:
        return {"n": n}
    return None


def input_dtype_not(ctx, node, attrs, p):
    for name in node.input[:2]:
        t = ctx.tensor(name)
        if t is not None and DTYPE_NAMES.get(t[0]) in p["dtypes"]:
            return {"dtype": DTYPE_NAMES[t[0]]}
    return None


def _axis(attrs, p, rank):
    axis = attrs.get("axis", p.get("default", 1))
    return axis + rank if axis < 0 else axis


def axis_in(ctx, node, attrs, p):
    dims = ctx.dims(_input(node, 0))
    if dims is None:
        return None
    r = len(dims)
    axis = _axis(attrs, p, r)
    want_rank = p.get("rank")
    allowed = {a + r if a < 0 else a for a in p["axes"]}
    if (want_rank is not None and r != want_rank) or axis not in allowed:
        return {"axis": attrs.get("axis", p.get("default", 1)), "r": r}
    return None


def axis_dim_max(ctx, node, attrs, p):
    dims = ctx.dims(_input(node, 0))
    if not dims:
        return None
    axis = _axis(attrs, p, len(dims))
    if 0 <= axis < len(dims) and isinstance(dims[axis], int) and dims[axis] > p["max"]:
        return {"value": dims[axis]}
    return None


def weight_dim_range(ctx, node, attrs, p):
    dims = ctx.dims(_input(node, p["index"]))
    if dims is None or len(dims) <= p["dim"] or not isinstance(dims[p["dim"]], int):
        return None
    v = dims[p["dim"]]
    if not p["min"] <= v <= p["max"]:
        return {"value": v}
    return None


_DLA_RESIZE_OK = {
    ("nearest", "asymmetric", "floor"),
    ("nearest", "half_pixel", "round_prefer_floor"),
    ("nearest", "half_pixel", "round_prefer_ceil"),
    ("linear", "half_pixel", "*"),
    ("linear", "pytorch_half_pixel", "*"),
}


def dla_resize(ctx, node, attrs, p):
    mode = attrs.get("mode", "nearest")
    if node.op_type == "Upsample":
        coord, nearest = "asymmetric", "floor"
    else:
        coord = attrs.get("coordinate_transformation_mode", "half_pixel")
        nearest = attrs.get("nearest_mode", "round_prefer_floor")
    key = (mode, coord, nearest if mode == "nearest" else "*")
    if key not in _DLA_RESIZE_OK:
        return {"mode": mode, "coord": coord, "nearest": nearest if mode == "nearest" else "-"}
    return None


def _scalar_or_none(arr):
    return None if arr is None else arr.reshape(-1)


def qdq_symmetric(ctx, node, attrs, p):
    """Q/DQ for TensorRT: zero point absent or all zeros; scales finite and strictly positive."""
    zp = _input(node, 2)
    if zp:
        values = ctx.const_array(zp)
        if values is not None and values.size and (values != 0).any():
            return {"what": f"zero point {values.reshape(-1)[:4].tolist()} is not 0"}
    scale = ctx.const_array(_input(node, 1))
    if scale is not None and scale.size:
        import numpy as np

        bad = ~np.isfinite(scale) | (scale <= 0)
        if bad.any():
            return {"what": f"scale {scale.reshape(-1)[bad.reshape(-1)][:4].tolist()} is not finite and positive"}
    return None


_WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1, "MatMul": -1, "Gemm": None}


def qdq_axis(ctx, node, attrs, p):
    """Per-tensor scales for activations; per-channel scales only for constant weights, along the output-channel
    axis of the operation that uses them (Conv: 0, ConvTranspose: 1, MatMul with a constant B: the last)."""
    dims = ctx.dims(_input(node, 1))
    if dims is None or len(dims) == 0 or (len(dims) == 1 and dims[0] == 1):
        return None
    if len(dims) > 1:
        return {"what": f"a rank-{len(dims)} (block) scale; INT8 takes per-tensor or per-channel scales"}
    data = _input(node, 0)
    weight = ctx.is_const(data) or _const_through_q(ctx, data)
    if not weight:
        return {"what": f"a per-channel scale ({dims[0]} values) on an activation"}
    out = node.output[0] if node.output else ""
    users = ctx.consumers(out)
    if node.op_type == "QuantizeLinear":  # Q on a float weight: look through the DequantizeLinear after it
        users = [u for d in users if d.op_type == "DequantizeLinear" for u in ctx.consumers(d.output[0])]
    wdims = ctx.dims(data)
    rank = len(wdims) if wdims is not None else None
    axis = attrs.get("axis", 1)
    if rank is not None and axis < 0:
        axis += rank
    for u in users:
        want = _WEIGHT_AXIS.get(u.op_type, "other")
        if want == "other" or want is None:
            continue
        if want == -1 and rank is not None:
            want = rank - 1
        if axis != want:
            return {"what": f"weight quantized along axis {attrs.get('axis', 1)}; {u.op_type} needs its "
                            f"output-channel axis {want}"}
    return None


def _const_through_q(ctx, name: str) -> bool:
    prod = ctx.producer(name)
    return prod is not None and prod.op_type == "QuantizeLinear" and ctx.is_const(_input(prod, 0))


_WEIGHTED = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
_EPILOGUE = frozenset({"BatchNormalization", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "PRelu"})


def qdq_epilogue(ctx, node, attrs, p):
    """A Q/DQ pair between a weighted op and its bias/BatchNorm/activation: TensorRT fuses Conv + epilogue into one
    INT8 kernel only when the quantization comes after the epilogue."""
    src = ctx.producer(_input(node, 0))
    if src is None or src.op_type not in _WEIGHTED:
        return None
    for dq in ctx.consumers(node.output[0] if node.output else ""):
        if dq.op_type != "DequantizeLinear":
            continue
        for u in ctx.consumers(dq.output[0]):
            bias_add = u.op_type == "Add" and any(ctx.is_const(i) for i in u.input if i != dq.output[0])
            if u.op_type in _EPILOGUE or bias_add:
                return {"producer": src.op_type, "after": "bias Add" if bias_add else u.op_type}
    return None


NODE_CHECKS: dict[str, Callable] = {
    "attr_range": attr_range, "attr_in": attr_in, "spatial_dims": spatial_dims, "io_rank_in": io_rank_in,
    "pad_lt_kernel": pad_lt_kernel,
    "input_const": input_const, "input_absent": input_absent, "outputs_max": outputs_max, "inputs_max": inputs_max,
    "input_dtype_not": input_dtype_not, "axis_in": axis_in, "axis_dim_max": axis_dim_max,
    "weight_dim_range": weight_dim_range, "dla_resize": dla_resize, "qdq_symmetric": qdq_symmetric,
    "qdq_axis": qdq_axis, "qdq_epilogue": qdq_epilogue,
}


def node_check_ops(rule) -> list[str]:
    if rule.check == "input_const":
        return list(rule.params["inputs"])
    return list(rule.params.get("ops", ()))


# -- tensor predicates (elem, dims) ----------------------------------------------------------------------------------
def _volume(dims):
    v = 1
    for d in dims:
        v *= d
    return v


def tensor_volume_max(elem, dims, p):
    if dims and all(isinstance(d, int) for d in dims):
        v = _volume(dims)
        if v > p["max"]:
            return {"volume": v}
    return None


def tensor_rank_max(elem, dims, p):
    if dims is not None and len(dims) > p["max"]:
        return {"rank": len(dims)}
    return None


def tensor_dtype(elem, dims, p):
    name = DTYPE_NAMES.get(elem, str(elem))
    if elem and name not in p["allowed"]:
        return {"dtype": name}
    return None


def tensor_static(elem, dims, p):
    if dims is None:
        return None  # unknown rank: nothing recorded, nothing to judge
    bad = [d if d is not None else "?" for d in dims if not isinstance(d, int)]
    if bad:
        return {"dims": ", ".join(map(str, bad))}
    return None


def _axes(spec: str, rank: int) -> range | list[int]:
    if ":" in spec:
        start = int(spec.split(":")[0] or 0)
        return range(start + rank if start < 0 else start, rank)
    i = int(spec)
    return [i + rank if i < 0 else i]


def tensor_dims_max(elem, dims, p):
    if dims is None or len(dims) < p.get("min_rank", 1):
        return None
    for i in _axes(str(p["axes"]), len(dims)):
        if 0 <= i < len(dims) and isinstance(dims[i], int) and dims[i] > p["max"]:
            return {"value": dims[i]}
    return None


def tensor_batch_max(elem, dims, p):
    keep = p.get("keep", 3)
    if dims is None or len(dims) <= keep:
        return None
    lead = dims[: len(dims) - keep]
    if all(isinstance(d, int) for d in lead) and _volume(lead) > p["max"]:
        return {"value": _volume(lead)}
    return None


TENSOR_CHECKS: dict[str, Callable] = {
    "tensor_volume_max": tensor_volume_max, "tensor_rank_max": tensor_rank_max, "tensor_dtype": tensor_dtype,
    "tensor_static": tensor_static, "tensor_dims_max": tensor_dims_max, "tensor_batch_max": tensor_batch_max,
}
# Rules about activations only (weights have other layouts: an OIHW weight is not a batch of 64).
ACTIVATION_ONLY = frozenset({"tensor_static", "tensor_dims_max", "tensor_batch_max"})


# -- graph predicates: yield (tensor or None, values) ----------------------------------------------------------------
def opset(model: onnx.ModelProto, profile, p, facts: GraphFacts | None = None):
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and not profile.opset_min <= o.version <= profile.opset_max:
            yield None, {"opset": o.version, "opset_min": profile.opset_min, "opset_max": profile.opset_max}


def io_dtype(model: onnx.ModelProto, profile, p, facts: GraphFacts | None = None):
    g = model.graph
    inits = {t.name for t in g.initializer} if g.initializer else set()
    for role, seq in (("input", g.input), ("output", g.output)):
        for v in seq:
            if v.name in inits:
                continue
            t = decode_type(v.type)
            name = DTYPE_NAMES.get(t[0]) if t else None
            if t and t[0] and name not in p["allowed"]:
                yield v.name, {"role": role, "tensor": v.name, "dtype": name or t[0]}


def graph_float(model: onnx.ModelProto, profile, p, facts: GraphFacts | None = None):
    g = model.graph
    seen = set()
    for seq in (g.input, g.output):
        for v in seq:
            t = decode_type(v.type)
            if t:
                seen.add(DTYPE_NAMES.get(t[0]))
    for t in g.initializer:
        seen.add(DTYPE_NAMES.get(t.data_type))
    hits = [d for d in p["dtypes"] if d in seen]
    if hits:
        yield None, {"dtype": "/".join(hits)}


_T = onnx.TensorProto
_NOT_COMPUTE = frozenset({"Cast", "CastLike", "Constant", "QuantizeLinear", "DequantizeLinear", "Shape", "Size",
                          "Identity"})


def _model_graphs(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    return [model.graph]


def _holds(model: onnx.ModelProto, code: int, facts: GraphFacts | None = None) -> bool:
    """Cheap pre-test: does any recorded tensor type (I/O, value_info, initializers) have element type `code`?"""
    if facts is not None:
        return code in facts.dtypes
    g = model.graph
    if any(t.data_type == code for t in g.initializer):
        return True
    return any(v.type.tensor_type.elem_type == code for seq in (g.input, g.output, g.value_info) for v in seq
               if v.type.HasField("tensor_type"))


class GraphFacts:
    """Whole-graph facts for the graph predicates, computed once per check from the engine's index."""

    def __init__(self, index):
        self._index = index
        self._dtypes: frozenset[int] | None = None

    @property
    def dtypes(self) -> frozenset[int]:
        """Element types of the main graph's recorded tensor types (I/O, value_info) and initializers."""
        if self._dtypes is None:
            g = self._index.graph
            codes = {t.data_type for t in g.initializer}
            for field_name in ("input", "output", "value_info"):
                for key in set(self._index.type_keys(field_name)):
                    tp = onnx.TypeProto.FromString(key)
                    if tp.HasField("tensor_type"):
                        codes.add(tp.tensor_type.elem_type)
            self._dtypes = frozenset(codes)
        return self._dtypes


def _plain_1x1_conv(tables: _Tables, node: onnx.NodeProto) -> bool:
    if node.op_type != "Conv":
        return False
    attrs = node_attrs(node)
    w = tables.const_array(_input(node, 1))
    kernel = attrs.get("kernel_shape") or (list(w.shape[2:]) if w is not None else None)
    return (kernel is not None and all(k == 1 for k in kernel) and all(v == 1 for v in attrs.get("strides", [1]))
            and all(v == 0 for v in attrs.get("pads", [0])) and all(v == 1 for v in attrs.get("dilations", [1]))
            and attrs.get("group", 1) == 1)


def fp32_compute(model: onnx.ModelProto, profile, p, facts: GraphFacts | None = None):
    """In a graph that computes in FP16, the nodes that still compute in FP32 (a float32 data input), except the
    documented exception (safety: 1x1 convolutions with stride 1, no padding, no dilation, one group)."""
    if not _holds(model, _T.FLOAT16, facts):
        return
    tables = _graph_tables(_model_graphs(model))
    for node in model.graph.node:
        if node.op_type in _NOT_COMPUTE or not node.input or not node.input[0]:
            continue
        if tables.types.get(node.input[0]) != _T.FLOAT:
            continue
        if p.get("allow_conv1x1") and _plain_1x1_conv(tables, node):
            continue
        yield node, {"dtype": "FLOAT"}


def fp16_eps(model: onnx.ModelProto, profile, p, facts: GraphFacts | None = None):
    """An FP16 constant below FP16's smallest normal (2^-14) added right before a Sqrt, Reciprocal or divisor (the
    epsilon of a normalisation, as an Add or as the bias of the variance-mean conv)."""
    if not _holds(model, _T.FLOAT16, facts):
        return
    tables = _graph_tables(_model_graphs(model))
    limit = float(p.get("min_normal", 2.0 ** -14))
    for node in model.graph.node:
        if node.op_type in ("Sqrt", "Reciprocal"):
            denom = _input(node, 0)
        elif node.op_type == "Div":
            denom = _input(node, 1)
        else:
            continue
        src = tables.producer.get(denom)
        if src is None:
            continue
        names = list(src.input) if src.op_type == "Add" else (list(src.input[2:3]) if src.op_type == "Conv" else [])
        for name in names:
            if tables.types.get(name) != _T.FLOAT16:
                continue
            v = tables.const_array(name)
            if v is None or not v.size:
                continue
            a = abs(v.astype("float64")).reshape(-1)
            small = a[(a > 0) & (a < limit)]
            if small.size:
                yield src, {"eps": f"{float(small[0]):.3g}", "user": node.op_type}
                break


def int8_unscaled(model: onnx.ModelProto, profile, p, facts: GraphFacts | None = None):
    """INT8 tensors read by anything but a DequantizeLinear: integer data without a scale."""
    if not _holds(model, _T.INT8, facts):
        return
    tables = _graph_tables(_model_graphs(model))
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            continue
        data = node.input[:1] if node.op_type == "QuantizeLinear" else node.input  # its zero point is INT8 by design
        for name in data:
            if name and tables.types.get(name) == _T.INT8:
                yield node, {"tensor": name}
                break


def int8_ranges(model: onnx.ModelProto, profile, p, facts: GraphFacts | None = None):
    """A model declared INT8 without Q/DQ (implicit quantization) must carry a dynamic range for the tensors it
    quantizes (metadata ``attn2conv.int8.ranges``: JSON {tensor: amax}), each finite, positive, and in the graph."""
    meta = {m.key: m.value for m in model.metadata_props}
    if meta.get("attn2conv.precision") != "int8":
        return
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return  # explicit quantization: the scales are in the graph (and other rules judge them)
    raw = meta.get(p.get("key", "attn2conv.int8.ranges"))
    if not raw:
        yield None, {"what": "no dynamic-range table (metadata attn2conv.int8.ranges)"}
        return
    import json
    import math

    try:
        ranges = json.loads(raw)
        assert isinstance(ranges, dict) and ranges
    except (ValueError, AssertionError):
        yield None, {"what": "an unreadable dynamic-range table"}
        return
    tables = _graph_tables(_model_graphs(model))
    for name, amax in sorted(ranges.items()):
        if name not in tables.producer and name not in tables.types:
            yield name, {"what": f"a range for {name}, which is not a tensor of the graph"}
        elif not isinstance(amax, (int, float)) or not math.isfinite(amax) or amax <= 0:
            yield name, {"what": f"range {amax!r} for {name} (must be finite and positive)"}


GRAPH_CHECKS: dict[str, Callable] = {"opset": opset, "io_dtype": io_dtype, "graph_float": graph_float,
                                     "fp32_compute": fp32_compute, "fp16_eps": fp16_eps,
                                     "int8_unscaled": int8_unscaled, "int8_ranges": int8_ranges}
OP_LEVEL = frozenset({"op", "op_not_in_matrix", "op_outside_scope", "custom_op"})
SPECIAL = frozenset({"op_dtype"})  # handled by the engine (needs the profile's op matrix)
KNOWN_CHECKS = frozenset(NODE_CHECKS) | frozenset(TENSOR_CHECKS) | frozenset(GRAPH_CHECKS) | OP_LEVEL | SPECIAL
