"""Original vs exact vs fast, side by side in one run: latency against input resolution (ONNX Runtime CPU, batch 1),
per-op-type time (ORT profiler), peak memory, parameters and MACs, conversion time by stage. Writes
benchmarks/results/pipeline.json and PNG plots (latency_vs_resolution.png, op_time_by_type.png).

    .venv/bin/python benchmarks/bench_pipeline.py                                   # defaults below (~5-8 min)
    .venv/bin/python benchmarks/bench_pipeline.py --model deit_small_patch16_224 --exact-max 1024 --repeats 7

Variants (timm, random weights, img_size=S; every one exported with attn2conv.export.export_onnx):
  original  the captured model (MatMul + Softmax attention, LayerNorm, GELU), exported for `trt`
  exact     attn2conv.convert(model, --target, fidelity="exact"): numerically the same model, conv-only for trt-safe
  fast      attn2conv.convert(model, --target, fidelity="fast"): CSA / spatial-reduction attention, BN, ReLU
            (architectural: needs distillation), then the exact passes
Sizes: `--sizes` (default 224 384 512 768 1024); the exact variant only up to `--exact-max` (default 384), because
its conv-only attention core materialises (N x N)-sized broadcast products: on CPU its cost grows with N^2 like
attention's, with a larger constant (see op_time_by_type). Latency: warm-up, then `--repeats` rounds interleaving the
variants, `--iters` runs per round, median of the round medians. Memory: peak RSS growth of a fresh process that
loads and runs the ONNX (benchmarks/bench_attention.py's probe). MACs: Conv/MatMul/Gemm from ONNX shape inference.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, interleaved_medians, machine, memory_probe, onnx_cost, ort_op_profile,  # noqa: E402
                     session, write_json)

import numpy as np  # noqa: E402
import torch  # noqa: E402

VARIANTS = ("original", "exact", "fast")


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def build(model_name: str, variant: str, size: int, target: str, path: Path) -> dict:
    import timm

    import attn2conv
    from attn2conv.capture import capture
    from attn2conv.export import export_onnx

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, img_size=size).eval()
    x = torch.randn(1, 3, size, size)
    info: dict = {"torch_params": sum(p.numel() for p in model.parameters())}
    marks: list[tuple[str, float]] = []
    start = time.perf_counter()
    with quiet():
        if variant == "original":
            gm = capture(model, (x,))
            marks.append(("export", time.perf_counter()))
            export_onnx(gm, (x,), path, "trt", parity=False)
        else:
            result = attn2conv.convert(model, target, (x,), fidelity=variant, export=path,
                                       progress=lambda stage: marks.append((stage, time.perf_counter())))
            info.update(certified=result.certified, rel_error_vs_original=result.report.rel_error,
                        needs_distillation=result.report.needs_distillation,
                        errors_left=sorted({o["onnx_op"] for o in result.report.illegal_ops
                                            if o["severity"] == "error"}))
    end = time.perf_counter()
    info["build_s"] = round(end - start, 2)
    stages: dict[str, float] = {}
    for (name, t0), (_, t1) in zip(marks, marks[1:] + [("end", end)]):
        stages[name] = round(stages.get(name, 0.0) + t1 - t0, 3)
    info["stage_s"] = stages
    info.update(onnx_cost(str(path)))
    return info


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224", help="a timm ViT that takes img_size")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512, 768, 1024])
    ap.add_argument("--exact-max", type=int, default=384, help="largest size for the exact variant")
    ap.add_argument("--target", default="trt-safe")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile-size", type=int, default=224, help="size for the per-op-type profile and memory")
    ap.add_argument("--profile-runs", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "pipeline.json"))
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        print("note: fewer than 5 repeats; the figures are less stable", file=sys.stderr)

    doc: dict = {"command": "python benchmarks/bench_pipeline.py " + " ".join(argv if argv is not None
                                                                              else sys.argv[1:]),
                 "model": args.model, "target": args.target, "weights": "random (pretrained=False)",
                 "repeats": args.repeats, "iters": args.iters, "sizes": args.sizes, "exact_max": args.exact_max,
                 "profile_size": args.profile_size,
                 "latency_ms": {v: {} for v in VARIANTS}, "builds": {v: {} for v in VARIANTS}}
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        tmpdir = Path(tmp)
        for size in args.sizes:
            paths = {}
            for v in VARIANTS:
                if v == "exact" and size > args.exact_max:
                    continue
                path = tmpdir / f"{v}_{size}.onnx"
                doc["builds"][v][str(size)] = build(args.model, v, size, args.target, path)
                paths[v] = str(path)
                b = doc["builds"][v][str(size)]
                print(f"built {v} @ {size}: {b['build_s']}s, {b['nodes']} nodes, {b['macs'] / 1e9:.2f} GMAC",
                      flush=True)
            feed = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
            sessions = {v: session(p, args.threads) for v, p in paths.items()}
            runners = {v: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed})) for v, s in sessions.items()}
            lat = interleaved_medians(runners, args.repeats, args.iters, warmup=1)
            for v, r in lat.items():
                doc["latency_ms"][v][str(size)] = r
            print(f"{size}: " + ", ".join(f"{v} {r['median_ms']:.1f} ms" for v, r in lat.items()), flush=True)
            if size == args.profile_size:
                doc["op_time_ms"] = {v: ort_op_profile(p, {sessions[v].get_inputs()[0].name: feed}, args.threads,
                                                       args.profile_runs, tmp) for v, p in paths.items()}
                doc["memory"] = {v: memory_probe(p, args.threads, [1, 3, size, size]) for v, p in paths.items()}
            del sessions, runners
            for p in paths.values():
                for f in tmpdir.glob(Path(p).name + "*"):
                    f.unlink()
            doc["ratios"] = ratios(doc)
            doc["machine"] = machine(args.threads)
            write_json(args.out, doc)  # after every size: a long run keeps what it measured
    if not args.no_plots:
        doc["plots"] = plots(doc, Path(args.out).parent)
        write_json(args.out, doc)
    print_summary(doc)
    return doc


def ratios(doc: dict) -> dict:
    """Headline ratios, all measured side by side: variant / original per size; memory, MACs, params at the
    profile size."""
    lat = doc["latency_ms"]
    out: dict = {"latency_vs_original": {}}
    for v in ("exact", "fast"):
        out["latency_vs_original"][v] = {s: round(r["median_ms"] / lat["original"][s]["median_ms"], 3)
                                         for s, r in lat[v].items() if s in lat["original"]}
    size = str(doc["sizes"][0])
    b = doc["builds"]
    for key in ("macs", "params", "nodes"):
        out[f"{key}_vs_original@{size}"] = {v: round(b[v][size][key] / max(b["original"][size][key], 1), 3)
                                            for v in ("exact", "fast") if size in b[v]}
    if "memory" in doc:
        m = doc["memory"]
        out["session_memory_vs_original"] = {v: round(m[v]["session_growth_mib"] /
                                                      max(m["original"]["session_growth_mib"], 1e-6), 3)
                                             for v in m if v != "original"}
    return out


def plots(doc: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for v, style in zip(VARIANTS, ("o-", "s-", "^-")):
        pts = sorted((int(s), r["median_ms"]) for s, r in doc["latency_ms"][v].items())
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=v)
    ax.set_xlabel("input resolution (pixels per side)")
    ax.set_ylabel("latency, ms (median, log scale)")
    ax.set_yscale("log")
    ax.set_title(f"{doc['model']} on ONNX Runtime CPU, batch 1 ({doc['target']} conversions)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    p = folder / "latency_vs_resolution.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p.name)

    if "op_time_ms" in doc:
        prof = doc["op_time_ms"]
        ops = sorted({op for d in prof.values() for op in d}, key=lambda op: -max(d.get(op, 0) for d in prof.values()))
        top, rest = ops[:9], ops[9:]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        names = list(prof)
        bottom = np.zeros(len(names))
        for op in top + (["other"] if rest else []):
            vals = np.array([sum(prof[n].get(o, 0) for o in rest) if op == "other" else prof[n].get(op, 0)
                             for n in names])
            ax.bar(names, vals, bottom=bottom, label=op)
            bottom += vals
        ax.set_ylabel("ms per run (ORT profiler)")
        ax.set_title(f"time by ONNX op type at {doc['profile_size']} px, {doc['model']}", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        p = folder / "op_time_by_type.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p.name)

    size = str(doc["sizes"][0])
    stages = {v: doc["builds"][v][size]["stage_s"] for v in ("exact", "fast") if size in doc["builds"][v]}
    if stages:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        names = list(stages)
        keys = list(dict.fromkeys(k for d in stages.values() for k in d))
        left = np.zeros(len(names))
        cmap = plt.get_cmap("tab20")
        for i, k in enumerate(keys):
            vals = np.array([stages[n].get(k, 0.0) for n in names])
            ax.barh(names, vals, left=left, color=cmap(i % 20), label=k)
            left += vals
        ax.set_xlabel("seconds (one conversion, wall clock)")
        ax.set_title(f"convert(..., export=path) by stage, {doc['model']} at {size} px", fontsize=9)
        ax.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.18))
        fig.tight_layout()
        p = folder / "convert_stages.png"
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(p.name)
    return written


def print_summary(doc: dict) -> None:
    r = doc["ratios"]
    for v, d in r["latency_vs_original"].items():
        print(f"{v} / original latency: " + ", ".join(f"{s}px x{x:.2f}" for s, x in d.items()))
    for k, d in r.items():
        if k != "latency_vs_original":
            print(f"{k}: {d}")


if __name__ == "__main__":
    main()
