"""Shared by the benchmark scripts: the machine description, ONNX Runtime sessions, interleaved medians, JSON output,
ONNX parameter/MAC counts and ORT per-op-type profiles."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine(threads: int | None = None) -> dict:
    """What the numbers were measured on: CPU model, cores, load, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for mod in ("torch", "onnx", "onnxruntime", "timm", "transformers", "numpy"):
        m = sys.modules.get(mod)
        if m is not None:
            versions[mod] = getattr(m, "__version__", "?")
    return {"cpu": cpu, "cores_visible": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "ort_threads": threads, "versions": versions,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "note": "shared machine: other processes ran alongside; compare ratios measured in one run, not times "
                    "across runs"}


def session(path: str, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def interleaved_medians(runners: dict, repeats: int, iters: int = 1, warmup: int = 1) -> dict[str, dict]:
    """runners: name -> zero-argument callable. After `warmup` calls each, `repeats` rounds; in a round every runner
    runs `iters` times and the round keeps its median. Returns name -> {median_ms, rounds_ms}. Interleaving spreads
    the load of other processes over every variant alike."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    rounds: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            rounds[name].append(statistics.median(ts) * 1e3)
    return {k: {"median_ms": round(statistics.median(v), 3), "rounds_ms": [round(t, 3) for t in v]}
            for k, v in rounds.items()}


def write_json(path: str | os.PathLike, doc: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def onnx_cost(path: str) -> dict:
    """Parameters (initializer elements) and multiply-accumulates of Conv / ConvTranspose / MatMul / Gemm, plus the
    element count of element-wise outputs (Mul, Add, Div, Sub, Sigmoid, ...), from ONNX shape inference."""
    import numpy as np
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(path), data_prop=True)
    g = model.graph
    shapes = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            shapes[vi.name] = dims
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    params = int(sum(np.prod(i.dims, dtype=np.int64) for i in g.initializer))
    macs, elementwise, by_op = 0, 0, defaultdict(int)
    for n in g.node:
        out = shapes.get(n.output[0]) if n.output else None
        if out is None:
            continue
        vol = int(np.prod(out, dtype=np.int64))
        if n.op_type in ("Conv", "ConvTranspose"):
            w = shapes.get(n.input[1])
            if w:
                k = int(np.prod(w[1:], dtype=np.int64))  # Cin/groups * kh * kw
                m = vol * k
                macs += m
                by_op[n.op_type] += m
        elif n.op_type in ("MatMul", "Gemm"):
            a = shapes.get(n.input[0])
            if a:
                k = a[-1] if not (n.op_type == "Gemm" and any(at.name == "transA" and at.i for at in n.attribute)) \
                    else a[0]
                macs += vol * k
                by_op[n.op_type] += vol * k
        elif n.op_type in ("Mul", "Add", "Sub", "Div", "Sigmoid", "Relu", "Exp", "Sqrt", "Max", "Tanh", "Erf",
                           "Softmax", "Pow", "Neg", "Reciprocal"):
            elementwise += vol
    return {"params": params, "macs": int(macs), "macs_by_op": dict(by_op), "elementwise_elems": int(elementwise),
            "nodes": len(g.node)}


def ort_op_profile(path: str, feed: dict, threads: int, runs: int, tmpdir: str) -> dict[str, float]:
    """Mean time per run (ms) spent in each ONNX op type, from ONNX Runtime's built-in profiler."""
    sess = session(path, threads, profile_prefix=str(Path(tmpdir) / Path(path).stem))
    sess.run(None, feed)  # warm-up (its events are skipped below: first run is dropped)
    for _ in range(runs):
        sess.run(None, feed)
    prof = sess.end_profiling()
    events = json.loads(Path(prof).read_text())
    os.unlink(prof)
    per_run: list[dict[str, float]] = []
    for ev in events:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            per_run.append({})
    totals: dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            totals[ev.get("args", {}).get("op_name", "?")] += ev.get("dur", 0) / 1e3
    n = runs + 1  # the profile holds the warm-up run as well
    return {op: round(t / n, 4) for op, t in sorted(totals.items(), key=lambda kv: -kv[1])}


def memory_probe(path: str, threads: int, shape: list[int]) -> dict:
    """Peak RSS growth of a fresh process that loads `path` into ORT and runs it 3 times (bench_attention's probe)."""
    import subprocess

    probe = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--threads",
                            str(threads), "--memory-probe", path, json.dumps(shape)],
                           capture_output=True, text=True, check=True)
    return json.loads(probe.stdout.strip().splitlines()[-1])
