"""mlp_prune: structured pruning of MLP hidden units (opt-in option of the fast pipeline)."""
from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn as nn

import attn2conv
from attn2conv.graph import get_constant, module_path, nodes_of
from attn2conv.pipeline import Pipeline
from conftest import rel_error, state_checksum
from test_fast_passes import FAST, run_passes, tiny_swin, tiny_vit


class Mlp(nn.Module):
    def __init__(self, c=16, hidden=64, gated=False):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, c)
        self.gate = nn.Linear(c, hidden) if gated else None

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.gate is not None:  # SwiGLU-style: the hidden units are a product of two Linears
            h = h * self.gate(x)
        return x + self.fc2(h)


def _widths(gm):
    """Output widths of the Linears, in graph order."""
    return [get_constant(gm, n.args[1]).shape[0] for n in nodes_of(gm, "aten.linear")]


def test_activation_score_keeps_the_strongest_units_and_folds_the_means_of_the_others():
    torch.manual_seed(0)
    model = Mlp().eval()
    calib = [torch.randn(4, 10, 16) * 2 + 0.5 for _ in range(3)]
    x = torch.randn(4, 10, 16)
    before = state_checksum(model)
    gm, res = run_passes(model, x, ["mlp_prune"], options={"mlp_prune": {"hidden_ratio": 1.0}}, calibration=calib)
    assert state_checksum(model) == before  # the user's model is untouched
    assert res["mlp_prune"].rewrites == 1 and "hidden 64 -> 16 units" in res["mlp_prune"].notes[0]
    assert _widths(gm) == [16, 16]
    # reference, computed independently: RMS activation x ||fc2 column||, top 16 in their original order
    w1, b1, w2, b2 = (t.detach().double() for t in (model.fc1.weight, model.fc1.bias, model.fc2.weight,
                                                     model.fc2.bias))
    with torch.no_grad():
        a = model.act(model.fc1(torch.cat(calib))).double().reshape(-1, 64)
    keep = torch.topk(a.square().mean(0).sqrt() * w2.norm(dim=0), 16).indices.sort().values
    drop = torch.ones(64, dtype=torch.bool)
    drop[keep] = False
    pruned_fc1 = get_constant(gm, nodes_of(gm, "aten.linear")[0].args[1])
    assert torch.equal(pruned_fc1, model.fc1.weight[keep])  # kept units keep their weights
    with torch.no_grad():
        h = torch.nn.functional.gelu(x.double() @ w1[keep].T + b1[keep])
        ref = x.double() + h @ w2[:, keep].T + b2 + w2[:, drop] @ a[:, drop].mean(0)
    assert rel_error(gm(x), ref) < 1e-5
    # the folded means make the pruned MLP exact on average over the calibration data
    with torch.no_grad():
        cal = torch.cat(calib)
        mean_gap = (gm(cal[:4]) - model(cal[:4])).double().mean((0, 1)).abs().max()
    assert mean_gap < 0.5 * (gm(cal[:4]) - model(cal[:4])).abs().max()


def test_weight_score_needs_no_data_and_keeps_the_bias():
    torch.manual_seed(1)
    model = Mlp(hidden=48).eval()
    x = torch.randn(2, 5, 16)
    gm, res = run_passes(model, x, ["mlp_prune"], options={"mlp_prune": {"keep": 0.5, "score": "weight",
                                                                          "multiple_of": 1}})
    assert _widths(gm) == [24, 16]
    w1 = torch.cat([model.fc1.weight, model.fc1.bias[:, None]], 1).detach()
    keep = torch.topk(w1.norm(dim=1) * model.fc2.weight.detach().norm(dim=0), 24).indices.sort().values
    with torch.no_grad():
        ref = x + nn.functional.linear(model.act(nn.functional.linear(x, model.fc1.weight[keep],
                                                                      model.fc1.bias[keep])),
                                       model.fc2.weight[:, keep], model.fc2.bias)
    assert rel_error(gm(x), ref) < 1e-6


def test_off_unless_asked_and_bad_options_fail_with_one_line():
    model = Mlp().eval()
    x = torch.randn(2, 5, 16)
    gm, res = run_passes(model, x, ["mlp_prune"])
    assert not res["mlp_prune"].changed and "off" in res["mlp_prune"].notes[0] and _widths(gm) == [64, 16]
    for opts, msg in (({"hidden_ratio": 1, "keep": 0.5}, "not both"), ({"keep": 0.5, "score": "l1"}, "score"),
                      ({"hidden_ratio": -1}, "must be positive")):
        with pytest.raises(ValueError, match=msg):
            run_passes(model, x, ["mlp_prune"], options={"mlp_prune": opts})


def test_gated_mlp_is_reported_not_pruned():
    model = Mlp(gated=True).eval()
    x = torch.randn(2, 5, 16)
    gm, res = run_passes(model, x, ["mlp_prune"], options={"mlp_prune": {"hidden_ratio": 1.0}})
    assert res["mlp_prune"].rewrites == 0 and _widths(gm) == [64, 64, 16]
    assert any(m.startswith("fc1 (") and "also reach" in m for m in res["mlp_prune"].misses), res["mlp_prune"].misses


@pytest.mark.parametrize("make, x", [(tiny_vit, torch.randn(2, 3, 32, 32)), (tiny_swin, torch.randn(1, 3, 56, 56))])
def test_timm_mlps_reach_the_requested_ratio(make, x):
    """timm DeiT/ViT and Swin Mlp modules: fc1 (C -> 4C) and fc2 become C -> C and C -> C at hidden_ratio 1; the
    attention's qkv/proj Linears are untouched. A {module glob: ratio} table prunes only the MLPs it names."""
    model = make()
    gm, res = run_passes(model, x, ["mlp_prune"], options={"mlp_prune": {"hidden_ratio": 1.0}},
                         calibration=[torch.randn(4, *x.shape[1:])])
    fc1s = [n for n in nodes_of(gm, "aten.linear") if module_path(n).endswith("mlp.fc1")]
    assert len(fc1s) == 4 and res["mlp_prune"].rewrites == 4
    for n in fc1s:
        w = get_constant(gm, n.args[1])
        assert w.shape[0] == w.shape[1]  # hidden units = channels
    qkv = [n for n in nodes_of(gm, "aten.linear") if module_path(n).endswith("attn.qkv")]
    assert all(get_constant(gm, n.args[1]).shape[0] == 3 * get_constant(gm, n.args[1]).shape[1] for n in qkv)
    drift = rel_error(gm(x), model(x))
    assert 0 < drift < float("inf")
    gm2, res2 = run_passes(model, x, ["mlp_prune"], options={"mlp_prune": {"hidden_ratio": {"*blocks.1.mlp": 2.0}}})
    assert res2["mlp_prune"].rewrites == (1 if make is tiny_vit else 2)
    widths = {module_path(n): get_constant(gm2, n.args[1]).shape for n in nodes_of(gm2, "aten.linear")
              if module_path(n).endswith("mlp.fc1")}
    assert sorted(w[0] // w[1] for w in widths.values()) == [2] * res2["mlp_prune"].rewrites + \
        [4] * (4 - res2["mlp_prune"].rewrites)


def test_keep_all_gives_the_unpruned_fast_model():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    calib = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    torch.manual_seed(0)  # the new MHCA blocks start from random weights: same seed, same blocks
    plain = attn2conv.convert(model, "trt-safe", x, fidelity="fast", pipeline=Pipeline(FAST), calibration=calib)
    for opts in ({"keep": 1.0}, {"hidden_ratio": 4.0}):
        torch.manual_seed(0)
        kept = attn2conv.convert(model, "trt-safe", x, fidelity="fast", pipeline=Pipeline(["mlp_prune"] + FAST),
                                 calibration=calib, options={"mlp_prune": opts})
        record = kept.report.passes[0]
        assert record.id == "mlp_prune" and record.status == "no change" and "keeps all" in record.notes[0]
        assert torch.equal(kept.module(x), plain.module(x))


def test_pruned_fast_model_exports_and_is_certified_for_trt_safe(tmp_path):
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    before = state_checksum(model)
    result = attn2conv.convert(model, "trt-safe", x, fidelity="fast", options={"mlp_prune": {"hidden_ratio": 1.0}},
                               calibration=[torch.randn(8, 3, 32, 32)], export=tmp_path / "pruned.onnx")
    assert state_checksum(model) == before
    rep = result.report
    record = next(p for p in rep.passes if p.id == "mlp_prune")
    assert record.status == "applied" and record.rewrites == 4 and not record.exact
    assert record.rel_error is not None and record.rel_error > 0  # the drift of this pass, measured
    assert rep.needs_distillation and rep.rel_error > 0
    assert result.certified, rep.to_table()
    # in the ONNX file every MLP is 1x1 Conv 64 -> 64 -> 64 (was 64 -> 256 -> 64)
    convs = [i for i in onnx.load(result.onnx_path).graph.initializer if len(i.dims) == 4 and i.dims[2:] == [1, 1]]
    assert not [i for i in convs if 256 in i.dims]


def test_cli_option_prunes_and_reports(tmp_path, capsys):
    from attn2conv.cli import main

    report = tmp_path / "r.json"
    code = main(["convert", "timm:deit_tiny_patch16_224?depth=1&img_size=32", "--fidelity", "fast",
                 "--mlp-hidden-ratio", "1", "-o", str(tmp_path / "m.onnx"), "--report", str(report)])
    out, _ = capsys.readouterr()
    assert code == 0, out
    import json

    record = next(p for p in json.loads(report.read_text())["passes"] if p["id"] == "mlp_prune")
    assert record["status"] == "applied" and "blocks.0.mlp: hidden 768 -> 192 units" in record["notes"][0]
