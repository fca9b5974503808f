"""Target profiles: what an ONNX graph may contain to build on a TensorRT target.

A profile is a TOML data file (``attn2conv/profiles/<id>.toml``, or any file a user passes). This module is the one
small loader for them; it imports nothing heavy (no torch, no onnx) so both the torch side and ``attn2conv-check``
can use it.

Profile file layout (schema 1)::

    schema = 1
    id = "trt-safe-8.6"            # unique id, also the file stem of a built-in profile
    kind = "trt-safe"              # "trt" | "trt-safe" | "dla" (aliases resolve to the newest profile of a kind)
    version = "8.6"
    extends = "trt-8.6"            # optional: start from this built-in profile's ops, scope and rules
    title = "..."; confidence = "..."; description = "..."
    opset_min = 7; opset_max = 17  # default-domain opset range the parser accepts
    scope = ["Conv", ...]          # optional: ops positively known to run on the target; others get the
                                   # profile's `op_outside_scope` rule
    disable = ["A2C-..."]          # optional: drop inherited rules
    [sources] S1 = "https://..."   # evidence sources, cited by rules
    [ops] Conv = "F32 F16 I8"      # the parser's op matrix: op type -> supported data types
    [[rules]]                      # one table per rule; a rule with an inherited id replaces it field by field
    id = "A2C-SAFE-OP-MATMUL"      # stable: A2C-<TARGET>-<AREA>-<NAME>
    check = "op"                   # predicate name (attn2conv/check/_rules.py); other keys are its parameters
    ops = ["MatMul", "Gemm"]
    severity = "error"             # error: known unsupported; warning: not documented either way; note: advice
    evidence = "secondary"         # documented | code | secondary | inferred
    source = "S13"                 # key into [sources]
    reason = "{op} lowers to ..."  # one line; {op} and other params are filled in per finding
    why = "..."                    # longer text for `--explain`
    fix = "linear_to_conv"         # a pass id of this project, several joined by " or ", or a manual step
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "PASS_IDS",
    "SEVERITIES",
    "EVIDENCE_KINDS",
    "Profile",
    "ProfileError",
    "Rule",
    "list_targets",
    "load_profile",
    "resolve_target",
]

PROFILE_DIR = Path(__file__).with_name("profiles")
KINDS = ("trt", "trt-safe", "dla")
SEVERITIES = ("error", "warning", "note")  # most severe first
EVIDENCE_KINDS = ("documented", "code", "secondary", "inferred")
# Pass ids of this project that a rule may name as its fix.
PASS_IDS = frozenset({
    "linear_to_conv", "attention_to_conv", "layernorm_decompose", "gelu_decompose", "unfold_to_shift",
    "window_ops", "constant_fold", "fold_batchnorm", "fold_reparam",
    "attention_to_csa", "attention_to_sra", "layernorm_to_batchnorm", "gelu_to_relu",
})
# Checks that decide whether an op type is legal at all (the rest look at attributes, shapes, dtypes).
OP_LEVEL_CHECKS = ("op", "op_not_in_matrix", "op_outside_scope", "custom_op")
_RULE_KEYS = {"id", "check", "severity", "evidence", "source", "reason", "why", "fix"}
_MAX_EXTENDS = 4


class ProfileError(ValueError):
    """A profile file is missing, malformed, or names an unknown target."""


@dataclass(frozen=True)
class Rule:
    id: str
    check: str
    severity: str
    evidence: str
    source: str  # the source text (URL and what it is), resolved from the profile's [sources]
    reason: str
    fix: str
    why: str = ""
    params: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    source_ids: tuple[str, ...] = ()

    @property
    def fix_passes(self) -> list[str]:
        """The pass ids named by ``fix`` (empty when the fix is a manual step)."""
        parts = [p.strip() for p in self.fix.split(" or ")]
        return parts if all(p in PASS_IDS for p in parts) else []

    def format_reason(self, **values: Any) -> str:
        try:
            return self.reason.format(**{**self.params, **values})
        except (KeyError, IndexError, ValueError):
            return self.reason


@dataclass(frozen=True, eq=False)  # identity equality: profiles are loaded once and cached
class Profile:
    id: str
    kind: str
    version: str
    title: str
    description: str
    confidence: str
    opset_min: int
    opset_max: int
    ops: dict[str, tuple[str, ...]]  # op type -> data types the parser supports for it
    scope: frozenset[str] | None  # ops positively known to run; None = every op in `ops`
    rules: tuple[Rule, ...]
    sources: dict[str, str]
    path: Path | None
    sha256: str  # of this profile file's bytes
    extends: Profile | None = None

    def __post_init__(self) -> None:
        op_rules: dict[str, Rule] = {}
        for rule in self.rules:
            if rule.check == "op":
                for op in rule.params.get("ops", ()):
                    op_rules.setdefault(op, rule)
        object.__setattr__(self, "_op_rules", op_rules)
        object.__setattr__(self, "_by_id", {r.id: r for r in self.rules})
        object.__setattr__(self, "_op_cache", {})

    # -- the API the torch side uses -------------------------------------------------------------------------------
    def op_rule(self, op_type: str, domain: str = "") -> Rule | None:
        """The op-level rule that flags this op type on this target (error or warning), or None if it is legal.

        Attribute, dtype and shape constraints are not considered here. Precedence: the most severe matching rule;
        among equals, an explicit per-op rule first, then the most derived profile's rule (a child's custom-op
        rule before its parent's).
        """
        key = (op_type, domain)
        cache = self._op_cache  # type: ignore[attr-defined]
        if key in cache:
            return cache[key]
        candidates: list[Rule] = []
        explicit = self._op_rules.get(op_type)  # type: ignore[attr-defined]
        if explicit is not None:
            candidates.append(explicit)
        custom = domain not in ("", "ai.onnx")
        for rule in reversed(self.rules):  # rules of the most derived profile come last
            if rule.check == "custom_op" and custom:
                candidates.append(rule)
            elif rule.check == "op_not_in_matrix" and not custom and op_type not in self.ops:
                candidates.append(rule)
            elif (rule.check == "op_outside_scope" and not custom and self.scope is not None
                  and op_type in self.ops and op_type not in self.scope and explicit is None):
                candidates.append(rule)
        found = min(candidates, key=lambda r: SEVERITIES.index(r.severity)) if candidates else None
        cache[key] = found
        return found

    def op_allowed(self, op_type: str, domain: str = "") -> bool:
        """Coarse legality: True when no op-level rule (error or warning) flags this op type on this target."""
        return self.op_rule(op_type, domain) is None

    def rule(self, rule_id: str) -> Rule | None:
        return self._by_id.get(rule_id)  # type: ignore[attr-defined]

    @property
    def limits(self) -> dict[str, Any]:
        """Numeric limits of the tensor and opset rules, for display."""
        out: dict[str, Any] = {"opset": [self.opset_min, self.opset_max]}
        for r in self.rules:
            if r.check.startswith("tensor_") and "max" in r.params:
                out[r.id] = r.params["max"]
        return out

    def __repr__(self) -> str:
        return f"Profile({self.id!r}, rules={len(self.rules)}, ops={len(self.ops)})"


# -- loading ---------------------------------------------------------------------------------------------------------
def _read_toml(path: Path) -> tuple[dict[str, Any], bytes]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(data.decode("utf-8")), data
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"profile {path} is not valid TOML: {exc}") from None


def _make_rule(raw: dict[str, Any], sources: dict[str, str], where: str) -> Rule:
    missing = [k for k in ("id", "check", "severity", "evidence", "reason", "fix") if not raw.get(k)]
    if missing:
        raise ProfileError(f"{where}: rule {raw.get('id', '?')} lacks {', '.join(missing)}")
    if raw["severity"] not in SEVERITIES:
        raise ProfileError(f"{where}: rule {raw['id']} has severity {raw['severity']!r}; use one of {SEVERITIES}")
    if raw["evidence"] not in EVIDENCE_KINDS:
        raise ProfileError(f"{where}: rule {raw['id']} has evidence {raw['evidence']!r}; use one of {EVIDENCE_KINDS}")
    src_keys = [s.strip() for s in str(raw.get("source", "")).split(",") if s.strip()]
    unknown = [s for s in src_keys if s not in sources]
    if unknown:
        raise ProfileError(f"{where}: rule {raw['id']} cites unknown source {', '.join(unknown)}")
    source = "; ".join(f"{s}: {sources[s]}" for s in src_keys)
    params = {k: v for k, v in raw.items() if k not in _RULE_KEYS}
    return Rule(id=raw["id"], check=raw["check"], severity=raw["severity"], evidence=raw["evidence"],
                source=source, reason=raw["reason"], fix=raw["fix"], why=raw.get("why", ""), params=params,
                source_ids=tuple(src_keys))


def load_profile(path: str | Path, _depth: int = 0) -> Profile:
    """Load one profile file (built-in or user-provided)."""
    path = Path(path)
    raw, data = _read_toml(path)
    where = str(path)
    if raw.get("schema", 1) != 1:
        raise ProfileError(f"{where}: unsupported profile schema {raw.get('schema')!r} (expected 1)")
    for key in ("id", "kind", "version"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ProfileError(f"{where}: missing string field {key!r}")
    if raw["kind"] not in KINDS:
        raise ProfileError(f"{where}: kind {raw['kind']!r} is not one of {', '.join(KINDS)}")

    parent: Profile | None = None
    if raw.get("extends"):
        if _depth >= _MAX_EXTENDS:
            raise ProfileError(f"{where}: 'extends' chain deeper than {_MAX_EXTENDS}")
        base = PROFILE_DIR / f"{raw['extends']}.toml"
        if not base.is_file():
            raise ProfileError(f"{where}: extends unknown built-in profile {raw['extends']!r}")
        parent = load_profile(base, _depth + 1)

    sources = dict(parent.sources) if parent else {}
    sources.update({str(k): str(v) for k, v in raw.get("sources", {}).items()})
    ops: dict[str, tuple[str, ...]] = dict(parent.ops) if parent else {}
    ops.update({str(k): tuple(str(v).split()) for k, v in raw.get("ops", {}).items()})
    scope = frozenset(raw["scope"]) if "scope" in raw else (parent.scope if parent else None)

    # Rules: inherited first (in order), a same-id rule replaces fields, new rules are appended.
    merged: dict[str, dict[str, Any]] = {}
    for r in parent.rules if parent else ():
        merged[r.id] = {"id": r.id, "check": r.check, "severity": r.severity, "evidence": r.evidence,
                        "source": ",".join(r.source_ids), "reason": r.reason, "fix": r.fix, "why": r.why,
                        **r.params}
    seen: set[str] = set()
    for i, r in enumerate(raw.get("rules", [])):
        if not isinstance(r, dict) or not isinstance(r.get("id"), str):
            raise ProfileError(f"{where}: rule #{i + 1} has no id")
        if r["id"] in seen:
            raise ProfileError(f"{where}: rule id {r['id']} appears twice")
        seen.add(r["id"])
        merged[r["id"]] = {**merged.get(r["id"], {}), **r}
    for rid in raw.get("disable", []):
        merged.pop(rid, None)
    rules = [_make_rule(r, sources, where) for r in merged.values()]

    opset_min = int(raw.get("opset_min", parent.opset_min if parent else 1))
    opset_max = int(raw.get("opset_max", parent.opset_max if parent else 10**6))
    return Profile(
        id=raw["id"], kind=raw["kind"], version=raw["version"], title=raw.get("title", raw["id"]),
        description=raw.get("description", "").strip(), confidence=raw.get("confidence", ""),
        opset_min=opset_min, opset_max=opset_max, ops=ops, scope=scope, rules=tuple(rules), sources=sources,
        path=path, sha256=hashlib.sha256(data).hexdigest(), extends=parent,
    )


_BUILTIN: dict[str, Profile] | None = None


def _builtin() -> dict[str, Profile]:
    global _BUILTIN
    if _BUILTIN is None:
        profiles = {}
        for f in sorted(PROFILE_DIR.glob("*.toml")):
            p = load_profile(f)
            if p.id != f.stem:
                raise ProfileError(f"{f}: id {p.id!r} does not match the file name")
            profiles[p.id] = p
        _BUILTIN = profiles
    return _BUILTIN


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) if x.isdigit() else 0 for x in v.split("."))


def list_targets() -> list[Profile]:
    """Built-in profiles, sorted by kind then version."""
    return sorted(_builtin().values(), key=lambda p: (KINDS.index(p.kind), _version_key(p.version)))


def aliases() -> dict[str, str]:
    """Kind alias -> id of the newest built-in profile of that kind."""
    out: dict[str, str] = {}
    for p in list_targets():  # sorted ascending, so the newest wins
        out[p.kind] = p.id
    return out


def resolve_target(name: str | Path | Profile) -> Profile:
    """A profile from an id (``trt-safe-8.6``), a kind alias (``trt-safe``: the newest of that kind) or a file path."""
    if isinstance(name, Profile):
        return name
    text = str(name)
    builtin = _builtin()
    if text in builtin:
        return builtin[text]
    alias = aliases().get(text)
    if alias:
        return builtin[alias]
    if text.endswith(".toml") or isinstance(name, Path):
        return load_profile(text)
    valid = sorted(aliases()) + sorted(builtin)
    raise ProfileError(f"unknown target {text!r}; valid targets: {', '.join(valid)} (or a path to a .toml profile)")
