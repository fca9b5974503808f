"""The rules engine: one pass over the nodes, one pass over the distinct tensor types.

Lookup tables are compiled once per profile (op type -> op-level rule and node predicates). The node loop reads
only ``op_type`` for nodes no rule is interested in; attributes, inputs and exporter metadata are read for the
nodes that rules look at or that produce findings.

Files and bytes that _wire decodes take ``run_rules_wire`` instead: the same rules over the decoded arrays, with
nodes of one op type grouped by a signature (attribute bytes, input/output counts, per input slot the resolved
tensor type and constness) and each group judged on its first node; only groups with a finding are judged node
by node. Anything that path does not cover (shape inference to run, precision rules that walk the nodes, Q/DQ
predicates that read producers and values) returns None and the parsed model goes through ``run_rules``. The
checker's tests run both paths on every model they check (``_CROSS_CHECK``).
"""

from __future__ import annotations

import ast
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from itertools import compress
from operator import attrgetter
from pathlib import Path
from typing import Any

import onnx

from attn2conv.targets import SEVERITIES, Profile, ProfileError, resolve_target

from . import _rules as R
from ._load import GraphIndex, InputError, LoadedModel, _static_type, infer_shapes, read_model

_OUTPUTS = attrgetter("output")
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
# dtypes every op accepts in practice; only tensors of other types are considered by the op_dtype rule
_PLAIN_DTYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16})
# what the parser does before looking at the op matrix (limited support types are cast down)
_CAST_DOWN = {"INT64": "INT32", "DOUBLE": "FLOAT"}


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str
    node: str
    op: str
    reason: str
    fix: str
    module: str | None = None
    source: str | None = None  # "file.py:123" of the Python line that created the node, when recorded
    tensor: str | None = None
    order: int = field(default=-1, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("order")
        return d


@dataclass
class _Compiled:
    profile: Profile
    node_rules: dict[str, list[tuple[Any, Any]]]  # op type -> [(rule, predicate)]
    tensor_rules: list[tuple[Any, Any]]
    graph_rules: list[tuple[Any, Any]]
    op_dtype_rule: Any
    allowed_dtypes: dict[str, frozenset[str]]  # op type -> dtype names (after casting down)


@lru_cache(maxsize=16)
def _compile(profile: Profile) -> _Compiled:
    node_rules: dict[str, list] = {}
    tensor_rules, graph_rules, op_dtype_rule = [], [], None
    for rule in profile.rules:
        c = rule.check
        if c in R.NODE_CHECKS:
            for op in R.node_check_ops(rule):
                node_rules.setdefault(op, []).append((rule, R.NODE_CHECKS[c]))
        elif c in R.TENSOR_CHECKS:
            tensor_rules.append((rule, R.TENSOR_CHECKS[c]))
        elif c in R.GRAPH_CHECKS:
            graph_rules.append((rule, R.GRAPH_CHECKS[c]))
        elif c == "op_dtype":
            op_dtype_rule = rule
        elif c not in R.OP_LEVEL:
            raise ProfileError(f"profile {profile.id}: rule {rule.id} uses unknown check {c!r}")
    allowed = {op: frozenset(R.SHORT_DTYPES.get(t, t) for t in types) for op, types in profile.ops.items()}
    return _Compiled(profile, node_rules, tensor_rules, graph_rules, op_dtype_rule, allowed)


def _provenance(node: onnx.NodeProto) -> tuple[str | None, str | None]:
    """(module path, 'file:line') from the exporter's metadata (torch.onnx dynamo writes pkg.torch.onnx.*)."""
    meta = {p.key: p.value for p in node.metadata_props}
    if not meta:
        return None, None
    module = None
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            parts = ast.literal_eval(scopes)
            if isinstance(parts, (list, tuple)) and len(parts) >= 2:
                module = str(parts[-2]) or None
        except (ValueError, SyntaxError):
            pass
    if module is None and meta.get("namespace"):  # ": cls/blocks.0: cls/.../op: aten.op" (older exporters)
        segs = [s.split(":")[0].strip() for s in meta["namespace"].split("/")]
        segs = [s for s in segs[:-1] if s]
        module = segs[-1] if segs else None
    source = None
    trace = meta.get("pkg.torch.onnx.stack_trace")
    if trace:
        frames = _FRAME.findall(trace)
        user = [f for f in frames if "/torch/" not in f[0].replace("\\", "/")]
        pick = (user or frames)[-1] if frames else None
        if pick:
            source = f"{pick[0]}:{pick[1]}"
    return module, source


class _Collector:
    def __init__(self, profile: Profile):
        self.profile = profile
        self.items: list[Finding] = []

    def add(self, rule, node: onnx.NodeProto | None, values: dict[str, Any], order: int, *, op: str = "",
            name: str = "", tensor: str | None = None) -> None:
        module = source = None
        if node is not None:
            op = node.op_type
            name = node.name or f"<{op} #{order}>"
            module, source = _provenance(node)
        reason = rule.format_reason(**{"op": op, "version": self.profile.version, "tensor": tensor or "", **values})
        self.items.append(Finding(rule=rule.id, severity=rule.severity, node=name, op=op, reason=reason, fix=rule.fix,
                                  module=module, source=source, tensor=tensor, order=order))


def _graphs(graph: onnx.GraphProto, depth: int = 0) -> list[onnx.GraphProto]:
    """The graph and its nested subgraphs, in order (only ops that carry subgraphs are opened)."""
    out = [graph]
    for node in graph.node:
        if node.op_type in _SUBGRAPH_OPS:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    out.extend(_graphs(a.g, depth + 1))
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        out.extend(_graphs(g, depth + 1))
    return out


def _judge_type(key: bytes, rules) -> tuple[list, int]:
    """(failing (rule, values) pairs, element type) of one serialized TypeProto."""
    decoded = R.decode_type(onnx.TypeProto.FromString(key))
    if decoded is None:
        return [], 0
    elem, dims = decoded
    fails = []
    for rule, fn in rules:
        values = fn(elem, dims, rule.params)
        if values is not None:
            fails.append((rule, values))
    return fails, elem


def _weight_hits(t: onnx.TensorProto, weight_rules) -> list[tuple]:
    """(rule, initializer name, values) for every weight rule the initializer `t` breaks (shape and dtype only)."""
    dims = tuple(t.dims)
    return [(rule, t.name, values) for rule, fn in weight_rules
            if (values := fn(t.data_type, dims, rule.params)) is not None]


def _node_checks(ctx, node, op: str, order: int, checks, dtype_rule, odd_dtype: dict, comp) -> list[tuple]:
    """(rule, values) for every attribute/shape check of `node` that fails, then its dtype rule (when `dtype_rule` is
    given and the first input has a dtype the op does not take). Shared by the protobuf and the decoded paths."""
    hits = []
    if checks:
        try:
            attrs = ctx.attrs(node)
            for rule, fn in checks:
                values = fn(ctx, node, attrs, rule.params)
                if values is not None:
                    hits.append((rule, values))
        except (R.MalformedNode, TypeError, ValueError, IndexError, KeyError, OverflowError) as exc:
            msg = " ".join(str(exc).split())[:160]
            raise InputError(f"node {node.name or order} ({op}) is malformed: {msg}") from None
    if dtype_rule is not None and node.input:
        code = odd_dtype.get(node.input[0])
        if code is not None:
            name = R.DTYPE_NAMES.get(code, str(code))
            allowed = comp.allowed_dtypes.get(op, frozenset())
            if _CAST_DOWN.get(name, name) not in allowed:
                hits.append((dtype_rule, {"dtype": name, "allowed": "/".join(sorted(allowed)) or "none"}))
    return hits


def run_rules(model: onnx.ModelProto, profile: Profile, has_subgraphs: bool = True,
              index: GraphIndex | None = None) -> list[Finding]:
    """All findings of `profile` on `model`, in graph order.

    Per-element work is kept to what can break a rule: node op types are grouped, and only nodes whose op type
    has an op-level rule, node predicates, a dtype question or is a Constant are opened; tensor types are judged
    once per distinct type, and tensor names are read only for types that break a rule.
    """
    comp = _compile(profile)
    out = _Collector(profile)
    graphs = _graphs(model.graph) if has_subgraphs else [model.graph]
    main = index if index is not None and index.graph is model.graph else GraphIndex(model.graph)
    indexes = [main] + [GraphIndex(g) for g in graphs[1:]]
    ctx = R.Context(graphs, indexes)
    facts = R.GraphFacts(main)

    node_order: dict[int, int] | None = None
    for rule, fn in comp.graph_rules:
        for where, values in fn(model, profile, rule.params, facts):
            if isinstance(where, onnx.NodeProto):  # a graph-wide rule that names the node it blames
                if node_order is None:
                    node_order = {id(n): i for i, n in enumerate(n for g in graphs for n in g.node)}
                out.add(rule, where, values, node_order.get(id(where), -1))
            else:
                out.add(rule, None, values, -1, op="", name="<graph>", tensor=where)

    # -- tensors: evaluate each distinct (type) once; read names only where a type fails or has an odd dtype -------
    odd_dtype: dict[str, int] = {}  # tensors with a dtype outside _PLAIN_DTYPES, for op_dtype
    tensor_hits: list[tuple[Any, str, dict]] = []
    if comp.tensor_rules or comp.op_dtype_rule:
        act_rules = list(comp.tensor_rules)
        weight_rules = [(r, f) for r, f in comp.tensor_rules if r.check not in R.ACTIVATION_ONLY]
        cache: dict[bytes, tuple[list, int]] = {}
        for g, idx in zip(graphs, indexes):
            for field_name in ("input", "output", "value_info"):
                keys = idx.type_keys(field_name)
                flagged = set()
                for key in set(keys):
                    hit = cache.get(key)
                    if hit is None:
                        hit = cache[key] = _judge_type(key, act_rules)
                    if hit[0] or (hit[1] and hit[1] not in _PLAIN_DTYPES):
                        flagged.add(key)
                if not flagged:
                    continue
                seq = getattr(g, field_name)
                for i, key in enumerate(keys):
                    if key in flagged:
                        fails, elem = cache[key]
                        name = seq[i].name
                        for rule, values in fails:
                            tensor_hits.append((rule, name, values))
                        if elem and elem not in _PLAIN_DTYPES:
                            odd_dtype[name] = elem
            for t in g.initializer:
                if t.data_type not in _PLAIN_DTYPES:
                    odd_dtype[t.name] = t.data_type
                if weight_rules:
                    tensor_hits.extend(_weight_hits(t, weight_rules))

    # -- nodes: one dict lookup per op type; only nodes of op types that can break a rule are opened -----------------
    node_rules = comp.node_rules
    op_cache: dict[str, tuple[Any, list, bool, bool]] = {}
    dtype_rule = comp.op_dtype_rule if odd_dtype else None
    odd_names = {R.DTYPE_NAMES.get(c, str(c)) for c in odd_dtype.values()}
    consts = ctx.constants
    start = 0  # graph order of the first node of the current graph
    for g, idx in zip(graphs, indexes):
        ops = idx.op_types
        hot = set()
        for op in set(ops):
            entry = op_cache.get(op)
            if entry is None:
                in_matrix = op in profile.ops
                op_rule = profile.op_rule(op) if in_matrix else None
                wants_dtype = dtype_rule is not None and in_matrix and bool(
                    {_CAST_DOWN.get(n, n) for n in odd_names} - comp.allowed_dtypes.get(op, frozenset()))
                entry = op_cache[op] = (op_rule, node_rules.get(op, []), wants_dtype, in_matrix)
            if entry[0] is not None or entry[1] or entry[2] or not entry[3] or op == "Constant":
                hot.add(op)
        if hot:
            nodes = g.node
            for i in compress(range(len(ops)), map(hot.__contains__, ops)):  # selected in C
                node = nodes[i]
                op = ops[i]
                order = start + i
                op_rule, checks, wants_dtype, in_matrix = op_cache[op]
                if not in_matrix:  # unknown op type: the domain decides between "unsupported" and "plugin"
                    op_rule = profile.op_rule(op, node.domain)
                if op_rule is not None:
                    out.add(op_rule, node, {"domain": node.domain}, order)
                if checks or wants_dtype:
                    for rule, values in _node_checks(ctx, node, op, order, checks, dtype_rule if wants_dtype else None,
                                                     odd_dtype, comp):
                        out.add(rule, node, values, order)
                if op == "Constant":
                    consts.update(node.output)
        start += len(ops)

    R.release_tables()  # producer/consumer tables of the precision rules: this model only
    if tensor_hits:
        inits = ctx.initializer_names()
        producers = _producers(graphs, indexes, {t for _, t, _ in tensor_hits})
        for rule, tensor, values in tensor_hits:
            prod = producers.get(tensor)
            if rule.check in R.ACTIVATION_ONLY and (tensor in inits or (prod and _weight_producer(prod[0], inits))):
                continue  # weights recorded in value_info: their layout is not NCHW
            if prod is not None:
                out.add(rule, prod[0], values, prod[1], tensor=tensor)
            else:
                out.add(rule, None, values, -1, op="", name=tensor, tensor=tensor)

    return sorted(out.items, key=lambda f: (f.order, SEVERITIES.index(f.severity), f.rule, f.tensor or ""))


def _producers(graphs, indexes, wanted: set[str]) -> dict[str, tuple[onnx.NodeProto, int]]:
    """(node, graph order) of the last node that outputs each wanted tensor."""
    found: dict[str, tuple[onnx.NodeProto, int]] = {}
    start = 0
    for g, idx in zip(graphs, indexes):
        nodes = g.node
        for i, outputs in enumerate(map(_OUTPUTS, nodes)):
            if not wanted.isdisjoint(outputs):
                for o in outputs:
                    if o in wanted:
                        found[o] = (nodes[i], start + i)
        start += len(idx.op_types)
    return found


def _weight_producer(node: onnx.NodeProto, inits) -> bool:
    """A Constant, or the DequantizeLinear of a constant (an INT8 weight): its output is a weight, not an activation."""
    if node.op_type == "Constant":
        return True
    return node.op_type == "DequantizeLinear" and bool(node.input) and node.input[0] in inits


# -- public API ------------------------------------------------------------------------------------------------------
_LEVELS = {"error": 0, "warning": 1, "note": 2, "never": -1}


@dataclass
class CheckResult:
    """The outcome of checking one model against one profile."""

    profile: Profile
    findings: list[Finding]
    model_name: str
    fail_on: str = "error"
    notes: list[str] = field(default_factory=list)
    loaded: LoadedModel | None = field(default=None, repr=False)

    @property
    def model_sha256(self) -> str:
        return self.loaded.sha256 if self.loaded is not None else ""

    @property
    def failing(self) -> list[Finding]:
        limit = _LEVELS[self.fail_on]
        return [f for f in self.findings if _LEVELS[f.severity] <= limit]

    @property
    def ok(self) -> bool:
        return not self.failing

    @property
    def verdict(self) -> str:
        return "pass" if self.ok else "fail"

    def counts(self) -> dict[str, int]:
        c = Counter(f.severity for f in self.findings)
        return {s: c.get(s, 0) for s in SEVERITIES}

    def by_rule(self) -> dict[str, int]:
        return dict(sorted(Counter(f.rule for f in self.findings).items()))

    def to_text(self, max_findings: int | None = None) -> str:
        from ._report import to_text
        return to_text(self, max_findings)

    def to_json(self, max_findings: int | None = None) -> str:
        from ._report import to_json
        return to_json(self, max_findings)

    def to_sarif(self, max_findings: int | None = None) -> str:
        from ._report import to_sarif
        return to_sarif(self, max_findings)

    def to_junit(self, max_findings: int | None = None) -> str:
        from ._report import to_junit
        return to_junit(self, max_findings)

    def certificate(self) -> str:
        from ._report import certificate
        return certificate(self)


def check(model: str | Path | onnx.ModelProto | bytes, target: str | Path | Profile = "trt-safe", *,
          fail_on: str = "error", shape_inference: str = "auto") -> CheckResult:
    """Check an ONNX model (path, bytes or ModelProto) against a target profile.

    Raises :class:`InputError` (a ValueError) for input that cannot be checked and ``ProfileError`` (a ValueError)
    for an unknown target.
    """
    if fail_on not in _LEVELS:
        raise ValueError(f"fail_on must be one of {', '.join(_LEVELS)}, not {fail_on!r}")
    profile = resolve_target(target)
    if _CROSS_CHECK:
        return _cross_checked(model, profile, fail_on, shape_inference)
    loaded = read_model(model)
    findings = _findings(loaded, profile, shape_inference)
    return CheckResult(profile=profile, findings=findings, model_name=loaded.display_name, fail_on=fail_on,
                       notes=loaded.notes, loaded=loaded)


def _findings(loaded: LoadedModel, profile: Profile, shape_inference: str) -> list[Finding]:
    if shape_inference not in ("auto", "always", "never"):
        raise InputError(f"shape inference mode {shape_inference!r} is not auto, always or never")
    if loaded.wire is not None:
        from . import _wire

        try:
            findings = run_rules_wire(loaded, profile, shape_inference)
        except InputError:
            raise  # what the full path says too (the tests compare both)
        except Exception:  # Unsupported, or a bug of the decoded path: the full path decides
            if _wire.STRICT and not isinstance(sys.exc_info()[1], _wire.Unsupported):
                raise
            findings = None
        if findings is not None:
            return findings
        loaded.wire = None  # the full path from here on
    if loaded.model.functions:
        try:
            import onnx.inliner

            n = len(loaded.model.functions)
            loaded.model = onnx.inliner.inline_local_functions(loaded.model)
            loaded.model_is_data = False
            loaded.notes.append(f"inlined {n} local function(s)")
            loaded.has_subgraphs = loaded.has_subgraphs or loaded.index.has_subgraph_ops  # inlined If/Loop bodies
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{loaded.display_name}: cannot inline local functions: {exc}".splitlines()[0]) from None
    infer_shapes(loaded, shape_inference)
    return run_rules(loaded.model, profile, loaded.has_subgraphs, loaded.index)


# Tests set this: every check() then runs both the decoded-bytes path and the full protobuf path and requires the
# same findings, notes and errors (ModelProto inputs are serialized for the decoded path).
_CROSS_CHECK = False


def _outcome(fn):
    try:
        loaded = fn()
        return loaded, None
    except InputError as exc:
        return None, str(exc)


def _cross_checked(model, profile: Profile, fail_on: str, shape_inference: str) -> CheckResult:
    if isinstance(model, onnx.ModelProto):
        src, data = model.SerializeToString(), None
    else:
        src = model
        data = model if isinstance(model, (bytes, bytearray)) else _read_once(model)

    def compare(source, mode: str):
        """(decoded-path outcome, full-path outcome) on one source, which must agree."""
        def run(decode: bool):
            loaded = read_model(source, decode=decode, data=data if source is src else None)
            used = loaded.wire is not None
            findings = _findings(loaded, profile, mode)
            return loaded, findings, used and loaded.wire is not None

        fast, fast_err = _outcome(lambda: run(True))
        full, full_err = _outcome(lambda: run(False))
        assert fast_err == full_err, (fast_err, full_err)
        if full_err is None:
            assert [f.to_dict() for f in fast[1]] == [f.to_dict() for f in full[1]], "decoded and full paths differ"
            assert fast[0].notes == full[0].notes, (fast[0].notes, full[0].notes)
            _CROSS_STATS["wire" if fast[2] else "full"] += 1
        return fast, full, full_err

    fast, full, err = compare(src, shape_inference)
    if err is None:
        if shape_inference != "never":
            compare(src, "never")
        if not full[0].model_is_data:  # the rules on the inferred shapes too, read from the inferred model's bytes
            compare(full[0].model.SerializeToString(), "never")
    if err is not None:
        raise InputError(err)
    if isinstance(model, onnx.ModelProto):  # the user's object itself, as check() would see it
        loaded = read_model(model)
        findings = _findings(loaded, profile, shape_inference)
        assert [f.to_dict() for f in findings] == [f.to_dict() for f in full[1]]
    else:
        loaded, findings = fast[0], fast[1]
    return CheckResult(profile=profile, findings=findings, model_name=loaded.display_name, fail_on=fail_on,
                       notes=loaded.notes, loaded=loaded)


def _read_once(path) -> bytes | None:
    from ._load import _read_bytes

    try:
        return _read_bytes(Path(path), 2 * 1024**3)
    except InputError:
        return None


_CROSS_STATS = Counter()


# -- the vectorised path (files decoded by _wire) -------------------------------------------------------------------
# Node predicates whose verdict depends only on what a node signature holds: the op type and domain, the attribute
# bytes, the input/output counts, and per input slot (and output 0) the resolved tensor type and constness.
_SIGNATURE_CHECKS = frozenset({"attr_range", "attr_in", "spatial_dims", "io_rank_in", "pad_lt_kernel", "input_const",
                               "input_absent", "outputs_max", "inputs_max", "input_dtype_not", "axis_in",
                               "axis_dim_max", "weight_dim_range", "dla_resize"})
# graph predicates that read nodes, and the element type (or metadata) without which they return at once
_NODE_GRAPH_RULES = {"fp32_compute": onnx.TensorProto.FLOAT16, "fp16_eps": onnx.TensorProto.FLOAT16,
                     "int8_unscaled": onnx.TensorProto.INT8}


class _Facts:
    def __init__(self, dtypes):
        self.dtypes = frozenset(dtypes)


class _WireContext(R.Context):
    """A Context for one node of a decoded graph: tensors and constness of that node's names, from the wire tables."""

    def __init__(self, tensors: dict, consts: set):
        super().__init__([])
        self._t, self._c = tensors, consts

    def tensor(self, name):
        return self._t.get(name)

    def is_const(self, name):
        return name in self._c

    def const_array(self, name):
        # constant values (and graph neighbours) are not decoded: a rule that asks hands the file to the full path
        from ._wire import Unsupported

        raise Unsupported(f"a rule read {name!r}'s value or neighbours, which the decoded path does not have")

    producer = consumers = const_array


class _WireTables:
    """Per name id: the tensor a name resolves to (initializer first, then the last input/output/value_info record),
    whether it is an initializer, and the first Constant node that outputs it."""

    def __init__(self, w, model: onnx.ModelProto):
        import numpy as np

        g = model.graph
        self.w = w
        n = w.n_names
        # tensor classes: 0..len(inits)-1 initializer (dtype, dims); then distinct record types
        init_vals = {}
        self.init_cls = {}
        for t, nid in zip(g.initializer, w.init_name.tolist()):
            self.init_cls[nid] = init_vals.setdefault((t.data_type, tuple(t.dims)), len(init_vals))
        io_keys = [v.type.SerializeToString() for v in g.input] + [v.type.SerializeToString() for v in g.output]
        keys = list(w.type_keys)
        key_id = {k: i for i, k in enumerate(keys)}
        io_ids = []
        for k in io_keys:
            if k not in key_id:
                key_id[k] = len(keys)
                keys.append(k)
            io_ids.append(key_id[k])
        self.keys = keys  # record type id -> serialized TypeProto
        rec_name = np.concatenate([w.gin_name, w.gout_name, w.vi_name])
        rec_type = np.concatenate([np.array(io_ids, np.int64), w.vi_type]).astype(np.int64)
        self.rec_name, self.rec_type = rec_name, rec_type
        self.n_gin, self.n_gout = len(w.gin_name), len(w.gout_name)
        last = np.full(n, -1, np.int64)
        if len(rec_name):
            at = np.arange(len(rec_name))
            last[rec_name] = at  # the last record of each name (sequential assignment; verified, else ufunc.at)
            if (last[rec_name] < at).any():
                np.maximum.at(last, rec_name, at)
        n_init = len(init_vals)
        self.cls = np.where(last >= 0, n_init + rec_type[np.maximum(last, 0)], -1)
        self.is_init = np.zeros(n, bool)
        for nid, c in self.init_cls.items():
            self.cls[nid] = c
            self.is_init[nid] = True
        self.classes = list(init_vals)
        self.n_init = n_init
        self._decoded = {}
        # first Constant node order per output name
        self.const_at = np.full(n, 1 << 62, np.int64)
        if "Constant" in w.ops:
            nodes = np.flatnonzero(w.op == w.ops.index("Constant"))
            occ = np.flatnonzero(np.isin(w.out_node, nodes))
            np.minimum.at(self.const_at, w.out_name[occ], w.out_node[occ])

    def tensor(self, cls: int):
        if cls < 0:
            return None
        if cls < self.n_init:
            return self.classes[cls]
        k = cls - self.n_init
        hit = self._decoded.get(k, R._MISSING)
        if hit is R._MISSING:
            hit = self._decoded[k] = R.decode_type(onnx.TypeProto.FromString(self.keys[k]))
        return hit


def wire_shapes_complete(w, tables: _WireTables) -> bool:
    """shapes_complete (see _load) over the decoded graph."""
    import numpy as np

    if len(w.vi_s) + tables.n_gout < w.n_nodes:
        return False
    rec = slice(tables.n_gin, None)  # value_info and graph output records
    names, types = tables.rec_name[rec], tables.rec_type[rec]
    static = np.array([_static_type(k) for k in tables.keys], bool)
    ok = np.zeros(w.n_names, bool)
    bad = np.zeros(w.n_names, bool)
    st = static[types] if len(types) else np.zeros(0, bool)
    ok[names[st]] = True
    bad[names[~st]] = True
    ok &= ~bad
    nonempty = w.out_e > w.out_s
    return bool(ok[w.out_name[nonempty]].all())


def run_rules_wire(loaded: LoadedModel, profile: Profile, mode: str) -> list[Finding] | None:
    """run_rules on a graph decoded by _wire, or None when this graph needs the full path (then nothing was
    reported). Same findings, same order, same errors as run_rules on the parsed model."""
    import numpy as np

    w, model = loaded.wire, loaded.wire.model
    comp = _compile(profile)
    g = model.graph
    if mode not in ("auto", "never"):
        return None
    if any(c.check not in _SIGNATURE_CHECKS for op in set(w.ops) for c, _ in comp.node_rules.get(op, [])):
        return None
    elems = set()
    for key in set(w.type_keys) | {v.type.SerializeToString() for seq in (g.input, g.output) for v in seq}:
        tp = onnx.TypeProto.FromString(key)
        if tp.HasField("tensor_type"):
            elems.add(tp.tensor_type.elem_type)
    dtypes = elems | {t.data_type for t in g.initializer}
    facts = _Facts(dtypes)
    meta = {m.key: m.value for m in model.metadata_props}
    for rule, _ in comp.graph_rules:
        code = _NODE_GRAPH_RULES.get(rule.check)
        if (code is not None and code in dtypes) or (rule.check == "int8_ranges"
                                                      and meta.get("attn2conv.precision") == "int8"):
            return None
    # the nodes run_rules opens (a superset: every element type odd_dtype could hold), and the names they read
    odd_all = {R.DTYPE_NAMES.get(c, str(c)) for c in elems if c and c not in _PLAIN_DTYPES}
    odd_all |= {R.DTYPE_NAMES.get(t.data_type, str(t.data_type)) for t in g.initializer
                if t.data_type not in _PLAIN_DTYPES}
    hot = np.zeros(len(w.ops) + 1, bool)
    for op_id, op in enumerate(w.ops):
        in_matrix = op in profile.ops
        maybe_dtype = comp.op_dtype_rule is not None and in_matrix and bool(
            {_CAST_DOWN.get(n, n) for n in odd_all} - comp.allowed_dtypes.get(op, frozenset()))
        hot[op_id] = (not in_matrix or maybe_dtype or bool(comp.node_rules.get(op))
                      or (profile.op_rule(op) if in_matrix else None) is not None)
    node_hot = hot[w.op]
    if "Constant" in w.ops:
        node_out = node_hot | (w.op == w.ops.index("Constant"))
    else:
        node_out = node_hot
    outputs = np.arange(len(w.out_s)) if mode == "auto" else np.flatnonzero(node_out[w.out_node])
    w.intern_names(np.flatnonzero(node_hot[w.in_node]), outputs)
    tables = _WireTables(w, model)
    if mode == "auto" and not wire_shapes_complete(w, tables):
        return None

    out = _Collector(profile)
    for rule, fn in comp.graph_rules:
        for where, values in fn(model, profile, rule.params, facts):
            out.add(rule, None, values, -1, op="", name="<graph>", tensor=where)

    # -- tensors: as run_rules; value_info types come from the wire (one key per distinct byte string) ------------
    odd_dtype: dict[str, int] = {}
    odd_ids: dict[int, int] = {}  # name id -> odd element type, with the precedence of odd_dtype
    tensor_hits: list[tuple[Any, str, dict]] = []
    if comp.tensor_rules or comp.op_dtype_rule:
        act_rules = list(comp.tensor_rules)
        weight_rules = [(r, f) for r, f in comp.tensor_rules if r.check not in R.ACTIVATION_ONLY]
        cache: dict[bytes, tuple[list, int]] = {}
        idx = GraphIndex(g)
        for field_name in ("input", "output", "value_info"):
            if field_name == "value_info":
                keys, ids = w.type_keys, w.vi_type
            else:
                keys = sorted(set(idx.type_keys(field_name)))
                pos = {k: i for i, k in enumerate(keys)}
                ids = np.array([pos[k] for k in idx.type_keys(field_name)], np.int64)
            flagged = []
            for i, key in enumerate(keys):
                hit = cache.get(key)
                if hit is None:
                    hit = cache[key] = _judge_type(key, act_rules)
                if hit[0] or (hit[1] and hit[1] not in _PLAIN_DTYPES):
                    flagged.append(i)
            if not flagged or not len(ids):
                continue
            sel = np.flatnonzero(np.isin(ids, flagged))
            rec_names = (w.vi_name if field_name == "value_info" else
                         w.gin_name if field_name == "input" else w.gout_name)
            for i in sel.tolist():
                fails, elem = cache[keys[ids[i]]]
                nid = int(rec_names[i])
                name = w.name(nid)
                for rule, values in fails:
                    tensor_hits.append((rule, name, values))
                if elem and elem not in _PLAIN_DTYPES:
                    odd_dtype[name] = elem
                    odd_ids[nid] = elem
        for t, nid in zip(g.initializer, w.init_name.tolist()):
            if t.data_type not in _PLAIN_DTYPES:
                odd_dtype[t.name] = t.data_type
                odd_ids[nid] = t.data_type
            if weight_rules:
                tensor_hits.extend(_weight_hits(t, weight_rules))

    # -- nodes: per op type, nodes grouped by signature; a group's verdict is computed on its first node ----------
    node_rules = comp.node_rules
    dtype_rule = comp.op_dtype_rule if odd_dtype else None
    odd_names = {R.DTYPE_NAMES.get(c, str(c)) for c in odd_dtype.values()}
    n_in = np.diff(w.in_first)
    n_out = np.diff(w.out_first)
    n_in_used = np.bincount(w.in_node, weights=(w.in_e > w.in_s), minlength=w.n_nodes).astype(np.int64)
    n_out_used = np.bincount(w.out_node, weights=(w.out_e > w.out_s), minlength=w.n_nodes).astype(np.int64)
    odd_arr = None
    if odd_ids:
        odd_arr = np.zeros(w.n_names, np.int64)
        odd_arr[list(odd_ids)] = list(odd_ids.values())
    k_slots = 2
    for rule_list in node_rules.values():
        for rule, _ in rule_list:
            p = rule.params
            for v in (p.get("index"),) + tuple(i for ops in (p.get("inputs") or {}).values() for i in ops):
                if isinstance(v, int):
                    k_slots = max(k_slots, v + 1)
    found: list[tuple[int, int, Any, Any, dict]] = []  # (order, seq, rule, node, values)

    def node_facts(i: int):
        node = w.node(i)
        tensors, consts = {}, set()
        for nid in np.concatenate([w.node_inputs(i), w.node_outputs(i)]).tolist():
            name = w.name(nid)
            tensors[name] = tables.tensor(int(tables.cls[nid]))
            if tables.is_init[nid] or tables.const_at[nid] < i:
                consts.add(name)
        return node, _WireContext(tensors, consts)

    def judge(i: int, op: str, op_rule, checks, wants_dtype, in_matrix, collect: bool) -> bool:
        """Runs what run_rules runs on node i; returns whether anything was (or would be) reported."""
        node, ctx = node_facts(i)
        hit = False
        if not in_matrix:
            op_rule = profile.op_rule(op, node.domain)
        if op_rule is not None:
            hit = True
            if collect:
                found.append((i, len(found), op_rule, node, {"domain": node.domain}))
        if checks or wants_dtype:
            node_dtype_rule = dtype_rule if wants_dtype else None
            for rule, values in _node_checks(ctx, node, op, i, checks, node_dtype_rule, odd_dtype, comp):
                hit = True
                if collect:
                    found.append((i, len(found), rule, node, values))
        return hit

    groups: list[tuple[int, np.ndarray, tuple]] = []  # (first node, members, rule entry)
    for op_id, op in enumerate(w.ops):
        in_matrix = op in profile.ops
        op_rule = profile.op_rule(op) if in_matrix else None
        wants_dtype = dtype_rule is not None and in_matrix and bool(
            {_CAST_DOWN.get(n, n) for n in odd_names} - comp.allowed_dtypes.get(op, frozenset()))
        checks = node_rules.get(op, [])
        if not (op_rule is not None or checks or wants_dtype or not in_matrix):
            continue  # Constant outputs are in tables.const_at
        entry = (op, op_rule, checks, wants_dtype, in_matrix)
        nodes = np.flatnonzero(w.op == op_id)
        if op_rule is not None or not in_matrix:  # every node is reported (or its domain decides)
            groups.extend((int(i), np.array([i]), entry) for i in nodes.tolist())
            continue
        cols = [w.attr[nodes], w.dom[nodes], n_in[nodes], n_in_used[nodes], n_out[nodes], n_out_used[nodes]]
        first_in = w.in_first[nodes]
        for j in range(k_slots):
            has = n_in[nodes] > j
            nid = w.in_name[np.where(has, first_in + j, 0)] if len(w.in_name) else np.zeros(len(nodes), np.int64)
            const = tables.is_init[nid] | (tables.const_at[nid] < nodes)
            cols.append(np.where(has, tables.cls[nid] * 2 + const, -(1 << 40)))
        has = n_out[nodes] > 0
        oid = w.out_name[np.where(has, w.out_first[nodes], 0)] if len(w.out_name) else np.zeros(len(nodes), np.int64)
        cols.append(np.where(has, tables.cls[oid], -(1 << 40)))
        if wants_dtype:
            iid = (w.in_name[np.where(n_in[nodes] > 0, first_in, 0)] if len(w.in_name)
                   else np.zeros(len(nodes), np.int64))
            cols.append(np.where(n_in[nodes] > 0, odd_arr[iid], 0))
        rows = np.stack(cols, axis=1).astype(np.int64)
        ids = _wire_rows(rows)
        order = np.argsort(ids, kind="stable")
        bounds = np.flatnonzero(np.diff(ids[order])) + 1
        for members in np.split(nodes[order], bounds):
            groups.append((int(members.min()), members, entry))

    groups.sort(key=lambda x: x[0])
    for first, members, (op, op_rule, checks, wants_dtype, in_matrix) in groups:
        if len(members) == 1 or judge(first, op, op_rule, checks, wants_dtype, in_matrix, collect=False):
            for i in members.tolist():
                judge(i, op, op_rule, checks, wants_dtype, in_matrix, collect=True)
    for order, _, rule, node, values in sorted(found, key=lambda f: (f[0], f[1])):
        out.add(rule, node, values, order)

    if tensor_hits:
        inits = {t.name for t in g.initializer}
        wanted = {t for _, t, _ in tensor_hits}
        producers: dict[str, Any] = {}
        for name in wanted:
            occ = w.outputs_named(name)
            if len(occ):  # the last producer wins, as in _producers
                i = int(w.out_node[occ[-1]])
                producers[name] = (i, i)
        for rule, tensor, values in tensor_hits:
            prod = producers.get(tensor)
            if prod is not None and not isinstance(prod[0], onnx.NodeProto):
                prod = producers[tensor] = (w.node(prod[0]), prod[1])
            if rule.check in R.ACTIVATION_ONLY and (tensor in inits or (prod and _weight_producer(prod[0], inits))):
                continue
            if prod is not None:
                out.add(rule, prod[0], values, prod[1], tensor=tensor)
            else:
                out.add(rule, None, values, -1, op="", name=tensor, tensor=tensor)

    if mode == "auto":
        loaded.notes.append("shape inference skipped: the graph records a static shape for every node output")
    return sorted(out.items, key=lambda f: (f.order, SEVERITIES.index(f.severity), f.rule, f.tensor or ""))


def _wire_rows(rows):
    """Ids of equal rows of a small-int matrix (exact: rows are compared after hashing)."""
    import numpy as np

    from ._wire import Unsupported, _group

    h = np.zeros(len(rows), np.uint64)
    for j in range(rows.shape[1]):
        h = (h ^ rows[:, j].view(np.uint64)) * np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(31)
    rep = _group(h)
    if (rows[rep] != rows).any():
        raise Unsupported("row hash collision")
    return np.unique(rep, return_inverse=True)[1].reshape(-1)
