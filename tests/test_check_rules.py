"""Every rule of every built-in profile: one small graph that breaks it and one that does not.

The graphs are derived from each rule's own parameters (the limit, the op list, the allowed values), so a rule
added to a profile is covered as soon as its check kind has a builder here; a rule whose kind has no builder
fails `test_every_check_kind_has_a_builder`.
"""

from __future__ import annotations

import pytest
from onnx import TensorProto as T
from onnx import helper as h

from attn2conv.check import check
from attn2conv.targets import list_targets

from _check_models import conv_net, init, model, unary, vi


def _first_op(profile, rule, candidates):
    for op in candidates:
        if profile.op_rule(op) is rule:
            return op
    raise AssertionError(f"{rule.id}: no op that this rule decides")


def _outside_scope_op(profile, rule):
    return _first_op(profile, rule, sorted(profile.ops))


def b_opset(p, r):
    return unary("Relu", opset=p.opset_max + 1), unary("Relu", opset=p.opset_max)


def b_op(p, r):
    op = _first_op(p, r, r.params["ops"])
    return unary(op), unary("Relu")


def b_op_not_in_matrix(p, r):
    op = _first_op(p, r, ("BitShift", "Col2Im", "Unique", "NoSuchOp"))
    return unary(op), unary("Relu")


def b_op_outside_scope(p, r):
    return unary(_outside_scope_op(p, r)), unary("Relu")


def b_custom_op(p, r):
    return unary("MyPlugin", domain="com.example"), unary("Relu")


def b_tensor_volume_max(p, r):
    return unary("Relu", shape=(1, 1, 65536, 32768)), unary("Relu", shape=(1, 1, 8, 8))


def b_tensor_rank_max(p, r):
    return unary("Relu", shape=(1,) * (r.params["max"] + 1)), unary("Relu", shape=(1,) * 4)


def b_tensor_dtype(p, r):
    return unary("Identity", dtype=T.COMPLEX64), unary("Identity")


def b_tensor_static(p, r):
    return unary("Relu", shape=("N", 4, 8, 8)), unary("Relu", shape=(1, 4, 8, 8))


def b_tensor_dims_max(p, r):
    rank = max(4, r.params.get("min_rank", 1))
    axes = str(r.params["axes"])
    axis = int(axes.split(":")[0] or 0)
    shape = [1] * rank
    shape[axis] = r.params["max"] + 1
    return unary("Relu", shape=shape), unary("Relu", shape=[1] * rank)


def b_io_rank_in(p, r):
    """A Reshape/Transpose of a rank-3 tensor breaks it; the same on rank 4 does not."""
    import numpy as np
    from onnx import numpy_helper

    op = r.params["ops"][0]
    bad = next(k for k in range(2, 7) if k not in r.params["allowed"])

    def net(rank):
        shape = [1] * (rank - 2) + [4, 6]
        out = shape[:-2] + [6, 4]
        if op == "Transpose":
            node = h.make_node("Transpose", ["x"], ["y"], name="n", perm=list(range(rank - 2)) + [rank - 1, rank - 2])
            return model([node], [vi("x", shape)], [vi("y", out)])
        target = numpy_helper.from_array(np.array(out, np.int64), "s")
        return model([h.make_node("Reshape", ["x", "s"], ["y"], name="n")], [vi("x", shape)], [vi("y", out)],
                     [target])

    return net(bad), net(min(r.params["allowed"]))


def b_tensor_batch_max(p, r):
    return unary("Relu", shape=(r.params["max"] + 1, 1, 1, 1, 1)), unary("Relu", shape=(1, 1, 1, 1, 1))


def b_io_dtype(p, r):
    bad = next(d for d in (T.INT32, T.BOOL, T.UINT8) if T.DataType.Name(d) not in r.params["allowed"])
    return unary("Identity", dtype=bad), unary("Identity")


def b_graph_float(p, r):
    return unary("Relu"), unary("Relu", dtype=T.FLOAT16)


def b_op_dtype(p, r):
    op = next(o for o in ("Sigmoid", "Tanh", "Relu") if "I32" not in p.ops.get(o, ("I32",)))
    return unary(op, dtype=T.INT32), unary(op)


_BAD_VALUES = {"mode": "wrap", "coordinate_transformation_mode": "tf_crop_and_resize", "training_mode": 1}


def _op_node(op, attrs, **kw):
    """One node of `op` with plausible inputs; returns a model."""
    x = vi("x", [1, 4, 16, 16])
    if op == "Pad":
        node = h.make_node("Pad", ["x", "pads"], ["y"], name="pad0", **attrs)
        return model([node], [x], [vi("y", None)], [init("pads", [8], T.INT64, 1)])
    if op == "Resize":
        ins = ["x", "", "scales"] + (["sizes"] if kw.get("sizes") else [])
        inits = [init("scales", [4], value=1.0)] if not kw.get("sizes") else \
            [init("scales", [0]), init("sizes", [4], T.INT64, 16)]
        if kw.get("sizes"):
            ins[2] = "scales"
        node = h.make_node("Resize", ins, ["y"], name="resize0", **attrs)
        return model([node], [x], [vi("y", None)], inits)
    if op == "BatchNormalization":
        node = h.make_node(op, ["x", "s", "b", "m", "v"], ["y"], name="bn0", **attrs)
        return model([node], [x], [vi("y", None)], [init(n, [4]) for n in "sbmv"])
    raise AssertionError(op)


def b_attr_in(p, r):
    op, attr = r.params["ops"][0], r.params["attr"]
    return _op_node(op, {attr: _BAD_VALUES[attr]}), _op_node(op, {attr: r.params["values"][0]})


def _conv_like(op, attr, value):
    """Conv/ConvTranspose/pooling node with `attr` set to `value` (others at safe defaults)."""
    pool = op not in ("Conv", "ConvTranspose")
    k = 2 if pool else 3
    attrs = {"kernel_shape": [k, k]}
    cin, cout = 4, 8
    if attr == "group":
        cin = cout = value
    if attr in ("kernel_shape", "strides", "dilations"):
        attrs[attr] = [value, value]
        if attr == "kernel_shape":
            k = value
    elif attr == "pads":
        attrs[attr] = [value] * 4
    else:
        attrs[attr] = value
    if pool:
        node = h.make_node(op, ["x"], ["y"], name="pool0", **attrs)
        return model([node], [vi("x", [1, 4, 40, 40])], [vi("y", None)])
    w = [cout, cin // attrs.get("group", 1), k, k] if op == "Conv" else [cin, cout // attrs.get("group", 1), k, k]
    node = h.make_node(op, ["x", "w"], ["y"], name="conv0", **attrs)
    return model([node], [vi("x", [1, cin, 40, 40])], [vi("y", None)], [init("w", w)])


def b_attr_range(p, r):
    op, attr = r.params["ops"][0], r.params["attr"]
    return _conv_like(op, attr, r.params["max"] + 1), _conv_like(op, attr, r.params["min"])


def _conv_nd(op, n):
    k = [1] * n
    attrs = {"kernel_shape": k}
    x = vi("x", [1, 4] + [4] * n)
    if op in ("Conv", "ConvTranspose"):
        node = h.make_node(op, ["x", "w"], ["y"], name="c0", **attrs)
        return model([node], [x], [vi("y", None)], [init("w", [4, 4] + k)])
    return model([h.make_node(op, ["x"], ["y"], name="p0", **attrs)], [x], [vi("y", None)])


def b_spatial_dims(p, r):
    op = r.params["ops"][0]
    bad = next(n for n in (4, 3, 1) if n not in r.params["allowed"])
    return _conv_nd(op, bad), _conv_nd(op, r.params["allowed"][0])


def b_pad_lt_kernel(p, r):
    return conv_net(kernel=3, pads=3), conv_net(kernel=3, pads=1)


def b_input_const(p, r):
    op, idxs = next(iter(r.params["inputs"].items()))
    idx = idxs[0]

    def build(const):
        names = ["x"] + [f"in{i}" for i in range(1, idx + 1)]
        inits = [init(n, [1], T.INT64, 0) for n in names[1:] if n != f"in{idx}"]
        inputs = [vi("x", [1, 4, 8, 8])]
        if const:
            inits.append(init(f"in{idx}", [1], T.INT64, 0))
        else:
            inputs.append(vi(f"in{idx}", [1], T.INT64))
        node = h.make_node(op, names, ["y"], name="n0")
        return model([node], inputs, [vi("y", None)], inits)

    return build(False), build(True)


def b_input_absent(p, r):
    return _op_node("Resize", {}, sizes=True), _op_node("Resize", {})


def b_outputs_max(p, r):
    op = r.params["ops"][0]
    extra = {"kernel_shape": [2, 2]} if op == "MaxPool" else {}

    def build(n):
        outs = ["y", "aux"][:n]
        ins = ["x"] if op == "MaxPool" else ["x", "s", "b"]
        inits = [] if op == "MaxPool" else [init("s", [8]), init("b", [8])]
        node = h.make_node(op, ins, outs, name="n0", **extra)
        return model([node], [vi("x", [1, 4, 8, 8])], [vi(o, None) for o in outs], inits)

    return build(r.params["max"] + 1), build(r.params["max"])


def b_inputs_max(p, r):
    def build(n):
        eq = ",".join(["ij"] * n) + "->ij"
        node = h.make_node("Einsum", [f"x{i}" for i in range(n)], ["y"], name="e0", equation=eq)
        return model([node], [vi(f"x{i}", [2, 2]) for i in range(n)], [vi("y", None)])

    return build(r.params["max"] + 1), build(r.params["max"])


def b_input_dtype_not(p, r):
    def build(dtype):
        node = h.make_node("MatMul", ["a", "b"], ["y"], name="mm0")
        return model([node], [vi("a", [2, 2], dtype), vi("b", [2, 2], dtype)], [vi("y", None, dtype)])

    return build(T.INT32), build(T.FLOAT)


def b_axis_in(p, r):
    op = r.params["ops"][0]
    rank = r.params.get("rank", 4)
    allowed = [a + rank if a < 0 else a for a in r.params["axes"]]
    bad = next(a for a in range(rank) if a not in allowed)

    def build(axis):
        ins = ["x"] if op == "Softmax" else ["x", "x"]
        node = h.make_node(op, ins, ["y"], name="n0", axis=axis)
        return model([node], [vi("x", [1, 4, 8, 8])], [vi("y", None)])

    return build(bad), build(allowed[0])


def b_axis_dim_max(p, r):
    return unary("Softmax", shape=(1, 1, 1, r.params["max"] + 1), axis=-1), unary("Softmax", axis=-1)


def b_weight_dim_range(p, r):
    return conv_net(cout=r.params["max"] + 1, hw=4), conv_net(cout=8, hw=4)


def b_dla_resize(p, r):
    bad = _op_node("Resize", {"mode": "nearest", "coordinate_transformation_mode": "align_corners"})
    good = _op_node("Resize", {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                               "nearest_mode": "floor"})
    return bad, good


# -- precision rules ---------------------------------------------------------------------------------------------

def _qdq_conv(zero_point=0, w_axis=0, w_scales=8, epilogue_after_q=False, int8_weight_direct=False):
    """x -> Q -> DQ -> Conv(DQ(int8 W, per-channel)) [-> Relu]: the explicit INT8 form TensorRT consumes."""
    nodes = [h.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_x"),
             h.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq_x")]
    inits = [init("sx", [], value=0.05), init("zx", [], T.INT8, zero_point), init("w", [8, 4, 3, 3], T.INT8, 3),
             init("b", [8], value=0.1)]
    if int8_weight_direct:
        nodes.append(h.make_node("Conv", ["xd", "w", "b"], ["c"], name="conv0", kernel_shape=[3, 3], pads=[1] * 4))
    else:
        inits += [init("sw", [w_scales], value=0.01), init("zw", [w_scales], T.INT8, 0)]
        nodes += [h.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w", axis=w_axis),
                  h.make_node("Conv", ["xd", "wd", "b"], ["c"], name="conv0", kernel_shape=[3, 3], pads=[1] * 4)]
    if epilogue_after_q:  # Conv -> Q -> DQ -> Relu
        inits.append(init("sc", [], value=0.05))
        nodes += [h.make_node("QuantizeLinear", ["c", "sc", "zx"], ["cq"], name="q_c"),
                  h.make_node("DequantizeLinear", ["cq", "sc", "zx"], ["cd"], name="dq_c"),
                  h.make_node("Relu", ["cd"], ["y"], name="relu0")]
    else:  # Conv -> Relu -> Q -> DQ: the fusable order
        inits.append(init("sc", [], value=0.05))
        nodes += [h.make_node("Relu", ["c"], ["r"], name="relu0"),
                  h.make_node("QuantizeLinear", ["r", "sc", "zx"], ["rq"], name="q_r"),
                  h.make_node("DequantizeLinear", ["rq", "sc", "zx"], ["y"], name="dq_r")]
    return model(nodes, [vi("x", [1, 4, 8, 8])], [vi("y", None)], inits, opset=17)


def b_qdq_symmetric(p, r):
    return _qdq_conv(zero_point=3), _qdq_conv()


def b_qdq_axis(p, r):
    return _qdq_conv(w_axis=1, w_scales=4), _qdq_conv()


def b_qdq_epilogue(p, r):
    return _qdq_conv(epilogue_after_q=True), _qdq_conv()


def b_int8_unscaled(p, r):
    return _qdq_conv(int8_weight_direct=True), _qdq_conv()


def _fp16_chain(fp32_island=False, conv1x1_fp32=False):
    """FP16 graph; optionally one Sigmoid (or a plain 1x1 Conv) computed in FP32 between two Casts."""
    x = vi("x", [1, 4, 8, 8], T.FLOAT16)
    nodes = [h.make_node("Relu", ["x"], ["a"], name="relu0")]
    inits = []
    if fp32_island or conv1x1_fp32:
        nodes.append(h.make_node("Cast", ["a"], ["a32"], name="to32", to=T.FLOAT))
        if conv1x1_fp32:
            inits.append(init("w", [4, 4, 1, 1]))
            nodes.append(h.make_node("Conv", ["a32", "w"], ["s32"], name="conv1x1", kernel_shape=[1, 1]))
        else:
            nodes.append(h.make_node("Sigmoid", ["a32"], ["s32"], name="sigmoid0"))
        nodes.append(h.make_node("Cast", ["s32"], ["y"], name="to16", to=T.FLOAT16))
    else:
        nodes.append(h.make_node("Sigmoid", ["a"], ["y"], name="sigmoid0"))
    return model(nodes, [x], [vi("y", None, T.FLOAT16)], inits)


def b_fp32_compute(p, r):
    return _fp16_chain(fp32_island=True), _fp16_chain()


def _eps_model(eps):
    nodes = [h.make_node("Add", ["x", "eps"], ["v"], name="add_eps"), h.make_node("Sqrt", ["v"], ["y"], name="sqrt0")]
    return model(nodes, [vi("x", [1, 4, 8, 8], T.FLOAT16)], [vi("y", None, T.FLOAT16)],
                 [init("eps", [1], T.FLOAT16, eps)])


def b_fp16_eps(p, r):
    return _eps_model(1e-6), _eps_model(1e-3)


def _declared_int8(ranges):
    m = unary("Relu")
    h.set_model_props(m, {"attn2conv.precision": "int8", **({"attn2conv.int8.ranges": ranges} if ranges else {})})
    return m


def b_int8_ranges(p, r):
    return _declared_int8(None), _declared_int8('{"x": 2.5, "y": 2.5}')


BUILDERS = {name[2:]: fn for name, fn in dict(globals()).items() if name.startswith("b_")}
RULES = [(p, r) for p in list_targets() for r in p.rules]


def test_every_check_kind_has_a_builder():
    kinds = {r.check for _, r in RULES}
    assert kinds - set(BUILDERS) == set()


@pytest.mark.parametrize("profile,rule", RULES, ids=[f"{p.id}:{r.id}" for p, r in RULES])
def test_rule_breaks_and_holds(profile, rule):
    bad, good = BUILDERS[rule.check](profile, rule)
    bad_res = check(bad, profile, fail_on="note")
    hits = [f for f in bad_res.findings if f.rule == rule.id]
    assert hits, f"{rule.id} did not fire; got {[f.rule for f in bad_res.findings]}"
    assert all(f.severity == rule.severity and f.fix == rule.fix for f in hits)
    assert all("{" not in f.reason for f in hits), hits[0].reason  # every placeholder was filled
    good_res = check(good, profile, fail_on="note")
    assert rule.id not in {f.rule for f in good_res.findings}, [f.reason for f in good_res.findings
                                                                if f.rule == rule.id]
