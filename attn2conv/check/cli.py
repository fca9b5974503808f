"""Command line: ``attn2conv-check MODEL.onnx --target trt-safe``.

Exit status: 0 clean, 1 findings at or above --fail-on, 2 usage or input error. Errors are one line, never a
traceback (set ATTN2CONV_DEBUG=1 to see one for an internal error).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from attn2conv.targets import ProfileError, aliases, list_targets, resolve_target

from ._load import InputError

PROG = "attn2conv-check"
FORMATS = ("text", "json", "sarif", "junit")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage block)
        raise _UsageError(message)


class CheckTool:
    """The attn2conv-check tool: argument parsing and the run, one class in the Polygraphy spirit."""

    def build_parser(self) -> argparse.ArgumentParser:
        p = _Parser(prog=PROG, description="Check an ONNX model against a TensorRT target profile.")
        p.add_argument("model", nargs="?", help="the .onnx file to check")
        tgt = p.add_mutually_exclusive_group()
        tgt.add_argument("--target", "-t", default="trt-safe",
                         help="profile id (trt-safe-8.6) or alias for the newest of a kind (trt, trt-safe, dla); "
                              "default trt-safe")
        tgt.add_argument("--profile", metavar="FILE", help="a profile .toml file of your own")
        p.add_argument("--format", "-f", choices=FORMATS, default="text")
        p.add_argument("-o", "--output", metavar="FILE", help="write the report here (atomically) instead of stdout")
        p.add_argument("--fail-on", choices=("error", "warning", "note", "never"), default="error",
                       help="lowest severity that makes the exit status 1 (default error)")
        p.add_argument("--max-findings", type=int, metavar="N", help="list at most N findings (the verdict counts all)")
        p.add_argument("--certificate", metavar="FILE", help="write a JSON certificate of this check")
        p.add_argument("--shape-inference", choices=("auto", "always", "never"), default="auto",
                       help="run ONNX shape inference: auto = unless every node output already has a recorded "
                            "static shape (then inference could not change the findings)")
        p.add_argument("--build", action="store_true",
                       help="also parse and build the engine with TensorRT (needs the trt extra and a GPU; "
                            "otherwise says so in one line and skips); a failed build makes the exit status 1")
        p.add_argument("--list-targets", action="store_true", help="list the built-in profiles and exit")
        p.add_argument("--explain", metavar="RULE", help="explain a rule id and exit")
        p.add_argument("--version", action="store_true", help="print the tool version and exit")
        return p

    def run(self, argv: list[str] | None) -> int:
        args = self.build_parser().parse_args(argv)
        if args.version:
            from ._report import tool_version
            print(f"{PROG} {tool_version()}")
            return 0
        if args.list_targets:
            return self.list_targets()
        profile = resolve_target(args.profile) if args.profile else resolve_target(args.target)
        if args.explain:
            return self.explain(args.explain, profile)
        if not args.model:
            raise _UsageError("the model argument is required (or use --list-targets / --explain RULE)")
        if args.max_findings is not None and args.max_findings < 0:
            raise _UsageError("--max-findings must be >= 0")

        from ._engine import check
        from ._report import certificate, write_atomic

        result = check(args.model, profile, fail_on=args.fail_on, shape_inference=args.shape_inference)
        render = {"text": result.to_text, "json": result.to_json, "sarif": result.to_sarif,
                  "junit": result.to_junit}[args.format]
        report = render(args.max_findings)
        build = None
        if args.build:
            from attn2conv.trt_build import build_engine

            build = build_engine(args.model, profile)
            report = _with_build(report, args.format, build)
        try:
            if args.output:
                write_atomic(args.output, report)
            else:
                sys.stdout.write(report)
            if args.certificate:
                write_atomic(args.certificate, certificate(result))
        except OSError as exc:
            raise InputError(f"cannot write {exc.filename or 'output'}: {exc.strerror or exc}") from None
        return 0 if result.ok and not (build is not None and build.failed) else 1

    def list_targets(self) -> int:
        alias = {v: k for k, v in aliases().items()}
        for p in list_targets():
            tag = f" (alias: {alias[p.id]})" if p.id in alias else ""
            print(f"{p.id:<14} {p.title}{tag}  [{len(p.rules)} rules, opset {p.opset_min}-{p.opset_max}, "
                  f"confidence {p.confidence}]")
        return 0

    def explain(self, rule_id: str, profile) -> int:
        rule = profile.rule(rule_id)
        if rule is None:
            for p in list_targets():  # explain works for any built-in rule, whatever the target
                rule = p.rule(rule_id)
                if rule is not None:
                    profile = p
                    break
        if rule is None:
            raise _UsageError(f"unknown rule {rule_id!r}; rule ids look like A2C-SAFE-OP-MATMUL (see the profiles)")
        wrap = lambda s: textwrap.fill(s, 100, subsequent_indent="          ")  # noqa: E731
        print(f"{rule.id} ({rule.severity}, profile {profile.id})")
        print(wrap(f"what:     {rule.format_reason(op='<op>', version=profile.version)}"))
        print(wrap(f"why:      {rule.why or rule.reason}"))
        print(wrap(f"evidence: {rule.evidence}: {rule.source}"))
        print(wrap(f"fix:      {rule.fix}" + (" (attn2conv pass)" if rule.fix_passes else " (manual step)")))
        return 0


def _with_build(report: str, fmt: str, build) -> str:
    """Adds the TensorRT builder's verdict: a line in text, a "trt_build" member in JSON; for SARIF and JUnit (fixed
    schemas) it goes to stderr."""
    if fmt == "text":
        return report + ("" if report.endswith("\n") else "\n") + build.line() + "\n"
    if fmt == "json":
        import json

        doc = json.loads(report)
        doc["trt_build"] = build.to_dict()
        return json.dumps(doc, indent=2) + "\n"
    print(f"{PROG}: {build.line()}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    try:
        code = CheckTool().run(argv)
    except _UsageError as exc:
        print(f"{PROG}: usage error: {exc}", file=sys.stderr)
        code = 2
    except (InputError, ProfileError) as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        code = 2
    except Exception as exc:  # noqa: BLE001 - the contract is one line, never a traceback
        if os.environ.get("ATTN2CONV_DEBUG"):
            raise
        msg = " ".join(str(exc).split())[:200]
        print(f"{PROG}: error: cannot check this input ({type(exc).__name__}: {msg})", file=sys.stderr)
        code = 2
    return code


if __name__ == "__main__":
    sys.exit(main())
