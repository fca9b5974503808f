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


def run_outputs(module: torch.nn.Module, probes: list[tuple]) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return [flat_tensors(module(*p)) for p in probes]


@dataclass
class NumericGuard:
    """Holds the outputs of the last accepted graph; `measure` compares a candidate against them."""

    probes: list[tuple]
    rtol: float = DEFAULT_RTOL
    reference: list[list[torch.Tensor]] = field(default_factory=list)
    original: list[list[torch.Tensor]] = field(default_factory=list)

    @classmethod
    def for_module(cls, module: torch.nn.Module, example_inputs: tuple, rtol: float = DEFAULT_RTOL,
                   n_random: int = 2) -> "NumericGuard":
        guard = cls(probe_inputs(example_inputs, n_random), rtol)
        guard.reference = guard.original = run_outputs(module, guard.probes)
        return guard

    def measure(self, gm: fx.GraphModule) -> tuple[float, float, list[list[torch.Tensor]]]:
        """(error vs the last accepted graph, error vs the original model, the candidate's outputs)."""
        outs = run_outputs(gm, self.probes)
        step = max(relative_error(o, r) for o, r in zip(outs, self.reference))
        total = max(relative_error(o, r) for o, r in zip(outs, self.original))
        return step, total, outs

    def accept(self, outputs: list[list[torch.Tensor]]) -> None:
        self.reference = outputs
