"""The checker's fast paths give the same findings as the full path.

`shape_inference="auto"` skips ONNX shape inference only when every node output already has a static recorded
shape; it must never see less than `always`. Large graphs read node outputs through a merged-message view of the
file instead of node by node; both must agree.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from attn2conv.check import _load, check
from attn2conv.check._load import GraphIndex, merged_view, read_model, shapes_complete

from _check_models import conv_net, init, model, vi

SKIPPED = "shape inference skipped"
WIDE = [1, 8000, 2, 2]  # channels over trt-safe's 4096: a finding on every tensor of this shape


def _concat_net(value_info, outputs=None):
    """x [1,4000,2,2] -> Relu -> Concat(axis 1) -> [1,8000,2,2] -> Relu -> y: the wide tensors exist only after
    the Concat, so their findings need recorded or inferred shapes."""
    nodes = [h.make_node("Relu", ["x"], ["r"], name="relu0"),
             h.make_node("Concat", ["r", "r"], ["c"], name="cat0", axis=1),
             h.make_node("Relu", ["c"], ["y"], name="relu1")]
    return model(nodes, [vi("x", [1, 4000, 2, 2])], outputs or [vi("y", WIDE)], value_info=value_info)


def _split_net(value_info):
    """One node with two outputs (a node count is not an output count)."""
    nodes = [h.make_node("Split", ["x", "sizes"], ["a", "b"], name="split0", axis=1),
             h.make_node("Relu", ["a"], ["ra"], name="relu_a"), h.make_node("Relu", ["b"], ["rb"], name="relu_b"),
             h.make_node("Concat", ["ra", "rb"], ["y"], name="cat0", axis=1)]
    sizes = onnx.numpy_helper.from_array(__import__("numpy").array([4000, 4000], "int64"), "sizes")
    return model(nodes, [vi("x", WIDE)], [vi("y", WIDE)], inits=[sizes], value_info=value_info)


HALF = [1, 4000, 2, 2]
GRAPHS = {
    "complete": (_concat_net([vi("r", HALF), vi("c", WIDE)]), True),
    "one value_info missing": (_concat_net([vi("r", HALF)]), False),
    # a stale entry keeps the count of records equal to the count of nodes: the old count test skipped inference
    "missing, stale entry instead": (_concat_net([vi("r", HALF), vi("gone", [1])]), False),
    "symbolic dim recorded": (_concat_net([vi("r", HALF), vi("c", ["N", 8000, 2, 2])]), False),
    "output without shape": (_concat_net([vi("r", HALF), vi("c", WIDE)], outputs=[vi("y", None)]), False),
    "split: one of two outputs missing": (_split_net([vi("a", HALF), vi("ra", HALF), vi("rb", HALF)]), False),
    "split complete": (_split_net([vi(n, HALF) for n in ("a", "b", "ra", "rb")]), True),
    "conv net, output without shape": (conv_net(), False),
}


def _findings(result):
    return [f.to_dict() for f in result.findings]


@pytest.mark.parametrize("name", GRAPHS)
@pytest.mark.parametrize("target", ["trt-safe", "dla"])
def test_auto_gives_the_findings_of_always(name, target):
    m, complete = GRAPHS[name]
    auto = check(m, target, fail_on="note")
    always = check(m, target, fail_on="note", shape_inference="always")
    assert _findings(auto) == _findings(always)
    assert any(SKIPPED in n for n in auto.notes) == complete  # the fast path was taken exactly when it is exact


def test_missing_shape_is_inferred_not_skipped():
    # the old count test skipped inference here and lost the channel findings on c
    m, _ = GRAPHS["missing, stale entry instead"]
    wide = {f.tensor for f in check(m, "trt-safe").findings if f.rule == "A2C-SAFE-TENSOR-CHANNELS"}
    assert wide == {"c", "y"}
    never = {f.tensor for f in check(m, "trt-safe", shape_inference="never").findings
             if f.rule == "A2C-SAFE-TENSOR-CHANNELS"}
    assert never == {"y"}


def test_duplicate_value_info_keeps_every_record():
    # two records for one tensor, one of them wide: the wide one is still judged, as the full scan judged it
    m = _concat_net([vi("r", HALF), vi("c", [1, 8, 2, 2]), vi("c", WIDE)])
    hits = [f for f in check(m, "trt-safe", shape_inference="never").findings if f.rule == "A2C-SAFE-TENSOR-CHANNELS"]
    assert sorted(f.tensor for f in hits) == ["c", "y"]


@pytest.mark.parametrize("name", ["complete", "one value_info missing", "split: one of two outputs missing"])
def test_file_bytes_and_proto_agree_with_the_merged_outputs_view(tmp_path, monkeypatch, name):
    m, complete = GRAPHS[name]
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    expected = _findings(check(m, "trt-safe", fail_on="note"))
    for merge_bytes in (1, 10**9):  # node by node; merged view
        monkeypatch.setattr(_load, "_MERGE_BYTES_PER_NODE", merge_bytes)
        for src in (path, m.SerializeToString()):
            res = check(src, "trt-safe", fail_on="note")
            assert _findings(res) == expected
            assert any(SKIPPED in n for n in res.notes) == complete


def _lists(index):
    return (index.op_types, list(index.node_outputs()),
            [(index.names(f), index.type_keys(f)) for f in ("input", "output", "value_info")])


def test_merged_view_gives_the_lists_read_node_by_node(monkeypatch):
    m, _ = GRAPHS["split complete"]
    m.graph.node.append(h.make_node("Dropout", ["y"], ["z", ""], name="drop0"))  # an empty optional output
    data = m.SerializeToString()
    monkeypatch.setattr(_load, "_MERGE_BYTES_PER_NODE", 10**9)
    view, canonical = merged_view(m, data)
    assert view is not None and canonical
    merged, by_node = GraphIndex(m.graph, view, canonical), GraphIndex(m.graph)
    assert merged._aligned("node", "op_type", len(m.graph.node)) is not None  # the view's lists are the ones used
    assert _lists(merged) == _lists(by_node)
    assert list(merged.node_outputs()) == ["a", "b", "ra", "rb", "y", "z", ""]


def _varint(n):
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def _field(number, payload):  # a length-delimited protobuf field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_non_canonical_file_cannot_misalign_the_view(tmp_path, monkeypatch):
    # Two appended value_info records: one with its name twice (the parser keeps "c"), one with no name. The counts
    # of names and records agree, so only the canonical-bytes test tells that the view's names are off by one.
    m, _ = GRAPHS["missing, stale entry instead"]
    wide = h.make_tensor_type_proto(T.FLOAT, WIDE).SerializeToString()
    rec1 = _field(1, b"zzz") + _field(1, b"c") + _field(2, wide)
    rec2 = _field(2, h.make_tensor_type_proto(T.FLOAT, [1]).SerializeToString())
    data = m.SerializeToString() + _field(7, _field(13, rec1) + _field(13, rec2))  # a second graph field merges
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    full = onnx.load(str(path))
    assert [v.name for v in full.graph.value_info][-2:] == ["c", ""]
    monkeypatch.setattr(_load, "_MERGE_BYTES_PER_NODE", 10**9)
    view, canonical = merged_view(full, data)
    assert view is not None and not canonical
    assert list(view.value_info.name)[-2:] == ["zzz", "c"]  # what a view trusted blindly would have used
    loaded = read_model(path)
    assert _lists(loaded.index) == _lists(GraphIndex(full.graph))
    assert _findings(check(path, "trt-safe", fail_on="note")) == _findings(check(full, "trt-safe", fail_on="note"))


def test_shapes_complete_needs_every_output_static():
    assert shapes_complete(GraphIndex(GRAPHS["complete"][0].graph))
    for name in ("one value_info missing", "symbolic dim recorded", "output without shape"):
        assert not shapes_complete(GraphIndex(GRAPHS[name][0].graph)), name
    # an element type of 0 (undefined) is not a recorded type either
    m = _concat_net([vi("r", HALF), vi("c", WIDE, T.UNDEFINED)])
    assert not shapes_complete(GraphIndex(m.graph))


def test_precision_rules_see_fp16_in_value_info_only():
    # the FP16-graph pre-test reads recorded types from the index: an FP16 tensor recorded only in value_info
    # makes the graph an FP16 graph, and the FP32 compute rule then names the FP32 node
    nodes = [h.make_node("Cast", ["x"], ["x16"], name="cast0", to=T.FLOAT16),
             h.make_node("Cast", ["x16"], ["x32"], name="cast1", to=T.FLOAT),
             h.make_node("Relu", ["x32"], ["y"], name="relu0")]
    m = model(nodes, [vi("x", [1, 4, 8, 8])], [vi("y", [1, 4, 8, 8])],
              value_info=[vi("x16", [1, 4, 8, 8], T.FLOAT16), vi("x32", [1, 4, 8, 8])])
    hits = [f.node for f in check(m, "trt-safe", fail_on="note").findings if f.rule == "A2C-SAFE-PREC-FP32-LAYER"]
    assert hits == ["relu0"]
    del m.graph.value_info[0]  # no FP16 tensor recorded anywhere: not an FP16 graph
    hits = [f.node for f in check(m, "trt-safe", fail_on="note", shape_inference="never").findings
            if f.rule == "A2C-SAFE-PREC-FP32-LAYER"]
    assert hits == []


def test_inlined_function_with_a_subgraph_is_checked():
    # an If that only appears once local functions are inlined: its branches must be opened
    then = h.make_graph([h.make_node("MatMul", ["a", "a"], ["o"], name="mm_in_branch")], "then", [],
                        [vi("o", [2, 2])], [init("a", [2, 2])])
    other = h.make_graph([h.make_node("Identity", ["a2"], ["o2"], name="id0")], "else", [], [vi("o2", [2, 2])],
                         [init("a2", [2, 2])])
    fn = h.make_function("local", "branchy", ["c"], ["o"],
                         [h.make_node("If", ["c"], ["o"], then_branch=then, else_branch=other)],
                         [h.make_opsetid("", 17)])
    m = model([h.make_node("branchy", ["c"], ["y"], domain="local", name="call0")], [vi("c", [], T.BOOL)],
              [vi("y", [2, 2])], domains=["local"])
    m.functions.append(fn)
    rules = {f.rule for f in check(m, "trt-safe", fail_on="note").findings}
    assert "A2C-SAFE-OP-MATMUL" in rules


# -- the decoded-bytes path (attn2conv/check/_wire.py) ---------------------------------------------------------------
# Every check() in these tests runs both paths and compares them (tests/conftest.py); the tests below build layouts
# the wire decoder must get exactly right, or hand to the full parse.
from attn2conv.check import _engine, _wire  # noqa: E402


def _uses_wire(data: bytes, mode: str = "never", target: str = "trt-safe") -> bool:
    loaded = read_model(data)
    if loaded.wire is None:
        return False
    return _engine.run_rules_wire(loaded, _engine.resolve_target(target), mode) is not None


def _chain(n=12, long_names=False, value_info=True):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_check import chain

    m = chain(n, value_info)
    if long_names:  # names of 1 to 40 bytes: several 8-byte words, spans of different lengths
        ren = {f"t{i}": f"t{i}" + "_x" * (i % 20) for i in range(n)}
        for node in m.graph.node:
            node.input[:] = [ren.get(x, x) for x in node.input]
            node.output[:] = [ren.get(x, x) for x in node.output]
        for v in list(m.graph.value_info) + list(m.graph.output):
            v.name = ren.get(v.name, v.name)
    return m


@pytest.mark.parametrize("long_names", [False, True])
@pytest.mark.parametrize("mode", ["auto", "never"])
def test_wire_path_is_taken_for_plain_graphs(long_names, mode):
    m = _chain(long_names=long_names)
    data = m.SerializeToString()
    assert _uses_wire(data, mode)
    w = _wire.decode(data)
    assert [w.ops[i] for i in w.op] == [n.op_type for n in m.graph.node]
    assert all(w.node(i) == m.graph.node[i] for i in range(len(m.graph.node)))
    check(data, "trt-safe", shape_inference=mode)  # cross-checked


# a float whose bytes 0A 7F 12 3C read as a node record: tag, length 127, then a NodeProto field tag
_FAKE_RECORD = bytes([0x0A, 0x7F, 0x12, 0x3C])
_ALPHA = float(np.frombuffer(_FAKE_RECORD, "<f4")[0])


def _wide_conv_chain():
    """A chain whose Conv weights break DLA's kernel limit and whose tensors break trt-safe's channel limit."""
    nodes = [h.make_node("Conv", ["x", "w"], ["c0"], name="conv0", kernel_shape=[9, 9], pads=[4] * 4),
             h.make_node("LeakyRelu", ["c0"], ["r0"], name="lrelu0", alpha=_ALPHA),
             h.make_node("Conv", ["r0", "w"], ["c1"], name="conv1", kernel_shape=[9, 9], pads=[4] * 4),
             h.make_node("Relu", ["c1"], ["y"], name="relu0")]
    wide = [1, 8000, 4, 4]
    return model(nodes, [vi("x", wide)], [vi("y", wide)], inits=[init("w", [8000, 8000 // 8000, 9, 9])],
                 value_info=[vi("c0", wide), vi("r0", wide), vi("c1", wide)])


@pytest.mark.parametrize("target", ["trt-safe", "dla", "trt"])
def test_wire_findings_equal_the_full_path(target):
    m = _wide_conv_chain()
    data = m.SerializeToString()
    assert _uses_wire(data, "auto", target)
    res = check(data, target, fail_on="note")  # cross-checked against the full path
    assert res.findings or target == "trt"  # trt: nothing to report


def _node_bytes(node_fields):
    return b"".join(_field(f, p) for f, p in node_fields)


def test_wire_non_canonical_node_layouts():
    # op_type before inputs, op_type twice (protobuf keeps the last), value_info records between nodes
    m = _wide_conv_chain()
    g = m.graph
    head = m.SerializeToString()
    relu = _node_bytes([(4, b"Sigmoid"), (1, b"y"), (4, b"Relu"), (2, b"z"), (3, b"odd0")])
    extra = _field(1, relu) + _field(13, h.make_tensor_value_info("z", T.FLOAT, [1, 8000, 4, 4]).SerializeToString())
    extra += _field(1, _node_bytes([(1, b"z"), (2, b"z2"), (4, b"Relu"), (3, b"odd1")]))
    data = head + _field(7, extra)  # a second graph field merges: not decoded, the full parse decides
    assert _wire.decode(data) is None
    check(data, "trt-safe", fail_on="note")
    # the same records inside the one graph field
    g.ClearField("node")
    g.ClearField("value_info")
    body = b"".join(_field(1, n.SerializeToString()) for n in _wide_conv_chain().graph.node) + extra
    rest = onnx.GraphProto()
    rest.CopyFrom(g)
    gbytes = body + rest.SerializeToString()
    mm = onnx.ModelProto()
    mm.CopyFrom(m)
    mm.ClearField("graph")
    data = mm.SerializeToString() + _field(7, gbytes)
    w = _wire.decode(data)
    assert w is not None and w.ops[w.op[4]] == "Relu"  # the last op_type of the odd node
    assert _uses_wire(data, "never")
    res = check(data, "trt-safe", fail_on="note", shape_inference="never")
    assert any(f.node == "odd0" for f in res.findings)


def test_wire_hands_unknown_fields_and_collisions_to_the_full_parse(monkeypatch):
    m = _wide_conv_chain()
    m.graph.node[3].device_configurations.add(configuration_id="x")  # NodeProto field 10: not decoded
    assert _wire.decode(m.SerializeToString()) is None
    check(m, "trt-safe", fail_on="note")
    data = _wide_conv_chain().SerializeToString()
    # every name hashing alike: the collision is detected, never trusted
    monkeypatch.setattr(_wire, "_words", lambda b, s, n: ([b.word(s) & 0], np.zeros(len(s), np.uint64)))
    assert _wire.decode(data) is None
    check(data, "trt-safe", fail_on="note")


def test_wire_reads_metadata_and_skips_weights():
    m = _wide_conv_chain()
    for i, n in enumerate(m.graph.node):
        p = n.metadata_props.add()
        p.key, p.value = "pkg.torch.onnx.name_scopes", repr(["", f"blocks.{i}", "conv"])
    data = m.SerializeToString()
    assert _uses_wire(data, "auto")
    res = check(data, "trt-safe", fail_on="note")
    assert {f.module for f in res.findings if f.node.startswith("conv")} == {"blocks.0", "blocks.2"}
    w = _wire.decode(data)
    assert [t.name for t in w.model.graph.initializer] == ["w"] and not w.model.graph.initializer[0].raw_data


def test_wire_finds_records_hidden_by_a_false_candidate(monkeypatch):
    # LeakyRelu's alpha is a plausible node record whose "length" covers the next nodes; they are found by walking
    # from the record before them (without the walk the file is not decoded)
    data = _wide_conv_chain().SerializeToString()
    assert _FAKE_RECORD in data
    assert _wire.decode(data).n_nodes == 4
    monkeypatch.setattr(_wire, "_MAX_WALK", 0)
    assert _wire.decode(data) is None
