"""batch_to_space: window-batched regions (Swin: batch B*nW) rebuilt with the windows on a spatial axis, so that a
trt-safe export has no tensor with batch > 16; index maps as reshape/slice/permute plans; unsupported regions left."""
import math

import onnx
import pytest
import timm
import torch

import attn2conv
from attn2conv.graph import shape
from attn2conv.legality import op_counts
from attn2conv.graph import express_index_map

from conftest import rel_error

MAX_BATCH = 16


def _apply(plan, x):
    for op, *val in plan:
        x = x.reshape(val[0]) if op == "reshape" else x.permute(val[0]) if op == "permute" else \
            x.narrow(val[0], val[1], val[2] - val[1])
    return x


def _intermediate_shapes(plan, src_shape):
    x = torch.empty(src_shape, device="meta")
    out = []
    for op, *val in plan:
        x = _apply([(op, *val)], x)
        out.append(tuple(x.shape))
    return out


CHAINS = {
    "window_partition": ((1, 42, 42, 32), lambda a: a.reshape(1, 6, 7, 6, 7, 32).permute(0, 1, 3, 2, 4, 5)
                         .reshape(36, 7, 7, 32).reshape(1, 36, 7, 7, 32).movedim(1, 2)),
    "window_reverse": ((1, 32, 36, 1, 49), lambda a: a.movedim(2, 1).reshape(36, 32, 1, 49).reshape(1, 6, 6, 32, 7, 7)
                       .permute(0, 1, 4, 2, 5, 3).reshape(1, 42, 42, 32)),
    "qkv_split_k": ((1, 96, 36, 1, 49), lambda a: a.movedim(2, 1).reshape(36, 3, 2, 16, 49).permute(1, 0, 2, 4, 3)
                    .unbind(0)[1].reshape(1, 36, 2, 49, 16).movedim(1, 2)),
    "transpose": ((3, 4), lambda a: a.t()),
    "select": ((2, 3, 4), lambda a: a[:, 1]),
    "strided_slice": ((4, 10), lambda a: a[1:3, 2:8:2]),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_express_index_map_reproduces_layout_chains(name):
    src_shape, chain = CHAINS[name]
    idx = chain(torch.arange(math.prod(src_shape)).reshape(src_shape))
    plan = express_index_map(src_shape, idx, MAX_BATCH)
    assert plan is not None
    x = torch.randn(src_shape)
    assert torch.equal(_apply(plan, x), chain(x))
    for s in _intermediate_shapes(plan, src_shape):
        assert len(s) < 3 or s[0] <= max(MAX_BATCH, src_shape[0], idx.shape[0]), (plan, s)
    assert sum(op == "permute" for op, *_ in plan) <= 1


def test_express_index_map_refuses_repeats():
    idx = torch.arange(4).reshape(4, 1).expand(4, 3)  # a broadcast: not a layout of the source
    assert express_index_map((4,), idx) is None


class Windowed(torch.nn.Module):
    """(1, C, 12, 12) -> 36 windows of 2x2 on the batch axis -> conv/pool/element-wise per window -> back."""

    def __init__(self, crossing=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3 if crossing else 1, padding=1 if crossing else 0)
        self.register_buffer("per_window", torch.randn(36, 1, 2, 2))

    def forward(self, x):
        w = x.reshape(1, 4, 6, 2, 6, 2).permute(0, 2, 4, 1, 3, 5).reshape(36, 4, 2, 2)
        y = torch.sigmoid(self.conv(w) + self.per_window) * 2.0
        y = y + torch.nn.functional.max_pool2d(y, 2, 2)
        return y.reshape(1, 6, 6, 8, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 8, 12, 12)


def _flagged(gm):
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and shape(n) and len(shape(n)) >= 3
            and shape(n)[0] > MAX_BATCH]


def test_unit_region_rebuilt_bit_exact():
    model, x = Windowed().eval(), torch.randn(1, 4, 12, 12)
    result = attn2conv.convert(model, "trt-safe", (x,), pipeline=attn2conv.Pipeline(["batch_to_space"]))
    record = result.report.passes[0]
    assert record.rewrites >= 5 and not record.misses, record.misses
    assert not _flagged(result.module)
    for probe in (x, torch.randn_like(x)):
        assert torch.allclose(result.module(probe), model(probe), rtol=0, atol=1e-6)


def test_unit_conv_straddling_windows_left_alone():
    model, x = Windowed(crossing=True).eval(), torch.randn(1, 4, 12, 12)
    result = attn2conv.convert(model, "trt-safe", (x,), pipeline=attn2conv.Pipeline(["batch_to_space"]))
    record = result.report.passes[0]
    assert record.rewrites == 0 and "straddle" in record.misses[0]
    assert _flagged(result.module)


def test_no_batch_limit_no_change():
    model, x = Windowed().eval(), torch.randn(1, 4, 12, 12)
    result = attn2conv.convert(model, "dla", (x,), pipeline=attn2conv.Pipeline(["batch_to_space"]))
    assert result.report.passes[0].rewrites == 0 and _flagged(result.module)


def _onnx_batches(path):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    dims = []
    for vi in list(model.graph.value_info) + list(model.graph.output):
        d = [x.dim_value for x in vi.type.tensor_type.shape.dim]
        if len(d) >= 3:
            dims.append(d)
    return dims


def _certify(model, x, path, options=None):
    result = attn2conv.convert(model, target="trt-safe", example_inputs=(x,), export=path, options=options)
    assert result.certified is True, [f for f in result.check.findings if f.severity == "error"][:5]
    assert not [f for f in result.check.findings if f.rule.startswith("A2C-SAFE-TENSOR")]
    record = next(p for p in result.report.passes if p.id == "batch_to_space")
    assert record.rewrites > 0 and record.rel_error <= 1e-6  # same arithmetic; conv kernels may round differently
    assert not _flagged(result.module)
    counts = op_counts(result.module)
    assert not counts.get("aten.matmul") and not counts.get("aten.scaled_dot_product_attention")
    assert all(d[0] <= MAX_BATCH and d[1] <= 4096 and max(d[2:]) <= 4096 for d in _onnx_batches(path))
    for probe in (x, torch.randn_like(x)):
        got, want = result.module(probe), model(probe)
        assert rel_error(got, want) <= 1e-5
    return result


def test_timm_swin_25_windows_certified(tmp_path):
    """One Swin stage at 140x140, patch 4, window 7: 35x35 tokens = 25 windows on the batch axis before the pass."""
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(2,), num_heads=(2,),
                              embed_dim=16, img_size=140, num_classes=10).eval()
    _certify(model, torch.randn(1, 3, 140, 140), tmp_path / "swin.onnx")


def test_timm_swin_attention_chunked_over_windows_certified(tmp_path):
    """attention_to_conv cut into 5 chunks of 5 windows (a budget of 5 windows x 2 heads): the chunks' batch axis is
    under the limit, their concatenation along the batch axis is rebuilt on the folded window axis."""
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(2,), num_heads=(2,),
                              embed_dim=16, img_size=140, num_classes=10).eval()
    budget = 5 * 2 * 8 * 49 * 49
    result = _certify(model, torch.randn(1, 3, 140, 140), tmp_path / "swin.onnx",
                      options={"attention_to_conv": {"max_broadcast_elems": budget}})
    notes = next(p for p in result.report.passes if p.id == "attention_to_conv").notes
    assert any("5 chunks (5 images x 2 heads x 49 keys)" in n for n in notes), notes


def test_hf_swin_25_windows_certified(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SwinConfig(image_size=140, patch_size=4, embed_dim=16, depths=[2], num_heads=[2],
                                  window_size=7)
    hf = transformers.SwinModel(cfg).eval()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = hf

        def forward(self, x):
            return self.model(pixel_values=x).last_hidden_state

    _certify(Wrap().eval(), torch.randn(1, 3, 140, 140), tmp_path / "hf_swin.onnx")


@pytest.mark.slow
def test_swin_tiny_full_size_certified(tmp_path):
    """Swin-T at 224: 64 windows per image at stage 1 (the 60 A2C-SAFE-TENSOR-BATCH findings before this pass)."""
    import subprocess
    import sys

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    path = tmp_path / "swin.onnx"
    _certify(model, torch.randn(1, 3, 224, 224), path)
    cli = subprocess.run([sys.executable, "-c", "import sys; from attn2conv.check.cli import main; sys.exit(main())",
                          str(path), "--target", "trt-safe"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stdout[-2000:]
