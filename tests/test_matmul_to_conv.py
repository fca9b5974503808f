"""matmul_to_conv: products of two activations (linear attention k^T @ v, q @ kv, any leading dims) rewritten to
broadcast Mul + grouped 1x1 Conv of ones with the same outputs; chunked under the element budget and the channel
limit; constant operands, broadcasting and plain TensorRT left alone with the reason; timm CoaT-Lite and
EfficientViT-MIT converted for trt-safe."""
import pytest
import timm
import torch
import torch.nn.functional as F

import attn2conv
from attn2conv.capture import capture
from attn2conv.graph import refresh_shapes, shape
from attn2conv.legality import illegal_ops, op_counts
from attn2conv.pass_infra import PassContext, get_pass
from attn2conv.targets import resolve_target

from conftest import rel_error

MATMUL_OPS = ("aten.matmul", "aten.bmm", "aten.mm")


def unstack(x):
    """x[0], x[1], ... as Split + Reshape (select would export to Gather, which DLA rejects)."""
    return [t.reshape(t.shape[1:]) for t in x.split(1)]


def run_pass(model, x, target="trt-safe", **options):
    gm = capture(model, (x,))
    before = set(gm.graph.nodes)
    gm.meta["own_shapes"] = {shape(n) for n in before}
    gm.meta["own_ops"] = set(op_counts(gm)) - set(MATMUL_OPS)
    ctx = PassContext(example_inputs=(x,), profile=resolve_target(target), options={"matmul_to_conv": options})
    result = get_pass("matmul_to_conv")().run(gm, ctx)
    gm.recompile()
    refresh_shapes(gm, (x,))
    gm.meta["created"] = [n for n in gm.graph.nodes if n not in before]
    return gm, result


def created_dims(gm) -> list[tuple[int, ...]]:
    """Shapes (rank >= 3) of the activations the pass created, except the model's own (results reshaped back)."""
    values = [shape(n) for n in gm.meta["created"] if n.op == "call_function"]
    return [s for s in values if s is not None and len(s) >= 3 and s not in gm.meta["own_shapes"]]


def assert_exact(model, x, rewrites, target="trt-safe", **options):
    gm, result = run_pass(model, x, target, **options)
    assert result.rewrites == rewrites, result.misses
    counts = op_counts(gm)
    assert not any(counts.get(op) for op in MATMUL_OPS), counts
    # no MatMul left, and nothing the pass added is an error (the model's own ops, e.g. DLA's Pad, are other passes')
    errors = [o for o in illegal_ops(gm, resolve_target(target))
              if o.severity == "error" and o.op_kind not in gm.meta["own_ops"]]
    assert not errors, errors
    for probe in (x, torch.randn_like(x) * 3):
        assert rel_error(gm(probe), model(probe)) <= 1e-5
    return gm, result


class Factorized(torch.nn.Module):
    """CoaT: softmax of k over the tokens, k^T @ v (contracts over tokens), then q @ kv."""

    def forward(self, x):  # (3, B, h, N, d)
        q, k, v = unstack(x)
        return q @ (k.softmax(dim=2).transpose(-1, -2) @ v)


class ReluLinear(torch.nn.Module):
    """EfficientViT-MIT: ReLU kernels, v padded with ones (its column of kv sums k), divided by that column."""

    def forward(self, x):
        q, k, v = unstack(x)
        q, k, v = F.relu(q), F.relu(k), F.pad(v, (0, 1), mode="constant", value=1.0)
        out = q @ (k.transpose(-1, -2) @ v)
        return out[..., :-1] / (out[..., -1:] + 1e-5)


class Bmm(torch.nn.Module):
    """3-D products whose leading dim (B*h = 24) exceeds trt-safe's batch limit (16)."""

    def forward(self, x):
        q, k, v = (t.flatten(0, 1) for t in unstack(x))
        return torch.bmm(q, torch.bmm(k.transpose(1, 2), v))


class Plain2d(torch.nn.Module):
    def forward(self, x):
        return torch.mm(x[0, 0, 0], x[1, 0, 0].t())


class Windows5d(torch.nn.Module):
    """VOLO's outlook attention: (B, h, L, 9, 9) @ (B, h, L, 9, d)."""

    def forward(self, x):  # (B, h, L, 9, 9 + d)
        return x[..., :9].softmax(dim=-1) @ x[..., 9:]


@pytest.mark.parametrize("module,rewrites", [(Factorized, 2), (ReluLinear, 2), (Bmm, 2)])
@pytest.mark.parametrize("target", ["trt-safe", "dla"])
def test_linear_attention_forms(module, rewrites, target):
    gm, result = assert_exact(module().eval(), torch.randn(3, 4, 6, 50, 8), rewrites, target=target)
    assert not result.misses
    if target == "trt-safe":  # every activation within the safety runtime's batch (16) and channel (4096) limits
        dims = created_dims(gm)
        assert max(s[0] for s in dims) <= 16 and max(s[1] for s in dims) <= 4096


def test_two_dimensional_and_five_dimensional_products():
    assert_exact(Plain2d().eval(), torch.randn(2, 1, 1, 20, 8), 1)
    assert_exact(Windows5d().eval(), torch.randn(1, 2, 12, 9, 9 + 16), 1)


def test_chunks_under_the_budget_and_the_channel_limit_stay_exact():
    """Tokens beyond the channel limit are summed in pieces (partial sums added); heads go in group chunks."""
    x = torch.randn(3, 1, 2, 5000, 2)  # k^T @ v contracts over 5000 tokens > 4096 channels
    gm, result = assert_exact(Factorized().eval(), x, 2)
    assert any("4 chunks (1 groups x 2500 of 5000 contracted" in note for note in result.notes), result.notes
    assert max(s[1] for s in created_dims(gm)) <= 4096
    gm, result = assert_exact(Factorized().eval(), torch.randn(3, 2, 4, 50, 8), 2, max_broadcast_elems=2000)
    assert "budget 2000" in result.notes[-1]
    peak = int(result.notes[-1].split("peak broadcast tensor ")[1].split()[0])
    assert 0 < peak <= 2000
    assert op_counts(gm)["aten.conv2d"] > 4


def test_left_alone_with_the_reason():
    class ConstantOperand(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 4))

        def forward(self, x):
            return x @ self.w

    class Broadcasting(torch.nn.Module):
        def forward(self, x):
            return x @ x[0].transpose(-1, -2)

    _, result = run_pass(ConstantOperand(), torch.randn(2, 5, 8))
    assert result.rewrites == 0 and "is a constant" in result.misses[0]
    _, result = run_pass(Broadcasting(), torch.randn(2, 5, 8))
    assert result.rewrites == 0 and "different leading dims" in result.misses[0]
    gm, result = run_pass(Factorized(), torch.randn(3, 1, 2, 9, 4), target="trt")
    assert result.rewrites == 0 and op_counts(gm)["aten.matmul"] == 2 and "accepts MatMul" in result.notes[0]


@pytest.mark.parametrize("name,kwargs", [
    ("coat_lite_tiny", dict(serial_depths=[1, 1, 1, 1], img_size=64)),
    ("efficientvit_b0", dict(depths=[1, 1, 1, 1, 1])),
])
def test_timm_linear_attention_converts_for_trt_safe(name, kwargs):
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    result = attn2conv.convert(model, target="trt-safe", example_inputs=(x,))
    record = next(p for p in result.report.passes if p.id == "matmul_to_conv")
    assert record.rewrites == (8 if name.startswith("coat") else 4), record.misses
    assert not [op for op in result.report.illegal_ops if op["severity"] == "error"], result.report.illegal_ops
    assert not any(op_counts(result.module).get(op) for op in MATMUL_OPS)
    for probe in (x, torch.randn_like(x)):
        assert rel_error(result.module(probe), model(probe)) <= 1e-4
