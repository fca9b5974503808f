"""Named, editable pass pipelines, and the runner that guards every exact pass numerically.

    pipe = Pipeline.for_target("trt-safe", fidelity="exact")
    pipe.remove("fold_reparam").insert("my_pass", after="linear_to_conv")
    gm, records = pipe.run(gm, ctx)

Each step: snapshot the module, run the pass, recompile, re-infer shapes, compare outputs with the previous graph.
An exact pass whose relative error exceeds the bound, or any pass that raises, is rolled back to the snapshot and
recorded as such; the pipeline goes on with the next pass.
"""
from __future__ import annotations

import copy
import sys
import time
from typing import Iterable, Union

import torch
import torch.fx as fx

from attn2conv.errors import PipelineError
from attn2conv.graph import cleanup, refresh_shapes
from attn2conv.guard import NumericGuard
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, get_pass
from attn2conv.report import PassRecord

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PassLike = Union[str, GraphPass, type]
FIDELITIES = ("exact", "fast")


def _load_presets() -> dict:
    from importlib.resources import files

    return tomllib.loads(files("attn2conv").joinpath("presets.toml").read_text())


def _instantiate(p: PassLike) -> GraphPass:
    if isinstance(p, GraphPass):
        return p
    if isinstance(p, type) and issubclass(p, GraphPass):
        return p()
    if isinstance(p, str):
        return get_pass(p)()
    raise PipelineError(f"a pipeline step must be a pass id, a GraphPass or its class, got {p!r}")


class Pipeline:
    def __init__(self, passes: Iterable[PassLike] = (), name: str = "custom"):
        self.name = name
        self.passes: list[GraphPass] = [_instantiate(p) for p in passes]

    @classmethod
    def for_target(cls, target_kind: str, fidelity: str = "exact") -> "Pipeline":
        if fidelity not in FIDELITIES:
            raise PipelineError(f"unknown fidelity {fidelity!r}; use one of {', '.join(FIDELITIES)}")
        presets = _load_presets()[fidelity]
        if target_kind not in presets:
            raise PipelineError(f"no {fidelity} pipeline for target kind {target_kind!r}; known: {', '.join(presets)}")
        return cls(presets[target_kind], name=f"{target_kind}/{fidelity}")

    # --- editing -----------------------------------------------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.passes]

    def _index(self, pass_id: str) -> int:
        try:
            return self.ids.index(pass_id)
        except ValueError:
            raise PipelineError(f"pass {pass_id!r} is not in pipeline {self.name} ({', '.join(self.ids)})") from None

    def remove(self, pass_id: str) -> "Pipeline":
        del self.passes[self._index(pass_id)]
        return self

    def insert(self, p: PassLike, index: int | None = None, *, before: str | None = None,
               after: str | None = None) -> "Pipeline":
        if sum(x is not None for x in (index, before, after)) > 1:
            raise PipelineError("insert takes one of index, before=, after=")
        if before is not None:
            index = self._index(before)
        elif after is not None:
            index = self._index(after) + 1
        elif index is None:
            index = len(self.passes)
        self.passes.insert(index, _instantiate(p))
        return self

    def append(self, p: PassLike) -> "Pipeline":
        return self.insert(p)

    def replace(self, pass_id: str, p: PassLike) -> "Pipeline":
        self.passes[self._index(pass_id)] = _instantiate(p)
        return self

    def move(self, pass_id: str, index: int) -> "Pipeline":
        self.passes.insert(index, self.passes.pop(self._index(pass_id)))
        return self

    def copy(self) -> "Pipeline":
        new = Pipeline(name=self.name)
        new.passes = list(self.passes)
        return new

    def __iter__(self):
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __repr__(self) -> str:
        return f"Pipeline({self.name}: {' -> '.join(self.ids)})"

    # --- running -----------------------------------------------------------------------------------------------------
    def run(self, gm: fx.GraphModule, ctx: PassContext, guard: NumericGuard | None = None,
            progress=None) -> tuple[fx.GraphModule, list[PassRecord]]:
        """Runs every pass in order on `gm`; returns the final module (possibly a rolled-back copy) and records."""
        records = []
        weights = WeightStore()
        for p in self.passes:
            if progress is not None:
                progress(p.id)
            gm, record = run_pass(p, gm, ctx, guard, weights, recompile=False)
            records.append(record)
        gm.recompile()  # once: the passes and the incremental guard read the graph, not the generated code
        return gm, records


def run_pass(p: GraphPass, gm: fx.GraphModule, ctx: PassContext, guard: NumericGuard | None,
             weights: "WeightStore | None" = None, recompile: bool = True) -> tuple[fx.GraphModule, PassRecord]:
    """recompile=False leaves gm's generated code stale (~0.6 s on converted Swin-T) unless the guard calls the
    module; the caller recompiles once at the end (Pipeline.run)."""
    start = time.perf_counter()
    weights = weights if weights is not None else WeightStore()
    snapshot = _snapshot(gm, weights)
    # the guard's run on the example input also re-infers the shapes (one forward instead of a fake propagation too)
    shapes_from_guard = guard is not None and bool(guard.probes) and guard.probes[0] is ctx.example_inputs
    record = PassRecord(p.id, p.exact, "applied")
    try:
        result = p.run(gm, ctx)
        if not isinstance(result, PassResult):
            raise PipelineError(f"pass {p.id} returned {type(result).__name__}, not PassResult")
        record.rewrites, record.notes, record.misses = result.rewrites, list(result.notes), list(result.misses)
        if not result.changed:
            record.status = "no change"
            record.seconds = time.perf_counter() - start
            return _restore(snapshot, gm) if _graph_touched(gm, snapshot) else gm, record
        cleanup(gm, recompile=recompile or guard is None or guard.recorded is None)
        if not shapes_from_guard:
            refresh_shapes(gm, ctx.example_inputs)
    except Exception as exc:  # a broken pass must not break the conversion
        record.status = "failed"
        record.notes.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
        record.seconds = time.perf_counter() - start
        return _restore(snapshot, gm), record
    if guard is not None:
        try:
            step, total, outs = guard.measure(gm, record_shapes=shapes_from_guard)
        except Exception as exc:
            record.status = "failed"
            record.notes.append(f"rewritten graph does not run: {type(exc).__name__}: {str(exc).splitlines()[0]}"[:300])
            record.seconds = time.perf_counter() - start
            return _restore(snapshot, gm), record
        record.rel_error, record.rel_error_total = step, total
        if p.exact and not step <= guard.rtol:
            record.status = "rolled back"
            record.notes.append(f"relative error {step:.2e} exceeds the bound {guard.rtol:g}; graph restored")
            record.seconds = time.perf_counter() - start
            return _restore(snapshot, gm), record
        guard.accept(outs)
    record.seconds = time.perf_counter() - start
    return gm, record


class _Snapshot:
    """The graph and the module tree as they were before a pass, restorable into the same GraphModule.

    Taking it records each node's fields (op, target, args, kwargs, name, type, a shallow copy of meta) and each
    submodule's tables of parameters, buffers, submodules and tensor attributes, sharing every tensor: no Node objects
    are built and no code generated unless the pass is rolled back (a deepcopy of the graph before every pass cost
    0.3 s on converted DeiT-S, though most passes are never rolled back). `weights` keeps each tensor's value as of
    now, in case the pass writes into one in place."""

    def __init__(self, gm: fx.GraphModule, weights: "WeightStore"):
        weights.refresh(gm)
        self.weights = weights
        graph = gm.graph
        self.tracer_cls, self.codegen = graph._tracer_cls, copy.deepcopy(graph._codegen)
        self.nodes = [(n, n.op, n.target, n.args, n.kwargs, n.name, n.type, copy.copy(n.meta)) for n in graph.nodes]
        self.node_count = len(self.nodes)
        self.modules = {name: (m, dict(m._parameters), dict(m._buffers), dict(m._modules),
                               {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)})
                        for name, m in gm.named_modules(remove_duplicate=False)}

    def graph(self) -> fx.Graph:
        """The recorded graph, rebuilt with new nodes (the pass may have edited or erased the old ones)."""
        from torch.fx.node import map_arg

        g = fx.Graph(tracer_cls=self.tracer_cls)
        env: dict[fx.Node, fx.Node] = {}
        for old, op, target, args, kwargs, name, type_, meta in self.nodes:
            new = g.create_node(op, target, map_arg(args, env.__getitem__), map_arg(kwargs, env.__getitem__),
                                name, type_)
            new.meta = copy.copy(meta)
            env[old] = new
        g._codegen = self.codegen
        return g

    def restore(self, gm: fx.GraphModule) -> fx.GraphModule:
        self.weights.restore()
        for m, params, buffers, children, tensors in self.modules.values():
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            m._modules.clear()
            m._modules.update(children)
            for k in [k for k, v in vars(m).items() if isinstance(v, torch.Tensor) and k not in tensors]:
                delattr(m, k)
            for k, v in tensors.items():
                object.__setattr__(m, k, v)
        gm.graph = self.graph()  # the setter recompiles
        return gm


def _snapshot(gm: fx.GraphModule, weights: "WeightStore") -> _Snapshot:
    return _Snapshot(gm, weights)


def _restore(snapshot: _Snapshot, gm: fx.GraphModule) -> fx.GraphModule:
    return snapshot.restore(gm)


class WeightStore:
    """The values of a module's tensors before the running pass, copied once per tensor and version (a pass that
    writes into a weight in place bumps its version counter): restoring a snapshot puts those values back. Most passes
    only register new tensors, so this copies the weights once per conversion instead of once per pass."""

    def __init__(self):
        self.saved: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def tensors(self) -> list[torch.Tensor]:
        return [entry[0] for entry in self.saved.values()]

    def refresh(self, gm: fx.GraphModule) -> None:
        live = {}
        for _, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
            entry = self.saved.get(id(t))
            if entry is None or entry[0] is not t or entry[1] != t._version:
                entry = (t, t._version, t.detach().clone())
            live[id(t)] = entry
        self.saved = live

    def restore(self) -> None:
        with torch.no_grad():
            for t, version, value in self.saved.values():
                if t._version != version:
                    t.copy_(value)


def _graph_touched(gm: fx.GraphModule, snapshot: _Snapshot) -> bool:
    # A pass that says "no change" but edited nodes anyway gets rolled back to keep the contract honest.
    return len(gm.graph.nodes) != snapshot.node_count
