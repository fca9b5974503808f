"""ONNX Runtime CPU latency of the converted DeiT-S: FP32 vs INT8 Q/DQ (and FP16 for reference), batch 1.

    .venv/bin/python benchmarks/bench_precision.py                          # DeiT-S 224, trt-safe
    .venv/bin/python benchmarks/bench_precision.py --model deit_tiny_patch16_224 --repeats 3 --threads 2

1. attn2conv.convert(deit_small_patch16_224 (random weights), "trt-safe", export=fp32.onnx): the exact conv-only form.
2. attn2conv.precision.lower_precision(fp32.onnx, ..., "int8"): onnxruntime quantize_static, explicit Q/DQ in the
   TensorRT form (symmetric, per-channel Conv weights, Q/DQ on conv inputs). Calibration on `--calib` random images:
   latency does not depend on the calibration data; accuracy figures need real data (see tests/test_precision.py).
   "int8_ort_placement" also quantizes the conv outputs (DQ -> Conv -> Q), the form onnxruntime's CPU provider fuses
   into QLinearConv; TensorRT's form leaves them float (the verifier warns about the split epilogues it creates).
   "fp16" is the FP16 export (onnxruntime's CPU provider has few FP16 kernels).
3. Latency: onnxruntime CPUExecutionProvider, ORT_ENABLE_ALL (onnxruntime fuses DQ->Conv->Q into QLinearConv),
   `--threads` intra-op threads; warm-up, then `--repeats` interleaved rounds of `--iters` runs per variant; the
   figure is the median over rounds of each round's median. Results: benchmarks/results/precision.json.
No TensorRT figures: no GPU was lent to the session that wrote this (TensorRT FP16/INT8 need one).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "precision.json"


def _session(path, threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main(argv=None) -> dict:
    import timm

    import attn2conv
    from attn2conv.precision import lower_precision

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--target", default="trt-safe")
    ap.add_argument("--calib", type=int, default=32, help="random calibration images (batch 1)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-fp16", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    result = {"benchmark": "ONNX Runtime CPU latency, converted model, FP32 vs INT8 Q/DQ (vs FP16)",
              "model": args.model, "target": args.target, "batch": 1, "threads": args.threads,
              "repeats": args.repeats, "iters": args.iters, "calibration_images": args.calib,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "loadavg_before": list(os.getloadavg())}, "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        conv = attn2conv.convert(model, args.target, example_inputs=(x,), export=tmp / "fp32.onnx")
        result["seconds"]["convert_fp32"] = round(time.perf_counter() - start, 1)
        result["fp32_certified"] = conv.certified
        paths = {"fp32": tmp / "fp32.onnx"}
        g = torch.Generator().manual_seed(1)
        calib = [torch.randn(1, 3, 224, 224, generator=g) for _ in range(args.calib)]
        evaluation = [torch.randn(1, 3, 224, 224, generator=g) for _ in range(4)]
        variants = [("int8", "int8", {}), ("int8_ort_placement", "int8", {"quantize_outputs": True})]
        variants += [] if args.no_fp16 else [("fp16", "fp16", {})]
        for name, precision, options in variants:
            start = time.perf_counter()
            res = lower_precision(paths["fp32"], tmp / f"{name}.onnx", precision, args.target, calibration=calib,
                                  evaluation=evaluation, config={"sensitivity": False, **options})
            result["seconds"][f"lower_{name}"] = round(time.perf_counter() - start, 1)
            result[f"{name}_drift_random_inputs"] = res.drift
            checked = attn2conv.check(tmp / f"{name}.onnx", args.target)
            result[f"{name}_verifier"] = {"verdict": checked.verdict, "by_rule": {
                k: v for k, v in checked.by_rule().items() if "PREC" in k}}
            if precision == "int8":
                result[name] = res.int8 | {"kept_float": len(res.int8["kept_float"])}
            paths[name] = tmp / f"{name}.onnx"
        sessions = {k: _session(p, args.threads) for k, p in paths.items()}
        feeds = {}
        for k, s in sessions.items():
            inp = s.get_inputs()[0]
            feeds[k] = {inp.name: x.numpy().astype(np.float16 if inp.type == "tensor(float16)" else np.float32)}
            for _ in range(3):
                s.run(None, feeds[k])
        rounds = {k: [] for k in sessions}
        for _ in range(args.repeats):
            for k, s in sessions.items():
                times = []
                for _ in range(args.iters):
                    t = time.perf_counter()
                    s.run(None, feeds[k])
                    times.append(time.perf_counter() - t)
                rounds[k].append(statistics.median(times) * 1000)
        result["latency_ms"] = {k: round(statistics.median(v), 2) for k, v in rounds.items()}
        result["latency_rounds_ms"] = {k: [round(t, 2) for t in v] for k, v in rounds.items()}
        result["speedup_vs_fp32"] = {k: round(result["latency_ms"]["fp32"] / v, 3)
                                     for k, v in result["latency_ms"].items() if k != "fp32"}
        result["file_mb"] = {k: round(p.stat().st_size / 2**20, 2) for k, p in paths.items()}
    result["machine"]["loadavg_after"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("latency_ms", "speedup_vs_fp32", "file_mb", "seconds")}, indent=2))
    return result


if __name__ == "__main__":
    main()
