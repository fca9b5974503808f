"""The pass contract and registry.

A pass is a small class in `passes/<id>.py`:

    @register
    class FoldBatchNorm(GraphPass):
        id = "fold_batchnorm"
        exact = True
        removes = ("aten._native_batch_norm_legit_no_training",)
        introduces = ()

        def run(self, gm, ctx) -> PassResult: ...

`run` edits the GraphModule in place and returns a PassResult saying whether it changed the graph, how many rewrites
it made, and why candidates did not match ("blocks.2.attn (linear_7): weight is computed in the graph"). The pipeline
snapshots the module before each pass, so a pass never has to undo its own work.
"""
from __future__ import annotations

import abc
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx

from attn2conv.errors import PipelineError


@dataclass
class PassResult:
    changed: bool
    rewrites: int = 0
    notes: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)  # candidates that did not match, each with the reason

    def tally(self, node: fx.Node, reason: str | None) -> None:
        """Counts one rewrite of `node`, or records why it was skipped (reason is None on success)."""
        if reason:
            from attn2conv.graph import where

            self.misses.append(f"{where(node)}: {reason}")
        else:
            self.rewrites += 1
            self.changed = True


@dataclass
class PassContext:
    """What a pass may know besides the graph: the target, the inputs, per-pass options."""

    example_inputs: tuple
    profile: Any = None  # attn2conv.targets.Profile, or None for "no target constraints"
    fidelity: str = "exact"
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: Any = None  # iterable of batches, for passes that need statistics

    def option(self, pass_id: str, key: str, default: Any = None) -> Any:
        return self.options.get(pass_id, {}).get(key, default)

    def allows(self, onnx_op: str) -> bool:
        """Whether the target accepts an ONNX op type at all (True when no profile is set)."""
        return True if self.profile is None else bool(self.profile.op_allowed(onnx_op))


class GraphPass(abc.ABC):
    id: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    removes: ClassVar[tuple[str, ...]] = ()  # op kinds it rewrites away, as counted by graph.op_kind
    introduces: ClassVar[tuple[str, ...]] = ()  # op kinds it may add
    summary: ClassVar[str] = ""

    @abc.abstractmethod
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Rewrites `gm` in place; returns what changed."""

    def __repr__(self) -> str:
        return f"<pass {self.id} ({'exact' if self.exact else 'architectural'})>"


_REGISTRY: dict[str, type[GraphPass]] = {}
_DISCOVERED = False


def register(cls: type[GraphPass]) -> type[GraphPass]:
    if not cls.id:
        raise PipelineError(f"{cls.__name__} has no pass id")
    if cls.id in _REGISTRY and _REGISTRY[cls.id] is not cls:
        raise PipelineError(f"pass id {cls.id!r} is registered twice ({_REGISTRY[cls.id].__name__}, {cls.__name__})")
    _REGISTRY[cls.id] = cls
    return cls


def _discover() -> None:
    """Imports every module of attn2conv.passes once, so their @register decorators run."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    import attn2conv.passes as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"attn2conv.passes.{info.name}")
    _DISCOVERED = True


def get_pass(pass_id: str) -> type[GraphPass]:
    _discover()
    try:
        return _REGISTRY[pass_id]
    except KeyError:
        raise PipelineError(f"unknown pass id {pass_id!r}; known passes: {', '.join(sorted(_REGISTRY))}") from None


def all_passes() -> dict[str, type[GraphPass]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))
