"""CLI behaviour, output formats (SARIF validated against the OASIS schema), certificate, atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from attn2conv.check import check
from attn2conv.check.cli import main

from _check_models import conv_net, init, model, vi
from onnx import helper as h

SARIF_SCHEMA = Path(__file__).parents[2] / "shared/data/sarif-schema-2.1.0.json"
REPO = Path(__file__).parents[1]


def _matmul_model():
    nodes = [h.make_node("MatMul", ["x", "w"], ["t"], name="mm0"), h.make_node("Erf", ["t"], ["y"], name="erf0")]
    return model(nodes, [vi("x", [1, 4, 8, 8])], [vi("y", None)], [init("w", [8, 8])])


@pytest.fixture
def files(tmp_path):
    bad, good = tmp_path / "bad.onnx", tmp_path / "good.onnx"
    bad.write_bytes(_matmul_model().SerializeToString())
    good.write_bytes(conv_net().SerializeToString())
    return bad, good


def test_exit_codes_and_text_format(files, capsys):
    bad, good = files
    assert main([str(good)]) == 0
    assert main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert "bad.onnx:mm0: error A2C-SAFE-OP-MATMUL: MatMul lowers to IMatrixMultiplyLayer" in out
    assert "[fix: linear_to_conv or attention_to_conv]" in out
    assert "FAIL for trt-safe-8.6: 1 error(s), 1 warning(s)" in out
    # the Erf warning alone does not fail by default, but does with --fail-on warning
    assert main([str(bad), "--fail-on", "never"]) == 0
    assert main([str(good), "--fail-on", "note"]) == 1  # the FP32 precision note
    assert main([str(bad), "--target", "nope"]) == 2
    assert main(["--format", "xml", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'nope'" in err and "usage error" in err


def test_max_findings_limits_listing_not_verdict(files, capsys):
    bad, _ = files
    assert main([str(bad), "--max-findings", "0", "-f", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["findings"] == [] and doc["findings_total"] == 3 and doc["verdict"] == "fail"
    assert doc["counts"]["by_rule"] == {"A2C-SAFE-OP-GELU": 1, "A2C-SAFE-OP-MATMUL": 1, "A2C-SAFE-PREC-FP32": 1}


def test_sarif_validates_against_oasis_schema(files, tmp_path):
    if not SARIF_SCHEMA.is_file():
        pytest.skip(f"SARIF schema not found at {SARIF_SCHEMA}")
    jsonschema = pytest.importorskip("jsonschema")
    bad, _ = files
    out = tmp_path / "r.sarif"
    assert main([str(bad), "-f", "sarif", "-o", str(out)]) == 1
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, json.loads(SARIF_SCHEMA.read_text()))
    run = doc["runs"][0]
    assert [r["ruleId"] for r in run["results"]] == ["A2C-SAFE-PREC-FP32", "A2C-SAFE-OP-MATMUL", "A2C-SAFE-OP-GELU"]
    rules = run["tool"]["driver"]["rules"]
    for r in run["results"]:
        assert rules[r["ruleIndex"]]["id"] == r["ruleId"]
    assert run["results"][1]["locations"][0]["logicalLocations"][0]["name"] == "mm0"


def test_junit_one_testcase_per_rule(files, tmp_path):
    bad, _ = files
    out = tmp_path / "r.xml"
    assert main([str(bad), "-f", "junit", "-o", str(out)]) == 1
    root = ET.parse(out).getroot()
    cases = root.findall(".//testcase")
    profile = check(bad).profile
    assert [c.get("name") for c in cases] == [r.id for r in profile.rules]
    failed = {c.get("name"): c for c in cases if c.find("failure") is not None}
    assert list(failed) == ["A2C-SAFE-OP-MATMUL"]  # the Erf warning is below --fail-on: system-out, not failure
    assert root.find("testsuite").get("failures") == "1"
    assert "Erf" in next(c for c in cases if c.get("name") == "A2C-SAFE-OP-GELU").find("system-out").text


def test_certificate_is_deterministic_except_timestamp(files, tmp_path):
    bad, _ = files
    c1, c2 = tmp_path / "c1.json", tmp_path / "c2.json"
    main([str(bad), "--certificate", str(c1), "-o", str(tmp_path / "r.txt")])
    main([str(bad), "--certificate", str(c2), "-o", str(tmp_path / "r.txt")])
    d1, d2 = json.loads(c1.read_text()), json.loads(c2.read_text())
    import hashlib

    assert d1["model"]["sha256"] == hashlib.sha256(bad.read_bytes()).hexdigest()
    assert d1["profile"]["id"] == "trt-safe-8.6" and len(d1["profile"]["sha256"]) == 64
    assert d1["verdict"] == "fail" and d1["counts"]["error"] == 1 and d1["issued_at"].endswith("Z")
    strip = lambda t: "\n".join(l for l in t.splitlines() if '"issued_at"' not in l)  # noqa: E731
    assert strip(c1.read_text()) == strip(c2.read_text())


def test_atomic_write_leaves_no_temp_files_and_replaces(files, tmp_path):
    bad, _ = files
    out = tmp_path / "report.json"
    out.write_text("old")
    main([str(bad), "-f", "json", "-o", str(out)])
    assert json.loads(out.read_text())["verdict"] == "fail"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "good.onnx", "report.json"]
    assert main([str(bad), "-o", str(tmp_path / "no" / "such" / "dir.txt")]) == 2


def test_list_targets_and_explain(capsys):
    assert main(["--list-targets"]) == 0
    out = capsys.readouterr().out
    assert "trt-safe-8.6" in out and "alias: trt-safe" in out and "dla-orin-8.6" in out
    assert main(["--explain", "A2C-DLA-CONV-KERNEL"]) == 0
    out = capsys.readouterr().out
    assert "what:" in out and "[1, 32]" in out and "evidence: documented" in out and "fix:" in out
    assert main(["--explain", "A2C-NOPE"]) == 2


def test_cli_never_imports_torch(files):
    bad, _ = files
    code = ("import sys; from attn2conv.check.cli import main; import attn2conv.check;"
            f"rc = main([{str(bad)!r}, '-o', {os.devnull!r}]);"
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr


def test_attn2conv_check_is_callable_whatever_the_import_order(files):
    bad, _ = files
    code = ("import attn2conv.check, attn2conv; r = attn2conv.check(%r, target='trt-safe');"
            "assert not r.ok and r.findings[1].rule == 'A2C-SAFE-OP-MATMUL'" % str(bad))
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
