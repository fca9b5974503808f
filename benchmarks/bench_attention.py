"""ONNX Runtime CPU latency and peak memory of a ViT before and after the exact attention -> convolution rewrite.

    .venv/bin/python benchmarks/bench_attention.py                      # DeiT-S and Swin-T, batch 1, 224x224
    .venv/bin/python benchmarks/bench_attention.py --model deit_small_patch16_224 --repeats 5 --op-profile

Variants, exported with attn2conv.export.export_onnx (torch.onnx dynamo) and run side by side in one process:
  original        the captured model (MatMul + Softmax attention)
  attention-only  only attention_to_conv and matmul_to_conv for trt-safe (isolates the cost of the conv-only
                  attention cores, softmax and linear attention: --model coat_lite_tiny efficientvit_b0)
  converted       attn2conv.convert(model, target="trt-safe"): the whole exact pipeline (conv-only model)
Latency: after warm-up, `--repeats` rounds; in each round every variant runs `--iters` times and the round's median
is kept; the reported figure is the median over rounds (rounds interleave the variants, so load from other processes
hits all of them alike). Paired ratio: each iteration runs every variant back to back; the median over iterations of
(variant time / the original's time in the same iteration), steadier when the machine's speed drifts. Noise control:
a second session of the original, measured the same way (its paired ratio should be 1.00; its spread is the noise). Peak memory: the peak RSS of a fresh process that loads the ONNX file into an ORT session and
runs it three times (VmHWM), minus the same process's RSS before the session was created.
With --op-profile, ONNX Runtime's profiler also gives the time per ONNX op type of each variant (mean per run).
Results go to benchmarks/results/attention.json, one entry per model (random weights: pretrained=False). The target
of the issue: converted / original <= 2.0 for both models. The original and attention-only graphs are exported with
the trt-10 profile's opset (Swin's Pad has no opset-17 adapter), the converted one for trt-safe.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "attention.json"


def _session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _memory_probe(path: str, threads: int, shape: list[int]) -> None:
    """Child-process mode: prints the RSS growth (MiB) caused by loading and running `path`."""
    import onnxruntime  # noqa: F401  (imported before the baseline is taken)

    base = _status_kib("VmRSS")
    sess = _session(path, threads)
    feed = {sess.get_inputs()[0].name: np.random.randn(*shape).astype(np.float32)}
    for _ in range(3):
        sess.run(None, feed)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_rss_mib": peak / 1024, "session_growth_mib": (peak - base) / 1024}))


def _status_kib(field: str) -> int:
    """From /proc/self/status; unlike ru_maxrss, VmHWM is not inherited from the forking parent across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _export(module, x, path: str, target: str) -> None:
    from attn2conv.export import export_onnx

    export_onnx(module, (x,), path, target=target, parity=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["deit_small_patch16_224", "swin_tiny_patch4_window7_224"])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=int, default=None, help="attention_to_conv max_broadcast_elems")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--op-profile", action="store_true", help="also record ORT time per op type")
    ap.add_argument("--memory-probe", nargs=2, metavar=("ONNX", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        _memory_probe(args.memory_probe[0], args.threads, json.loads(args.memory_probe[1]))
        return

    for model_name in args.model:
        _bench_model(args, model_name)


def _bench_model(args, model_name: str) -> None:
    import timm
    import torch

    import attn2conv
    from attn2conv.capture import capture
    from attn2conv.pipeline import Pipeline

    torch.manual_seed(0)
    try:
        model = timm.create_model(model_name, pretrained=False, img_size=args.img_size).eval()
    except TypeError:  # no img_size argument (EfficientViT-MIT): its default input size is used as given
        model = timm.create_model(model_name, pretrained=False).eval()
    x = torch.randn(1, 3, args.img_size, args.img_size)
    options = {"attention_to_conv": {"max_broadcast_elems": args.budget}} if args.budget else {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_attention_"))
    variants: dict[str, dict] = {}

    start = time.perf_counter()
    with torch.no_grad():
        reference = model(x).numpy()
        modules = {"original": capture(model, (x,))}
        attn_only = attn2conv.convert(model, target="trt-safe", example_inputs=(x,), options=options,
                                      pipeline=Pipeline(["attention_to_conv", "matmul_to_conv"]))
        modules["attention-only"] = attn_only.module
        converted = attn2conv.convert(model, target="trt-safe", example_inputs=(x,), options=options)
        modules["converted"] = converted.module
    print(f"{model_name}: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    notes = {"attention-only": [n for p in attn_only.report.passes for n in p.notes][-1:],
             "converted": [f"{p.id}: {p.rewrites} rewrites" for p in converted.report.passes]}
    illegal = {"converted": [f"{o['onnx_op']} ({o['severity']})" for o in converted.report.illegal_ops]}

    sessions, paths = {}, {}
    for name, module in modules.items():
        path = str(tmp / f"{name}.onnx")
        _export(module, x, path, "trt-safe" if name == "converted" else "trt-10")
        sessions[name], paths[name] = _session(path, args.threads), path
        out = sessions[name].run(None, {sessions[name].get_inputs()[0].name: x.numpy()})[0]
        err = float(np.abs(out - reference).max() / np.abs(reference).max())
        variants[name] = {"rel_error_vs_torch": err, "nodes": _node_count(path)}

    # A second session of the original model is the noise control: its ratio to the first shows how far two runs of
    # the same graph drift apart on this machine (the VM's memory bandwidth varies over minutes).
    sessions["original (control)"] = _session(paths["original"], args.threads)
    feeds = {n: {s.get_inputs()[0].name: x.numpy()} for n, s in sessions.items()}
    for name, sess in sessions.items():
        for _ in range(args.warmup):
            sess.run(None, feeds[name])
    rounds: dict[str, list[float]] = {n: [] for n in sessions}
    paired: dict[str, list[float]] = {n: [] for n in sessions}  # per iteration, over the original's run next to it
    for _ in range(args.repeats):
        times: dict[str, list[float]] = {n: [] for n in sessions}
        for _ in range(args.iters):
            for name, sess in sessions.items():
                t0 = time.perf_counter()
                sess.run(None, feeds[name])
                times[name].append(time.perf_counter() - t0)
        for name in sessions:
            rounds[name].append(statistics.median(times[name]) * 1e3)
            paired[name] += [t / t0 for t, t0 in zip(times[name], times["original"])]
    control = sorted(paired.pop("original (control)"))
    rounds.pop("original (control)")
    sessions.pop("original (control)")
    load = os.getloadavg()
    for name in sessions:
        v = variants[name]
        v["latency_ms_median"] = statistics.median(rounds[name])
        v["latency_ms_rounds"] = [round(t, 2) for t in rounds[name]]
        probe = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--memory-probe",
                                paths[name], json.dumps(list(x.shape))], capture_output=True, text=True, check=True)
        v.update(json.loads(probe.stdout.strip().splitlines()[-1]))
        if args.op_profile:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from _common import ort_op_profile

            v["op_time_ms"] = ort_op_profile(paths[name], feeds[name], args.threads, 3, str(tmp))
    base = variants["original"]["latency_ms_median"]
    for name, v in variants.items():
        v["latency_vs_original"] = v["latency_ms_median"] / base
        ratios = sorted(paired[name])
        v["paired_ratio_median"] = statistics.median(ratios)
        v["paired_ratio_iqr"] = [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]]

    import onnxruntime

    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/bench_attention.py", *sys.argv[1:]]),
        "model": model_name, "input": [1, 3, args.img_size, args.img_size], "weights": "random (pretrained=False)",
        "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "threads": args.threads,
        "cpu": platform.processor() or platform.machine(), "cores_visible": os.cpu_count(),
        "load_average_during_timing": load, "repeats": args.repeats, "iters_per_round": args.iters,
        "target_converted_vs_original": 2.0, "variants": variants, "notes": notes, "remaining_illegal_ops": illegal,
        "noise_control_paired_ratio": {"median": statistics.median(control),
                                       "iqr": [control[len(control) // 4], control[(3 * len(control)) // 4]]},
    }
    out_path = Path(args.out)
    existing = json.loads(out_path.read_text()) if out_path.exists() else {}
    existing[model_name] = result
    out_path.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"{model_name} (load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, {args.threads} threads)")
    for name, v in variants.items():
        print(f"  {name:15s} {v['latency_ms_median']:8.2f} ms  x{v['latency_vs_original']:.2f}  "
              f"(paired x{v['paired_ratio_median']:.2f})  +{v['session_growth_mib']:.0f} MiB  "
              f"rel.err {v['rel_error_vs_torch']:.1e}  {v['nodes']} nodes")
    noise = result["noise_control_paired_ratio"]
    print(f"  noise control: the original against a second session of itself, paired x{noise['median']:.3f} "
          f"(IQR {noise['iqr'][0]:.3f}-{noise['iqr'][1]:.3f})")


def _node_count(path: str) -> int:
    import onnx

    return len(onnx.load(path, load_external_data=False).graph.node)


if __name__ == "__main__":
    main()
