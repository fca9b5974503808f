"""Numeric guard: an exact pass must leave the graph's outputs unchanged.

Relative error = max|y - y_ref| / max|y_ref|, taken over every output tensor and every probe input (the example input
and `n_random` random inputs of the same shape and dtype). The default bound 1e-4 suits fp32; rewrites that reorder
reductions (a 1x1 conv instead of a GEMM, a folded BatchNorm) land around 1e-7..1e-6.

In 'final' mode the per-pass check on the example input is incremental (`_Recorded`): every node's value is kept, and
after a pass only the nodes it added or edited are computed, from the kept values of their inputs. Where a computed
value meets a node the previous graph had (same name, shape and dtype), it is compared with that node's kept value;
within the bound the kept value goes on downstream, so a pass costs about the forward time of the part it rewrote
instead of a forward of the whole graph (on converted DeiT-S the attention products make a forward ~5x the original).
A comparison above the bound, or none at all, falls back to the full forward and the output comparison.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from attn2conv.graph import flat_tensors

DEFAULT_RTOL = 1e-4


def relative_error(outputs: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    if len(outputs) != len(references):
        return float("inf")
    worst = 0.0
    for y, ref in zip(outputs, references):
        if y.shape != ref.shape:
            return float("inf")
        y, ref = y.detach().double(), ref.detach().double()
        if not torch.isfinite(y).all():
            return float("inf")
        scale = ref.abs().max().item() if ref.numel() else 0.0
        diff = (y - ref).abs().max().item() if ref.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def free_cores() -> int:
    """Cores not taken by other processes (one-minute load average, this process counted as one), at least 1."""
    try:
        busy = os.getloadavg()[0]
    except OSError:  # pragma: no cover - no load average on this platform
        return os.cpu_count() or 1
    return max(1, int((os.cpu_count() or 1) - busy + 1))


@contextlib.contextmanager
def eval_threads():
    """torch's intra-op threads capped at the free cores while the guard runs the graph. Its ops are small (one
    image) and many (~3,000 on converted DeiT-S); with more threads than free cores every op's parallel region waits
    for a descheduled thread: on a 2-core machine with one other busy process the converted DeiT-S forward took
    12-15 s on 2 threads and 0.5-0.7 s on 1."""
    before = torch.get_num_threads()
    wanted = min(before, free_cores())
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        with torch.no_grad():
            yield
    finally:
        if wanted != before:
            torch.set_num_threads(before)


def probe_inputs(example_inputs: tuple, n_random: int = 2, seed: int = 0) -> list[tuple]:
    """The example input plus `n_random` seeded random inputs with the same shapes and dtypes."""
    gen = torch.Generator().manual_seed(seed)
    probes = [example_inputs]
    for _ in range(n_random):
        probe = []
        for t in example_inputs:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                probe.append(torch.randn(t.shape, generator=gen, dtype=t.dtype))
            elif isinstance(t, torch.Tensor) and t.dtype != torch.bool:
                hi = int(t.max().item()) + 1 if t.numel() else 1
                probe.append(torch.randint(0, max(hi, 1), t.shape, generator=gen, dtype=t.dtype))
            else:
                probe.append(t)
        probes.append(tuple(probe))
    return probes


def run_outputs(module: torch.nn.Module, probes: list[tuple], record_shapes: bool = False) -> list[list[torch.Tensor]]:
    """Flat output tensors of `module` on each probe. record_shapes=True (an fx.GraphModule) also sets every node's
    meta['val'] from the first probe's real values, which is what attn2conv.graph.refresh_shapes computes with fake
    tensors: one forward run gives the guard's outputs and the shapes (the separate fake propagation cost about as
    much as a forward)."""
    with eval_threads():
        if record_shapes and probes:
            first = flat_tensors(_ShapeRecorder(module).run(*_flat_probe(probes[0])))
            return [first] + [flat_tensors(module(*p)) for p in probes[1:]]
        return [flat_tensors(module(*p)) for p in probes]


def _flat_probe(probe: tuple) -> list:
    return torch.utils._pytree.tree_leaves(probe)


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph on real tensors and leaves each node a fake tensor of its value (shape, dtype, strides), as
    torch.fx.passes.fake_tensor_prop.FakeTensorProp would."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n.op != "output":
            meta = _meta_value(result)
            if meta is not None:
                n.meta["val"] = meta
        return result


def _meta_value(obj):
    """The fake tensor (shape, dtype, strides) that stands for a real value in node.meta['val']."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.node import map_aggregate

    def fake(v):
        if isinstance(v, torch.Tensor):
            # an empty fake with the value's layout, built directly: from_tensor or empty_strided under the mode
            # go through fake dispatch, whose first call per new shape cost ~5 ms a node
            meta = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
            return FakeTensor(_fake_mode(), meta, v.device)
        if isinstance(v, (int, float, bool)):
            return v
        return None

    return map_aggregate(obj, fake)


_FAKE_MODE = None


def _fake_mode():
    global _FAKE_MODE
    if _FAKE_MODE is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        _FAKE_MODE = FakeTensorMode(allow_non_fake_inputs=True)
    return _FAKE_MODE


def _signature(gm: fx.GraphModule, n: fx.Node):
    """What a node computes, with its inputs named: equal signatures over equal input values give equal values.
    A get_attr also names the tensor object and its version (a pass may write into a weight in place)."""
    from torch.fx.node import map_arg

    if n.op == "get_attr":
        from attn2conv.graph import get_constant

        t = get_constant(gm, n)
        return (n.op, n.target, id(t), getattr(t, "_version", None))
    args = map_arg((n.args, n.kwargs), lambda a: ("%node", a.name))
    return (n.op, n.target, args)


def _same_signature(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a tensor among the arguments: compare nothing, recompute
        return False


def _local_error(new, old) -> float | None:
    """Relative error of a recomputed value against the kept one; None when they are not comparable (another shape,
    dtype or structure: the pass gave the node another meaning)."""
    if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor):
        if new.shape != old.shape or new.dtype != old.dtype:
            return None
        if new is old or torch.equal(new, old):
            return 0.0
        if not new.is_floating_point():
            return float("inf")
        return relative_error([new], [old])
    if isinstance(new, (tuple, list)) and isinstance(old, (tuple, list)) and len(new) == len(old) and \
            all(isinstance(v, torch.Tensor) for v in (*new, *old)):
        errors = [_local_error(a, b) for a, b in zip(new, old)]
        return None if any(e is None for e in errors) else max(errors, default=0.0)
    return None


class _Recorded:
    """Every node's value on the example input (by node name), its signature and meta value; see the module doc."""

    def __init__(self, values: dict, signatures: dict, metas: dict, outputs: list[torch.Tensor]):
        self.values, self.signatures, self.metas, self.outputs = values, signatures, metas, outputs

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept values (a storage shared by views counted once)."""
        storages = {}
        for t in flat_tensors(list(self.values.values())):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    @classmethod
    def full(cls, gm: fx.GraphModule, inputs: tuple, record_shapes: bool) -> "_Recorded":
        return cls({}, {}, {}, []).update(gm, inputs, record_shapes, cut=-1.0)[0]

    def update(self, gm: fx.GraphModule, inputs: tuple, record_shapes: bool,
               cut: float) -> tuple["_Recorded", float | None]:
        """Evaluates `gm` reusing what is kept. Returns the new record and the worst error at the nodes where a
        recomputed value met a kept one; a value within `cut` of the kept one is replaced by it."""
        interp = fx.Interpreter(gm)
        flat = iter(_flat_probe(inputs))
        values, signatures, metas = {}, {}, {}
        unchanged: set[str] = set()  # nodes whose value is the kept one
        worst = 0.0
        outputs = None
        waiting = {n: len(n.users) for n in gm.graph.nodes}  # consumers still to run

        def value_of(node: fx.Node):
            value = values[node.name]
            if value is _DROPPED:  # an unchanged product the last record let go: its inputs are unchanged too
                value = values[node.name] = compute(node)
            return value

        def compute(node: fx.Node):
            args = torch.fx.node.map_arg(node.args, value_of)
            kwargs = torch.fx.node.map_arg(node.kwargs, value_of)
            return getattr(interp, node.op)(node.target, args, kwargs)

        with eval_threads():
            for n in gm.graph.nodes:
                if n.op == "output":
                    outputs = flat_tensors(torch.fx.node.map_arg(n.args[0], value_of))
                    break
                sig = _signature(gm, n) if n.op != "placeholder" else ("placeholder", n.target)
                signatures[n.name] = sig
                kept = self.values.get(n.name, _MISSING)
                same = kept is not _MISSING and _same_signature(sig, self.signatures.get(n.name))
                if n.op == "placeholder":
                    value = next(flat)
                elif n.op == "get_attr":  # a weight is its own record: written in place, it has a new version
                    value = interp.get_attr(n.target, (), {}) if not same else kept
                elif same and all(a.name in unchanged for a in n.all_input_nodes):
                    value = kept
                else:
                    value = compute(n)
                    err = _local_error(value, kept) if kept is not _MISSING and kept is not _DROPPED else None
                    if err is not None:
                        worst = max(worst, err)
                        if err <= cut:
                            value = kept
                if value is kept and (same or n.op not in ("placeholder", "get_attr")):
                    unchanged.add(n.name)
                    meta = self.metas.get(n.name)
                else:
                    meta = None
                if record_shapes:
                    if meta is None:
                        meta = _meta_value(value)
                    if meta is not None:
                        n.meta["val"] = meta
                values[n.name], metas[n.name] = value, meta
                for a in n.all_input_nodes:
                    waiting[a] -= 1
                    if not waiting[a] and _is_product(a, values):
                        values[a.name] = _DROPPED
        return _Recorded(values, signatures, metas, outputs or []), worst


def _is_product(node: fx.Node, values: dict) -> bool:
    """A value far larger than every input and every consumer's value: a broadcast product that a reduction reads
    right away (attention_to_conv's Q*K and E'*V). The record lets these go once their consumers have run: on
    converted DeiT-S they were 1.4 GB of it, and that much fresh memory page-faulted for ~10 s of system time in a
    cold process. The rare later pass that reads one again recomputes it from its kept inputs."""
    value = values.get(node.name)
    if node.op != "call_function" or not isinstance(value, torch.Tensor) or value.nbytes < PRODUCT_MIN_BYTES or \
            any(u.op == "output" for u in node.users):
        return False
    neighbours = [values.get(m.name) for m in (*node.all_input_nodes, *node.users)]
    return all(not isinstance(v, torch.Tensor) or v.nbytes * PRODUCT_RATIO <= value.nbytes for v in neighbours)


_MISSING = object()
_DROPPED = object()  # an unchanged value the record let go (_is_product); recomputed when a rewritten node reads it
# A kept value this large and at least PRODUCT_RATIO times each neighbour's is a broadcast product (_is_product).
PRODUCT_MIN_BYTES = 1 << 20
PRODUCT_RATIO = 4
# Past this many bytes of kept values the guard stops keeping them and checks each pass with a whole forward, as in
# 'each' mode (on the example input only): large inputs (all values of a 1024 px Swin at once are many GB) must not
# run out of memory for a speed-up.
RECORD_BUDGET_BYTES = 2 << 30


GUARD_MODES = ("each", "final")


@dataclass
class NumericGuard:
    """Holds the outputs of the last accepted graph; `measure` compares a candidate against them.

    mode 'each' (default) runs every probe after every pass. mode 'final' runs only the example input after each
    pass (so each pass is still measured and can be rolled back) and the random probes once, on the final graph
    (`finish`); convert() re-runs the pipeline in 'each' mode when that final check fails. It needs a third of the
    forward runs, which is what dominates conversion time on large models.
    """

    probes: list[tuple]
    rtol: float = DEFAULT_RTOL
    reference: list[list[torch.Tensor]] = field(default_factory=list)
    original: list[list[torch.Tensor]] = field(default_factory=list)
    mode: str = "each"
    stale: bool = False  # reference outputs of the random probes belong to an older graph ('final' mode)
    recorded: _Recorded | None = None  # every node's value on the example input ('final' mode)

    @classmethod
    def for_module(cls, module: torch.nn.Module, example_inputs: tuple, rtol: float = DEFAULT_RTOL,
                   n_random: int = 2, mode: str = "each", record_shapes: bool = False) -> "NumericGuard":
        """record_shapes: `module` is an fx.GraphModule whose node.meta['val'] is set from the example input's run."""
        if mode not in GUARD_MODES:
            raise ValueError(f"guard mode {mode!r} is not one of {', '.join(GUARD_MODES)}")
        guard = cls(probe_inputs(example_inputs, n_random), rtol, mode=mode)
        if mode == "final" and isinstance(module, fx.GraphModule):
            recorded = _Recorded.full(module, guard.probes[0], record_shapes)
            guard.recorded = recorded if recorded.nbytes <= RECORD_BUDGET_BYTES else None
            guard.reference = [recorded.outputs] + run_outputs(module, guard.probes[1:])
        else:
            guard.reference = run_outputs(module, guard.probes, record_shapes=record_shapes)
        guard.original = guard.reference
        return guard

    def _step_count(self) -> int:
        return len(self.probes) if self.mode == "each" else 1

    def measure(self, gm: fx.GraphModule, record_shapes: bool = False) -> tuple[float, float, list[list[torch.Tensor]]]:
        """(error vs the last accepted graph, error vs the original model, what `accept` takes).
        record_shapes: also refresh every node's meta['val'] from the run on the first probe (the example input)."""
        if self.recorded is not None:
            new, local = self.recorded.update(gm, self.probes[0], record_shapes, cut=self.rtol)
            if not local <= self.rtol:  # a node changed its value, or its meaning: decide on the whole forward
                new = _Recorded.full(gm, self.probes[0], record_shapes)
                local = 0.0
            step = max(local, relative_error(new.outputs, self.reference[0]))
            return step, relative_error(new.outputs, self.original[0]), new
        n = self._step_count()
        outs = run_outputs(gm, self.probes[:n], record_shapes=record_shapes)
        step = max(relative_error(o, r) for o, r in zip(outs, self.reference[:n]))
        total = max(relative_error(o, r) for o, r in zip(outs, self.original[:n]))
        return step, total, outs

    def accept(self, outputs) -> None:
        if isinstance(outputs, _Recorded):
            self.recorded = outputs if outputs.nbytes <= RECORD_BUDGET_BYTES else None
            outputs = [outputs.outputs]
            self.stale = True
        self.reference = list(outputs) + list(self.reference[len(outputs):])
        self.stale = self.stale or len(outputs) < len(self.probes) or self.recorded is not None

    def finish_example(self, gm: fx.GraphModule) -> float:
        """Runs `gm` whole on the example input (the incremental checks kept values of older graphs where they
        agreed) and returns the error against the original model; the random probes stay to be run (through the
        exported ONNX, convert's export path)."""
        self.recorded = None  # every node's value: let it go
        if self.stale:
            self.reference = [*run_outputs(gm, self.probes[:1]), *self.reference[1:]]
        return relative_error(self.reference[0], self.original[0])

    def finish(self, gm: fx.GraphModule) -> float:
        """Brings every probe's reference up to date with `gm`; returns the error against the original model."""
        self.recorded = None
        if self.stale:
            self.reference = run_outputs(gm, self.probes)
            self.stale = False
        return max(relative_error(r, o) for r, o in zip(self.reference, self.original))
