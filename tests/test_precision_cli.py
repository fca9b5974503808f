"""attn2conv convert --precision: FP16 and INT8 from the command line."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from attn2conv.cli import main

MODEL = '''
import torch.nn as nn

def make(width=8):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 1), nn.ReLU()).eval()
'''


def test_cli_precision_fp16_and_int8(tmp_path, capsys):
    factory = tmp_path / "net.py"
    factory.write_text(MODEL)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((24, 3, 16, 16)).astype(np.float32))
    for precision, extra in (("fp16", []), ("int8", ["--calibration", str(calib), "--calibrator", "percentile"])):
        out = tmp_path / f"net_{precision}.onnx"
        code = main(["convert", f"{factory}:make", "--input-shape", "2,3,16,16", "--precision", precision,
                     "-o", str(out), *extra])
        text = capsys.readouterr().out
        assert code == 0, text
        assert "VERDICT: CERTIFIED" in text and f"precision: {precision}" in text
        model = onnx.load(str(out))
        ops = {n.op_type for n in model.graph.node}
        assert ("QuantizeLinear" in ops) == (precision == "int8")
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        dtype = np.float16 if precision == "fp16" else np.float32
        (y,) = session.run(None, {session.get_inputs()[0].name: np.ones((2, 3, 16, 16), dtype)})
        assert y.shape == (2, 8, 16, 16) and np.isfinite(y).all()


def test_cli_bad_calibration_file_is_a_usage_error(tmp_path, capsys):
    factory = tmp_path / "net.py"
    factory.write_text(MODEL)
    bad = tmp_path / "calib.npy"
    bad.write_text("not numpy")
    code = main(["convert", f"{factory}:make", "--input-shape", "2,3,16,16", "--precision", "int8",
                 "--calibration", str(bad), "-o", str(tmp_path / "m.onnx")])
    assert code == 2 and "--calibration" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
