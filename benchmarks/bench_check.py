"""Benchmark: attn2conv-check time over onnx.load time (not a test; writes benchmarks/results/check.json).

    .venv/bin/python benchmarks/bench_check.py [--repeats 5] [--sizes 10000,25000,50000,100000] [--quiet]

Graphs (built with onnx.helper, weights embedded so both sides parse the same bytes):
- vit_b: a ViT-B/16-sized graph (12 blocks, width 768, MLP 3072, 197 tokens, ~86 M float32 weights) with
  intermediate shapes recorded, as torch.onnx records them;
- chain_N: a synthetic N-node Conv/Relu/Add/Sigmoid chain, once with value_info recorded (`auto` then skips ONNX
  shape inference after checking that every node output has a static recorded shape) and once without (`auto`
  then runs inference); `never` skips inference.
Reported: medians of interleaved repeats; ratio = check() / onnx.load(path, load_external_data=False).
ratio_cpu: the same with process CPU time (steadier than wall time on a shared machine).
floor_ratio: parsing the file and reading every node's op_type in a Python loop, over onnx.load: the least any
check that looks at every node through protobuf objects can cost. decode_ratio: reading the file and decoding its
node and value_info records with attn2conv/check/_wire.py (numpy over the bytes, what `check` does before any rule
runs), over onnx.load. wire: whether `check` took that decoded path (else it parsed the file with protobuf).
onnx.load is timed in the process that built the graphs, so its memory is warm (no page faults): a fresh process
pays several times more for its first loads, which would flatter the ratio. load_avg: 1-minute load average
before and after the graph.
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
import onnx
from onnx import TensorProto as T
from onnx import helper as h

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attn2conv.check import _wire, check  # noqa: E402


def _w(name, shape):
    return onnx.numpy_helper.from_array(np.zeros(shape, np.float32), name)


def vit_b() -> onnx.ModelProto:
    D, F, N, H = 768, 3072, 197, 12
    nodes, inits = [], []
    x = "tokens"
    for b in range(12):
        p = f"blocks.{b}"

        def lin(inp, name, i, o):
            inits.extend([_w(f"{p}.{name}.weight", [i, o]), _w(f"{p}.{name}.bias", [o])])
            nodes.append(h.make_node("MatMul", [inp, f"{p}.{name}.weight"], [f"{p}.{name}.mm"], name=f"{p}.{name}/mm"))
            nodes.append(h.make_node("Add", [f"{p}.{name}.mm", f"{p}.{name}.bias"], [f"{p}.{name}.out"],
                                     name=f"{p}.{name}/add"))
            return f"{p}.{name}.out"

        for ln in ("norm1", "norm2"):
            inits.extend([_w(f"{p}.{ln}.weight", [D]), _w(f"{p}.{ln}.bias", [D])])
        nodes.append(h.make_node("LayerNormalization", [x, f"{p}.norm1.weight", f"{p}.norm1.bias"], [f"{p}.n1"],
                                 name=f"{p}.norm1", axis=-1))
        qkv = lin(f"{p}.n1", "attn.qkv", D, 3 * D)
        inits.append(onnx.numpy_helper.from_array(np.array([1, N, 3, H, D // H], np.int64), f"{p}.shape5"))
        nodes.append(h.make_node("Reshape", [qkv, f"{p}.shape5"], [f"{p}.qkv5"], name=f"{p}.attn/reshape"))
        nodes.append(h.make_node("Transpose", [f"{p}.qkv5"], [f"{p}.qkvT"], name=f"{p}.attn/permute",
                                 perm=[2, 0, 3, 1, 4]))
        nodes.append(h.make_node("Split", [f"{p}.qkvT"], [f"{p}.q", f"{p}.k", f"{p}.v"], name=f"{p}.attn/split",
                                 axis=0, num_outputs=3))
        nodes.append(h.make_node("Transpose", [f"{p}.k"], [f"{p}.kT"], name=f"{p}.attn/kT", perm=[0, 1, 2, 4, 3]))
        nodes.append(h.make_node("MatMul", [f"{p}.q", f"{p}.kT"], [f"{p}.s"], name=f"{p}.attn/qk"))
        nodes.append(h.make_node("Softmax", [f"{p}.s"], [f"{p}.a"], name=f"{p}.attn/softmax", axis=-1))
        nodes.append(h.make_node("MatMul", [f"{p}.a", f"{p}.v"], [f"{p}.o"], name=f"{p}.attn/av"))
        inits.append(onnx.numpy_helper.from_array(np.array([1, N, D], np.int64), f"{p}.shape3"))
        nodes.append(h.make_node("Transpose", [f"{p}.o"], [f"{p}.oT"], name=f"{p}.attn/oT", perm=[0, 1, 3, 2, 4]))
        nodes.append(h.make_node("Reshape", [f"{p}.oT", f"{p}.shape3"], [f"{p}.o3"], name=f"{p}.attn/merge"))
        proj = lin(f"{p}.o3", "attn.proj", D, D)
        nodes.append(h.make_node("Add", [x, proj], [f"{p}.r1"], name=f"{p}/res1"))
        nodes.append(h.make_node("LayerNormalization", [f"{p}.r1", f"{p}.norm2.weight", f"{p}.norm2.bias"],
                                 [f"{p}.n2"], name=f"{p}.norm2", axis=-1))
        fc1 = lin(f"{p}.n2", "mlp.fc1", D, F)
        nodes.append(h.make_node("Gelu", [fc1], [f"{p}.g"], name=f"{p}.mlp.act"))
        fc2 = lin(f"{p}.g", "mlp.fc2", F, D)
        nodes.append(h.make_node("Add", [f"{p}.r1", fc2], [f"{p}.out"], name=f"{p}/res2"))
        x = f"{p}.out"
    g = h.make_graph(nodes, "vit_b", [h.make_tensor_value_info("tokens", T.FLOAT, [1, N, D])],
                     [h.make_tensor_value_info(x, T.FLOAT, [1, N, D])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 20)])
    return onnx.shape_inference.infer_shapes(m)


def chain(n: int, value_info: bool) -> onnx.ModelProto:
    nodes, x = [], "x"
    ops = ("Conv", "Relu", "Add", "Sigmoid")
    for i in range(n):
        op = ops[i % 4]
        ins = [x, "w"] if op == "Conv" else [x, x] if op == "Add" else [x]
        kw = {"kernel_shape": [1, 1]} if op == "Conv" else {}
        nodes.append(h.make_node(op, ins, [f"t{i}"], name=f"n{i}", **kw))
        x = f"t{i}"
    g = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, [1, 8, 32, 32])],
                     [h.make_tensor_value_info(x, T.FLOAT, [1, 8, 32, 32])], [_w("w", [8, 8, 1, 1])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(m) if value_info else m


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, run in turns (load, check, load, check, ...) so load drifts hit all alike."""
    for fn in fns.values():
        fn()  # warm-up
    runs = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            runs[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    out = {k: (statistics.median(v), v) for k, v in runs.items()}
    out.update({f"{k}_cpu": (statistics.median(v), v) for k, v in cpu.items()})
    return out


def _parse_and_read_op_types(path: Path) -> None:
    m = onnx.ModelProto()
    m.ParseFromString(path.read_bytes())
    for n in m.graph.node:
        n.op_type


def measure(path: Path, target: str, repeats: int, shape_inference: str, floor: bool = False) -> dict:
    load_avg = round(os.getloadavg()[0], 2)
    fns = {"load": lambda: onnx.load(str(path), load_external_data=False),
           "check": lambda: check(path, target, shape_inference=shape_inference)}
    if floor:
        fns["floor"] = lambda: _parse_and_read_op_types(path)
        fns["decode"] = lambda: _wire.decode(path.read_bytes())
    t = interleaved_medians(fns, repeats)
    load, chk = t["load"][0], t["check"][0]
    res = check(path, target, shape_inference=shape_inference)
    m = onnx.load(str(path), load_external_data=False)
    row = {
        "nodes": len(m.graph.node), "value_info": len(m.graph.value_info), "bytes": path.stat().st_size,
        "target": target, "shape_inference": shape_inference, "load_s": round(load, 5), "check_s": round(chk, 5),
        "ratio": round(chk / load, 2), "ratio_cpu": round(t["check_cpu"][0] / max(t["load_cpu"][0], 1e-9), 2),
        "findings": len(res.findings), "notes": res.notes, "wire": res.loaded.wire is not None,
        "load_runs_s": [round(x, 5) for x in t["load"][1]], "check_runs_s": [round(x, 5) for x in t["check"][1]],
    }
    if floor:
        row["floor_s"] = round(t["floor"][0], 5)
        row["floor_ratio"] = round(t["floor"][0] / load, 2)
        row["decode_s"] = round(t["decode"][0], 5)
        row["decode_ratio"] = round(t["decode"][0] / load, 2)
    row["load_avg"] = [load_avg, round(os.getloadavg()[0], 2)]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default="10000,25000,50000,100000")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "check.json"))
    ap.add_argument("--no-vit", action="store_true", help="skip the ViT-B graph (340 MB of weights)")
    ap.add_argument("--no-plot", action="store_true", help="skip check_vs_load.png")
    ap.add_argument("--quiet", action="store_true", help="print only the output paths")
    args = ap.parse_args()
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_vit:
            p = Path(tmp) / "vit_b.onnx"
            onnx.save(vit_b(), str(p))
            for target in ("trt-safe", "dla"):
                rows.append({"graph": "vit_b", **measure(p, target, args.repeats, "auto")})
                say("vit_b", target, "load", rows[-1]["load_s"], "check", rows[-1]["check_s"], "ratio",
                    rows[-1]["ratio"], "cpu", rows[-1]["ratio_cpu"], "load avg", rows[-1]["load_avg"])
            p.unlink()
        for n in map(int, args.sizes.split(",")):
            for vi in (True, False):
                p = Path(tmp) / f"chain_{n}_{vi}.onnx"
                onnx.save(chain(n, vi), str(p))
                for mode in ("auto", "never"):
                    r = {"graph": f"chain_{n}", "recorded_shapes": vi,
                         **measure(p, "trt-safe", args.repeats, mode, floor=(mode == "auto"))}
                    rows.append(r)
                    say(r["graph"], "value_info" if vi else "no value_info", mode, "load", r["load_s"], "check",
                        r["check_s"], "ratio", r["ratio"], "cpu", r["ratio_cpu"], "floor", r.get("floor_ratio", "-"),
                        "decode", r.get("decode_ratio", "-"), "wire", r["wire"], "load avg", r["load_avg"])
                p.unlink()
    doc = {"benchmark": "attn2conv-check time / onnx.load time", "repeats": args.repeats,
           "python": platform.python_version(), "onnx": onnx.__version__, "machine": platform.machine(),
           "command": "python benchmarks/bench_check.py " + " ".join(sys.argv[1:]), "results": rows}
    from _common import machine

    doc["machine_details"] = machine()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print("wrote", args.out)
    if not args.no_plot:
        print("wrote", plot(rows, Path(args.out).with_name("check_vs_load.png")))


def plot(rows: list[dict], path: Path) -> Path:
    """Bars: check time / onnx.load time per graph and mode (1.0 = as fast as parsing the file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['graph']} {r['target']}" if r["graph"] == "vit_b" else
              f"{r['graph']} {'shapes' if r.get('recorded_shapes') else 'no shapes'}/{r['shape_inference']}"
              for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.barh(labels, [r["ratio"] for r in rows], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(1.5, color="tab:red", lw=0.8, ls="--", label="target 1.5x")
    floors = [(lab, r["floor_ratio"]) for lab, r in zip(labels, rows) if "floor_ratio" in r]
    if floors:
        ax.scatter([f for _, f in floors], [lab for lab, _ in floors], color="tab:orange", marker="|", s=120,
                   zorder=3, label="parse + Python op_type loop")
    ax.set_xscale("log")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_xlabel("attn2conv-check time / onnx.load time (median, log scale)")
    ax.set_title("verifier cost relative to parsing the file", fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
