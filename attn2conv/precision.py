"""Reduced precision: FP16 and INT8 ONNX models from a (converted, certified) FP32 ONNX model.

    res = lower_precision("model_fp32.onnx", "model_int8.onnx", "int8", target="trt-safe",
                          calibration=batches, evaluation=held_out_batches)
    res.drift          # {'rel_error': ..., 'top1_agreement': ..., 'samples': ...} against the FP32 model
    res.layers         # the quantized layers whose quantization hurts most, worst first

`attn2conv.convert(..., precision="fp16" | "int8", calibration=..., evaluation=..., export="m.onnx")` calls this on the
FP32 export and certifies the result with the same target profile.

FP16 (all targets)
    onnxruntime's float16 converter (the one from onnxconverter-common, vendored in onnxruntime.transformers) turns
    weights and activations into FP16, inputs and outputs included (DLA standalone and the safety runtime take FP16
    I/O; feed float16 arrays). Before converting, the FP32 graph runs on the calibration batches (or the example
    inputs) and every tensor's range is recorded; two overflow/underflow checks follow the ANE and TensorRT guides:

    * epsilon in normalisations: the constant added right before a ``Sqrt``/``Reciprocal``/divisor (an Add, or the
      bias of the variance-mean conv that layernorm_decompose writes) with 0 < eps < 2^-14 (FP16's smallest normal,
      6.1e-5; LayerNorm's 1e-6 is one) is a subnormal in FP16: hardware that flushes denormals turns it into 0, and a
      zero variance then divides by zero. It is reported (``res.fp16['eps_subnormal']``, with the measured minimum
      of the denominator) and the verifier warns (A2C-TRT-PREC-FP16-EPS); ``fp16_eps='raise'`` lifts it to 2^-14.
      Not by default: on a random-weight ViT (variances ~1e-3) raising it moved the output by 4e-2, 40x the FP16
      rounding drift.
    * scale placement before products: a tensor whose FP32 range passes ``fp16_margin * 65504`` and that is a product
      (MatMul, Mul of two activations, Conv) immediately scaled by a constant (Mul by s, or Div by d, |s| < 1) gets the
      scale moved onto an input of the product: (a*b)*s == (a*s)*b exactly in real arithmetic, and the FP16 product
      then stays in range (Apple's "scale q before q.k" rule). A Conv takes the scale into its weights and bias.
    * anything that still overflows is kept in FP32 (listed in ``res.fp16['kept_fp32']``); the verifier then flags
      those layers on trt-safe/DLA (A2C-SAFE/DLA-PREC-FP32-LAYER), which is the honest outcome.

INT8, explicit Q/DQ (trt, trt-safe)
    onnxruntime.quantization.quantize_static in QDQ format, in the form TensorRT consumes: symmetric INT8 (zero points
    0), weights per output channel (axis 0) on Conv, activations per tensor, Q/DQ on the *inputs* of the quantized
    convolutions only (``OpTypesToExcludeOutputQuantization``), bias kept in float (``QuantizeBias=False``; TensorRT
    8.6's DequantizeLinear takes INT8 only): Conv + bias + BatchNorm/activation then fuse into one INT8 kernel, and the
    next layer's Q fuses as its output (TensorRT developer guide, Q/DQ placement recommendations).
    Constant reduction and selection convolutions that the exact passes create (channel means for LayerNorm, head
    sums and key sums in the conv-only attention: weights with at most two distinct values) stay in float by
    default: their inputs (squared deviations, q*k products) are the tensors INT8 represents worst, and they are
    exact reductions, not learned layers; TensorRT runs them in FP16.

    Calibration: ``create_calibrator`` of onnxruntime with MinMax ("max"), Percentile ("percentile") or Entropy
    ("entropy"). onnxruntime offers no MSE calibrator; "mse" picks, per tensor, the clipping threshold that minimises
    the expected squared quantization error over onnxruntime's own |x| histogram (the percentile calibrator's): a
    few lines of arithmetic on the library's statistics. The ranges go through onnxruntime's calibration cache
    (``calibration_cache_path``), so the per-layer sensitivity runs re-use them without recalibrating.
    Calibration data: any iterable of batches (tensors, arrays, tuples or dicts), re-batched to the model's static
    batch; the first ``samples`` samples (default 500, as in the CSA study) are used.

INT8 on DLA (implicit quantization)
    TensorRT 8.6 does not take explicit Q/DQ on DLA (the DLA operator table: Q/DQ "can be collapsed to INT8 scaling
    factors, switching from explicit to implicit quantization"; the dla profile rejects the ops). For target dla the
    deliverable is therefore the FP16 graph (DLA runs FP16 where a layer is not INT8) plus the dynamic ranges of the
    same calibration: in the model's metadata (``attn2conv.int8.ranges``, checked by A2C-DLA-PREC-INT8-RANGES), as
    ``<model>.ranges.json`` ({tensor: amax}, for ITensor::setDynamicRange) and as a TensorRT calibration cache
    ``<model>.calib`` (``trtexec --int8 --fp16 --useDLACore=0 --calib=<model>.calib``). The ranges cover the tensors
    the Q/DQ form would quantize (inputs and outputs of the quantized convolutions); the accuracy figures for DLA INT8
    come from that Q/DQ form run in onnxruntime with the same ranges (a simulation: DLA rounds the same way, but its
    FP16 layers in between are FP16 rather than FP32).

Drift and sensitivity
    ``drift``: relative error max|y - y32| / max|y32| and top-1 agreement (per sample argmax over the last axis of the
    first output) against the FP32 model on the evaluation batches (the example/probe inputs if none are given).
    ``layers``: per quantized node, the output error its own quantization adds. Up to ``one_at_a_time_max`` nodes it
    is measured exactly (quantize that node alone, relative output error); above, from one run of the full Q/DQ
    model: error of the node's output minus the error already in its input.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

PRECISIONS = ("fp32", "fp16", "int8")
CALIBRATORS = ("max", "percentile", "entropy", "mse")
DEFAULT_SAMPLES = 500  # the CSA study calibrated its INT8 engines on 500 images
_CALIB_CHUNK = 16
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14  # 6.1e-5
_PRODUCTS = ("MatMul", "Mul", "Conv", "Gemm")
_DIVISOR_USERS = ("Sqrt", "Reciprocal")


class PrecisionError(ValueError):
    """Bad precision request or data (one line)."""


@dataclass
class PrecisionConfig:
    calibrator: str = "max"
    samples: int = DEFAULT_SAMPLES
    percentile: float = 99.99
    per_channel: bool = True
    op_types: tuple[str, ...] = ("Conv", "ConvTranspose")  # weighted ops whose inputs get Q/DQ
    keep_structural_float: bool = True  # constant reduction/selection convs stay in float
    quantize_outputs: bool = False  # True: also Q/DQ the conv outputs (onnxruntime's QLinearConv form, not TensorRT's)
    exclude: tuple[str, ...] = ()  # node names kept in float
    fp16_margin: float = 0.5  # a tensor above margin * 65504 in FP32 counts as an FP16 overflow risk
    fp16_eps: str = "report"  # "report" a subnormal normalisation epsilon, or "raise" it to 2^-14
    sensitivity: bool = True
    one_at_a_time_max: int = 24
    top_k: int = 5
    fp16_rtol: float = 1e-2  # an FP16 export drifting more than this from FP32 is not certified
    min_top1: float | None = None  # optional bound on INT8/FP16 top-1 agreement for certification

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> PrecisionConfig:
        cfg = cls()
        for key, value in (options or {}).items():
            if not hasattr(cfg, key):
                raise PrecisionError(f"unknown precision option {key!r}; known: {', '.join(cfg.__dict__)}")
            setattr(cfg, key, tuple(value) if isinstance(getattr(cfg, key), tuple) else value)
        if cfg.calibrator not in CALIBRATORS:
            raise PrecisionError(f"calibrator {cfg.calibrator!r} is not one of {', '.join(CALIBRATORS)}")
        if int(cfg.samples) <= 0:
            raise PrecisionError("samples must be positive")
        return cfg


@dataclass
class PrecisionResult:
    precision: str
    target_kind: str
    path: str
    form: str  # "fp16", "qdq" (explicit INT8) or "fp16+ranges" (implicit INT8 for DLA)
    drift: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    fp16: dict[str, Any] = field(default_factory=dict)
    int8: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    calibration_samples: int = 0
    ort_ok: bool = False
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "target_kind": self.target_kind, "path": self.path, "form": self.form,
                "drift": self.drift, "layers": self.layers, "fp16": self.fp16, "int8": self.int8,
                "artifacts": dict(self.artifacts), "calibration_samples": self.calibration_samples,
                "ort_ok": self.ort_ok, "notes": list(self.notes),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}

    def summary(self) -> str:
        d = self.drift
        top1 = f", top-1 agreement {100 * d['top1_agreement']:.2f}%" if d.get("top1_agreement") is not None else ""
        worst = f"; hurts most: {self.layers[0]['node']} ({self.layers[0]['rel_error']:.1e})" if self.layers else ""
        return (f"{self.precision} ({self.form}) vs fp32 on {d.get('samples', 0)} samples: rel. error "
                f"{d.get('rel_error', float('nan')):.2e}{top1}{worst}")


# --- data ------------------------------------------------------------------------------------------------------------

def _input_specs(model: onnx.ModelProto) -> list[tuple[str, list[int | None], int]]:
    inits = {t.name for t in model.graph.initializer}
    out = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        out.append((v.name, dims, tt.elem_type))
    return out


def _as_arrays(batch: Any, n_inputs: int) -> list[np.ndarray]:
    if isinstance(batch, dict):
        return [np.asarray(_to_numpy(v)) for v in batch.values()]
    if isinstance(batch, (tuple, list)):
        items = [_to_numpy(b) for b in batch]
        return items[:n_inputs] if len(items) > n_inputs else items  # (x, label) batches: drop the labels
    return [_to_numpy(batch)]


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def make_feeds(batches: Iterable[Any] | None, model: onnx.ModelProto, samples: int | None = None,
               dtype: Any = np.float32) -> list[dict[str, np.ndarray]]:
    """Re-batches any iterable of batches to the model's static batch size; the first `samples` samples, rounded up
    to whole batches (500 samples at batch 16: 32 batches, 512 samples).

    A batch is a tensor/array, a tuple (inputs..., labels) or a dict {input name: array}. The tail that does not
    fill a whole batch is dropped unless it is all there is (then it is padded by repeating its first sample).
    """
    if batches is None:
        return []
    specs = _input_specs(model)
    names = [s[0] for s in specs]
    batch = specs[0][1][0] if specs and specs[0][1] and specs[0][1][0] else 1
    pending: list[list[np.ndarray]] = [[] for _ in specs]
    have = 0
    feeds: list[dict[str, np.ndarray]] = []
    limit = samples if samples is not None else math.inf
    for item in batches:
        arrays = _as_arrays(item, len(specs))
        if len(arrays) != len(specs):
            raise PrecisionError(f"a calibration/evaluation batch has {len(arrays)} input(s); the model takes "
                                 f"{len(specs)} ({', '.join(names)})")
        for i, a in enumerate(arrays):
            want = specs[i][1]
            if a.ndim == len(want) - 1:  # a single sample
                a = a[None]
            if a.ndim != len(want) or any(w and d != w for w, d in zip(want[1:], a.shape[1:])):
                raise PrecisionError(f"batch for input {names[i]} has shape {tuple(a.shape)}; the model takes "
                                     f"{tuple(want)}")
            pending[i].append(a)
        have += len(pending[0][-1])
        while have >= batch and len(feeds) * batch < limit:
            cat = [np.concatenate(p) for p in pending]
            feeds.append({n: c[:batch].astype(dtype, copy=False) for n, c in zip(names, cat)})
            pending = [[c[batch:]] for c in cat]
            have -= batch
        if len(feeds) * batch >= limit:
            break
    if not feeds and have:  # fewer samples than one batch: pad with the first sample
        cat = [np.concatenate(p) for p in pending]
        feeds.append({n: np.concatenate([c, np.repeat(c[:1], batch - len(c), 0)]).astype(dtype, copy=False)
                      for n, c in zip(names, cat)})
    return feeds


def _reader(feeds: list[dict[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class _FeedReader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

        def __len__(self):
            return len(feeds)

        def rewind(self):
            self._it = iter(feeds)

    return _FeedReader()


# --- running ---------------------------------------------------------------------------------------------------------

def _session(model: str | os.PathLike | bytes, level: str = "basic"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if level == "basic"
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    src = str(model) if isinstance(model, (str, os.PathLike)) else model
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _cast_feed(session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    kinds = {i.name: i.type for i in session.get_inputs()}
    out = {}
    for name, arr in feed.items():
        want = np.float16 if kinds.get(name) == "tensor(float16)" else np.float32
        out[name] = arr.astype(want, copy=False) if arr.dtype.kind == "f" else arr
    return out


def run_model(model, feeds: Sequence[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    session = model if hasattr(model, "run") else _session(model)
    return [[np.asarray(o, dtype=np.float32) for o in session.run(None, _cast_feed(session, f))] for f in feeds]


def drift(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> dict[str, Any]:
    """Relative error (worst output, max|y - y32| / max|y32|) and top-1 agreement over samples (argmax over the
    last axis of the first output, when it is (batch, classes))."""
    num = den = 0.0
    agree = total = 0
    finite = True
    for ref, cand in zip(reference, candidate):
        for r, c in zip(ref, cand):
            finite &= bool(np.isfinite(c).all())
            num = max(num, float(np.abs(c.astype(np.float64) - r).max()) if c.size else 0.0)
            den = max(den, float(np.abs(r).max()) if r.size else 0.0)
        r0, c0 = ref[0], cand[0]
        if r0.ndim == 2 and r0.shape[1] > 1:
            agree += int((r0.argmax(1) == c0.argmax(1)).sum())
            total += r0.shape[0]
    samples = sum(len(r[0]) for r in reference)
    return {"rel_error": num / den if den > 0 else num, "top1_agreement": agree / total if total else None,
            "samples": samples, "finite": finite}


# --- calibration -----------------------------------------------------------------------------------------------------

def calibrate(fp32_path: str | os.PathLike, feeds: list[dict[str, np.ndarray]], method: str = "max",
              percentile: float = 99.99) -> dict[str, tuple[float, float]]:
    """Per-tensor (low, high) of every float activation, with onnxruntime's calibrators ('mse': see module doc)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    if method not in CALIBRATORS:
        raise PrecisionError(f"calibrator {method!r} is not one of {', '.join(CALIBRATORS)}")
    if not feeds:
        raise PrecisionError("calibration needs at least one batch")
    ort_method = {"max": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy, "mse": CalibrationMethod.Percentile}[method]
    extra: dict[str, Any] = {"symmetric": method != "max"}
    if method in ("percentile", "mse"):
        extra["percentile"] = percentile
    if method == "entropy":  # onnxruntime's default of 128 bins equals its 128 quantized bins: the KL search then
        extra["num_bins"] = 2048  # has one candidate, the max; TensorRT's entropy calibrator uses 2048 bins
    with tempfile.TemporaryDirectory(prefix="a2c-calib-") as tmp, _quiet():
        calibrator = create_calibrator(Path(fp32_path), [], augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=ort_method, extra_options=extra)
        # 16 batches per collect_data call: the histogram calibrators hold every collected tensor until the call
        # ends, and each call merges into the running ranges/histograms. (onnxruntime's own knob for this,
        # max_intermediate_outputs, drops the collected batches without merging them in 1.31.)
        for start in range(0, len(feeds), _CALIB_CHUNK):
            calibrator.collect_data(_reader(feeds[start:start + _CALIB_CHUNK]))
        if method == "mse":
            ranges = {name: (-t, t) for name, t in _mse_thresholds(calibrator.collector.histogram_dict).items()}
        else:
            ranges = {name: (float(np.min(td.range_value[0])), float(np.max(td.range_value[1])))
                      for name, td in calibrator.compute_data().items()}
        del calibrator
    return {k: (float(lo), float(hi)) for k, (lo, hi) in ranges.items()}


def _mse_thresholds(histograms: dict[str, tuple]) -> dict[str, float]:
    """Clipping threshold t per tensor minimising E[(x - q(x))^2] for symmetric INT8 with step t/127, over the
    |x| histogram: values below t cost the rounding noise step^2/12, values above cost (|x| - t)^2."""
    out = {}
    for name, (hist, edges, *_rest) in histograms.items():
        hist = np.asarray(hist, dtype=np.float64)
        centers = 0.5 * (np.asarray(edges[1:], np.float64) + np.asarray(edges[:-1], np.float64))
        top = float(edges[-1])
        if hist.sum() == 0 or top <= 0:
            out[name] = max(top, 1e-8)
            continue
        candidates = np.linspace(top / 64, top, 128)
        costs = []
        for t in candidates:
            step = t / 127.0
            clipped = np.clip(centers - t, 0.0, None)
            costs.append(float((hist * np.where(centers <= t, step * step / 12.0, clipped * clipped)).sum()))
        out[name] = float(candidates[int(np.argmin(costs))])
    return out


def _tensors_data(ranges: dict[str, tuple[float, float]]):
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    return TensorsData(CalibrationMethod.MinMax, {
        k: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32)) for k, (lo, hi) in ranges.items()})


# --- INT8 ------------------------------------------------------------------------------------------------------------

def quantizable_nodes(model: onnx.ModelProto, cfg: PrecisionConfig) -> tuple[list[str], list[str]]:
    """(node names to quantize, structural convs kept in float)."""
    inits = {t.name: t for t in model.graph.initializer}
    chosen, kept = [], []
    for node in model.graph.node:
        if node.op_type not in cfg.op_types or node.name in cfg.exclude:
            continue
        w = inits.get(node.input[1]) if len(node.input) > 1 else None
        if w is None:
            continue  # weights computed at run time: nothing TensorRT would quantize per channel
        if cfg.keep_structural_float and (_is_structural(w) or _is_scalar_path(node, w)):
            kept.append(node.name)
            continue
        chosen.append(node.name)
    return chosen, kept


def _is_scalar_path(node: onnx.NodeProto, weight: onnx.TensorProto) -> bool:
    """A 1x1 conv on per-token statistics: one input or one output channel, or depthwise (a per-channel scale).
    The Sqrt-free 1/sqrt of layernorm_decompose (knots, chords, Newton steps on the variance) is made of these;
    8-bit steps on a variance that spans decades would wreck it, and they cost nothing in float."""
    dims = list(weight.dims)
    if len(dims) != 4:
        return False
    if dims[2] != 1 or dims[3] != 1:
        return False  # spatial kernels (a grayscale stem conv) are real layers
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return dims[0] == 1 or (dims[1] == 1 and group in (1, dims[0]))


def _is_structural(weight: onnx.TensorProto) -> bool:
    """A constant reduction/selection kernel (channel mean, head sum, one-hot shift): at most two distinct values."""
    values = numpy_helper.to_array(weight)
    if values.size > 4_000_000:
        return False
    return len(np.unique(values)) <= 2


def quantize_qdq(fp32_path: str | os.PathLike, out_path: str | os.PathLike, ranges: dict[str, tuple[float, float]],
                 nodes: Sequence[str], cfg: PrecisionConfig) -> None:
    """Explicit Q/DQ for TensorRT: symmetric INT8, per-channel Conv weights, per-tensor activations, Q/DQ on the
    inputs of `nodes` only, float bias."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    extra = {
        "ActivationSymmetric": True, "WeightSymmetric": True,
        "QuantizeBias": False,  # TensorRT 8.6 dequantizes INT8 only; the bias stays float and fuses
        # the next layer's input Q fuses as this conv's output; quantize_outputs=True gives onnxruntime's CPU form
        "OpTypesToExcludeOutputQuantization": [] if cfg.quantize_outputs else list(cfg.op_types),
        "AddQDQPairToWeight": False,  # INT8 weights + DequantizeLinear (TensorRT's pre-quantized weights form)
        "DedicatedQDQPair": False,
    }
    with tempfile.TemporaryDirectory(prefix="a2c-qdq-") as tmp, _quiet():
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(_tensors_data(ranges), cache)
        quantize_static(str(fp32_path), str(out_path), None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(cfg.op_types), nodes_to_quantize=list(nodes) or ["<none>"],
                        per_channel=cfg.per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, extra_options=extra,
                        calibration_cache_path=str(cache))
    _tidy(out_path)


def _tidy(path: str | os.PathLike) -> None:
    """Drops stale value_info (types changed) and re-infers types/shapes so the verifier sees the real dtypes."""
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    onnx.save(model, str(path))


def qdq_ranges(qdq: onnx.ModelProto, nodes: Sequence[str], fp32_ranges: dict[str, tuple[float, float]]
               ) -> dict[str, float]:
    """amax of the tensors the Q/DQ form quantizes, by their FP32 names: the float inputs of the quantized nodes
    (before their QuantizeLinear) and their outputs."""
    producer = {o: n for n in qdq.graph.node for o in n.output}
    wanted = set(nodes)
    out: dict[str, float] = {}
    for node in qdq.graph.node:
        if node.name not in wanted:
            continue
        data = node.input[0]
        dq = producer.get(data)
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                data = q.input[0]
        for name in (data, node.output[0]):
            if name in fp32_ranges:
                lo, hi = fp32_ranges[name]
                out[name] = max(abs(lo), abs(hi), 1e-8)
    return out


def write_trt_calibration_cache(amax: dict[str, float], path: str | os.PathLike,
                                header: str = "TRT-8601-EntropyCalibration2") -> None:
    """TensorRT's calibration cache text format: a header line, then ``tensor: <scale as big-endian float32 hex>``
    with scale = amax / 127 (what IInt8Calibrator::writeCalibrationCache writes and trtexec --calib reads)."""
    lines = [header]
    for name in sorted(amax):
        scale = float(amax[name]) / 127.0
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def layer_sensitivity(fp32_path: str | os.PathLike, ranges: dict[str, tuple[float, float]], nodes: Sequence[str],
                      feeds: list[dict[str, np.ndarray]], reference: list[list[np.ndarray]], cfg: PrecisionConfig,
                      qdq_path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The quantized nodes ordered by the output error their own quantization causes (worst first)."""
    if not nodes or not feeds:
        return []
    rows: list[dict[str, Any]] = []
    if len(nodes) <= cfg.one_at_a_time_max:
        with tempfile.TemporaryDirectory(prefix="a2c-sens-") as tmp:
            for name in nodes:
                path = Path(tmp) / "one.onnx"
                quantize_qdq(fp32_path, path, ranges, [name], cfg)
                d = drift(reference, run_model(path, feeds))
                rows.append({"node": name, "rel_error": d["rel_error"], "top1_agreement": d["top1_agreement"],
                             "method": "one at a time"})
    else:
        rows = _accumulated_sensitivity(fp32_path, qdq_path, nodes, feeds[:2])
    fp32 = onnx.load(str(fp32_path), load_external_data=False)
    module = {n.name: _module_of(n) for n in fp32.graph.node}
    for r in rows:
        r["module"] = module.get(r["node"])
    rows.sort(key=lambda r: -r["rel_error"])
    return rows[: cfg.top_k]


def _accumulated_sensitivity(fp32_path, qdq_path, nodes, feeds) -> list[dict[str, Any]]:
    """One run of both models with the quantized nodes' inputs and outputs exposed: the error a node adds is the
    relative error of its output minus that of its (FP32-named) input."""
    fp32 = onnx.load(str(fp32_path))
    qdq = onnx.load(str(qdq_path))
    by_name = {n.name: n for n in fp32.graph.node}
    pairs = [(n, by_name[n].input[0], by_name[n].output[0]) for n in nodes if n in by_name]
    wanted = sorted({t for _, i, o in pairs for t in (i, o)})
    graph_inputs = {i.name for i in fp32.graph.input}

    def expose(model):
        have = {o.name for o in model.graph.output}
        for t in wanted:
            if t not in have and t not in graph_inputs:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
        names = [o.name for o in model.graph.output]
        session = _session(model.SerializeToString())
        return names, [dict(zip(names, outs)) for outs in
                       [session.run(None, _cast_feed(session, f)) for f in feeds]]

    _, ref = expose(fp32)
    _, got = expose(qdq)
    feed_vals = [{k: v for k, v in f.items()} for f in feeds]

    def err(t):
        num = den = 0.0
        for r, g, f in zip(ref, got, feed_vals):
            a = f[t] if t in graph_inputs else r[t]
            b = f[t] if t in graph_inputs else g[t]
            num = max(num, float(np.abs(np.asarray(b, np.float64) - a).max()))
            den = max(den, float(np.abs(a).max()))
        return num / den if den else num

    return [{"node": n, "rel_error": max(0.0, err(o) - err(i)), "method": "accumulated"} for n, i, o in pairs]


def _module_of(node: onnx.NodeProto) -> str | None:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                import ast

                parts = ast.literal_eval(p.value)
                return str(parts[-2]) if len(parts) >= 2 else None
            except (ValueError, SyntaxError):
                return None
    return None


# --- FP16 ------------------------------------------------------------------------------------------------------------

def _const_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return out


def fp16_safety(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]], margin: float,
                eps_policy: str = "report") -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The two FP16 checks of the module doc, applied to a copy of the FP32 model; returns (model, report)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = _const_values(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
        for o in n.output:
            producer[o] = n
    report: dict[str, Any] = {"eps_subnormal": [], "eps_raised": [], "scales_hoisted": [], "kept_fp32": [],
                              "overflow_tensors": []}

    def scalar(name):
        t = consts.get(name)
        if t is None:
            return None
        v = numpy_helper.to_array(t)
        return float(v.reshape(-1)[0]) if v.size and np.all(v == v.reshape(-1)[0]) else None

    # 1. epsilon in normalisations: the constant added right before a Sqrt/Reciprocal/divisor (an Add, or the bias
    #    of the 1x1 conv that layernorm_decompose uses for the variance mean)
    for n in g.node:
        if n.op_type in _DIVISOR_USERS:
            denom = n.input[0]
        elif n.op_type == "Div":
            denom = n.input[1]
        else:
            continue
        p = producer.get(denom)
        if p is None:
            continue
        names = list(p.input) if p.op_type == "Add" else (p.input[2:3] if p.op_type == "Conv" else [])
        for name in names:
            eps = scalar(name)
            if eps is None or not 0 < abs(eps) < FP16_MIN_NORMAL or name not in inits:
                continue
            lo, hi = ranges.get(denom, (float("nan"), float("nan")))
            entry = {"node": p.name, "module": _module_of(p), "eps": eps, "denominator_min": lo}
            report["eps_subnormal"].append(entry)
            if eps_policy != "raise":
                continue
            # a fresh initializer: the exporter shares equal constants between layers
            arr = numpy_helper.to_array(inits[name])
            fresh = f"{name}_fp16_eps"
            if fresh not in inits:
                inits[fresh] = numpy_helper.from_array(np.full_like(arr, math.copysign(FP16_MIN_NORMAL, eps)), fresh)
                g.initializer.append(inits[fresh])
            p.input[list(p.input).index(name)] = fresh
            report["eps_raised"].append({**entry, "now": FP16_MIN_NORMAL})

    # 2. products that overflow FP16, scaled right after: move the scale before the product
    limit = margin * FP16_MAX
    for n in list(g.node):
        out = n.output[0] if n.output else None
        lo, hi = ranges.get(out, (0.0, 0.0)) if out else (0.0, 0.0)
        if max(abs(lo), abs(hi)) <= limit:
            continue
        report["overflow_tensors"].append({"tensor": out, "node": n.name, "op": n.op_type,
                                           "amax": max(abs(lo), abs(hi))})
        if _hoist_scale(model, n, consumers, consts, inits, ranges, limit):
            report["scales_hoisted"].append({"node": n.name, "module": _module_of(n)})
        else:
            report["kept_fp32"].append(n.name)
    return model, report


def _hoist_scale(model, node, consumers, consts, inits, ranges, limit) -> bool:
    users = consumers.get(node.output[0], [])
    if node.op_type not in _PRODUCTS or len(users) != 1 or users[0].op_type not in ("Mul", "Div"):
        return False
    scaler = users[0]
    other = scaler.input[1] if scaler.input[0] == node.output[0] else scaler.input[0]
    if scaler.op_type == "Div" and scaler.input[0] != node.output[0]:
        return False
    t = consts.get(other)
    if t is None:
        return False
    s = numpy_helper.to_array(t).astype(np.float64)
    if s.size != 1:
        return False
    s = float(s.reshape(-1)[0])
    s = 1.0 / s if scaler.op_type == "Div" else s
    lo, hi = ranges[node.output[0]]
    if max(abs(lo), abs(hi)) * abs(s) > limit:
        return False  # the scaled value overflows as well: nothing to gain
    g = model.graph
    if node.op_type == "Conv":  # the scale goes into the weights and the bias
        for i in range(1, len(node.input)):
            w = inits.get(node.input[i])
            if w is None:
                return False
        for i in range(1, len(node.input)):
            w = inits[node.input[i]]
            w.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(w) * s).astype(np.float32), w.name))
    else:  # scale the first input of the product
        name = f"{node.name}_hoisted_scale"
        g.initializer.append(numpy_helper.from_array(np.array(s, np.float32), name))
        scaled = f"{node.input[0]}_scaled_for_{node.name}"
        mul = onnx.helper.make_node("Mul", [node.input[0], name], [scaled], name=f"{node.name}_prescale")
        mul.metadata_props.extend(node.metadata_props)
        node.input[0] = scaled
        idx = list(g.node).index(node)
        g.node.insert(idx, mul)
    # the scaler becomes an identity: its users read the product directly
    for u in [n for n in g.node]:
        for i, inp in enumerate(u.input):
            if inp == scaler.output[0]:
                u.input[i] = node.output[0]
    for o in g.output:
        if o.name == scaler.output[0]:
            return _undo_output(model, scaler, node)
    g.node.remove(scaler)
    return True


def _undo_output(model, scaler, node) -> bool:
    """The scaler produced a graph output: keep its name by renaming the product's output."""
    g = model.graph
    old = node.output[0]
    for u in g.node:
        for i, inp in enumerate(u.input):
            if inp == old:
                u.input[i] = scaler.output[0]
    node.output[0] = scaler.output[0]
    g.node.remove(scaler)
    return True


def to_fp16(model: onnx.ModelProto, keep_fp32: Sequence[str] = ()) -> onnx.ModelProto:
    """onnxruntime's float16 converter: FP16 weights, activations, inputs and outputs; `keep_fp32` nodes stay FP32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        out = convert_float_to_float16(model, keep_io_types=False, op_block_list=[],
                                       node_block_list=list(keep_fp32) or None, disable_shape_infer=False)
    del out.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(out, check_type=False, strict_mode=False)


# --- the whole step --------------------------------------------------------------------------------------------------

def lower_precision(fp32_path: str | os.PathLike, out_path: str | os.PathLike, precision: str, target: Any = "trt-safe",
                    *, calibration: Iterable[Any] | None = None, evaluation: Iterable[Any] | None = None,
                    probes: Iterable[Any] | None = None, config: PrecisionConfig | dict | None = None
                    ) -> PrecisionResult:
    """Writes the `precision` form of the FP32 ONNX model at `fp32_path` to `out_path` (plus side files for DLA INT8)
    and measures its drift against FP32. `probes` stand in for evaluation data when none is given."""
    from attn2conv.targets import resolve_target

    if precision not in PRECISIONS or precision == "fp32":
        raise PrecisionError(f"precision {precision!r}: use 'fp16' or 'int8' (fp32 is the plain export)")
    cfg = config if isinstance(config, PrecisionConfig) else PrecisionConfig.from_options(config)
    profile = resolve_target(target)
    kind = profile.kind
    fp32 = onnx.load(str(fp32_path))
    seconds: dict[str, float] = {}
    notes: list[str] = []

    start = time.perf_counter()
    calib_feeds = make_feeds(calibration, fp32, int(cfg.samples))
    eval_feeds = make_feeds(evaluation, fp32) if evaluation is not None else make_feeds(probes, fp32)
    if evaluation is None:
        notes.append("no evaluation batches given: drift measured on the example/probe inputs")
    if precision == "int8" and not calib_feeds:
        raise PrecisionError("precision='int8' needs calibration data: calibration=<iterable of batches>")
    if not calib_feeds:
        calib_feeds = eval_feeds
        notes.append("no calibration batches given: FP16 range checks ran on the evaluation/probe inputs")
    samples = sum(len(next(iter(f.values()))) for f in calib_feeds)
    if precision == "int8" and samples < min(int(cfg.samples), DEFAULT_SAMPLES):
        notes.append(f"calibrated on {samples} samples (fewer than the {min(int(cfg.samples), DEFAULT_SAMPLES)} "
                     f"asked for)")
    seconds["data"] = time.perf_counter() - start

    start = time.perf_counter()
    ranges = calibrate(fp32_path, calib_feeds, cfg.calibrator if precision == "int8" else "max", cfg.percentile)
    seconds["calibrate"] = time.perf_counter() - start
    reference = run_model(fp32_path, eval_feeds)

    out_path = Path(out_path)
    res = PrecisionResult(precision=precision, target_kind=kind, path=str(out_path), form="fp16",
                          calibration_samples=samples, notes=notes, seconds=seconds)
    start = time.perf_counter()
    if precision == "fp16" or kind == "dla":
        max_ranges = ranges if precision == "fp16" else calibrate(fp32_path, calib_feeds, "max")
        safe, res.fp16 = fp16_safety(fp32, max_ranges, cfg.fp16_margin, cfg.fp16_eps)
        model16 = to_fp16(safe, res.fp16["kept_fp32"])
        if res.fp16["kept_fp32"]:
            notes.append(f"{len(res.fp16['kept_fp32'])} node(s) overflow FP16 and stay FP32: "
                         f"{', '.join(res.fp16['kept_fp32'][:5])}")
    seconds["fp16"] = time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="a2c-prec-") as tmp:
        tmp = Path(tmp)
        if precision == "int8":
            start = time.perf_counter()
            nodes, kept = quantizable_nodes(fp32, cfg)
            qdq_path = tmp / "qdq.onnx"
            quantize_qdq(fp32_path, qdq_path, ranges, nodes, cfg)
            qdq = onnx.load(str(qdq_path))
            amax = qdq_ranges(qdq, nodes, ranges)
            res.int8 = {"calibrator": cfg.calibrator, "quantized_nodes": len(nodes), "kept_float": kept,
                        "per_channel": cfg.per_channel, "symmetric": True, "tensors_with_ranges": len(amax)}
            seconds["quantize"] = time.perf_counter() - start
            simulated = run_model(qdq_path, eval_feeds)
            res.drift = drift(reference, simulated)
            if kind == "dla":
                res.form = "fp16+ranges"
                _stamp(model16, precision="int8", form="implicit", ranges=amax)
                _save(model16, out_path)
                ranges_path = out_path.with_name(out_path.name + ".ranges.json")
                calib_path = out_path.with_name(out_path.name + ".calib")
                ranges_path.write_text(json.dumps(amax, indent=1, sort_keys=True) + "\n", encoding="utf-8")
                write_trt_calibration_cache(amax, calib_path)
                res.artifacts = {"ranges": str(ranges_path), "calibration_cache": str(calib_path)}
                res.drift["simulated_with"] = "explicit Q/DQ form with the same ranges (onnxruntime)"
                res.drift["fp16_graph"] = drift(reference, run_model(out_path, eval_feeds))
            else:
                res.form = "qdq"
                _stamp(qdq, precision="int8", form="qdq")
                _save(qdq, out_path)
            if cfg.sensitivity:
                start = time.perf_counter()
                res.layers = layer_sensitivity(fp32_path, ranges, nodes, eval_feeds[:2], reference[:2], cfg,
                                               qdq_path=qdq_path)
                seconds["sensitivity"] = time.perf_counter() - start
        else:
            _stamp(model16, precision="fp16", form="fp16")
            _save(model16, out_path)
            res.drift = drift(reference, run_model(out_path, eval_feeds))
    start = time.perf_counter()
    try:
        run_model(out_path, eval_feeds[:1])
        res.ort_ok = True
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types
        notes.append(f"onnxruntime cannot run {out_path.name}: {' '.join(str(exc).split())[:200]}")
    seconds["ort"] = time.perf_counter() - start
    if not res.drift.get("finite", True):
        notes.append("the reduced-precision model produces inf/NaN on the evaluation data")
    return res


def export_with_precision(result, path: str | os.PathLike, profile, guard, say, precision: str,
                          calibration: Any = None, evaluation: Any = None, options: dict | None = None) -> None:
    """convert(..., precision=, export=): FP32 export (parity vs torch) -> reduced precision -> verifier ->
    certificate, written as one transaction like the FP32 export (nothing new is left at the destination on error).

    `.certified`: the verifier finds nothing at error severity, the FP32 export matches torch, onnxruntime runs the
    reduced model with finite outputs, FP16 drifts at most `fp16_rtol`, and top-1 agreement reaches `min_top1` when
    that option is set."""
    from attn2conv.check import check as run_check
    from attn2conv.check._report import certificate
    from attn2conv.export import ExportError, export_onnx, validate_destination

    cfg = PrecisionConfig.from_options(options)
    dest = validate_destination(path)
    report = result.report
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as exc:
        raise ExportError(f"cannot write {dest}: {exc.strerror or exc}") from None
    try:
        fp32 = tmpdir / "fp32.onnx"
        info = export_onnx(result.module, result.example_inputs, fp32, profile, rtol=report.rtol,
                           parity_inputs=guard.probes[:2], parity_reference=guard.reference[:2],
                           original_reference=guard.original[:2], certify=False, progress=say)
        say(f"precision {precision}")
        tmp_out = tmpdir / dest.name
        res = lower_precision(fp32, tmp_out, precision, profile, calibration=calibration, evaluation=evaluation,
                              probes=list(guard.probes), config=cfg)
        say("check")
        checked = run_check(tmp_out, target=profile)
        cert_text = certificate(checked)
        side = {p.name: p for p in precision_files(tmp_out) if p.exists()}
        written = []
        try:
            for name, src in side.items():
                os.replace(src, dest.with_name(name))
                written.append(dest.with_name(name))
            os.replace(tmp_out, dest)
            written.append(dest)
            cert = dest.with_name(dest.name + ".cert.json")
            cert.write_text(cert_text, encoding="utf-8")
        except OSError as exc:
            for w in written:
                with contextlib.suppress(OSError):
                    w.unlink()
            raise ExportError(f"cannot write {dest}: {exc.strerror or exc}") from None
    finally:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)
    if checked.loaded is not None:
        checked.loaded.path = dest
    res.path = str(dest)
    res.artifacts = {k: str(dest.with_name(Path(v).name)) for k, v in res.artifacts.items()}
    reasons = []
    if not checked.ok:
        reasons.append("verifier errors")
    if not info.parity_ok:
        reasons.append("the FP32 export differs from torch")
    if not res.ort_ok or not res.drift.get("finite", True):
        reasons.append("onnxruntime cannot run it or produces inf/NaN")
    if precision == "fp16" and res.drift.get("rel_error", 0.0) > cfg.fp16_rtol:
        reasons.append(f"FP16 drift {res.drift['rel_error']:.1e} > {cfg.fp16_rtol:g}")
    top1 = res.drift.get("top1_agreement")
    if cfg.min_top1 is not None and top1 is not None and top1 < cfg.min_top1:
        reasons.append(f"top-1 agreement {top1:.4f} < {cfg.min_top1}")
    result.onnx_path, result.check = str(dest), checked
    result.certified = not reasons
    counts = checked.counts()
    export_info = info.to_dict()
    export_info.update(path=str(dest), certificate=str(dest.with_name(dest.name + ".cert.json")),
                       fp32_parity=info.parity)
    report.extra["export"] = export_info
    report.extra["check"] = {"profile": checked.profile.id, "verdict": checked.verdict, "fail_on": checked.fail_on,
                             "counts": counts, "by_rule": checked.by_rule(),
                             "failing": [f.to_dict() for f in checked.failing[:50]]}
    report.extra["precision_report"] = res.to_dict()
    report.extra["certified"] = result.certified
    report.extra["onnx"] = (f"{dest} ({precision}, {res.form}; FP32 export vs torch {info.parity:.1e})"
                            + (f"; side files: {', '.join(Path(v).name for v in res.artifacts.values())}"
                               if res.artifacts else ""))
    report.extra["precision"] = res.summary() + ("" if not reasons else f" (not certified: {'; '.join(reasons)})")
    report.extra["verifier"] = (f"{checked.verdict.upper()} for {checked.profile.id}: {counts['error']} error(s), "
                                f"{counts['warning']} warning(s), {counts['note']} note(s)")


def _stamp(model: onnx.ModelProto, precision: str, form: str, ranges: dict[str, float] | None = None) -> None:
    stamps = {"attn2conv.precision": precision, "attn2conv.precision_form": form}
    if ranges is not None:
        stamps["attn2conv.int8.ranges"] = json.dumps({k: float(v) for k, v in sorted(ranges.items())})
    keep = [p for p in model.metadata_props if p.key not in stamps]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in stamps.items():
        model.metadata_props.add(key=k, value=v)


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantization tooling prints and logs progress; keep the caller's output clean."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def precision_files(path: str | os.PathLike) -> list[Path]:
    """The side files lower_precision may write next to `path`."""
    p = Path(path)
    return [p.with_name(p.name + ".ranges.json"), p.with_name(p.name + ".calib")]


__all__ = ["PRECISIONS", "CALIBRATORS", "DEFAULT_SAMPLES", "PrecisionConfig", "PrecisionError", "PrecisionResult",
           "lower_precision", "make_feeds", "calibrate", "quantize_qdq", "to_fp16", "fp16_safety", "drift",
           "layer_sensitivity", "write_trt_calibration_cache", "quantizable_nodes", "precision_files",
           "export_with_precision"]
