"""The rules engine: one pass over the nodes, one pass over the distinct tensor types.

Lookup tables are compiled once per profile (op type -> op-level rule and node predicates). The node loop reads
only ``op_type`` for nodes no rule is interested in; attributes, inputs and exporter metadata are read for the
nodes that rules look at or that produce findings.
"""

from __future__ import annotations

import ast
import re
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
from ._load import GraphIndex, InputError, LoadedModel, infer_shapes, read_model

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
                    dims = tuple(t.dims)
                    for rule, fn in weight_rules:
                        values = fn(t.data_type, dims, rule.params)
                        if values is not None:
                            tensor_hits.append((rule, t.name, values))

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
                if checks:
                    try:
                        attrs = ctx.attrs(node)
                        for rule, fn in checks:
                            values = fn(ctx, node, attrs, rule.params)
                            if values is not None:
                                out.add(rule, node, values, order)
                    except (R.MalformedNode, TypeError, ValueError, IndexError, KeyError, OverflowError) as exc:
                        msg = " ".join(str(exc).split())[:160]
                        raise InputError(f"node {node.name or order} ({op}) is malformed: {msg}") from None
                if wants_dtype and node.input:
                    code = odd_dtype.get(node.input[0])
                    if code is not None:
                        name = R.DTYPE_NAMES.get(code, str(code))
                        allowed = comp.allowed_dtypes.get(op, frozenset())
                        if _CAST_DOWN.get(name, name) not in allowed:
                            out.add(dtype_rule, node, {"dtype": name, "allowed": "/".join(sorted(allowed)) or "none"},
                                    order)
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
    loaded = read_model(model)
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
    findings = run_rules(loaded.model, profile, loaded.has_subgraphs, loaded.index)
    return CheckResult(profile=profile, findings=findings, model_name=loaded.display_name, fail_on=fail_on,
                       notes=loaded.notes, loaded=loaded)
