"""Command line: ``attn2conv convert SPEC --target trt-safe -o model.onnx``.

SPEC names the model to build, always with random weights (nothing is downloaded):

    timm:NAME[?key=value&...]          timm.create_model(NAME, pretrained=False, **kwargs)
                                       e.g. timm:deit_small_patch16_224, timm:vit_tiny_patch16_224?depth=2&img_size=64
    hf:CONFIG_CLASS[?key=value&...]    a transformers config class with its defaults (plus kwargs) and the matching
                                       AutoModel, e.g. hf:ViTConfig?num_hidden_layers=2&image_size=64
    path/to/file.py:FACTORY[?k=v&...]  FACTORY(**kwargs) from that file; it returns an nn.Module, or a tuple
                                       (module, example_input)

Values after ``?`` are Python literals (2, 0.1, True, None, 'x', (4, 4)); anything else is taken as a string.
Quote the SPEC in a shell (``&`` and ``?`` are special there).

Exit status: 0 converted and certified; 1 converted and exported but not certified (the verifier still finds
errors, or ONNX Runtime disagrees with torch); 2 usage or input error (unknown model, wrong input shape, unwritable
output...), printed as one line, never a traceback (ATTN2CONV_DEBUG=1 shows one), with no output file left behind.
Progress per stage goes to stderr on a terminal; it is off when stderr is not a TTY or CI is set (CI logs).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

PROG = "attn2conv"


class UsageError(Exception):
    """Bad command line or model spec: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print its usage block)
        raise UsageError(message)


# --- model specs -----------------------------------------------------------------------------------------------------

def parse_kwargs(query: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if not key.isidentifier():
            raise UsageError(f"bad option {key!r} in the model spec: names look like depth=2")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def load_model(spec: str) -> tuple[Any, tuple | None, str]:
    """SPEC -> (model in eval mode, example inputs or None, display name)."""
    spec = spec.strip()
    base, _, query = spec.partition("?")
    kwargs = parse_kwargs(query)
    if base.startswith("timm:"):
        model = _timm_model(base[5:], kwargs)
        return model, _timm_inputs(model, kwargs), base
    if base.startswith("hf:"):
        return _hf_model(base[3:], kwargs), None, base
    path, sep, factory = base.rpartition(":")
    if sep and path.endswith(".py"):
        model, inputs = _file_model(Path(path), factory, kwargs)
        return model, inputs, base
    raise UsageError(f"cannot read model spec {spec!r}: use timm:NAME, hf:CONFIG_CLASS or path/to/file.py:factory")


def _timm_model(name: str, kwargs: dict[str, Any]):
    try:
        import timm
    except ImportError:
        raise UsageError("timm is not installed (pip install 'attn2conv[timm]')") from None
    if not name:
        raise UsageError("timm: needs a model name, e.g. timm:deit_small_patch16_224")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; list them with timm.list_models('*vit*')"
        raise UsageError(f"unknown timm model {name!r}{hint}")
    if kwargs.pop("pretrained", False):
        raise UsageError("pretrained weights are never downloaded: drop pretrained=True")
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - bad kwargs raise TypeError, AssertionError, ...
        raise UsageError(f"timm cannot build {name} with {kwargs}: {_line(exc)}") from None
    return model.eval()


def _timm_inputs(model, kwargs: dict[str, Any]) -> tuple | None:
    """timm keeps pretrained_cfg['input_size'] at the default when img_size/in_chans are overridden: follow them."""
    import torch

    if "img_size" not in kwargs and "in_chans" not in kwargs:
        return None  # capture derives it from pretrained_cfg
    c, h, w = (model.pretrained_cfg or {}).get("input_size", (3, 224, 224))
    size = kwargs.get("img_size", (h, w))
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    return (torch.randn(1, int(kwargs.get("in_chans", c)), int(h), int(w)),)


def _hf_model(name: str, kwargs: dict[str, Any]):
    try:
        import transformers
    except ImportError:
        raise UsageError("transformers is not installed (pip install 'attn2conv[hf]')") from None
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PretrainedConfig)):
        known = [n for n in dir(transformers) if n.endswith("Config")]
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else " (e.g. hf:ViTConfig)"
        raise UsageError(f"unknown transformers config class {name!r}{hint}")
    try:
        config = cls(**kwargs)
        model = transformers.AutoModel.from_config(config)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"transformers cannot build a model from {name}({kwargs}): {_line(exc)}") from None
    return model.eval()


def _file_model(path: Path, factory: str, kwargs: dict[str, Any]):
    import torch

    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    if not factory.isidentifier():
        raise UsageError(f"{factory!r} is not a function name (spec: path/to/file.py:factory)")
    spec = importlib.util.spec_from_file_location(f"attn2conv_user_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file
        raise UsageError(f"cannot import {path}: {_line(exc)}") from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise UsageError(f"{path} has no function {factory!r}")
    try:
        made = fn(**kwargs)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{path}:{factory}() failed: {_line(exc)}") from None
    inputs = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, inputs = made
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    if not isinstance(made, torch.nn.Module):
        raise UsageError(f"{path}:{factory}() returned {type(made).__name__}, not a torch.nn.Module")
    return made.eval(), inputs


def parse_shape(text: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\s*\d+(\s*[,x]\s*\d+)*\s*", text):
        raise UsageError(f"--input-shape {text!r}: give positive integers such as 1,3,224,224")
    dims = tuple(int(p) for p in re.split(r"[,x]", text))
    if any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape {text!r}: give positive integers such as 1,3,224,224")
    return dims


# --- progress --------------------------------------------------------------------------------------------------------

class Progress:
    """One line per stage on stderr, with the time each stage took; silent when not on a terminal or under CI."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.stage: str | None = None
        self.start = self.t0 = time.perf_counter()
        self.times: list[tuple[str, float]] = []

    @staticmethod
    def wanted(choice: str | None) -> bool:
        if choice is not None:
            return choice == "on"
        ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
        return sys.stderr.isatty() and not ci

    def __call__(self, stage: str) -> None:
        self._close()
        self.stage, self.start = stage, time.perf_counter()
        if self.enabled:
            print(f"  {stage:<24}", end="", file=sys.stderr, flush=True)

    def _close(self) -> None:
        if self.stage is None:
            return
        dt = time.perf_counter() - self.start
        self.times.append((self.stage, dt))
        if self.enabled:
            print(f"{dt:6.2f}s", file=sys.stderr, flush=True)
        self.stage = None

    def done(self) -> float:
        self._close()
        return time.perf_counter() - self.t0


# --- the tool --------------------------------------------------------------------------------------------------------

_EPILOG = """model specs (random weights; nothing is downloaded; quote them in a shell):
  timm:deit_small_patch16_224
  'timm:vit_tiny_patch16_224?depth=2&img_size=64'      timm.create_model kwargs after '?'
  'hf:ViTConfig?num_hidden_layers=2&image_size=64'     transformers config class + AutoModel.from_config
  'models.py:make_net?width=32'                         a factory in a file: returns a module or (module, input)
values after '?' are Python literals (2, 0.5, True, None, (64, 48)); anything else is a string.

exit status: 0 certified, 1 converted but not certified, 2 usage or input error (one line, no file written)."""


class ConvertTool:
    """`attn2conv convert`: build the model, convert, export, certify, print the table and the verdict."""

    def add_parser(self, sub) -> None:
        p = sub.add_parser("convert", help="convert a model and export a certified ONNX",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Convert a model's attention into convolutions for a TensorRT target, "
                                       "export ONNX and certify it with the verifier.",
                           epilog=_EPILOG)
        p.add_argument("spec", help="timm:NAME[?k=v&...], hf:CONFIG_CLASS[?k=v&...] or path/to/file.py:factory")
        p.add_argument("--target", "-t", default="trt-safe",
                       help="trt, trt-safe, dla, a profile id (trt-safe-8.6) or a profile .toml (default trt-safe)")
        p.add_argument("--fidelity", choices=("exact", "fast"), default="exact",
                       help="exact: numerically identical rewrites only (default); fast: also architectural swaps")
        p.add_argument("--mlp-hidden-ratio", type=float, metavar="R",
                       help="with --fidelity fast: also prune every MLP to R hidden units per channel (mlp_prune; "
                            "DeiT/Swin have 4, so 1 keeps a quarter); needs distillation")
        p.add_argument("--guard", choices=("each", "final"), default="final",
                       help="numeric guard: the example input after every pass and two random probes at the end, "
                            "re-run per pass if they fail (default, 'final'), or every probe after every pass ('each', "
                            "3x the forward runs)")
        p.add_argument("--input-shape", metavar="N,C,H,W",
                       help="example input shape (default: from the model's config, e.g. 1,3,224,224)")
        p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                       help="fp16: FP16 weights/activations/I-O; int8: explicit Q/DQ (trt, trt-safe) or FP16 + "
                            "calibration cache (dla); default fp32")
        p.add_argument("--calibration", metavar="DATA.npy",
                       help="INT8 calibration inputs, an .npy/.npz array (N, C, H, W); 500 samples are used "
                            "(without it: random normal inputs, which only suit a smoke test)")
        p.add_argument("--calibrator", choices=("max", "percentile", "entropy", "mse"), default="max",
                       help="INT8 calibration method (default max)")
        p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write the ONNX model")
        p.add_argument("--report", metavar="REPORT.json", help="also write the full report as JSON")
        p.add_argument("--progress", choices=("on", "off"),
                       help="per-stage progress on stderr (default: on for a terminal, off in CI)")
        p.set_defaults(tool=self)

    def run(self, args) -> int:
        import torch

        from attn2conv.convert import convert
        from attn2conv.errors import CaptureError
        from attn2conv.export import validate_destination
        from attn2conv.targets import resolve_target

        profile = resolve_target(args.target)
        out = validate_destination(args.output)
        report_path = validate_destination(args.report, suffix=".json") if args.report else None
        shape = parse_shape(args.input_shape) if args.input_shape else None
        if args.mlp_hidden_ratio is not None and (args.fidelity != "fast" or args.mlp_hidden_ratio <= 0):
            raise UsageError("--mlp-hidden-ratio needs --fidelity fast and a ratio above 0 (e.g. 1.0)")

        progress = Progress(Progress.wanted(args.progress))
        progress("build model")
        model, inputs, name = load_model(args.spec)
        if shape is not None:
            inputs = (torch.randn(shape),)
        calibration, options = _calibration(args, inputs, model)
        if args.mlp_hidden_ratio is not None:
            options = {**(options or {}), "mlp_prune": {"hidden_ratio": args.mlp_hidden_ratio}}
        written = _Written([out, out.with_name(out.name + ".data"), out.with_name(out.name + ".cert.json"),
                            out.with_name(out.name + ".ranges.json"), out.with_name(out.name + ".calib"),
                            report_path])
        with written.removed_on_error():
            try:
                result = convert(model, target=profile, example_inputs=inputs, fidelity=args.fidelity,
                                 guard=args.guard, export=out, progress=progress,
                                 precision=args.precision, calibration=calibration, options=options)
            except CaptureError as exc:
                given = f"--input-shape {args.input_shape}" if shape else "the default input shape"
                raise CaptureError(f"{exc} (with {given}; does the model accept it?)") from None
            total = progress.done()
            result.report.extra["spec"] = args.spec
            result.report.extra["stage_seconds"] = {k: round(v, 3) for k, v in progress.times}
            result.report.extra["total_seconds"] = round(total, 3)
            if report_path is not None:
                from attn2conv.check._report import write_atomic

                write_atomic(report_path, json.dumps(result.report.to_dict(), indent=2) + "\n")
        print(result.report.to_table())
        print(_verdict(result, name, total))
        return 0 if result.certified else 1


def _calibration(args, inputs, model):
    """(calibration batches, convert options) for --precision; (None, None) for FP32."""
    if args.precision == "fp32":
        return None, None
    options = {"precision": {"calibrator": args.calibrator}}
    if args.calibration:
        import numpy as np
        import torch

        try:
            data = np.load(args.calibration)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--calibration {args.calibration}: cannot read it as .npy/.npz ({_line(exc)})") from None
        if hasattr(data, "files"):  # .npz: the first array
            data = data[data.files[0]]
        return [torch.from_numpy(np.asarray(data, dtype=np.float32))], options
    if args.precision == "int8":
        import torch

        from attn2conv.capture import as_input_tuple, default_example_inputs

        example = as_input_tuple(inputs) or default_example_inputs(model)
        g = torch.Generator().manual_seed(0)
        print(f"{PROG}: warning: no --calibration data; INT8 calibrated on random normal inputs (a smoke test, not "
              f"a deployable calibration)", file=sys.stderr)
        return [torch.randn(example[0].shape, generator=g) for _ in range(8)], options
    return None, options


def _verdict(result, name: str, seconds: float) -> str:
    check = result.check
    lines = []
    if not result.certified:
        by_rule: dict[str, list] = {}
        for f in check.failing:
            by_rule.setdefault(f.rule, []).append(f)
        if by_rule:
            lines.append(f"what blocks {check.profile.id} (run attn2conv-check {result.onnx_path} --target "
                         f"{check.profile.id} for every finding):")
        for rule, fs in sorted(by_rule.items(), key=lambda kv: -len(kv[1])):
            mods = sorted({f.module for f in fs if f.module}, key=_natural)
            where = f" e.g. {', '.join(mods[:3])}" + (f" (+{len(mods) - 3} more)" if len(mods) > 3 else "") if mods else ""
            lines.append(f"  {len(fs):4d} x {fs[0].op:<18} {rule}{where}  [fix: {fs[0].fix}]")
        parity = result.report.extra["export"]["parity"]
        if parity is not None and parity > result.report.rtol:
            lines.append(f"  ONNX Runtime differs from torch by {parity:.1e} (bound {result.report.rtol:g})")
    cert = result.report.extra["export"].get("certificate")
    if result.certified:
        lines.append(f"VERDICT: CERTIFIED for {check.profile.id}: {name} -> {result.onnx_path} "
                     f"(certificate {cert}; {seconds:.1f}s)")
    else:
        c = check.counts()
        lines.append(f"VERDICT: converted and exported, NOT certified for {check.profile.id}: {name} -> "
                     f"{result.onnx_path} has {c['error']} error(s) the target rejects"
                     + ("" if result.report.extra["export"]["parity_ok"] else ", and ONNX Runtime does not match")
                     + f" ({seconds:.1f}s)")
    return "\n".join(lines)


class _Written:
    """Files this run may create; on an error those that did not exist before are removed."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths if p is not None]
        self.existed = {p for p in self.paths if p.exists()}

    @contextlib.contextmanager
    def removed_on_error(self):
        try:
            yield
        except BaseException:
            for p in self.paths:
                if p not in self.existed:
                    with contextlib.suppress(OSError):
                        p.unlink()
            raise


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="attn2conv: attention -> convolutions for TensorRT safety mode and DLA.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    ConvertTool().add_parser(sub)
    from attn2conv.coverage import CoverageTool  # stdlib-only at import time

    CoverageTool().add_parser(sub)
    return p


def _natural(text: str) -> list:
    """blocks.2 before blocks.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:240]


def main(argv: list[str] | None = None) -> int:
    from attn2conv.errors import Attn2ConvError

    try:
        args = build_parser().parse_args(argv)
        if args.version:
            from attn2conv import __version__

            print(f"{PROG} {__version__}")
            return 0
        if getattr(args, "tool", None) is None:
            raise UsageError("give a command: attn2conv convert SPEC -o OUT.onnx, or attn2conv coverage "
                             "(see attn2conv --help)")
        return args.tool.run(args)
    except UsageError as exc:
        print(f"{PROG}: usage error: {exc}", file=sys.stderr)
    except (Attn2ConvError, ValueError) as exc:  # CaptureError, ExportError, ProfileError, InputError (ValueErrors)
        print(f"{PROG}: error: {_line(exc)}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
    except OSError as exc:
        print(f"{PROG}: error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - the contract is one line, never a traceback
        if os.environ.get("ATTN2CONV_DEBUG"):
            raise
        print(f"{PROG}: error: {type(exc).__name__}: {_line(exc)} (ATTN2CONV_DEBUG=1 for a traceback)",
              file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
