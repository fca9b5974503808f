"""ONNX Runtime CPU latency of Swin-T (batch 1, 224x224, random weights): the original model against the exact
trt-safe conversion, with the windows moved off the batch axis (batch_to_space, the preset) and without (windows
stay on the batch axis: 64 at stage 1, not certifiable on trt-safe).

    .venv/bin/python benchmarks/bench_swin_windows.py [--threads 2] [--repeats 7] [--workdir DIR]

Latency: after 3 warm-up runs, `--repeats` rounds; in each round every variant runs 3 times and the round's median is
kept; the figure is the median over rounds (rounds interleave the variants, so load from other processes hits all of
them alike). ONNX files are kept in --workdir and reused when present. Results: benchmarks/results/swin_windows.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "swin_windows.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    import timm
    import torch

    import attn2conv
    from attn2conv.capture import capture
    from attn2conv.export import export_onnx

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_swin_"))
    work.mkdir(parents=True, exist_ok=True)
    paths = {"original": work / "original.onnx", "trt-safe exact (batch_to_space)": work / "converted.onnx",
             "trt-safe exact, windows on batch": work / "windows_on_batch.onnx"}
    certified = None
    if not paths["original"].exists():  # trt-10's opset: the plain export has Pad-18, which opset 17 cannot take
        export_onnx(capture(model, (x,)), (x,), str(paths["original"]), target="trt-10", parity=False)
    if not paths["trt-safe exact (batch_to_space)"].exists():
        certified = attn2conv.convert(model, "trt-safe", (x,), export=str(paths["trt-safe exact (batch_to_space)"])
                                      ).certified
    if not paths["trt-safe exact, windows on batch"].exists():
        pipeline = attn2conv.Pipeline.for_target("trt-safe", "exact").remove("batch_to_space")
        module = attn2conv.convert(model, "trt-safe", (x,), pipeline=pipeline).module
        export_onnx(module, (x,), str(paths["trt-safe exact, windows on batch"]), target="trt-safe", parity=False)

    with torch.no_grad():
        reference = model(x).numpy()
    sessions, errors = {}, {}
    for name, path in paths.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.numpy()}
        out = sess.run(None, feed)[0]
        errors[name] = float(np.abs(out - reference).max() / np.abs(reference).max())
        sessions[name] = (sess, feed)
    for sess, feed in sessions.values():
        for _ in range(3):
            sess.run(None, feed)
    rounds: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(args.repeats):
        for name, (sess, feed) in sessions.items():
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                sess.run(None, feed)
                times.append(time.perf_counter() - t0)
            rounds[name].append(statistics.median(times) * 1e3)
    base = statistics.median(rounds["original"])
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/bench_swin_windows.py", *sys.argv[1:]]),
        "model": "swin_tiny_patch4_window7_224", "input": [1, 3, 224, 224], "weights": "random (pretrained=False)",
        "onnxruntime": ort.__version__, "threads": args.threads, "repeats": args.repeats,
        "cores_visible": os.cpu_count(), "load_average_at_end": os.getloadavg(),
        "certified_trt_safe": certified,
        "variants": {n: {"latency_ms_median": statistics.median(r), "latency_vs_original": statistics.median(r) / base,
                         "latency_ms_rounds": [round(t, 1) for t in r], "rel_error_vs_torch": errors[n]}
                     for n, r in rounds.items()},
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for name, v in result["variants"].items():
        print(f"{name:34s} {v['latency_ms_median']:8.1f} ms  x{v['latency_vs_original']:.2f}  "
              f"rel.err {v['rel_error_vs_torch']:.1e}")


if __name__ == "__main__":
    main()
