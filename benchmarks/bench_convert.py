"""Benchmark: end-to-end `attn2conv.convert(..., export=path)` against a plain dynamo ONNX export of the same model.

    .venv/bin/python benchmarks/bench_convert.py [--models deit_small_patch16_224,swin_tiny_patch4_window7_224]
                                                 [--repeats 3] [--target trt-safe] [--guard each|final]
                                                 [--out benchmarks/results/convert.json] [--code DIR]

For each timm model (random weights, 1x3x224x224 input), alternating the two sides in every repeat:
- plain:   torch.onnx.export(model, (x,), path, dynamo=True) of the original model (opset 18, optimiser on, file written);
- convert: capture + every pass of the preset pipeline with its numeric guard + export (dynamo export, opset from the
           profile, graph-surgeon clean-up, onnx.checker) + ONNX Runtime parity + verifier + certificate.
Reported: medians over the repeats, overhead = convert / plain - 1 (target: <= 0.30), and the median time of each
convert stage ("capture" includes the guard's reference run; a pass stage includes its snapshot, shape refresh and
guard run). One warm-up export runs first so neither side pays the exporter's one-time start-up. The machine's load
average is recorded (before and after each model): on a shared machine the figures move with it, so compare the
overhead ratios, which are measured side by side, not the seconds. `--code DIR` imports attn2conv from another checkout
(a folder holding attn2conv/ with passes/ inside it, e.g. `git archive OLD attn2conv passes`), for a before/after
comparison run the same way. `--quiet` prints only the summary.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _code_root(argv) -> str:
    if "--code" in argv:
        return str(Path(argv[argv.index("--code") + 1]).resolve())
    return str(Path(__file__).resolve().parents[1])


sys.path.insert(0, _code_root(sys.argv))

import torch  # noqa: E402

import attn2conv  # noqa: E402

DEFAULT_MODELS = "deit_small_patch16_224,swin_tiny_patch4_window7_224"
TARGET_OVERHEAD = 0.30


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def plain_export(model, x, path: Path) -> float:
    start = time.perf_counter()
    with quiet(), torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    return time.perf_counter() - start


def attn2conv_convert(model, x, path: Path, target: str, guard: str | None) -> tuple[float, dict[str, float], object]:
    marks: list[tuple[str, float]] = []
    kwargs = {"guard": guard} if guard else {}
    start = time.perf_counter()
    with quiet():
        result = attn2conv.convert(model, target=target, example_inputs=(x,), export=path,
                                   progress=lambda stage: marks.append((stage, time.perf_counter())), **kwargs)
    end = time.perf_counter()
    stages = {}
    for (name, t0), (_, t1) in zip(marks, marks[1:] + [("end", end)]):
        stages[name] = stages.get(name, 0.0) + (t1 - t0)
    return end - start, stages, result


def bench_model(name: str, repeats: int, target: str, workdir: Path, guard: str | None = None,
                say=print) -> dict:
    import timm

    load_before = os.getloadavg()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    plain, ours, stage_runs, export_runs = [], [], [], []
    result = None
    for i in range(repeats):
        plain.append(plain_export(model, x, workdir / f"{name}_plain.onnx"))
        seconds, stages, result = attn2conv_convert(model, x, workdir / f"{name}_ours.onnx", target, guard)
        ours.append(seconds)
        stage_runs.append(stages)
        export_runs.append(result.report.extra["export"]["seconds"])
        say(f"  {name} run {i + 1}/{repeats}: plain {plain[-1]:.1f}s, convert {ours[-1]:.1f}s "
            f"(load {os.getloadavg()[0]:.1f})")
    med = lambda runs, key: round(statistics.median(r.get(key, 0.0) for r in runs), 3)  # noqa: E731
    plain_med, ours_med = statistics.median(plain), statistics.median(ours)
    exp = result.report.extra["export"]
    return {
        "plain_export_s": [round(s, 3) for s in plain],
        "convert_s": [round(s, 3) for s in ours],
        "plain_export_median_s": round(plain_med, 3),
        "convert_median_s": round(ours_med, 3),
        "overhead": round(ours_med / plain_med - 1.0, 3),
        "meets_target": ours_med / plain_med - 1.0 <= TARGET_OVERHEAD,
        "guard": result.report.guard_mode,
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "convert_stage_median_s": {k: med(stage_runs, k) for k in stage_runs[0]},
        "export_step_median_s": {k: med(export_runs, k) for k in export_runs[0]},
        "passes": [(p.id, p.status, p.rewrites) for p in result.report.passes],
        "certified": result.certified,
        "verifier": result.report.extra["verifier"],
        "onnx_nodes": exp["nodes"],
        "opset": exp["opset"],
        "parity_ort_vs_torch": exp["parity"],
        "rel_error_vs_original": result.report.rel_error,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated timm model names")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--target", default="trt-safe")
    ap.add_argument("--guard", choices=("each", "final"), default=None, help="convert's guard mode (default: its own)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "convert.json"))
    ap.add_argument("--code", default=None, help="import attn2conv from this folder instead (before/after runs)")
    ap.add_argument("--quiet", action="store_true", help="no per-run lines")
    args = ap.parse_args(argv)
    say = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))

    load_before = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        plain_export(torch.nn.Conv2d(3, 4, 1).eval(), torch.randn(1, 3, 8, 8), workdir / "warmup.onnx")
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            results[name] = bench_model(name, args.repeats, args.target, workdir, args.guard, say)
            write(out, args, results, load_before)  # after every model: a long run keeps what it measured
    for name, r in results.items():
        print(f"{name}: plain {r['plain_export_median_s']:.1f}s, convert {r['convert_median_s']:.1f}s "
              f"(overhead {r['overhead'] * 100:+.0f}%, target <= +{TARGET_OVERHEAD * 100:.0f}%), "
              f"certified {r['certified']}")
        print("   stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["convert_stage_median_s"].items()))
    print(f"wrote {out}")
    return 0


def write(out: Path, args, results: dict, load_before) -> None:
    doc = {
        "benchmark": "attn2conv.convert(export=...) end to end vs torch.onnx.export(dynamo=True) of the original",
        "target": args.target,
        "repeats": args.repeats,
        "overhead_target": TARGET_OVERHEAD,
        "code": str(Path(attn2conv.__file__).resolve().parents[1]),
        "guard": args.guard or "convert's default",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "loadavg_before": [round(v, 2) for v in load_before],
                    "loadavg_after": [round(v, 2) for v in os.getloadavg()]},
        "models": results,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
