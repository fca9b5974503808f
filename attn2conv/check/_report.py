"""Output formats (text, JSON, SARIF 2.1.0, JUnit XML), the certificate, and atomic file writes."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape, quoteattr

from attn2conv.targets import Profile, Rule

from ._load import external_data_digests

if TYPE_CHECKING:
    from ._engine import CheckResult, Finding

TOOL_NAME = "attn2conv-check"
TOOL_URI = "https://github.com/attn2conv/attn2conv"
SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
_SARIF_LEVEL = {"error": "error", "warning": "warning", "note": "note"}


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("attn2conv")
    except Exception:  # noqa: BLE001 - not installed (source checkout)
        return "0.0.0+source"


def _listed(result: CheckResult, max_findings: int | None) -> list[Finding]:
    return result.findings if max_findings is None else result.findings[: max(0, max_findings)]


def _where(f: Finding) -> str:
    parts = [p for p in (f.module, Path(f.source).name if f.source else None) if p]
    return f" ({', '.join(parts)})" if parts else ""


def to_text(result: CheckResult, max_findings: int | None = None) -> str:
    lines = []
    for f in _listed(result, max_findings):
        lines.append(f"{result.model_name}:{f.node}: {f.severity} {f.rule}: {f.reason}{_where(f)} [fix: {f.fix}]")
    hidden = len(result.findings) - len(_listed(result, max_findings))
    if hidden:
        lines.append(f"... {hidden} more finding(s) not listed (--max-findings)")
    if result.findings:
        lines.append("")
        lines.append("findings by rule:")
        rules = {r.id: r for r in result.profile.rules}
        for rid, n in result.by_rule().items():
            lines.append(f"  {n:6d}  {rules[rid].severity:<7} {rid}" if rid in rules else f"  {n:6d}  {rid}")
    for note in result.notes:
        lines.append(f"note: {note}")
    c = result.counts()
    lines.append(f"{result.model_name}: {result.verdict.upper()} for {result.profile.id}: {c['error']} error(s), "
                 f"{c['warning']} warning(s), {c['note']} note(s) (fail on: {result.fail_on})")
    return "\n".join(lines) + "\n"


def _profile_dict(p: Profile) -> dict:
    d = {"id": p.id, "kind": p.kind, "version": p.version, "sha256": p.sha256}
    if p.extends is not None:
        d["extends"] = {"id": p.extends.id, "sha256": p.extends.sha256}
    return d


def to_json(result: CheckResult, max_findings: int | None = None) -> str:
    doc = {
        "tool": {"name": TOOL_NAME, "version": tool_version()},
        "model": {"name": result.model_name, "sha256": result.model_sha256},
        "profile": _profile_dict(result.profile),
        "fail_on": result.fail_on,
        "verdict": result.verdict,
        "counts": {**result.counts(), "by_rule": result.by_rule()},
        "findings": [f.to_dict() for f in _listed(result, max_findings)],
        "findings_listed": len(_listed(result, max_findings)),
        "findings_total": len(result.findings),
        "notes": result.notes,
    }
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def _rule_descriptor(r: Rule) -> dict:
    return {
        "id": r.id,
        "name": r.id.replace("-", "_").lower(),
        "shortDescription": {"text": r.reason.replace("{", "").replace("}", "")},
        "fullDescription": {"text": r.why or r.reason},
        "help": {"text": f"Fix: {r.fix}. Evidence ({r.evidence}): {r.source}"},
        "defaultConfiguration": {"level": _SARIF_LEVEL[r.severity]},
        "properties": {"evidence": r.evidence, "source": r.source, "fix": r.fix, "check": r.check},
    }


def to_sarif(result: CheckResult, max_findings: int | None = None) -> str:
    rules = list(result.profile.rules)
    index = {r.id: i for i, r in enumerate(rules)}
    results = []
    for f in _listed(result, max_findings):
        logical = {"name": f.node, "kind": "function"}
        if f.module:
            logical["fullyQualifiedName"] = f"{f.module}/{f.node}"
        loc = {"physicalLocation": {"artifactLocation": {"uri": result.model_name}}, "logicalLocations": [logical]}
        res = {
            "ruleId": f.rule,
            "ruleIndex": index[f.rule],
            "level": _SARIF_LEVEL[f.severity],
            "message": {"text": f"{f.reason} [fix: {f.fix}]"},
            "locations": [loc],
            "properties": {"op": f.op, "fix": f.fix, **({"tensor": f.tensor} if f.tensor else {})},
        }
        if f.source and ":" in f.source:
            file, _, line = f.source.rpartition(":")
            if line.isdigit():
                res["relatedLocations"] = [{
                    "id": 0,
                    "physicalLocation": {"artifactLocation": {"uri": Path(file).as_uri() if Path(file).is_absolute()
                                                              else file},
                                         "region": {"startLine": int(line)}},
                    "message": {"text": f"Python source of {f.module or f.node}"},
                }]
        results.append(res)
    doc = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": TOOL_NAME, "version": tool_version(), "informationUri": TOOL_URI,
                                "rules": [_rule_descriptor(r) for r in rules]}},
            "artifacts": [{"location": {"uri": result.model_name},
                           "hashes": {"sha-256": result.model_sha256}}],
            "results": results,
            "properties": {"profile": _profile_dict(result.profile), "verdict": result.verdict,
                           "findingsTotal": len(result.findings)},
        }],
    }
    return json.dumps(doc, indent=2) + "\n"


def to_junit(result: CheckResult, max_findings: int | None = None) -> str:
    listed = _listed(result, max_findings)
    failing = {id(f) for f in result.failing}
    by_rule: dict[str, list] = {}
    for f in listed:
        by_rule.setdefault(f.rule, []).append(f)
    suite = f"{TOOL_NAME}.{result.profile.id}"
    cases, n_fail = [], 0
    for r in result.profile.rules:
        fs = by_rule.get(r.id, [])
        fails = [f for f in fs if id(f) in failing]
        others = [f for f in fs if id(f) not in failing]
        n_fail += 1 if fails else 0
        body = []
        for f in fails:
            text = f"{f.node} ({f.op}){_where(f)}: {f.reason} [fix: {f.fix}]"
            body.append(f"      <failure type={quoteattr(f.severity)} message={quoteattr(f.reason)}>"
                        f"{escape(text)}</failure>")
        if others:
            out = "\n".join(f"{f.severity}: {f.node} ({f.op}): {f.reason}" for f in others)
            body.append(f"      <system-out>{escape(out)}</system-out>")
        attrs = f'classname={quoteattr(suite)} name={quoteattr(r.id)}'
        cases.append(f"    <testcase {attrs}>\n" + "\n".join(body) + "\n    </testcase>" if body
                     else f"    <testcase {attrs}/>")
    head = (f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuites name={quoteattr(TOOL_NAME)} '
            f'tests="{len(cases)}" failures="{n_fail}">\n'
            f'  <testsuite name={quoteattr(suite)} tests="{len(cases)}" failures="{n_fail}" errors="0" '
            f'skipped="0">\n')
    return head + "\n".join(cases) + "\n  </testsuite>\n</testsuites>\n"


def certificate(result: CheckResult, now: datetime | None = None) -> str:
    """A JSON certificate; identical inputs give identical bytes except ``issued_at``."""
    loaded = result.loaded
    model = {"name": result.model_name, "sha256": result.model_sha256}
    if loaded is not None and loaded.external:
        model["external_data"] = external_data_digests(loaded)
    doc = {
        "certificate_version": 1,
        "tool": {"name": TOOL_NAME, "version": tool_version()},
        "model": model,
        "profile": _profile_dict(result.profile),
        "fail_on": result.fail_on,
        "verdict": result.verdict,
        "counts": {**result.counts(), "by_rule": result.by_rule()},
        "issued_at": (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to path via a temporary file in the same folder and os.replace (never a half-written file)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
