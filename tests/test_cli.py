"""`attn2conv convert`: the three SPEC forms end to end, and bad input as one-line errors with exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from attn2conv.cli import Progress, load_model, main, parse_kwargs

pytest.importorskip("timm")

# RepVGG-A0 without its pooled head: Conv/BN/ReLU only, certifiable on trt-safe and DLA
REPVGG = "timm:repvgg_a0?num_classes=0&global_pool=&img_size=64"
TINY_VIT = "timm:deit_tiny_patch16_224?depth=1&img_size=32"
HF_VIT = ("hf:ViTConfig?num_hidden_layers=1&hidden_size=32&num_attention_heads=2&intermediate_size=64"
          "&image_size=32&patch_size=8")

FACTORY = textwrap.dedent("""
    import torch

    def make(channels=8):
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, channels, 3, padding=1), torch.nn.BatchNorm2d(channels), torch.nn.ReLU(),
            torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1), torch.nn.BatchNorm2d(channels),
            torch.nn.ReLU())

    def make_with_input():
        return make(4), torch.randn(1, 3, 24, 24)

    def broken():
        raise RuntimeError("boom")
""")


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attn2conv: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_timm_spec_certified(tmp_path, capsys):
    out_path, report = tmp_path / "r.onnx", tmp_path / "r.json"
    code, out, err = run(["convert", REPVGG, "--target", "dla", "-o", str(out_path), "--report", str(report)], capsys)
    assert code == 0, out + err
    assert err == ""  # no TTY under pytest: no progress lines
    assert "VERDICT: CERTIFIED for dla-orin-8.6" in out and "fold_reparam" in out
    doc = json.loads(report.read_text())
    assert doc["extra"]["certified"] is True and doc["extra"]["export"]["parity"] <= 1e-4
    assert doc["extra"]["check"]["verdict"] == "pass" and doc["extra"]["spec"] == REPVGG
    assert {"capture", "export", "check"} <= set(doc["extra"]["stage_seconds"])
    assert (tmp_path / "r.onnx.cert.json").exists()


def test_hf_spec(tmp_path, capsys):
    out_path, report = tmp_path / "hf.onnx", tmp_path / "hf.json"
    code, out, err = run(["convert", HF_VIT, "-o", str(out_path), "--report", str(report)], capsys)
    doc = json.loads(report.read_text())
    # exit 0 when certified, 1 when converted but not certified: the verdict says which, honestly
    assert code == (0 if doc["extra"]["certified"] else 1), out + err
    assert out_path.exists() and doc["model"] == "ViTModel" and doc["extra"]["export"]["parity"] <= 1e-4
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("VERDICT: CERTIFIED" if code == 0 else "VERDICT: converted and exported, NOT certified")
    if code == 1:
        assert "what blocks trt-safe-8.6" in out and "encoder.layer.0" in out


def test_file_spec_with_kwargs_and_factory_input(tmp_path, capsys):
    factory = tmp_path / "my_models.py"
    factory.write_text(FACTORY)
    out_path = tmp_path / "net.onnx"
    code, out, err = run(["convert", f"{factory}:make?channels=4", "--input-shape", "1,3,32,32", "-o",
                          str(out_path)], capsys)
    assert code == 0, out + err
    assert "VERDICT: CERTIFIED for trt-safe-8.6" in out and "fold_batchnorm" in out
    model, inputs, _ = load_model(f"{factory}:make_with_input")
    assert tuple(inputs[0].shape) == (1, 3, 24, 24)
    code, out, err = run(["convert", f"{factory}:make_with_input", "-o", str(tmp_path / "n2.onnx")], capsys)
    assert code == 0, out + err


@pytest.mark.parametrize("argv,needles", [
    (["convert", "timm:deit_smal_patch16_224", "-o", "{tmp}/m.onnx"], ["unknown timm model", "deit_small_patch16_224"]),
    (["convert", "hf:VitConfigg", "-o", "{tmp}/m.onnx"], ["unknown transformers config class"]),
    (["convert", "{tmp}/nofile.py:make", "-o", "{tmp}/m.onnx"], ["no such file"]),
    (["convert", "{tmp}/my_models.py:nothing", "-o", "{tmp}/m.onnx"], ["has no function 'nothing'"]),
    (["convert", "{tmp}/my_models.py:broken", "-o", "{tmp}/m.onnx"], ["broken() failed", "boom"]),
    (["convert", "resnet50", "-o", "{tmp}/m.onnx"], ["cannot read model spec"]),
    (["convert", TINY_VIT, "--input-shape", "1,3,40,40", "-o", "{tmp}/m.onnx"], ["capture failed", "patch_embed", "--input-shape 1,3,40,40"]),
    (["convert", TINY_VIT, "--input-shape", "1,3,x", "-o", "{tmp}/m.onnx"], ["--input-shape"]),
    (["convert", TINY_VIT, "-o", "{tmp}/missing/dir/m.onnx"], ["does not exist"]),
    (["convert", TINY_VIT, "-o", "{tmp}/my_models.py/m.onnx"], ["not a folder"]),
    (["convert", TINY_VIT, "-o", "{tmp}/m.onnx", "--report", "{tmp}/missing/r.json"], ["does not exist"]),
    (["convert", TINY_VIT, "-o", "{tmp}/m.pt"], ["must end in .onnx"]),
    (["convert", TINY_VIT, "--target", "tpu", "-o", "{tmp}/m.onnx"], ["tpu"]),
    (["convert", TINY_VIT, "--fidelity", "sloppy", "-o", "{tmp}/m.onnx"], ["sloppy"]),
    (["convert", TINY_VIT, "--mlp-hidden-ratio", "1", "-o", "{tmp}/m.onnx"], ["--mlp-hidden-ratio needs --fidelity fast"]),
    (["convert", TINY_VIT], ["-o"]),
    ([], ["give a command"]),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, argv, needles):
    (tmp_path / "my_models.py").write_text(FACTORY)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert_one_line_error(code, err, *needles)
    after = sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__")
    assert after == before  # no output, no temporary file left


def test_console_script_bad_input_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "attn2conv.cli", "convert", "timm:no_such_net", "-o",
                           str(tmp_path / "m.onnx")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith("attn2conv: usage error: unknown timm model 'no_such_net'")
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


def test_progress_only_on_a_terminal_outside_ci(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert Progress.wanted(None)
    monkeypatch.setenv("CI", "true")
    assert not Progress.wanted(None)
    assert Progress.wanted("on")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.delenv("CI")
    assert not Progress.wanted(None)


def test_progress_prints_stage_times(capsys):
    p = Progress(True)
    p("capture")
    p("export")
    p.done()
    err = capsys.readouterr().err.splitlines()
    assert [line.split()[0] for line in err] == ["capture", "export"] and err[0].endswith("s")
    assert [name for name, _ in p.times] == ["capture", "export"]


def test_spec_kwargs_are_python_literals():
    assert parse_kwargs("depth=2&img_size=(64, 48)&drop=0.1&act=gelu&flag=True&none=None&empty=") == {
        "depth": 2, "img_size": (64, 48), "drop": 0.1, "act": "gelu", "flag": True, "none": None, "empty": ""}
