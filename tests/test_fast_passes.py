"""fidelity="fast": the four architectural passes, the conv-only modules, and the full fast pipeline on timm ViTs."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import attn2conv
from attn2conv.capture import capture
from attn2conv.graph import module_path, nodes_of
from attn2conv.legality import op_counts
from attn2conv.modules import CSA, MHCA, HierarchicalAttention, LocallyGroupedAttention, SpatialReductionAttention
from attn2conv.pass_infra import PassContext, get_pass
from attn2conv.pipeline import Pipeline
from conftest import rel_error

FAST = ["layernorm_to_batchnorm", "gelu_to_relu", "attention_to_csa", "attention_to_sra"]
EXACT = ["fold_reparam", "fold_batchnorm", "layernorm_decompose", "gelu_decompose", "linear_to_conv",
         "attention_to_conv", "layout_cleanup"]
ATTENTION_OPS = {"aten.scaled_dot_product_attention", "aten.matmul", "aten.bmm", "aten.softmax", "aten._softmax"}


def tiny_vit(**kw):
    cfg = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, num_classes=10)
    cfg.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg).eval()


def grafted_class(gm, name: str) -> str | None:
    """The class of the module grafted at `name`, from the provenance of the nodes it produced."""
    for n in gm.graph.nodes:
        entry = (n.meta.get("nn_module_stack") or {}).get(name)
        if entry:
            return entry[1].rsplit(".", 1)[-1]
    return None


def run_passes(model, x, ids, options=None, calibration=None):
    gm = capture(model, (x,))
    ctx = PassContext(example_inputs=(x,), options=options or {}, calibration=calibration)
    from attn2conv.graph import cleanup, refresh_shapes

    results = {}
    for pid in ids:
        results[pid] = get_pass(pid)().run(gm, ctx)
        cleanup(gm)
        refresh_shapes(gm, (x,))
    return gm, results


@pytest.mark.parametrize("make", [
    lambda: CSA(64, (8, 8), prefix=1, heads=2, reduced=4),
    lambda: CSA(64, (6, 10), prefix=0, heads=1, reduced=5, mlp_ratio=3),
    lambda: MHCA(64, (8, 8), prefix=2),
    lambda: SpatialReductionAttention(64, (8, 8), prefix=1, heads=2, reduction=2),
    lambda: SpatialReductionAttention(64, (8, 8), prefix=0, heads=2, reduction=4, mode="conv"),
    lambda: LocallyGroupedAttention(64, (8, 8), prefix=1, heads=2, window=4),
    lambda: HierarchicalAttention(64, (8, 8), prefix=1, heads=2, window=4, reduction=2),
])
def test_modules_map_tokens_to_tokens_with_trainable_weights(make):
    mod = make()
    n = mod.prefix + mod.grid[0] * mod.grid[1]
    x = torch.randn(3, n, 64, requires_grad=True)
    y = mod.eval()(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad.abs().sum() > 0
    ops = set(op_counts(capture(mod, (x.detach(),))))
    if isinstance(mod, (CSA, MHCA)):  # pure convolution blocks: no attention core at all
        assert not ops & ATTENTION_OPS, ops
    assert "aten.linear" not in ops and "aten.layer_norm" not in ops


def test_csa_follows_nvidia_rotation_and_gating():
    """The relation map is Q_h[c, pi] * Q_h[pi, c] (per-head P x P transpose), gated by Sigmoid(BN(Conv1x1))."""
    torch.manual_seed(1)
    mod = CSA(8, (4, 4), heads=2, reduced=2).eval()
    g = torch.randn(1, 8, 4, 4)
    v = mod.value_bn(mod.value(g)) * torch.sigmoid(mod.value_bn(mod.value(g)))
    q = mod.query_bn(mod.query(nn.functional.interpolate(v, scale_factor=0.5, mode="bilinear")))
    qh = q.reshape(1, 2, 4, 4)  # (B, heads, P channels, P positions)
    relation = (qh * qh.transpose(2, 3)).reshape(1, 8, 2, 2)
    gate = torch.sigmoid(mod.gate_bn(mod.gate(nn.functional.interpolate(relation, scale_factor=2.0,
                                                                         mode="bilinear"))))
    assert rel_error(mod.mix(g), gate * v) < 1e-6


def test_sra_without_reduction_reuses_the_original_attention_exactly():
    """Planned everywhere as attention with R = 1, SRA is the original MHSA with its q/k/v/proj weights."""
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    gm, res = run_passes(model, x, ["attention_to_sra"],
                         options={"attention_to_sra": {"every": 0, "reduction": 1}})
    assert res["attention_to_sra"].rewrites == 4
    assert all("reused: q, k, v, proj" in n for n in res["attention_to_sra"].notes[:4])
    assert rel_error(gm(x), model(x)) < 1e-5


def test_full_fast_pipeline_leaves_no_error_for_trt_safe():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    calib = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    result = attn2conv.convert(model, "trt-safe", x, fidelity="fast", pipeline=Pipeline(FAST + EXACT),
                               calibration=calib)
    rep = result.report
    status = {p.id: (p.status, p.rewrites) for p in rep.passes}
    for pid in FAST:
        assert status[pid][0] == "applied" and status[pid][1] > 0, status
    assert rep.needs_distillation and rep.legal, rep.to_table()
    left = set(rep.op_counts_after)
    assert not left & (ATTENTION_OPS | {"aten.linear", "aten.layer_norm", "aten.gelu", "aten.erf", "aten.mean"}), left
    assert not [op for op in rep.illegal_ops if op["severity"] == "error"]
    # the default plan (Next-ViT hybrid): MHCA convolution blocks, the stage ends with an SRA block
    plan = result.module.meta["attn2conv_plan"]
    assert list(plan.values()) == ["mhca", "mhca", "mhca", "sra"]
    assert grafted_class(result.module, "blocks.0.attn_mhca") == "MHCA"
    # grafted nodes carry the replaced block's provenance plus the new module
    paths = {module_path(n) for n in result.module.graph.nodes if n.op == "call_function"}
    assert "blocks.0.attn_mhca" in paths and "blocks.3.attn_sra" in paths
    y = result.module(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_plan_overrides_by_module_path_and_kinds():
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    options = {"attention_to_csa": {"plan": {"blocks.0.attn": "mhca", "blocks.1.attn": "keep"}},
               "attention_to_sra": {"plan": {"blocks.2.attn": "hmhsa", "blocks.3.attn": "lsa"}, "window": 2}}
    gm, res = run_passes(model, x, ["attention_to_csa", "attention_to_sra"], options=options)
    assert grafted_class(gm, "blocks.0.attn_mhca") == "MHCA"
    assert grafted_class(gm, "blocks.2.attn_hmhsa") == "HierarchicalAttention"
    assert grafted_class(gm, "blocks.3.attn_lsa") == "LocallyGroupedAttention"
    assert "blocks.0.attn_mhca.group_conv.weight" in dict(gm.named_parameters())
    assert res["attention_to_csa"].rewrites == 1 and res["attention_to_sra"].rewrites == 2
    # the kept block still has its attention core
    cores = [n for n in nodes_of(gm, "aten.scaled_dot_product_attention") if module_path(n) == "blocks.1.attn"]
    assert len(cores) == 1
    assert torch.isfinite(gm(x)).all()


def test_layernorm_to_batchnorm_uses_calibration_statistics_and_folds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 8), nn.GELU(), nn.LayerNorm(8)).eval()
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].bias.normal_()
    calib = [torch.randn(4, 10, 16) * 3 + 1 for _ in range(3)]
    x = torch.randn(2, 10, 16)
    gm, res = run_passes(model, x, ["layernorm_to_batchnorm"], calibration=calib)
    assert res["layernorm_to_batchnorm"].rewrites == 2
    assert not nodes_of(gm, "aten.layer_norm")
    # reference: eval-mode BatchNorm with the calibration statistics in place of each LayerNorm
    data = torch.cat(calib).reshape(-1, 16).double()

    def bn(t, stats, ln):
        mu, var = stats.mean(0), stats.var(0, unbiased=False)
        return ((t.double() - mu) / torch.sqrt(var + ln.eps) * ln.weight.double() + ln.bias.double()).float()

    with torch.no_grad():
        h = model[2](model[1](bn(x, data, model[0])))
        h_cal = model[2](model[1](bn(torch.cat(calib), data, model[0]))).reshape(-1, 8).double()
        ref = bn(h, h_cal, model[3])
    assert rel_error(gm(x), ref) < 1e-5
    # the first one folded into the Linear: no Mul/Add for it; the last one (feeding the output) is Mul + Add
    assert len(nodes_of(gm, "aten.mul")) == 1 and len(nodes_of(gm, "aten.add")) == 1


def test_gelu_to_relu_and_silu():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4), nn.GELU(approximate="tanh")).eval()
    x = torch.randn(5, 8)
    relu = nn.Sequential(model[0], nn.ReLU(), model[2], nn.ReLU())
    gm, res = run_passes(model, x, ["gelu_to_relu"])
    assert res["gelu_to_relu"].rewrites == 2 and not nodes_of(gm, "aten.gelu")
    assert rel_error(gm(x), relu(x)) < 1e-6
    gm, _ = run_passes(model, x, ["gelu_to_relu"], options={"gelu_to_relu": {"to": "silu"}})
    silu = nn.Sequential(model[0], nn.SiLU(), model[2], nn.SiLU())
    assert rel_error(gm(x), silu(x)) < 1e-6


def test_blocks_that_do_not_fit_a_grid_are_reported():
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    _, res = run_passes(model, x, ["attention_to_csa"], options={"attention_to_csa": {"grid": [5, 5]}})
    assert res["attention_to_csa"].rewrites == 0
    assert any("do not make 65 tokens" in m for m in res["attention_to_csa"].misses)


def _plan_for(stages: list[tuple[int, int]], options=None) -> list[str]:
    from attn2conv.modules.replace import AttentionBlock, make_plan

    blocks = [AttentionBlock(f"b{i}", None, [], None, None, dim, tokens, 1, 1.0)
              for i, (tokens, dim) in enumerate(stages)]
    return list(make_plan(blocks, options or {}).values())


def test_default_plan_is_next_vit_hybrid():
    from attn2conv.modules.replace import AttentionBlock, make_plan

    # one 12-block stage (DeiT): two rounds of 5 MHCA + 1 SRA
    assert _plan_for([(197, 384)] * 12) == (["mhca"] * 5 + ["sra"]) * 2
    # Swin-T [2, 2, 6, 2]: the first stage all convolution, the others end with attention
    swin = [(49, 96)] * 2 + [(49, 192)] * 2 + [(49, 384)] * 6 + [(49, 768)] * 2
    assert _plan_for(swin) == ["mhca", "mhca", "mhca", "sra"] + ["mhca"] * 5 + ["sra", "mhca", "sra"]
    # the older every-3 CSA plan is one option set away; a stage ending mid-round still ends with attention
    assert _plan_for([(65, 64)] * 6, {"every": 3, "conv_kind": "csa"}) == ["csa"] * 3 + ["sra", "csa", "sra"]
    assert _plan_for([(65, 64)] * 6, {"every": 3, "end_with_attention": False}) == ["mhca"] * 3 + ["sra"] + \
        ["mhca"] * 2
    assert _plan_for(swin, {"first_stage_conv": False})[:2] == ["mhca", "sra"]
    # windowed models (Swin) default to attention in the last stage only; "all" gives the Next-ViT plan back
    windowed = [AttentionBlock(f"b{i}", None, [], None, None, dim, tokens, 1, 1.0, window_span=(None, None, []))
                for i, (tokens, dim) in enumerate(swin)]
    assert list(make_plan(windowed, {}).values()) == ["mhca"] * 11 + ["sra"]
    assert list(make_plan(windowed, {"attention_stages": "all"}).values()) == _plan_for(swin)
    assert list(make_plan(windowed[:4], {}).values())[2:] == ["mhca", "sra"]  # two stages: the second
    # attention only in chosen stages
    assert _plan_for(swin, {"attention_stages": [-1]}) == ["mhca"] * 11 + ["sra"]
    assert _plan_for(swin, {"attention_stages": [2, 3]}) == ["mhca"] * 4 + ["mhca"] * 5 + ["sra", "mhca", "sra"]


def tiny_swin():
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=32,
                             depths=(2, 2), num_heads=(1, 2), window_size=7, num_classes=10).eval()


def test_window_attention_becomes_a_block_on_the_whole_map():
    """Swin: the new blocks replace roll + window partition + attention + window reverse + roll, not just the
    attention inside the windows (stage 1 is a 14x14 map of four 7x7 windows; stage 2 is one window)."""
    torch.manual_seed(0)
    model = tiny_swin()
    x = torch.randn(1, 3, 56, 56)
    gm, res = run_passes(model, x, ["attention_to_csa", "attention_to_sra"])
    plan = gm.meta["attn2conv_plan"]
    assert list(plan.values()) == ["mhca", "mhca", "mhca", "sra"]
    notes = res["attention_to_csa"].notes + res["attention_to_sra"].notes
    whole = [n for n in notes if "whole map" in n]
    assert len(whole) == 2 and all(n.startswith("layers.0.blocks.") for n in whole), notes
    assert "grid 14x14" in whole[1]
    # no window shift / partition left in stage 1: its blocks read and write (1, 14, 14, 32) maps only
    assert not [n for n in nodes_of(gm, "aten.roll") if module_path(n).startswith("layers.0")]
    from attn2conv.graph import shape

    stage1 = [n for n in gm.graph.nodes if n.op == "call_function" and module_path(n).startswith("layers.0.blocks")]
    assert not [n for n in stage1 if shape(n) is not None and len(shape(n)) == 6], "window partition left"
    assert gm(x).shape == (1, 10) and torch.isfinite(gm(x)).all()
    # the whole-map MHCA is the module applied to the (B, C, H, W) map
    mhca = MHCA(32, (14, 14)).eval()
    mhca.channels_last = True
    m = torch.randn(2, 14, 14, 32)
    ref = mhca.proj(torch.relu(mhca.norm(mhca.group_conv(m.permute(0, 3, 1, 2))))).permute(0, 2, 3, 1)
    assert torch.allclose(mhca(m), ref, atol=1e-6)
    # option unwindow=False keeps the blocks inside the windows
    gm2, res2 = run_passes(model, x, ["attention_to_csa"], options={"attention_to_csa": {"unwindow": False}})
    assert not [n for n in res2["attention_to_csa"].notes if "whole map" in n]
    assert nodes_of(gm2, "aten.roll")


def test_lockstep_frees_values_after_their_last_use():
    """Calibration sweeps run the graph on every batch at once; an intermediate must be released once its last user
    ran (at camera resolutions keeping them all is tens of GiB), while hooks still see their node's arguments."""
    import gc
    import weakref

    from attn2conv.modules.replace import lockstep

    class Chain(nn.Module):
        def forward(self, x):
            a = x * 2
            b = a + 1
            c = b.relu()
            return c - 3

    gm = capture(Chain(), (torch.randn(2, 8),))
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    first, second, last = ops[0], ops[1], ops[-1]
    refs, seen = [], {}

    def keep_refs(values, fetch):
        refs.extend(weakref.ref(v) for v in values)

    def check(values, fetch):
        gc.collect()
        seen["alive"] = [r() is not None for r in refs]
        seen["args"] = fetch(last.args[0])

    batches = [(torch.randn(2, 8),), (torch.randn(2, 8),)]
    lockstep(gm, batches, {first: keep_refs, last: check})
    assert len(refs) == 2 and seen["alive"] == [False, False]  # x * 2 of both batches: dropped after a + 1 ran
    expected = [(b[0] * 2 + 1).relu() for b in batches]
    assert all(torch.equal(got, want) for got, want in zip(seen["args"], expected))
    assert second in [u for u in first.users]
