"""Coverage: run the converter over a corpus of attention families and tabulate what works, per target.

    attn2conv coverage                                   # the built-in corpus (attn2conv/coverage_corpus.toml)
    attn2conv coverage --families ViT,Swin --targets trt-safe,dla --json cov.json --markdown cov.md

    from attn2conv.coverage import load_corpus, run_coverage
    rows = run_coverage(load_corpus(), targets=("trt-safe",))

For every family (small config, random weights) and every target, with fidelity "exact":
  captured   torch.export captures the model (attn2conv.capture);
  certified  `convert(..., export=path)` writes ONNX that the verifier passes (no error-severity finding) and ONNX
             Runtime matches the original model within the guard's bound (1e-4 relative);
  rel.err    the converted graph against the original model (the guard's figure), and ONNX Runtime against torch;
  ops left   the ONNX ops the target still rejects (verifier findings at error severity), with counts;
  reason     for every failure, one line: the capture/convert/export error, or the rejected ops and their rules.
A failure is a finding about the converter, never hidden: the table lists every family, failed or not.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

DEFAULT_CORPUS = Path(__file__).with_name("coverage_corpus.toml")
DEFAULT_TARGETS = ("trt", "trt-safe", "dla")


@dataclass
class Family:
    name: str
    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input: tuple[int, ...] = (1, 3, 224, 224)
    attention: str = ""

    def build(self):
        """(model in eval mode, example input tuple); random weights, nothing downloaded."""
        import torch

        from attn2conv.cli import _hf_model, _timm_model

        if self.spec.startswith("timm:"):
            model = _timm_model(self.spec[5:], {k: _tuples(v) for k, v in self.kwargs.items()})
        elif self.spec.startswith("hf:"):
            model = _hf_model(self.spec[3:], dict(self.kwargs))
        else:
            raise ValueError(f"{self.name}: spec {self.spec!r} is neither timm:NAME nor hf:CONFIG_CLASS")
        torch.manual_seed(0)
        return model, (torch.randn(*self.input),)


@dataclass
class TargetResult:
    target: str
    certified: bool = False
    legal_fx: bool | None = None  # FX-level legality (no error-severity op kind left)
    rel_error: float | None = None  # converted graph vs original (guard)
    parity: float | None = None  # ONNX Runtime vs original model
    ops_left: dict[str, int] = field(default_factory=dict)  # ONNX op -> count of error findings
    rules: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    seconds: float = 0.0
    reason: str = ""  # one line when not certified


@dataclass
class FamilyResult:
    name: str
    spec: str
    attention: str
    captured: bool = False
    capture_reason: str = ""
    capture_seconds: float = 0.0
    params_m: float | None = None
    targets: dict[str, TargetResult] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_corpus(path: str | os.PathLike | None = None, families: Iterable[str] | None = None) -> list[Family]:
    """The corpus file's families, optionally only those named (case-insensitive; unknown names raise)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    path = Path(path) if path else DEFAULT_CORPUS
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    corpus = [Family(name=f["name"], spec=f["spec"], kwargs=dict(f.get("kwargs", {})),
                     input=tuple(f.get("input", (1, 3, 224, 224))), attention=f.get("attention", ""))
              for f in data.get("family", [])]
    names = [n.casefold() for n in corpus_names(corpus)]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: family names must be unique")
    if families:
        wanted = [w.strip() for w in families if w.strip()]
        by_name = {f.name.casefold(): f for f in corpus}
        unknown = [w for w in wanted if w.casefold() not in by_name]
        if unknown:
            raise ValueError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} "
                             f"(known: {', '.join(f.name for f in corpus)})")
        corpus = [by_name[w.casefold()] for w in wanted]
    return corpus


def corpus_names(corpus: Sequence[Family]) -> list[str]:
    return [f.name for f in corpus]


def run_family(family: Family, targets: Sequence[str] = DEFAULT_TARGETS, workdir: str | os.PathLike | None = None,
               rtol: float = 1e-4) -> FamilyResult:
    """Captures once (to say whether the model is capturable at all), then converts + exports + certifies per
    target. Never raises for a model failure: the reason goes into the result."""
    from attn2conv.capture import capture

    row = FamilyResult(name=family.name, spec=family.spec, attention=family.attention)
    try:
        model, inputs = family.build()
    except BaseException as exc:  # noqa: BLE001 - a corpus entry that timm/transformers cannot build is a finding
        if isinstance(exc, KeyboardInterrupt):
            raise
        row.capture_reason = f"build failed: {_line(exc)}"
        return row
    row.params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    start = time.perf_counter()
    try:
        with _quiet():
            capture(model, inputs)
        row.captured = True
    except Exception as exc:  # noqa: BLE001
        row.capture_reason = _line(exc)
    row.capture_seconds = round(time.perf_counter() - start, 2)
    if not row.captured:
        return row
    with tempfile.TemporaryDirectory(prefix="a2c_cov_", dir=workdir) as tmp:
        for target in targets:
            row.targets[target] = run_target(model, inputs, target, Path(tmp) / f"{_slug(family.name)}_{target}.onnx",
                                             rtol)
    return row


def run_target(model, inputs: tuple, target: str, path: Path, rtol: float = 1e-4) -> TargetResult:
    from attn2conv.convert import convert

    res = TargetResult(target=target)
    start = time.perf_counter()
    try:
        with _quiet():
            result = convert(model, target=target, example_inputs=inputs, export=path, rtol=rtol)
    except Exception as exc:  # noqa: BLE001 - recorded, one line
        res.seconds = round(time.perf_counter() - start, 2)
        res.reason = f"{type(exc).__name__}: {_line(exc)}"
        return res
    res.seconds = round(time.perf_counter() - start, 2)
    report = result.report
    exp = report.extra.get("export", {})
    res.certified = bool(result.certified)
    res.legal_fx = report.legal
    res.rel_error = _finite(report.rel_error)
    res.parity = _finite(exp.get("parity_vs_original", exp.get("parity")))
    res.rolled_back = [p.id for p in report.rolled_back]
    for f in result.check.failing:
        res.ops_left[f.op] = res.ops_left.get(f.op, 0) + 1
        if f.rule not in res.rules:
            res.rules.append(f.rule)
    if not res.certified:
        parts = []
        if res.ops_left:
            ops = ", ".join(f"{n}x {op}" for op, n in sorted(res.ops_left.items(), key=lambda kv: -kv[1]))
            parts.append(f"{result.check.profile.id} rejects {ops} ({', '.join(res.rules[:3])}"
                         f"{', ...' if len(res.rules) > 3 else ''})")
        if not exp.get("parity_ok", True):
            parts.append(f"ONNX Runtime vs torch {exp.get('parity'):.1e} > {rtol:g}")
        if res.rolled_back:
            parts.append(f"rolled back: {', '.join(res.rolled_back)}")
        res.reason = "; ".join(parts) or "not certified"
    elif res.rolled_back:
        res.reason = f"certified, but passes rolled back: {', '.join(res.rolled_back)}"
    return res


def run_coverage(corpus: Sequence[Family], targets: Sequence[str] = DEFAULT_TARGETS,
                 progress: Callable[[FamilyResult], None] | None = None,
                 workdir: str | os.PathLike | None = None) -> list[FamilyResult]:
    rows = []
    for family in corpus:
        row = run_family(family, targets, workdir=workdir)
        rows.append(row)
        if progress:
            progress(row)
    return rows


# --- tables ----------------------------------------------------------------------------------------------------------

def summary(rows: Sequence[FamilyResult], targets: Sequence[str]) -> dict[str, Any]:
    n = len(rows)
    out: dict[str, Any] = {"families": n, "captured": sum(r.captured for r in rows), "certified": {}}
    for t in targets:
        ok = sum(1 for r in rows if r.targets.get(t) and r.targets[t].certified)
        out["certified"][t] = {"count": ok, "fraction": round(ok / n, 3) if n else 0.0}
    return out


def to_markdown(rows: Sequence[FamilyResult], targets: Sequence[str]) -> str:
    head = ["family", "model", "captured"] + [f"{t}" for t in targets] + ["rel.err (max)", "ops left (worst target)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, f"`{r.spec}`", "yes" if r.captured else "**no**"]
        errs, worst = [], {}
        for t in targets:
            tr = r.targets.get(t)
            if tr is None:
                cells.append("-")
                continue
            cells.append("certified" if tr.certified else "**no**")
            if tr.rel_error is not None:
                errs.append(tr.rel_error)
            if sum(tr.ops_left.values()) > sum(worst.values()):
                worst = tr.ops_left
        cells.append(f"{max(errs):.1e}" if errs else "-")
        cells.append(", ".join(f"{op} x{n}" for op, n in sorted(worst.items(), key=lambda kv: -kv[1])) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    s = summary(rows, targets)
    lines.append("")
    lines.append(f"captured: {s['captured']}/{s['families']}; certified (exact): "
                 + ", ".join(f"{t} {v['count']}/{s['families']} ({v['fraction']:.0%})"
                             for t, v in s["certified"].items()))
    fails = failures(rows, targets)
    if fails:
        lines.append("")
        lines.append("Failures (one line each):")
        lines.append("")
        lines.extend(f"- **{name}** [{where}]: {reason}" for name, where, reason in fails)
    return "\n".join(lines) + "\n"


def failures(rows: Sequence[FamilyResult], targets: Sequence[str]) -> list[tuple[str, str, str]]:
    out = []
    for r in rows:
        if not r.captured:
            out.append((r.name, "capture", r.capture_reason))
            continue
        for t in targets:
            tr = r.targets.get(t)
            if tr is not None and not tr.certified:
                out.append((r.name, t, tr.reason))
    return out


def to_text(rows: Sequence[FamilyResult], targets: Sequence[str]) -> str:
    width = max([len(r.name) for r in rows] + [6])
    lines = [f"{'family':<{width}}  capt  " + "  ".join(f"{t:<9}" for t in targets) + "  rel.err  time"]
    for r in rows:
        marks = []
        for t in targets:
            tr = r.targets.get(t)
            marks.append(f"{'-' if tr is None else ('ok' if tr.certified else 'FAIL'):<9}")
        errs = [tr.rel_error for tr in r.targets.values() if tr.rel_error is not None]
        secs = r.capture_seconds + sum(tr.seconds for tr in r.targets.values())
        err = f"{max(errs):.1e}" if errs else "-"
        lines.append(f"{r.name:<{width}}  {'yes ' if r.captured else 'NO  '}  " + "  ".join(marks)
                     + f"  {err:<7}  {secs:5.1f}s")
    s = summary(rows, targets)
    lines.append(f"captured {s['captured']}/{s['families']}; certified (exact): "
                 + ", ".join(f"{t} {v['count']}/{s['families']} ({v['fraction']:.0%})"
                             for t, v in s["certified"].items()))
    for name, where, reason in failures(rows, targets):
        lines.append(f"  FAIL {name} [{where}]: {reason}")
    return "\n".join(lines) + "\n"


def to_json(rows: Sequence[FamilyResult], targets: Sequence[str], extra: dict[str, Any] | None = None) -> str:
    import platform

    doc = {"targets": list(targets), "fidelity": "exact", "summary": summary(rows, targets),
           "failures": [{"family": n, "where": w, "reason": r} for n, w, r in failures(rows, targets)],
           "families": [r.to_dict() for r in rows],
           "machine": {"platform": platform.platform(), "python": platform.python_version(),
                       "cpus": os.cpu_count()}}
    doc["versions"] = _versions()
    doc.update(extra or {})
    return json.dumps(doc, indent=2) + "\n"


# --- helpers ---------------------------------------------------------------------------------------------------------

def _versions() -> dict[str, str]:
    out = {}
    for mod in ("torch", "timm", "transformers", "onnx", "onnxruntime"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def _tuples(value):
    """TOML has arrays only; timm and transformers accept tuples where they want sequences."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _finite(x):
    import math

    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def _line(exc: BaseException, limit: int = 240) -> str:
    import re

    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split()) or type(exc).__name__  # no terminal colours
    return text[:limit]


@contextlib.contextmanager
def _quiet():
    """The exporter and model libraries print and warn a lot; the table is the output."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# --- command line: `attn2conv coverage` ------------------------------------------------------------------------------

class CoverageTool:
    """`attn2conv coverage`: the corpus through convert + export + verifier, one row per family."""

    def add_parser(self, sub) -> None:
        import argparse

        p = sub.add_parser("coverage", help="run the converter over a corpus of attention families; print the table",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Convert every family of the corpus (exact fidelity, small configs, random "
                                       "weights) for each target, export, certify, and tabulate the results. "
                                       "Every failure is listed with a one-line reason.",
                           epilog="exit status: 0 table written (and --fail-under met), 1 --fail-under not met, "
                                  "2 usage error.")
        p.add_argument("--corpus", metavar="FILE.toml", help=f"corpus file (default {DEFAULT_CORPUS.name}, built in)")
        p.add_argument("--families", metavar="A,B", help="only these families (names from --list)")
        p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                       help=f"comma-separated targets (default {','.join(DEFAULT_TARGETS)})")
        p.add_argument("--json", metavar="OUT.json", help="write every row, the summary and the failures as JSON")
        p.add_argument("--markdown", metavar="OUT.md", help="write the table as Markdown")
        p.add_argument("--fail-under", type=float, metavar="FRACTION",
                       help="exit 1 when the certified fraction of any target is below this (e.g. 0.5)")
        p.add_argument("--list", action="store_true", help="list the corpus families and exit")
        p.set_defaults(tool=self)

    def run(self, args) -> int:
        from attn2conv.check._report import write_atomic
        from attn2conv.cli import UsageError
        from attn2conv.targets import resolve_target

        try:
            corpus = load_corpus(args.corpus, args.families.split(",") if args.families else None)
        except (OSError, ValueError) as exc:
            raise UsageError(_line(exc)) from None
        if args.list:
            for f in corpus:
                kw = ", ".join(f"{k}={v}" for k, v in f.kwargs.items())
                print(f"{f.name:<20} {f.spec}{f' ({kw})' if kw else ''}  input {list(f.input)}  - {f.attention}")
            return 0
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        if not targets:
            raise UsageError("--targets needs at least one target")
        for t in targets:
            resolve_target(t)  # unknown target: ProfileError, one line, exit 2
        if args.fail_under is not None and not 0.0 <= args.fail_under <= 1.0:
            raise UsageError("--fail-under takes a fraction between 0 and 1")

        start = time.perf_counter()
        width = max(len(f.name) for f in corpus)

        done: list[FamilyResult] = []

        def say(row: FamilyResult) -> None:
            done.append(row)
            if args.json:  # after every family: a long run keeps what it measured
                write_atomic(args.json, to_json(done, targets, {"partial": len(done) < len(corpus)}))
            marks = " ".join(f"{t}:{'ok' if row.targets.get(t) and row.targets[t].certified else 'FAIL'}"
                             for t in targets) if row.captured else f"capture FAILED: {row.capture_reason[:120]}"
            secs = row.capture_seconds + sum(tr.seconds for tr in row.targets.values())
            print(f"  {row.name:<{width}}  {marks}  ({secs:.1f}s)", file=sys.stderr, flush=True)

        rows = run_coverage(corpus, targets, progress=say)
        seconds = round(time.perf_counter() - start, 1)
        print(to_text(rows, targets), end="")
        extra = {"seconds": seconds, "corpus": str(args.corpus or DEFAULT_CORPUS.name),
                 "command": "attn2conv coverage " + " ".join(sys.argv[2:])}
        if args.json:
            write_atomic(args.json, to_json(rows, targets, extra))
        if args.markdown:
            write_atomic(args.markdown, to_markdown(rows, targets))
        if args.fail_under is not None:
            low = {t: v["fraction"] for t, v in summary(rows, targets)["certified"].items()
                   if v["fraction"] < args.fail_under}
            if low:
                print("below --fail-under: " + ", ".join(f"{t} {f:.0%}" for t, f in low.items()), file=sys.stderr)
                return 1
        return 0
