"""FP16 and INT8 deployment (attn2conv.precision, convert(precision=...)).

A conv-only digits classifier trained here in a few seconds (scikit-learn's 8x8 digits) and a small timm ViT are
exported in FP16 and INT8, certified, run in onnxruntime, and compared with FP32 on held-out data.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto as T
from onnx import helper as h

import attn2conv
from attn2conv.check import check
from attn2conv.precision import (DEFAULT_SAMPLES, PrecisionConfig, calibrate, fp16_safety, lower_precision,
                                 make_feeds, run_model, write_trt_calibration_cache)

BATCH = 16  # the safety runtime takes batches of at most 16


# --- the digits model ------------------------------------------------------------------------------------------------

class DigitsNet(nn.Module):
    """Conv-BN-ReLU x2, a fixed 4x4 average pool and a 1x1-conv head: every op runs on DLA and in safe mode."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AvgPool2d(4), nn.Conv2d(32, 10, 1))

    def forward(self, x):
        return self.body(x).reshape(x.shape[0], 10)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0 - 0.5) / 0.5
    y = torch.tensor(d.target)
    tr, te = train_test_split(np.arange(len(y)), test_size=352, stratify=d.target, random_state=0)
    torch.manual_seed(0)
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(12):  # ~3 s on two busy cores
        for idx in torch.randperm(len(tr)).split(64):
            batch = torch.as_tensor(tr)[idx]
            loss = F.cross_entropy(net(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[te]).argmax(1) == y[te]).float().mean().item()
    assert acc > 0.9, acc
    train = [(x[tr][i:i + 64], y[tr][i:i + 64]) for i in range(0, len(tr), 64)]
    held_out = [(x[te][i:i + BATCH], y[te][i:i + BATCH]) for i in range(0, len(te), BATCH)]
    return net, train, held_out, x[te], y[te]


@pytest.mark.parametrize("target", ["trt-safe", "dla"])
@pytest.mark.parametrize("precision,min_agreement", [("fp16", 0.999), ("int8", 0.99)])
def test_digits_reduced_precision_certified_and_accurate(digits, tmp_path, target, precision, min_agreement):
    net, train, held_out, x_te, y_te = digits
    out = tmp_path / f"digits_{precision}.onnx"
    res = attn2conv.convert(net, target, example_inputs=(x_te[:BATCH],), export=out, precision=precision,
                            calibration=train, evaluation=held_out)
    rep = res.report.extra["precision_report"]
    assert res.certified, (res.report.extra["verifier"], res.report.extra["check"]["failing"][:3])
    assert rep["drift"]["samples"] == 352
    assert rep["drift"]["top1_agreement"] >= min_agreement, rep["drift"]
    # onnxruntime runs the written file; its accuracy on the held-out digits stays with FP32's
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feed_type = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    logits = np.concatenate([session.run(None, {session.get_inputs()[0].name: xb.numpy().astype(feed_type)})[0]
                             for xb, _ in held_out])
    with torch.no_grad():
        ref = net(x_te).numpy()
    assert (logits.argmax(1) == ref.argmax(1)).mean() >= min_agreement
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["attn2conv.precision"] == precision
    ops = {n.op_type for n in model.graph.node}
    if precision == "fp16" or target == "dla":
        assert session.get_inputs()[0].type == "tensor(float16)" and "QuantizeLinear" not in ops
    if precision == "int8":
        assert rep["calibration_samples"] == -(-DEFAULT_SAMPLES // BATCH) * BATCH  # 500 rounded up to whole batches
        assert rep["layers"] and all(r["rel_error"] >= 0 for r in rep["layers"])
        assert rep["int8"]["quantized_nodes"] == 3  # the two convs and the head; BN folded, pools/ReLU in float
    if precision == "int8" and target == "dla":
        ranges = json.loads(meta["attn2conv.int8.ranges"])
        side = json.loads(Path(str(out) + ".ranges.json").read_text())
        assert ranges == pytest.approx(side) and len(ranges) >= 4
        cache = Path(str(out) + ".calib").read_text().splitlines()
        assert cache[0].startswith("TRT-") and len(cache) == len(ranges) + 1
    if precision == "int8" and target == "trt-safe":
        _assert_tensorrt_qdq_form(model)


def _assert_tensorrt_qdq_form(model: onnx.ModelProto):
    """Symmetric, per-channel weights on axis 0, Q/DQ only in front of the convolutions, float bias."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs
    for conv in convs:
        x, w = producer[conv.input[0]], producer[conv.input[1]]
        assert x.op_type == "DequantizeLinear" and w.op_type == "DequantizeLinear"
        assert inits[w.input[0]].data_type == T.INT8 and len(inits[w.input[1]].dims) == 1
        assert all(a.i == 0 for a in w.attribute if a.name == "axis")
        if len(conv.input) > 2:
            assert inits[conv.input[2]].data_type == T.FLOAT  # bias stays float, fuses into the INT8 conv
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        assert producer.get(q.input[0]) is None or producer[q.input[0]].op_type != "Conv"  # outputs not quantized
    for dq in (n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")):
        zp = onnx.numpy_helper.to_array(inits[dq.input[2]])
        assert not zp.any()


# --- a small ViT ---------------------------------------------------------------------------------------------------

def _vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, in_chans=1,
                             embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10).eval()


@pytest.fixture(scope="module")
def vit_fp32(tmp_path_factory):
    """The converted ViT's FP32 export for trt-safe and for dla (the exact pipelines differ per target)."""
    torch.manual_seed(0)
    model = _vit()
    x = torch.randn(4, 1, 32, 32)
    out = {}
    for target in ("trt-safe", "dla"):
        path = tmp_path_factory.mktemp("vit") / f"vit_{target}.onnx"
        res = attn2conv.convert(model, target, example_inputs=(x,), export=path)
        out[target] = (path, res)
    return out


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_vit_trt_safe_reduced_precision_certified(vit_fp32, tmp_path, precision):
    path, fp32 = vit_fp32["trt-safe"]
    assert fp32.certified
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 1, 32, 32, generator=g) for _ in range(6)]
    evaluation = [torch.randn(4, 1, 32, 32, generator=g) for _ in range(2)]
    out = tmp_path / f"vit_{precision}.onnx"
    res = lower_precision(path, out, precision, "trt-safe", calibration=calib, evaluation=evaluation)
    verdict = check(out, "trt-safe")
    assert verdict.ok, [f.reason for f in verdict.failing[:3]]
    assert res.ort_ok and res.drift["finite"]
    assert res.drift["rel_error"] < (5e-3 if precision == "fp16" else 0.2), res.drift
    if precision == "int8":  # attention's constant head-sum / mean convs stay in float, the learned ones are INT8
        assert res.int8["quantized_nodes"] == 10 and res.int8["kept_float"]
        assert res.layers[0]["module"]  # the worst layer is named by its module path


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_vit_dla_reduced_precision_certified(vit_fp32, tmp_path, precision):
    """The exact dla pipeline makes this ViT DLA-clean (Newton 1/sqrt, no Squeeze, channel-axis Concat); FP16 and
    the DLA INT8 form (FP16 graph + calibrated ranges) stay certified and close to FP32."""
    path, fp32 = vit_fp32["dla"]
    assert fp32.certified, fp32.report.extra["check"]["failing"][:3]
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 1, 32, 32, generator=g) for _ in range(6)]
    evaluation = [torch.randn(4, 1, 32, 32, generator=g) for _ in range(2)]
    out = tmp_path / f"vit_dla_{precision}.onnx"
    res = lower_precision(path, out, precision, "dla", calibration=calib, evaluation=evaluation)
    verdict = check(out, "dla")
    assert verdict.ok, [f.reason for f in verdict.failing[:3]]
    assert res.ort_ok and res.drift["finite"] and res.form == ("fp16" if precision == "fp16" else "fp16+ranges")
    assert res.drift["rel_error"] < (5e-3 if precision == "fp16" else 0.2), res.drift
    if precision == "int8":  # the FP16 graph itself (what DLA runs before INT8 ranges) stays close too
        assert res.drift["fp16_graph"]["rel_error"] < 5e-3, res.drift


# --- pieces --------------------------------------------------------------------------------------------------------

def _mlp_onnx(path: Path, scale: float = 1.0, big: float = 1.0):
    """x(2,8) -> MatMul W -> Mul s -> y: with big weights the product overflows FP16 while the scaled one does not."""
    w = (np.random.default_rng(0).standard_normal((8, 8)) * big).astype(np.float32)
    nodes = [h.make_node("MatMul", ["x", "w"], ["p"], name="mm"), h.make_node("Mul", ["p", "s"], ["y"], name="scale")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2, 8])],
                     [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.float32(scale), "s")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return m


def test_make_feeds_rebatches_and_limits(tmp_path):
    m = _mlp_onnx(tmp_path / "m.onnx")
    batches = [(torch.randn(3, 8), torch.zeros(3)) for _ in range(10)]  # (inputs, labels), odd batch size
    feeds = make_feeds(batches, m, samples=7)
    assert [f["x"].shape for f in feeds] == [(2, 8)] * 4  # 7 samples rounded up to the model's static batch of 2
    assert np.allclose(np.concatenate([f["x"] for f in feeds]), torch.cat([b[0] for b in batches])[:8].numpy())
    assert len(make_feeds([np.ones(8, np.float32)], m)) == 1  # a single sample is padded to one batch
    with pytest.raises(ValueError, match="shape"):
        make_feeds([torch.randn(2, 9)], m)


@pytest.mark.parametrize("method", ["max", "percentile", "entropy", "mse"])
def test_calibrators(tmp_path, method):
    _mlp_onnx(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 8)).astype(np.float32)} for _ in range(20)]
    feeds[3]["x"][0, 0] = 40.0  # one outlier
    feeds[18]["x"][0, 0] = -30.0  # and one in the second chunk of 16 batches
    ranges = calibrate(tmp_path / "m.onnx", feeds, method)
    lo, hi = ranges["x"]
    assert lo < 0 < hi and np.isfinite([lo, hi]).all()
    if method == "max":  # both chunks count
        assert (lo, hi) == (pytest.approx(-30.0), pytest.approx(40.0))
    elif method == "percentile":  # clips the single outlier (one value in 320 is above the 99.99th percentile)
        assert hi < 40.0
    else:  # entropy / MSE: one far outlier costs more squared error clipped than kept; never beyond the max
        assert hi <= 40.0


def test_fp16_scale_is_moved_before_an_overflowing_product(tmp_path):
    m = _mlp_onnx(tmp_path / "m.onnx", scale=1 / 64, big=3000.0)
    feeds = [{"x": np.full((2, 8), 8.0, np.float32)}]
    ranges = calibrate(tmp_path / "m.onnx", feeds, "max")
    assert max(abs(v) for v in ranges["p"]) > 65504  # the FP32 product leaves FP16's range
    fixed, report = fp16_safety(m, ranges, margin=0.5)
    assert [r["node"] for r in report["scales_hoisted"]] == ["mm"] and not report["kept_fp32"]
    assert [n.op_type for n in fixed.graph.node] == ["Mul", "MatMul"]
    ref = run_model(tmp_path / "m.onnx", feeds)[0][0]
    res = lower_precision(tmp_path / "m.onnx", tmp_path / "m16.onnx", "fp16", "trt", calibration=feeds,
                          evaluation=feeds)
    assert res.fp16["scales_hoisted"] and res.drift["finite"] and res.drift["rel_error"] < 5e-3
    onnx.save(fixed, str(tmp_path / "fixed.onnx"))  # in the rewritten FP32 graph every tensor fits FP16
    assert max(max(abs(lo), abs(hi)) for lo, hi in calibrate(tmp_path / "fixed.onnx", feeds, "max").values()) < 65504
    assert np.allclose(run_model(tmp_path / "fixed.onnx", feeds)[0][0], ref, rtol=1e-5)


def test_trt_calibration_cache_format(tmp_path):
    write_trt_calibration_cache({"x": 127.0, "y": 2.54}, tmp_path / "c.calib")
    lines = (tmp_path / "c.calib").read_text().splitlines()
    assert lines[0] == "TRT-8601-EntropyCalibration2"
    name, hexval = lines[1].split(": ")
    assert name == "x" and struct.unpack(">f", bytes.fromhex(hexval))[0] == pytest.approx(1.0)
    assert struct.unpack(">f", bytes.fromhex(lines[2].split(": ")[1]))[0] == pytest.approx(0.02)


def test_precision_config_and_convert_arguments(digits, tmp_path):
    with pytest.raises(ValueError, match="calibrator"):
        PrecisionConfig.from_options({"calibrator": "kl"})
    with pytest.raises(ValueError, match="unknown precision option"):
        PrecisionConfig.from_options({"bits": 4})
    net = digits[0]
    x = digits[3][:BATCH]
    with pytest.raises(ValueError, match="export="):
        attn2conv.convert(net, "trt-safe", example_inputs=(x,), precision="fp16")
    with pytest.raises(ValueError, match="calibration"):
        attn2conv.convert(net, "trt-safe", example_inputs=(x,), precision="int8", export=tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="precision"):
        attn2conv.convert(net, "trt-safe", example_inputs=(x,), precision="int4", export=tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_fp32_layer_rule_allows_plain_1x1_conv_on_safe_only():
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_check_rules import _fp16_chain

    m = _fp16_chain(conv1x1_fp32=True)
    assert "A2C-SAFE-PREC-FP32-LAYER" not in {f.rule for f in check(m, "trt-safe").findings}
    assert "A2C-DLA-PREC-FP32-LAYER" in {f.rule for f in check(m, "dla").findings}


@pytest.mark.slow
def test_distilled_digits_example_fp16_int8(tmp_path):
    """The fast/distill example's digits student (its default 30 + 30 epochs), lowered for trt-safe, in FP16 and INT8.
    Measured: FP16 top-1 agreement 100% (rel. error 5.6e-4), INT8 99.69% with max, percentile and MSE calibration
    (1 of 320 held-out images flips; with 8 + 8 epochs the less confident student lands at 98.8-99.7%)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_example",
                                                  Path(__file__).parents[1] / "examples" / "digits_fast_distill.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    torch.manual_seed(0)
    (x_tr, y_tr), (x_te, y_te) = ex.load_digits_32(0)
    train = ex.Batches(x_tr, y_tr, seed=0)
    teacher = ex.train_teacher(ex.make_teacher(), train, epochs=30)
    preset = attn2conv.Pipeline.for_target("trt-safe", "fast")
    calib = [xb for xb, _ in ex.Batches(x_tr, y_tr, seed=1, augment=False)][:4]
    fast = attn2conv.convert(teacher, "trt-safe", example_inputs=x_tr[:ex.BATCH], fidelity="fast",
                             calibration=calib, pipeline=attn2conv.Pipeline([p for p in preset if not p.exact]))
    student = attn2conv.distill(fast.module, teacher, train, epochs=30, lr=2e-3, warmup_steps=20, temperature=2.0,
                                label_weight=0.5, seed=0)
    deployable, legal = ex.lower(student, preset, x_tr[:ex.BATCH])
    assert legal
    fp32 = tmp_path / "student.onnx"
    attn2conv.export_onnx(deployable, (x_tr[:ex.BATCH],), fp32, "trt-safe")
    n = len(x_te) // ex.BATCH * ex.BATCH
    held_out = [x_te[i:i + ex.BATCH] for i in range(0, n, ex.BATCH)]
    train_batches = [xb for xb, _ in ex.Batches(x_tr, y_tr, seed=2, augment=False)]
    for precision, bound in (("fp16", 0.999), ("int8", 0.99)):
        out = tmp_path / f"student_{precision}.onnx"
        res = lower_precision(fp32, out, precision, "trt-safe", calibration=train_batches, evaluation=held_out)
        # the example's graph has a static batch of 64 (safety caps it at 16): that is the only rule it may break
        assert {f.rule for f in check(out, "trt-safe").failing} <= {"A2C-SAFE-TENSOR-BATCH"} and res.ort_ok
        assert res.drift["top1_agreement"] >= bound, (precision, res.drift, res.layers[:3])
