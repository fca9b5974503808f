from __future__ import annotations

import re
from pathlib import Path

import pytest

from attn2conv.check._rules import KNOWN_CHECKS
from attn2conv.targets import EVIDENCE_KINDS, PASS_IDS, SEVERITIES, ProfileError, list_targets, resolve_target

ID = re.compile(r"^A2C-(TRT|SAFE|DLA)-[A-Z0-9]+(-[A-Z0-9]+)*$")


def test_builtin_profiles_and_aliases():
    assert [p.id for p in list_targets()] == ["trt-8.6", "trt-10", "trt-safe-8.6", "dla-orin-8.6"]
    assert resolve_target("trt").id == "trt-10"
    assert resolve_target("trt-safe").id == "trt-safe-8.6"
    assert resolve_target("dla").id == "dla-orin-8.6"
    p = resolve_target("trt-safe-8.6")
    assert (p.kind, p.version, p.opset_min, p.opset_max) == ("trt-safe", "8.6", 7, 17)
    assert len(p.sha256) == 64 and p.sha256 == resolve_target("trt-safe").sha256


def test_unknown_target_is_one_line_value_error():
    with pytest.raises(ValueError) as exc:
        resolve_target("trt-safe-9.9")
    msg = str(exc.value)
    assert "\n" not in msg and "trt-safe-8.6" in msg and "dla" in msg


@pytest.mark.parametrize("profile", list_targets(), ids=lambda p: p.id)
def test_every_rule_is_complete_and_unique(profile):
    ids = [r.id for r in profile.rules]
    assert len(ids) == len(set(ids))
    for r in profile.rules:
        assert ID.match(r.id), r.id
        assert r.severity in SEVERITIES and r.evidence in EVIDENCE_KINDS
        assert r.source and r.reason and r.why and r.fix, r.id
        assert r.check in KNOWN_CHECKS, r.id
        # a fix is pass ids joined by " or ", or a manual step written out in words
        assert r.fix_passes or " " in r.fix, r.id
        assert all(p in PASS_IDS for p in r.fix_passes)


def test_same_rule_id_means_same_rule_across_profiles():
    seen = {}
    for p in list_targets():
        for r in p.rules:
            seen.setdefault(r.id, set()).add((r.check, r.severity))
    assert all(len(v) == 1 for v in seen.values()), {k: v for k, v in seen.items() if len(v) > 1}


def test_op_allowed_matches_the_evidence():
    safe, dla, trt86, trt10 = (resolve_target(t) for t in ("trt-safe-8.6", "dla-orin-8.6", "trt-8.6", "trt-10"))
    for op in ("Conv", "BatchNormalization", "Relu", "Sigmoid", "Mul", "Add", "Resize", "AveragePool", "Reshape",
               "Transpose"):
        assert safe.op_allowed(op), op
    assert safe.op_rule("MatMul").id == "A2C-SAFE-OP-MATMUL" and safe.op_rule("MatMul").severity == "error"
    assert safe.op_rule("Gemm").fix == "linear_to_conv or attention_to_conv"
    assert safe.op_rule("ReduceMean").severity == "error"
    assert safe.op_rule("Softmax").severity == "warning"
    assert safe.op_rule("Concat").id == "A2C-SAFE-OP-UNVERIFIED"
    assert not trt86.op_allowed("Gelu") and trt10.op_allowed("Gelu")  # Gelu op arrived in the 10.x parser
    assert trt86.op_allowed("MatMul") and trt86.op_allowed("LayerNormalization")
    assert dla.op_allowed("MatMul")  # legal as an op; the constant-weight rule is separate
    assert dla.op_rule("Erf").id == "A2C-DLA-OP-GELU" and dla.op_rule("LayerNormalization").severity == "error"
    assert dla.op_rule("Div").severity == "warning"
    assert dla.op_rule("Einsum").id == "A2C-DLA-OP-UNLISTED"
    assert dla.op_rule("Foo", "com.x").id == "A2C-DLA-OP-PLUGIN"


def test_user_profile_extends_and_overrides(tmp_path: Path):
    f = tmp_path / "mine.toml"
    f.write_text('schema = 1\nid = "my-safe"\nkind = "trt-safe"\nversion = "8.6"\nextends = "trt-safe-8.6"\n'
                 'disable = ["A2C-SAFE-OP-SOFTMAX"]\n[[rules]]\nid = "A2C-SAFE-TENSOR-BATCH"\nmax = 4\n')
    p = resolve_target(str(f))
    assert p.id == "my-safe" and p.rule("A2C-SAFE-TENSOR-BATCH").params["max"] == 4
    assert p.rule("A2C-SAFE-OP-SOFTMAX") is None and p.op_rule("Softmax").id == "A2C-SAFE-OP-UNVERIFIED"


@pytest.mark.parametrize("text,needle", [
    ("id = 'x'", "missing string field"),
    ("schema = 1\nid='x'\nkind='gpu'\nversion='1'", "kind"),
    ("schema = 1\nid='x'\nkind='trt'\nversion='1'\n[[rules]]\nid='A2C-TRT-X'\ncheck='op'\nseverity='fatal'\n"
     "evidence='documented'\nreason='r'\nfix='constant_fold'", "severity"),
    ("schema = 1\nid='x'\nkind='trt'\nversion='1'\n[[rules]]\nid='A2C-TRT-X'\ncheck='op'\nseverity='error'\n"
     "evidence='documented'\nreason='r'\nfix='constant_fold'\nsource='S99'", "unknown source"),
    ("not toml [", "not valid TOML"),
])
def test_bad_profiles_are_rejected_in_one_line(tmp_path, text, needle):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ProfileError) as exc:
        resolve_target(str(f))
    assert needle in str(exc.value)
