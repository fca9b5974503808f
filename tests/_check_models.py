"""Small ONNX graphs for the checker tests, built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h


def vi(name, shape, dtype=T.FLOAT):
    return h.make_tensor_value_info(name, dtype, shape)


def init(name, shape, dtype=T.FLOAT, value=0.5):
    arr = np.full(shape, value, dtype=onnx.helper.tensor_dtype_to_np_dtype(dtype))
    return onnx.numpy_helper.from_array(arr, name)


def model(nodes, inputs, outputs, inits=(), opset=17, domains=(), value_info=()):
    g = h.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits), value_info=list(value_info))
    ops = [h.make_opsetid("", opset)] + [h.make_opsetid(d, 1) for d in domains]
    m = h.make_model(g, opset_imports=ops, producer_name="tests")
    m.ir_version = 8
    return m


def unary(op, shape=(1, 4, 8, 8), dtype=T.FLOAT, out_dtype=None, opset=17, domain="", **attrs):
    node = h.make_node(op, ["x"], ["y"], name=f"{op.lower()}0", domain=domain, **attrs)
    return model([node], [vi("x", list(shape), dtype)], [vi("y", None, out_dtype or dtype)], opset=opset,
                 domains=[domain] if domain else [])


def conv_net(kernel=3, stride=1, pads=1, cin=4, cout=8, hw=32, group=1, op="Conv", dilation=1, extra=None):
    """Conv -> BatchNormalization -> Relu with constant weights."""
    wshape = [cout, cin // group, kernel, kernel] if op == "Conv" else [cin, cout // group, kernel, kernel]
    attrs = dict(kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pads] * 4, group=group,
                 dilations=[dilation, dilation])
    attrs.update(extra or {})
    nodes = [
        h.make_node(op, ["x", "w"], ["c"], name="conv0", **attrs),
        h.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], name="bn0"),
        h.make_node("Relu", ["n"], ["y"], name="relu0"),
    ]
    inits = [init("w", wshape), init("s", [cout], value=1.0), init("b", [cout], value=0.0),
             init("m", [cout], value=0.0), init("v", [cout], value=1.0)]
    return model(nodes, [vi("x", [1, cin, hw, hw])], [vi("y", None)], inits)
