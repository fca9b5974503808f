"""Slow: mutated models never produce a traceback, only findings or a one-line input error."""

from __future__ import annotations

import random

import onnx
import pytest

from attn2conv.check import InputError, check
from attn2conv.targets import list_targets

from _check_models import conv_net, init, model, vi
from onnx import helper as h


def _seeds() -> list[bytes]:
    mm = model([h.make_node("MatMul", ["x", "w"], ["t"]), h.make_node("Softmax", ["t"], ["y"], axis=-1)],
               [vi("x", [1, 4, 8, 8])], [vi("y", None)], [init("w", [8, 8])])
    # recorded shapes and exporter metadata: the checks of these take the decoded-bytes path (attn2conv/check/_wire.py)
    shaped = onnx.shape_inference.infer_shapes(conv_net())
    for i, n in enumerate(shaped.graph.node):
        p = n.metadata_props.add()
        p.key, p.value = "pkg.torch.onnx.name_scopes", repr(["", f"blocks.{i}"])
    return [conv_net().SerializeToString(), mm.SerializeToString(),
            conv_net(kernel=5, pads=2, op="ConvTranspose").SerializeToString(), shaped.SerializeToString()]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        i = rng.randrange(len(b)) if b else 0
        if kind < 0.5 and b:
            b[i] = rng.randrange(256)
        elif kind < 0.7:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind < 0.85 and b:
            del b[i: i + rng.randint(1, 16)]
        else:
            b = b[: rng.randrange(len(b) + 1)]
    return bytes(b)


@pytest.mark.slow
def test_fuzz_mutated_models(tmp_path):
    rng = random.Random(1234)
    seeds, targets = _seeds(), list_targets()
    outcomes = {"findings": 0, "input_error": 0}
    for i in range(2400):
        data = _mutate(rng, rng.choice(seeds))
        path = tmp_path / "m.onnx"
        path.write_bytes(data)
        try:
            check(path, rng.choice(targets), shape_inference=rng.choice(["auto", "always"]))
            outcomes["findings"] += 1
        except InputError as exc:
            assert "\n" not in str(exc)
            outcomes["input_error"] += 1
    assert sum(outcomes.values()) == 2400
    assert outcomes["findings"] > 100 and outcomes["input_error"] > 100, outcomes
