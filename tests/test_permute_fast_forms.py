"""permute_fast_forms: each replacement rebuilds the permute exactly, every step is a form ONNX Runtime copies as
blocks, the target's axis limits hold, and ONNX Runtime's own optimiser does not merge the pieces back."""
import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch

import attn2conv
from attn2conv.export import export_onnx
from attn2conv.graph import is_op, shape
from attn2conv.passes.permute_fast_forms import MIN_FAST_RUN, canonical, fast_steps, is_fast


def test_fast_steps_rebuild_every_permutation_with_fast_transposes():
    rng = random.Random(0)
    counts = {"none": 0, 1: 0, 2: 0}
    for _ in range(1500):
        rank = rng.randint(2, 6)
        dims = [rng.choice([1, 1, 2, 3, 8, 9]) for _ in range(rank)]
        perm = list(range(rank))
        rng.shuffle(perm)
        x = torch.arange(int(np.prod(dims))).reshape(dims)
        steps = fast_steps(dims, perm)
        if steps is None:
            counts["none"] += 1
            continue
        y = x
        for step_shape, step_perm in steps:
            assert is_fast(step_shape, step_perm), (dims, perm, steps)
            y = y.reshape(step_shape).permute(step_perm)
        assert torch.equal(y.reshape(x.permute(perm).shape), x.permute(perm))
        if steps:
            counts[len(steps)] += 1
    assert counts[1] > 100 and counts[2] > 20 and counts["none"] > 0  # every branch is exercised


def test_canonical_form_drops_size_one_axes_and_merges_neighbours():
    assert canonical([1, 96, 4, 49], [2, 1, 3, 0]) == ([96, 4, 49], [1, 0, 2])  # Swin key chunk: windows out
    assert canonical([4, 3, 12, 32, 49], [0, 1, 2, 4, 3]) == ([144, 32, 49], [0, 2, 1])
    assert not is_fast([1, 96, 4, 49], [2, 1, 3, 0]) and is_fast([96, 4, 49], [1, 0, 2])
    assert fast_steps([3, 32, 4, 49], [2, 0, 3, 1]) == [([3, 32, 4, 49], [0, 2, 3, 1]), ([3, 4, 1568], [1, 0, 2])]
    assert fast_steps([2688, 2, 28, 2], [1, 3, 0, 2]) is None  # patch merging: the run behind the last axis is 2


class _Chunks(torch.nn.Module):
    """The two slow permutes of a chunked Swin core: a key chunk (size-1 axis moved) and a value chunk."""

    def forward(self, k, v):
        kt = k.permute(2, 1, 3, 0)  # (1, C, W, M) -> (W, C, M, 1)
        vt = v.permute(2, 0, 3, 1)  # (h, d, W, M) -> (W, h, M, d)
        return kt * 2.0, vt + 1.0


@pytest.mark.parametrize("target", ["trt", "trt-safe"])
def test_rewrite_is_bit_identical_and_onnxruntime_keeps_the_fast_forms(target, tmp_path):
    k, v = torch.randn(1, 32, 4, 49), torch.randn(3, MIN_FAST_RUN * 2, 4, 49)
    pipeline = attn2conv.Pipeline(["permute_fast_forms"])
    result = attn2conv.convert(_Chunks().eval(), target, (k, v), pipeline=pipeline)
    record = next(r for r in result.report.passes if r.id == "permute_fast_forms")
    assert record.rewrites == 2 and record.rel_error == 0.0
    for got, want in zip(result.module(k, v), _Chunks()(k, v)):
        assert torch.equal(got, want)
    permutes = [n for n in result.module.graph.nodes if is_op(n, "aten.permute")]
    assert len(permutes) == 3 and all(is_fast(shape(n.args[0]), list(n.args[1])) for n in permutes)
    if target == "trt-safe":  # axis 0 of rank >= 3 tensors stays within the batch limit of 16
        assert all(shape(n)[0] <= 16 for n in result.module.graph.nodes
                   if n.op == "call_function" and shape(n) is not None and len(shape(n)) >= 3)

    # ONNX Runtime's optimiser does not merge the key chunk's Reshapes back into its Transpose. (In this two-op
    # graph it does fuse the value chunk's two steps back into one Transpose; in the models' graphs, where the
    # chunks come out of a Split, it keeps them: see the Swin test below.)
    assert _slow_transposes_after_onnxruntime(result.module, (k, v), target, tmp_path) == [[3, 16, 4, 49]]
    plain = attn2conv.convert(_Chunks().eval(), target, (k, v), pipeline=attn2conv.Pipeline([]))
    assert len(_slow_transposes_after_onnxruntime(plain.module, (k, v), target, tmp_path)) == 2


def _slow_transposes_after_onnxruntime(module, inputs, target, tmp_path) -> list[list[int]]:
    """Input shapes of the Transposes that ONNX Runtime's optimised graph copies element by element."""
    path = tmp_path / "model.onnx"
    export_onnx(module, inputs, str(path), target=target, parity=False)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "model.ort.onnx")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    outs = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    with torch.no_grad():
        want = module(*inputs)
    want = want if isinstance(want, (tuple, list)) else [want]
    assert all(np.allclose(o, w.numpy(), rtol=1e-5, atol=1e-5) for o, w in zip(outs, want))
    optimised = onnx.shape_inference.infer_shapes(onnx.load(opts.optimized_model_filepath))
    dims = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in list(optimised.graph.value_info) + list(optimised.graph.input)}
    return [dims[n.input[0]] for n in optimised.graph.node
            if n.op_type == "Transpose" and not is_fast(dims[n.input[0]], list(n.attribute[0].ints))]


def test_swin_chunked_cores_keep_outputs_and_lose_their_slow_permutes(tmp_path):
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(2, 2), num_heads=(3, 6)).eval()
    x = torch.randn(1, 3, 224, 224)
    options = {}
    result = attn2conv.convert(model, "trt-safe", x, options=options)
    record = next(r for r in result.report.passes if r.id == "permute_fast_forms")
    assert record.rewrites >= 4
    for n in result.module.graph.nodes:  # what stays slow has no fast form (window partitions: runs of 7)
        if is_op(n, "aten.permute"):
            perm = [p % len(n.args[1]) for p in n.args[1]]
            assert is_fast(shape(n.args[0]), perm) or fast_steps(list(shape(n.args[0])), perm) is None
    with torch.no_grad():
        assert (result.module(x) - model(x)).abs().max() / model(x).abs().max() < 1e-5
    before = attn2conv.convert(model, "trt-safe", x, options=options,
                               pipeline=attn2conv.Pipeline.for_target("trt-safe").remove("permute_fast_forms"))
    slow_before = _slow_transposes_after_onnxruntime(before.module, (x,), "trt-safe", tmp_path)
    slow_after = _slow_transposes_after_onnxruntime(result.module, (x,), "trt-safe", tmp_path)
    elements = lambda shapes: sum(int(np.prod(s)) for s in shapes)  # noqa: E731
    assert elements(slow_after) <= 0.5 * elements(slow_before), (slow_before, slow_after)  # measured: 2.41M -> 1.20M
