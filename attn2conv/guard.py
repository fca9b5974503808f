"""Numeric guard: an exact pass must leave the graph's outputs unchanged.

Relative error = max|y - y_ref| / max|y_ref|, taken over every output tensor and every probe input (the example input
and `n_random` random inputs of the same shape and dtype). The default bound 1e-4 suits fp32; rewrites that reorder
reductions (a 1x1 conv instead of a GEMM, a folded BatchNorm) land around 1e-7..1e-6.
"""
from __future__ import annotations

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
    with torch.no_grad():
        if record_shapes and probes:
            first = flat_tensors(_ShapeRecorder(module).run(*_flat_probe(probes[0])))
            return [first] + [flat_tensors(module(*p)) for p in probes[1:]]
        return [flat_tensors(module(*p)) for p in probes]


def _flat_probe(probe: tuple) -> list:
    return torch.utils._pytree.tree_leaves(probe)


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph on real tensors and leaves each node a fake tensor of its value (shape, dtype, strides), as
    torch.fx.passes.fake_tensor_prop.FakeTensorProp would."""

    def __init__(self, module: fx.GraphModule):
        from torch._subclasses.fake_tensor import FakeTensorMode

        super().__init__(module)
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)

    def run_node(self, n: fx.Node):
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.fx.node import map_aggregate

        result = super().run_node(n)
        if n.op == "output":
            return result

        def fake(obj):
            if isinstance(obj, torch.Tensor):
                # an empty fake with the value's layout, built directly: from_tensor or empty_strided under the mode
                # go through fake dispatch, whose first call per new shape cost ~5 ms a node
                meta = torch.empty_strided(obj.shape, obj.stride(), dtype=obj.dtype, device="meta")
                return FakeTensor(self.mode, meta, obj.device)
            if isinstance(obj, (int, float, bool)):
                return obj
            return None

        meta = map_aggregate(result, fake)
        if meta is not None:
            n.meta["val"] = meta
        return result


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

    @classmethod
    def for_module(cls, module: torch.nn.Module, example_inputs: tuple, rtol: float = DEFAULT_RTOL,
                   n_random: int = 2, mode: str = "each", record_shapes: bool = False) -> "NumericGuard":
        """record_shapes: `module` is an fx.GraphModule whose node.meta['val'] is set from the example input's run."""
        if mode not in GUARD_MODES:
            raise ValueError(f"guard mode {mode!r} is not one of {', '.join(GUARD_MODES)}")
        guard = cls(probe_inputs(example_inputs, n_random), rtol, mode=mode)
        guard.reference = guard.original = run_outputs(module, guard.probes, record_shapes=record_shapes)
        return guard

    def _step_count(self) -> int:
        return len(self.probes) if self.mode == "each" else 1

    def measure(self, gm: fx.GraphModule, record_shapes: bool = False) -> tuple[float, float, list[list[torch.Tensor]]]:
        """(error vs the last accepted graph, error vs the original model, the candidate's outputs).
        record_shapes: also refresh every node's meta['val'] from the run on the first probe (the example input)."""
        n = self._step_count()
        outs = run_outputs(gm, self.probes[:n], record_shapes=record_shapes)
        step = max(relative_error(o, r) for o, r in zip(outs, self.reference[:n]))
        total = max(relative_error(o, r) for o, r in zip(outs, self.original[:n]))
        return step, total, outs

    def accept(self, outputs: list[list[torch.Tensor]]) -> None:
        self.reference = list(outputs) + list(self.reference[len(outputs):])
        self.stale = len(outputs) < len(self.probes)

    def finish(self, gm: fx.GraphModule) -> float:
        """Brings every probe's reference up to date with `gm`; returns the error against the original model."""
        if self.stale:
            outs = run_outputs(gm, self.probes[1:])
            self.reference = [self.reference[0], *outs]
            self.stale = False
        return max(relative_error(r, o) for r, o in zip(self.reference, self.original))
