"""examples/: each script runs end to end (slow suite); the custom-model example and the CI hook also run fast.

The digits fast-fidelity + distillation example runs in tests/test_fast_slow.py (slow).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto
from onnx import helper as oh

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_every_example_script_is_exercised_by_a_test():
    tested = (Path(__file__).read_text() + (ROOT / "tests" / "test_fast_slow.py").read_text())
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts, "no examples found"
    assert [s for s in scripts if s not in tested] == []


# --- the custom model (fast) -----------------------------------------------------------------------------------------

def test_custom_attention_example_small_is_certified(tmp_path, capsys):
    example = _load("custom_attention")
    out = tmp_path / "custom.onnx"
    assert example.main(["--width", "32", "--depth", "1", "--img", "32", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.exists() and out.with_name(out.name + ".cert.json").exists()
    assert "attention_to_conv" in text and "certified: True" in text
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert not ops & {"MatMul", "Softmax", "LayerNormalization", "Gather", "Erf", "ReduceMean"}, ops


# --- CI files (fast) --------------------------------------------------------------------------------------------------

def _onnx_file(path: Path, op: str) -> Path:
    """A two-input graph with one node: Add (trt-safe accepts it) or MatMul (trt-safe rejects it)."""
    x = oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4])
    w = onnx.numpy_helper.from_array(np.ones((1, 4, 4), np.float32), "w")
    y = oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4])
    graph = oh.make_graph([oh.make_node(op, ["x", "w"], ["y"], name=f"n_{op}")], "g", [x], [y], [w])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), str(path))
    return path


def _hook(config: str) -> dict:
    data = yaml.safe_load((EXAMPLES / "ci" / config).read_text())
    hooks = data if isinstance(data, list) else [h for repo in data["repos"] for h in repo["hooks"]]
    return next(h for h in hooks if h["id"] == "attn2conv-check")


def test_pre_commit_configs_agree():
    provided, local = _hook(".pre-commit-hooks.yaml"), _hook("pre-commit-config.yaml")
    for key in ("entry", "args", "files", "require_serial"):
        assert provided[key] == local[key], key


def test_pre_commit_hook_runs_the_verifier_on_staged_models(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("bash is not available")
    hook = _hook(".pre-commit-hooks.yaml")
    assert hook["files"] == r"\.onnx$"
    import shlex

    entry = shlex.split(hook["entry"]) + list(hook.get("args", []))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    good, bad = _onnx_file(tmp_path / "good.onnx", "Add"), _onnx_file(tmp_path / "bad.onnx", "MatMul")
    ok = subprocess.run(entry + [str(good)], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    fail = subprocess.run(entry + [str(good), str(bad)], capture_output=True, text=True, env=env, timeout=120)
    assert fail.returncode == 1, fail.stdout + fail.stderr
    assert "A2C-SAFE-OP-MATMUL" in fail.stdout
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    worst = subprocess.run(entry + [str(bad), str(broken)], capture_output=True, text=True, env=env, timeout=120)
    assert worst.returncode == 2  # the worst status wins


def test_github_workflow_checks_and_uploads_sarif():
    wf = yaml.safe_load((EXAMPLES / "ci" / "github-actions.yml").read_text())
    steps = wf["jobs"]["check"]["steps"]
    run = "\n".join(s.get("run", "") for s in steps)
    assert "attn2conv-check" in run and "--format sarif" in run and "--certificate" in run
    upload = [s for s in steps if str(s.get("uses", "")).startswith("github/codeql-action/upload-sarif")]
    assert upload and upload[0].get("if") == "always()"
    assert wf["permissions"]["security-events"] == "write"
    assert set(wf["jobs"]["check"]["strategy"]["matrix"]["target"]) <= {"trt", "trt-safe", "dla"}


# --- the model examples at full size (slow) ---------------------------------------------------------------------------

@pytest.mark.slow
def test_timm_swin_example_is_certified_for_trt_safe(tmp_path):
    out = tmp_path / "swin.onnx"
    proc = _run("timm_swin_trt_safe.py", "-o", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.exists() and out.with_suffix(".report.json").exists()
    assert "certificate:" in proc.stdout


@pytest.mark.slow
def test_hf_vit_example_converts_for_dla(tmp_path):
    """Exit 0 (certified) or 1 (not yet: the listing names the blockers); never a crash, and no attention core left."""
    out = tmp_path / "vit_dla.onnx"
    proc = _run("hf_vit_dla.py", "-o", str(out))
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("certified for dla-orin-8.6" in proc.stdout) == (proc.returncode == 0)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert not ops & {"MatMul", "LayerNormalization", "Erf", "Gather"}, ops


@pytest.mark.slow
def test_custom_attention_example_default_size(tmp_path):
    out = tmp_path / "custom.onnx"
    proc = _run("custom_attention.py", "-o", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["timm_swin_trt_safe.py", "hf_vit_dla.py"])
def test_model_examples_small(tmp_path, script):
    out = tmp_path / "m.onnx"
    proc = _run(script, "--small", "-o", str(out))
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.exists()
    if script.startswith("timm_swin"):
        assert proc.returncode == 0, proc.stdout[-3000:]
