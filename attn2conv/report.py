"""The conversion report: per pass what happened and what it cost, then what the target still rejects."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PassRecord:
    id: str
    exact: bool
    status: str  # "applied", "no change", "rolled back", "failed"
    rewrites: int = 0
    rel_error: float | None = None  # against the graph before this pass
    rel_error_total: float | None = None  # against the original model
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)


@dataclass
class ConversionReport:
    model: str
    target: str
    fidelity: str
    rtol: float
    passes: list[PassRecord] = field(default_factory=list)
    illegal_ops: list[dict[str, Any]] = field(default_factory=list)  # op kinds the target still rejects
    op_counts_before: dict[str, int] = field(default_factory=dict)
    op_counts_after: dict[str, int] = field(default_factory=dict)
    rel_error: float | None = None  # final graph vs original model
    capture_seconds: float = 0.0
    guard_mode: str = "each"  # see attn2conv.guard.NumericGuard
    extra: dict[str, Any] = field(default_factory=dict)  # export / check / precision sections added later

    @property
    def needs_distillation(self) -> bool:
        return any(not p.exact and p.status == "applied" for p in self.passes)

    @property
    def rolled_back(self) -> list[PassRecord]:
        return [p for p in self.passes if p.status in ("rolled back", "failed")]

    @property
    def legal(self) -> bool:
        """No op left that the target is known to reject (warnings = undocumented ops do not count)."""
        return not any(op["severity"] == "error" for op in self.illegal_ops)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["needs_distillation"] = self.needs_distillation
        d["legal"] = self.legal
        return _finite(d)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_table(self) -> str:
        rows = [("pass", "kind", "status", "rewrites", "rel.err", "vs orig", "time")]
        for p in self.passes:
            rows.append((p.id, "exact" if p.exact else "arch", p.status, str(p.rewrites), _err(p.rel_error),
                         _err(p.rel_error_total), f"{p.seconds:.2f}s"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"attn2conv: {self.model} -> {self.target} (fidelity {self.fidelity}, bound {self.rtol:g}, "
                 f"guard {self.guard_mode})"]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        for p in self.passes:
            for note in p.notes[:5]:
                lines.append(f"  note [{p.id}] {note}")
            if len(p.notes) > 5:
                lines.append(f"  note [{p.id}] ... and {len(p.notes) - 5} more")
            for miss in p.misses[:5]:
                lines.append(f"  skip [{p.id}] {miss}")
            if len(p.misses) > 5:
                lines.append(f"  skip [{p.id}] ... and {len(p.misses) - 5} more")
        lines.append(f"relative error vs original: {_err(self.rel_error)}")
        if self.illegal_ops:
            lines.append(f"ops left that {self.target} flags (error = known unsupported, warning = undocumented):")
            for op in self.illegal_ops:
                mods = ", ".join(op["modules"])
                lines.append(f"  {op['severity']:<7} {op['op_kind']:<34} -> {op['onnx_op']:<18} x{op['count']:<4} "
                             f"e.g. {mods}  [fix: {op['fix']}]")
        if self.legal:
            lines.append(f"no op left that {self.target} is known to reject")
        if self.needs_distillation:
            lines.append("architectural passes applied: the model needs distillation (attn2conv.distill)")
        for key, value in self.extra.items():
            if isinstance(value, str):
                lines.append(f"{key}: {value}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


def _err(x: float | None) -> str:
    return "-" if x is None else ("inf" if math.isinf(x) else f"{x:.1e}")


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
