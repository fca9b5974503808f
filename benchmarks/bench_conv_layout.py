"""ONNX Runtime CPU: one MLP (1x1 -> ReLU -> 1x1, C -> 4C -> C) on N tokens in the three layouts a converted model can
hand ORT, to see whether the fast models' (1, C, 1, N) token layout costs more per MAC than the original's MatMul.

    .venv/bin/python benchmarks/bench_conv_layout.py                       # N = 65536, C = 96 (Swin-T stage 1 at 1024 px)
    .venv/bin/python benchmarks/bench_conv_layout.py --tokens 3136 --dim 96   # the same stage at 224 px

Layouts: conv_1xN Conv on (1, C, 1, N) (what attn2conv's fast/exact graphs use for tokens); conv_map Conv on the
square (1, C, sqrt N, sqrt N) map; matmul MatMul on (1, N, C) (the original model). Each with ORT's full graph
optimisation (NCHWc layout transform for Conv) and with 'extended' (no layout transform). Interleaved medians
(_common.interleaved_medians); results in benchmarks/results/conv_layout.json with the load average.
"""
from __future__ import annotations

import argparse
import math

import numpy as np

from _common import RESULTS, interleaved_medians, machine, write_json


def mlp_model(layout: str, tokens: int, dim: int, hidden: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((hidden, dim)) * dim ** -0.5).astype(np.float32)
    w2 = (rng.standard_normal((dim, hidden)) * hidden ** -0.5).astype(np.float32)
    side = math.isqrt(tokens)
    if layout == "matmul":
        shape, op, inits = [1, tokens, dim], "MatMul", [w1.T.copy(), w2.T.copy()]
    else:
        shape = [1, dim, 1, tokens] if layout == "conv_1xN" else [1, dim, side, side]
        op, inits = "Conv", [w1.reshape(hidden, dim, 1, 1), w2.reshape(dim, hidden, 1, 1)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    nodes = [helper.make_node(op, ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node(op, ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, layout, [x], [y], [numpy_helper.from_array(w, n) for w, n in
                                                         zip(inits, ("w1", "w2"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def main(argv=None) -> dict:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(RESULTS / "conv_layout.json"))
    args = ap.parse_args(argv)
    if math.isqrt(args.tokens) ** 2 != args.tokens:
        ap.error("--tokens must be a square (the conv_map layout is a square map)")
    hidden = 4 * args.dim
    runners = {}
    for layout in ("conv_1xN", "conv_map", "matmul"):
        for level in ("all", "extended"):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == "all"
                                              else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
            sess = ort.InferenceSession(mlp_model(layout, args.tokens, args.dim, hidden), opts,
                                        providers=["CPUExecutionProvider"])
            feed = {"x": np.random.default_rng(1).standard_normal(sess.get_inputs()[0].shape).astype(np.float32)}
            runners[f"{layout}/{level}"] = lambda s=sess, f=feed: s.run(None, f)
    timing = interleaved_medians(runners, args.repeats)
    macs = 2 * args.tokens * args.dim * hidden
    result = {"tokens": args.tokens, "dim": args.dim, "hidden": hidden, "macs": macs, "machine": machine(args.threads),
              "latency_ms": {k: v["median_ms"] for k, v in timing.items()},
              "gmacs_per_s": {k: round(macs / v["median_ms"] / 1e6, 1) for k, v in timing.items()}}
    write_json(args.out, result)
    for k, v in timing.items():
        print(f"{k:20s} {v['median_ms']:9.1f} ms  {result['gmacs_per_s'][k]:7.1f} GMAC/s")
    print("load average", result["machine"]["load_average"])
    return result


if __name__ == "__main__":
    main()
