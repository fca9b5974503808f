"""`convert`: capture -> passes (guarded) -> report, and later export -> check -> certificate."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from attn2conv.capture import as_input_tuple, capture, default_example_inputs
from attn2conv.guard import DEFAULT_RTOL, NumericGuard
from attn2conv.legality import illegal_ops, op_counts
from attn2conv.pass_infra import PassContext
from attn2conv.pipeline import Pipeline
from attn2conv.report import ConversionReport


@dataclass
class ConversionResult:
    module: fx.GraphModule  # the rewritten graph, runnable like the original model
    report: ConversionReport
    example_inputs: tuple = ()
    onnx_path: str | None = None
    check: Any = None  # attn2conv.check.CheckResult on the exported file
    certified: bool | None = None  # None until exported; then: verifier passes (fail on error) and ORT matches torch
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def convert(
    model: torch.nn.Module,
    target: str = "trt-safe",
    example_inputs: Any = None,
    fidelity: str = "exact",
    *,
    pipeline: Pipeline | None = None,
    rtol: float = DEFAULT_RTOL,
    options: dict[str, dict[str, Any]] | None = None,
    calibration: Any = None,
    progress: Callable[[str], None] | None = None,
    export: str | os.PathLike | None = None,
    precision: str = "fp32",
    evaluation: Any = None,
    guard: str = "final",
) -> ConversionResult:
    """Rewrites `model` for `target` ('trt', 'trt-safe', 'dla', a profile id such as 'trt-safe-8.6', or a profile file).

    fidelity='exact' applies only rewrites that keep the numbers; each one is checked against the graph before it
    (relative error <= rtol, fp32) and rolled back if it breaks the bound.
    fidelity='fast' also applies architectural swaps; the report then says the model needs distillation.
    `pipeline` overrides the preset pass list; `options` gives per-pass options {pass_id: {key: value}}.
    guard='final' (default) checks each pass on the example input (incrementally: only the part of the graph the pass
    rewrote is evaluated, see attn2conv.guard) and two random inputs once at the end, against the original model
    (with export=, through ONNX Runtime on the written file, which runs the converted graph several times faster
    than eager torch); if that final check fails, the pipeline re-runs with the per-pass guard on all three, which
    guard='each' does from the start (whole forward runs of the converted graph, which dominate the time).
    The user's model is deep-copied by capture and never modified.

    export='model.onnx' also writes the ONNX (attn2conv.export.export_onnx: opset from the profile, provenance kept),
    compares ONNX Runtime with torch (report.extra['export']['parity']), runs the verifier on the file with the same
    profile (.check) and writes the certificate next to it ('model.onnx.cert.json'). `.certified` is True when the
    verifier finds nothing at error severity and ONNX Runtime matches torch within rtol. On failure nothing new is left
    at the destination.

    precision='fp16' | 'int8' (needs export=) writes that precision instead (attn2conv.precision): FP16 with overflow
    checks, or INT8 as explicit Q/DQ (trt, trt-safe) / FP16 graph + dynamic ranges and a TensorRT calibration cache
    (dla). `calibration` (any iterable of batches; the first 500 samples are used) calibrates INT8; `evaluation`
    (batches not used for calibration) gives the drift against FP32 in report.extra['precision_report'];
    options['precision'] holds attn2conv.precision.PrecisionConfig fields (calibrator='max'|'percentile'|'entropy'|
    'mse', samples, ...).
    """
    with _collections_of_new_objects_only():
        return _convert(model, target, example_inputs, fidelity, pipeline, rtol, options, calibration, progress, export,
                        precision, evaluation, guard)


@contextlib.contextmanager
def _collections_of_new_objects_only():
    """Python's full garbage collections traverse every tracked object, and a process with torch, timm and a model
    loaded holds ~600k of them: the 1-2 full collections a DeiT-S conversion triggers cost 0.35 s each. The objects
    older than the call are frozen for its duration (gc.freeze), so collections see only what convert creates;
    unfreezing hands them back to the oldest generation. Skipped when the caller has frozen objects itself
    (unfreezing would undo that)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _convert(model, target, example_inputs, fidelity, pipeline, rtol, options, calibration, progress, export,
             precision, evaluation, guard) -> ConversionResult:
    from attn2conv.targets import resolve_target

    profile = resolve_target(target)
    if precision != "fp32":  # fail before the expensive part
        from attn2conv.precision import PRECISIONS, PrecisionConfig

        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if export is None:
            raise ValueError(f"precision={precision!r} writes an ONNX model: give export='model.onnx'")
        if precision == "int8" and calibration is None:
            raise ValueError("precision='int8' needs calibration=<iterable of batches> (500 samples are used)")
        PrecisionConfig.from_options((options or {}).get("precision"))
    if export is not None:  # fail before the expensive part
        from attn2conv.export import validate_destination

        validate_destination(export)
    inputs = as_input_tuple(example_inputs) or default_example_inputs(model)
    say = progress or (lambda stage: None)

    say("capture")
    start = time.perf_counter()
    gm = capture(model, inputs, shapes=False)  # the guard's first run below records the shapes
    capture_seconds = time.perf_counter() - start

    pipe = pipeline if pipeline is not None else Pipeline.for_target(profile.kind, fidelity)
    ctx = PassContext(example_inputs=inputs, profile=profile, fidelity=fidelity, options=dict(options or {}),
                      calibration=calibration)
    report = ConversionReport(model=gm.meta.get("source_class", type(model).__name__), target=profile.id,
                              fidelity=fidelity, rtol=rtol, capture_seconds=capture_seconds, guard_mode=guard,
                              op_counts_before=dict(op_counts(gm)))
    # torch.export reproduces the model exactly, so the captured graph is the numeric reference for every pass.
    numeric_guard = NumericGuard.for_module(gm, inputs, rtol=rtol, mode=guard, record_shapes=True)
    gm, report.passes = pipe.run(gm, ctx, numeric_guard, progress=say)
    # with export= in 'final' mode the random probes run through ONNX Runtime after the export (below)
    probes_in_ort = guard == "final" and export is not None and precision == "fp32"
    report.rel_error = numeric_guard.finish_example(gm) if probes_in_ort else numeric_guard.finish(gm)
    if guard == "final" and not report.needs_distillation and not report.rel_error <= rtol:
        gm, numeric_guard = _rerun_each(model, inputs, rtol, pipe, ctx, report, say)
        probes_in_ort = False
    result = ConversionResult(module=gm, report=report, example_inputs=inputs)
    if export is not None and precision != "fp32":
        from attn2conv.precision import export_with_precision

        _finish_report(result, profile)
        export_with_precision(result, export, profile, numeric_guard, say, precision, calibration, evaluation,
                              (options or {}).get("precision"))
        return result
    if export is not None:
        _export_and_certify(result, export, profile, numeric_guard, say)
        if probes_in_ort:
            random_error = max(result.report.extra["export"]["parity_vs_original_each"][1:], default=0.0)
            report.rel_error = max(report.rel_error, random_error)
            if not report.needs_distillation and not random_error <= rtol:
                result.module, numeric_guard = _rerun_each(model, inputs, rtol, pipe, ctx, report, say)
                _export_and_certify(result, export, profile, numeric_guard, say)
    _finish_report(result, profile)
    return result


def _rerun_each(model, inputs, rtol, pipe, ctx, report, say):
    """The final check failed with guard='final': every pass again with the per-pass guard on all probes."""
    report.extra["guard"] = (f"final check {report.rel_error:.1e} > {rtol:g} with guard='final': "
                             "re-ran every pass with the per-pass guard")
    captured = capture(model, inputs)  # the same graph again (kept no copy for this rare path)
    numeric_guard = NumericGuard.for_module(captured, inputs, rtol=rtol, mode="each")
    gm, report.passes = pipe.run(captured, ctx, numeric_guard, progress=say)
    report.rel_error = numeric_guard.finish(gm)
    return gm, numeric_guard


def _finish_report(result: ConversionResult, profile) -> None:
    report, gm = result.report, result.module
    report.op_counts_after = dict(op_counts(gm))
    report.illegal_ops = [dataclasses.asdict(op) for op in illegal_ops(gm, profile)]


def _export_and_certify(result: ConversionResult, path: str | os.PathLike, profile, guard: NumericGuard,
                        say: Callable[[str], None]) -> None:
    """ONNX export + ORT parity + verifier + certificate, as one transaction (attn2conv.export)."""
    from attn2conv.export import export_onnx

    report = result.report
    say("export")
    # ONNX Runtime on every probe against the original model; against torch where the guard has the final graph's
    # outputs (all probes after guard.finish, the example input after guard.finish_example)
    known = 1 if guard.stale else len(guard.probes)
    info = export_onnx(result.module, result.example_inputs, path, profile, rtol=report.rtol,
                       parity_inputs=guard.probes, parity_reference=guard.reference[:known],
                       original_reference=guard.original, certify=True, progress=say)
    check = info.check
    result.onnx_path, result.check = info.path, check
    result.certified = bool(check.ok and info.parity_ok)
    counts = check.counts()
    report.extra["export"] = info.to_dict()
    report.extra["check"] = {"profile": check.profile.id, "verdict": check.verdict, "fail_on": check.fail_on,
                             "counts": counts, "by_rule": check.by_rule(),
                             "failing": [f.to_dict() for f in check.failing[:50]]}
    report.extra["certified"] = result.certified
    report.extra["onnx"] = (f"{info.path} (opset {info.opset}, {info.nodes} nodes, ONNX Runtime vs torch "
                            f"{info.parity:.1e})")
    report.extra["verifier"] = (f"{check.verdict.upper()} for {check.profile.id}: {counts['error']} error(s), "
                                f"{counts['warning']} warning(s), {counts['note']} note(s)")
