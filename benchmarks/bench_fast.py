"""ONNX Runtime CPU latency, batch 1: DeiT-S and Swin-T after convert(fidelity="fast") vs the originals, from 224x224
to 1024x1024 (AV camera scale), and how each grows with the number of pixels.

    .venv/bin/python benchmarks/bench_fast.py                              # sizes 224 1024, trt-safe
    .venv/bin/python benchmarks/bench_fast.py --sizes 224 --repeats 7      # 224 only (minutes, not tens of minutes)
    .venv/bin/python benchmarks/bench_fast.py --sizes 224 448 1024         # the growth fit over three sizes
    .venv/bin/python benchmarks/bench_fast.py --sizes 1024 --repeats 2 --variants deit_s deit_s_fast
    .venv/bin/python benchmarks/bench_fast.py --sizes 512 --repeats 3 --variants swin_t swin_t_fast --op-profile
    .venv/bin/python benchmarks/bench_fast.py --sizes 224 1024 --repeats 3 --variants swin_t swin_t_fast swin_t_fast_mlp

Variants (random weights, pretrained=False; every model exported with attn2conv.export.export_onnx):
  deit_s            timm deit_small_patch16_224 at img_size=S (MatMul + Softmax attention, LayerNorm, GELU)
  swin_t            timm swin_tiny_patch4_window7_224 at img_size=S (window 7; window 8 where 7 does not tile the
                    stages, e.g. 1024: 256/7 is not whole)
  deit_s_fast       attn2conv.convert(deit_s, --target, fidelity="fast") with the default plan (Next-ViT hybrid):
                    MHCA x 5, SRA, MHCA x 5, SRA (MHCA: grouped 3x3 conv, head dim 32, + the original proj; SRA: keys
                    and values from a ~7x7 average-pooled grid, original q/k/v/proj), LN -> BN (folded), GELU -> ReLU,
                    then the exact passes (for trt-safe: conv-only attention cores, no MatMul/Softmax)
  swin_t_fast       the same for swin_t with the windowed models' default plan: MHCA in stages 1-3, MHCA then SRA
                    in stage 4 (attention_stages "last"); the new blocks run on the whole feature map (window
                    partition, shift and reverse dropped)
  deit_s_fast_mlp,  the fast models with the opt-in MLP pruning as well: options={"mlp_prune": {"hidden_ratio":
  swin_t_fast_mlp   1.0}}, every MLP C -> 4C -> C becomes C -> C -> C (MLP MACs / 4; needs distillation)
  swin_t_fast_all,  Swin-T fast (+ mlp_prune) with the Next-ViT plan in every stage instead of Swin's default (attention
  swin_t_fast_mlp_all   in the last stage only): options={"attention_to_sra": {"attention_stages": "all"}}
Conversions use guard="final" (numeric checks once at the end; the fast passes are architectural anyway).
Latency: warm-up, then `--repeats` rounds; each round runs every variant `--iters` times and keeps the round's median;
the figure is the median over rounds (interleaving spreads the load of other processes over all variants).
Ratios: each fast model over its own original, and deit_s_fast over swin_t; `mac_ratio` the same for the ONNX
files' Conv/MatMul/Gemm multiply-accumulates (load-independent; per-MAC speed is about equal on ORT CPU, so for
Swin-T, whose windowed attention is already linear, it bounds the latency ratio: its MLPs, kept by the fast passes,
are 61 % of its MACs). --op-profile adds ORT's time per op type of every variant. Growth: least-squares fit of
log(latency) = a + k log(pixels) over the sizes; k = 1 is linear in pixels, attention's N^2 term pushes k towards 2.
Results go to benchmarks/results/fast.json (sizes measured in an earlier run and not re-measured are kept, marked
with the run that measured them).
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
RESULTS = ROOT / "benchmarks" / "results" / "fast.json"


def _swin_window(size: int) -> int:
    stages = [size // 4 // (2 ** i) for i in range(4)]
    return 7 if all(s % 7 == 0 for s in stages) else 8


def variant_options(variant: str) -> dict | None:
    """convert options of a fast variant: `_mlp` adds mlp_prune (hidden ratio 1), `_all` attention blocks in every
    stage (attention_stages "all": the Next-ViT plan, Swin's default before 2026-12-04)."""
    options: dict = {}
    if "_mlp" in variant:
        options["mlp_prune"] = {"hidden_ratio": 1.0}
    if variant.endswith("_all"):
        options["attention_to_sra"] = {"attention_stages": "all"}
    return options or None


def build(variant: str, size: int, target: str, out_dir: Path) -> tuple[str, dict]:
    import timm

    import attn2conv
    from attn2conv.capture import capture
    from attn2conv.export import export_onnx
    from _common import onnx_cost

    x = torch.randn(1, 3, size, size)
    path = out_dir / f"{variant}_{size}.onnx"
    info: dict = {}
    start = time.perf_counter()
    if variant.startswith("swin_t"):
        w = _swin_window(size)
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=size,
                                  window_size=w).eval()
        info["window"] = w
    else:
        model = timm.create_model("deit_small_patch16_224", pretrained=False, img_size=size).eval()
    fast = "_fast" in variant
    if fast:
        options = variant_options(variant)
        result = attn2conv.convert(model, target, x, fidelity="fast", guard="final", options=options)
        gm = result.module
        info["legal"] = result.report.legal
        plan = list(gm.meta.get("attn2conv_plan", {}).values())
        info["plan"] = {k: plan.count(k) for k in sorted(set(plan))}
        info["needs_distillation"] = result.report.needs_distillation
        info["rel_error_vs_original_before_distillation"] = result.report.rel_error
        info["errors_left"] = [op["onnx_op"] for op in result.report.illegal_ops if op["severity"] == "error"]
    else:
        gm = capture(model, (x,))
    export_onnx(gm, (x,), path, target if fast else "trt", parity=False)
    info["build_seconds"] = round(time.perf_counter() - start, 1)
    info["gmacs"] = round(onnx_cost(str(path))["macs"] / 1e9, 2)  # Conv/MatMul/Gemm multiply-accumulates
    info["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    del gm, model
    return str(path), info


def _session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def measure(paths: dict[str, str], size: int, threads: int, repeats: int, iters: int) -> dict[str, float]:
    feed = np.random.randn(1, 3, size, size).astype(np.float32)
    sessions = {k: _session(p, threads) for k, p in paths.items()}
    name = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    for k, s in sessions.items():
        s.run(None, {name[k]: feed})  # warm-up
    rounds: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            times = []
            for _ in range(iters):
                t = time.perf_counter()
                s.run(None, {name[k]: feed})
                times.append(time.perf_counter() - t)
            rounds[k].append(statistics.median(times))
    return {k: statistics.median(v) * 1000 for k, v in rounds.items()}


def growth_exponent(sizes: list[int], ms: list[float]) -> float:
    x = np.log(np.array(sizes, dtype=float) ** 2)
    y = np.log(np.array(ms))
    return float(np.polyfit(x, y, 1)[0])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 1024])  # 448 too with --sizes 224 448 1024
    ap.add_argument("--target", default="trt-safe")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["deit_s", "deit_s_fast", "swin_t", "swin_t_fast"])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--op-profile", action="store_true", help="also record ORT's time per op type (ms per run)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    latency: dict[str, dict[int, float]] = {v: {} for v in args.variants}
    builds: dict[str, dict[int, dict]] = {v: {} for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            paths = {}
            for v in args.variants:
                paths[v], builds[v][size] = build(v, size, args.target, Path(tmp))
                print(f"built {v} @ {size}: {builds[v][size]}", flush=True)
            ms = measure(paths, size, args.threads, args.repeats, args.iters)
            for v, t in ms.items():
                latency[v][size] = t
            if args.op_profile:
                import onnx
                from _common import ort_op_profile

                for v, p in paths.items():
                    name = onnx.load(p, load_external_data=False).graph.input[0].name
                    feed = {name: np.random.randn(1, 3, size, size).astype(np.float32)}
                    builds[v][size]["op_time_ms"] = ort_op_profile(p, feed, args.threads, 2, tmp)
            print(f"{size}x{size}: " + ", ".join(f"{v} {t:.1f} ms" for v, t in ms.items()), flush=True)
            for p in paths.values():
                for f in Path(tmp).glob(Path(p).name + "*"):
                    f.unlink()
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    old_latency = previous.get("latency_ms", {})
    for v in set(old_latency) | set(args.variants):  # sizes not re-measured now: keep the earlier run's figures
        for s, t in (old_latency.get(v) or {}).items():
            if int(s) not in args.sizes:
                latency.setdefault(v, {})[int(s)] = t
    sizes = sorted({s for d in latency.values() for s in d})
    command = "python benchmarks/bench_fast.py " + " ".join(argv if argv is not None else sys.argv[1:])
    runs = dict(previous.get("runs", {}))
    for s in args.sizes:
        runs[str(s)] = {"command": command, "load_avg_at_end": [round(v, 2) for v in os.getloadavg()],
                        "repeats": args.repeats, "iters": args.iters, "threads": args.threads}
    result = {
        "command": command,
        "target": args.target, "threads": args.threads, "repeats": args.repeats, "iters": args.iters,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "load_avg_at_end": os.getloadavg()},
        "runs": runs,
        "latency_ms": {v: {str(s): round(d[s], 2) for s in sorted(d)} for v, d in latency.items()},
        "builds": {v: {**(previous.get("builds", {}).get(v) or {}),
                       **{str(s): i for s, i in builds.get(v, {}).items()}} for v in latency},
    }
    pairs = {"deit_s_fast/deit_s": ("deit_s_fast", "deit_s"), "swin_t_fast/swin_t": ("swin_t_fast", "swin_t"),
             "deit_s_fast/swin_t": ("deit_s_fast", "swin_t"),
             "deit_s_fast_mlp/deit_s": ("deit_s_fast_mlp", "deit_s"),
             "swin_t_fast_mlp/swin_t": ("swin_t_fast_mlp", "swin_t"),
             "swin_t_fast_all/swin_t": ("swin_t_fast_all", "swin_t"),
             "swin_t_fast_mlp_all/swin_t": ("swin_t_fast_mlp_all", "swin_t")}
    result["ratio"] = {name: {str(s): round(latency[a][s] / latency[b][s], 3) for s in sizes
                              if s in latency.get(a, {}) and s in latency.get(b, {})}
                       for name, (a, b) in pairs.items() if a in latency and b in latency}
    result["growth_exponent_vs_pixels"] = {
        v: round(growth_exponent(sorted(d), [d[s] for s in sorted(d)]), 3) for v, d in latency.items() if len(d) >= 2}
    result["mac_ratio"] = {name: {str(s): round(builds[a][s]["gmacs"] / builds[b][s]["gmacs"], 3) for s in args.sizes
                                  if "gmacs" in builds.get(a, {}).get(s, {}) and "gmacs" in builds.get(b, {}).get(s, {})}
                           for name, (a, b) in pairs.items() if a in builds and b in builds}
    result["targets"] = {"ratio_at_224": 0.8, "ratio_at_1024": 0.4}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("latency_ms", "ratio", "mac_ratio", "growth_exponent_vs_pixels")
                      if k in result}, indent=2))
    return result


if __name__ == "__main__":
    main()
