import pytest
import timm
import torch

import attn2conv
from attn2conv.errors import PipelineError
from attn2conv.graph import get_constant, is_op
from attn2conv.pass_infra import GraphPass, PassResult, all_passes
from attn2conv.pipeline import Pipeline

from conftest import rel_error


class ScaleFirstConv(GraphPass):
    """Deliberately wrong 'exact' pass: scales the last convolution's weight by 1.05."""

    id = "test_scale_first_conv"
    exact = True

    def run(self, gm, ctx):
        conv = [n for n in gm.graph.nodes if is_op(n, "aten.conv2d")][-1]
        get_constant(gm, conv.args[1]).mul_(1.05)
        return PassResult(changed=True, rewrites=1)


class Explodes(GraphPass):
    id = "test_explodes"
    exact = True

    def run(self, gm, ctx):
        gm.graph.erase_node(next(n for n in gm.graph.nodes if n.op == "placeholder"))  # would corrupt the graph
        return PassResult(changed=True)


def test_presets_cover_every_target_and_fidelity():
    known = set(all_passes())
    for kind in ("trt", "trt-safe", "dla"):
        for fidelity in ("exact", "fast"):
            pipe = Pipeline.for_target(kind, fidelity)
            assert len(pipe) >= 3 and set(pipe.ids) <= known
            if fidelity == "exact":
                assert all(p.exact for p in pipe)


def test_pipeline_editing():
    pipe = Pipeline.for_target("trt-safe")
    n = len(pipe)
    pipe.remove("fold_reparam")
    assert "fold_reparam" not in pipe.ids and len(pipe) == n - 1
    pipe.insert("fold_reparam", after="linear_to_conv")
    assert pipe.ids[pipe.ids.index("linear_to_conv") + 1] == "fold_reparam"
    pipe.move("fold_reparam", 0)
    assert pipe.ids[0] == "fold_reparam"
    pipe.insert(ScaleFirstConv, before="linear_to_conv")
    assert pipe.ids[pipe.ids.index("linear_to_conv") - 1] == "test_scale_first_conv"
    with pytest.raises(PipelineError, match="unknown pass id 'nope'"):
        pipe.insert("nope")
    with pytest.raises(PipelineError, match="not in pipeline"):
        pipe.remove("nope")
    with pytest.raises(PipelineError, match="unknown fidelity"):
        Pipeline.for_target("trt", "approximate")


def test_wrong_pass_is_rolled_back_and_conversion_still_works():
    model = timm.create_model("repvgg_a0", pretrained=False).eval()
    x = torch.randn(1, 3, 32, 32)
    pipe = Pipeline.for_target("trt-safe").insert(ScaleFirstConv, index=0).insert(Explodes, index=1)
    result = attn2conv.convert(model, target="trt-safe", example_inputs=x, pipeline=pipe)
    records = {r.id: r for r in result.report.passes}
    bad = records["test_scale_first_conv"]
    assert bad.status == "rolled back" and bad.rel_error > 1e-3
    assert "exceeds the bound" in bad.notes[0]
    assert records["test_explodes"].status == "failed"
    assert records["fold_reparam"].status == "applied"
    assert rel_error(result.module(x), model(x)) < 1e-4
    assert len(result.report.rolled_back) == 2
    table = result.report.to_table()
    assert "rolled back" in table and "failed" in table


def test_report_json_and_table():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8)
    result = attn2conv.convert(model, target="trt-safe", example_inputs=torch.randn(1, 3, 32, 32))
    import json

    data = json.loads(result.report.to_json())
    assert data["target"] == "trt-safe-8.6" and data["fidelity"] == "exact"
    assert {p["id"] for p in data["passes"]} >= {"linear_to_conv", "fold_batchnorm"}
    assert all({"id", "exact", "rewrites", "rel_error", "seconds", "status"} <= set(p) for p in data["passes"])
    assert data["rel_error"] < 1e-4
    assert "pass" in result.report.to_table().splitlines()[1]


class BreaksOnlyRandomProbes(GraphPass):
    """Adds 1.0 to the output wherever the input's first value is not the example input's: invisible on the example
    input, caught only by the random probes."""

    id = "test_breaks_only_random_probes"
    exact = True

    def run(self, gm, ctx):
        from attn2conv.graph import Builder, aten

        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        out = next(n for n in gm.graph.nodes if n.op == "output")
        y = out.args[0][0]
        b = Builder(gm, out)
        marker = b.constant(ctx.example_inputs[0].flatten()[:1].clone(), "marker")
        first = b.call(aten.reshape.default, b.call(aten.slice.Tensor, b.call(aten.reshape.default, x, [-1]), 0, 0, 1), [])
        off = b.call(aten.ne.Tensor, first, b.call(aten.reshape.default, marker, []))
        bumped = b.call(aten.add.Tensor, y, b.call(aten._to_copy.default, off, dtype=torch.float32))
        out.args = ((bumped, *out.args[0][1:]),)
        return PassResult(changed=True, rewrites=1)


@pytest.mark.parametrize("mode", ["each", "final"])
def test_guard_modes_catch_a_pass_that_only_breaks_random_inputs(mode):
    model = timm.create_model("repvgg_a0", pretrained=False, num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    pipe = Pipeline(["fold_reparam", BreaksOnlyRandomProbes, "fold_batchnorm"])
    result = attn2conv.convert(model, "trt", x, pipeline=pipe, guard=mode)
    records = {r.id: r for r in result.report.passes}
    assert records["test_breaks_only_random_probes"].status == "rolled back"
    assert records["fold_reparam"].status == "applied"
    assert result.report.rel_error < 1e-4
    probe = torch.randn(1, 3, 32, 32)
    assert rel_error(result.module(probe), model(probe)) < 1e-4
    assert ("re-ran every pass" in result.report.extra.get("guard", "")) == (mode == "final")


def test_guard_run_records_the_same_shapes_as_fake_propagation():
    """The pipeline takes each node's meta['val'] from the guard's run on the example input instead of a separate
    fake-tensor propagation; both must agree on every node's shape and dtype."""
    from attn2conv.capture import capture
    from attn2conv.graph import refresh_shapes
    from attn2conv.guard import NumericGuard
    from attn2conv.pass_infra import PassContext
    from attn2conv.pipeline import run_pass
    from attn2conv.targets import resolve_target

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = capture(model, x)
    ctx = PassContext(example_inputs=(x,), profile=resolve_target("trt-safe"))
    guard = NumericGuard.for_module(gm, ctx.example_inputs, mode="final")
    for pass_id in ("layernorm_decompose", "linear_to_conv", "attention_to_conv"):
        gm, record = run_pass(Pipeline([pass_id]).passes[0], gm, ctx, guard)
        assert record.status == "applied", (pass_id, record.notes)
    recorded = {n.name: n.meta.get("val") for n in gm.graph.nodes}
    refresh_shapes(gm, ctx.example_inputs)
    compared = 0
    for n in gm.graph.nodes:
        want, got = n.meta.get("val"), recorded[n.name]
        if isinstance(want, torch.Tensor):
            assert isinstance(got, torch.Tensor), n.name
            # (strides can differ: the real conv kernel may pick another memory format than the fake one predicts)
            assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device), n.name
            compared += 1
    assert compared > 50


class RewiresThenFails(GraphPass):
    """Registers a buffer under a new submodule, reroutes the conv through it, drops the conv bias, then raises."""

    id = "test_rewires_then_fails"
    exact = True

    def run(self, gm, ctx):
        from attn2conv.graph import Builder, aten

        conv = next(n for n in gm.graph.nodes if is_op(n, "aten.conv2d"))
        b = Builder(gm, conv)
        shift = b.call(aten.add.Tensor, conv.args[0], b.constant(torch.ones(1), "shift"))
        conv.args = (shift, conv.args[1], None, *conv.args[3:])
        from attn2conv.graph import cleanup

        cleanup(gm)  # removes the now unread bias parameter from the module tree
        raise RuntimeError("boom")


def test_failed_pass_restores_graph_module_tree_and_weights_in_place():
    from attn2conv.capture import capture
    from attn2conv.guard import NumericGuard
    from attn2conv.pass_infra import PassContext
    from attn2conv.pipeline import run_pass

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = capture(model, x)
    names = [n.name for n in gm.graph.nodes]
    tensors = {k: v.clone() for k, v in [*gm.named_parameters(), *gm.named_buffers()]}
    modules = [k for k, _ in gm.named_modules()]
    guard = NumericGuard.for_module(gm, (x,))
    out, record = run_pass(RewiresThenFails(), gm, PassContext(example_inputs=(x,)), guard)
    assert record.status == "failed" and "boom" in record.notes[0]
    assert [n.name for n in out.graph.nodes] == names
    assert [k for k, _ in out.named_modules()] == modules
    restored = dict([*out.named_parameters(), *out.named_buffers()])
    assert restored.keys() == tensors.keys() and all(torch.equal(restored[k], v) for k, v in tensors.items())
    assert rel_error(out(x), model(x)) == 0.0


class DoublesThenHalves(GraphPass):
    """Exact, but gives an existing node another value: the first GELU computes 2 * gelu(x), a new node halves it for
    its consumers. The incremental guard sees the node's kept value disagree and must decide on the whole forward."""

    id = "test_doubles_then_halves"
    exact = True

    def run(self, gm, ctx):
        from attn2conv.graph import aten

        gelu = next(n for n in gm.graph.nodes if is_op(n, "aten.gelu"))
        users = list(gelu.users)
        with gm.graph.inserting_before(gelu):
            fresh = gm.graph.call_function(aten.gelu.default, gelu.args, gelu.kwargs)
        gelu.target, gelu.args, gelu.kwargs = aten.mul.Tensor, (fresh, 2.0), {}  # same name, twice the value
        with gm.graph.inserting_after(gelu):
            half = gm.graph.call_function(aten.mul.Tensor, (gelu, 0.5))
        for u in users:
            u.replace_input_with(gelu, half)
        return PassResult(changed=True, rewrites=1)


def _tiny_vit_guarded():
    from attn2conv.capture import capture
    from attn2conv.guard import NumericGuard
    from attn2conv.pass_infra import PassContext
    from attn2conv.targets import resolve_target

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = capture(model, x, shapes=False)
    ctx = PassContext(example_inputs=(x,), profile=resolve_target("trt-safe"))
    return model, x, gm, ctx, NumericGuard.for_module(gm, ctx.example_inputs, mode="final", record_shapes=True)


def test_final_guard_evaluates_only_what_a_pass_rewrote():
    from attn2conv.pipeline import run_pass

    model, x, gm, ctx, guard = _tiny_vit_guarded()
    before = guard.recorded
    gm, record = run_pass(Pipeline(["gelu_decompose"]).passes[0], gm, ctx, guard)
    assert record.status == "applied" and record.rewrites == 2 and 0 < record.rel_error < 1e-5
    after = guard.recorded
    computed = [name for name, v in after.values.items() if before.values.get(name) is not v]
    added = [name for name in after.values if name not in before.values]
    # only the two GELUs' replacements get new values: their readers were recomputed and matched their kept values
    assert set(computed) == set(added) and 0 < len(added) < len(after.values) / 2
    assert all(isinstance(gm.graph.find_nodes(op="call_function", target=n.target)[0].meta.get("val"), torch.Tensor)
               for n in gm.graph.nodes if n.op == "call_function" and n.name in added)
    assert rel_error(gm(x), model(x)) < 1e-5


def test_final_guard_decides_on_the_whole_forward_where_a_node_changes_meaning():
    from attn2conv.pipeline import run_pass

    model, x, gm, ctx, guard = _tiny_vit_guarded()
    gm, record = run_pass(DoublesThenHalves(), gm, ctx, guard)
    assert record.status == "applied" and record.rel_error < 1e-5, record.notes
    gm, record = run_pass(ScaleFirstConv(), gm, ctx, guard)  # a real error is still caught
    assert record.status == "rolled back" and record.rel_error > 1e-3
    assert rel_error(gm(x), model(x)) < 1e-5 and guard.finish(gm) < 1e-5


def test_final_guard_with_export_runs_the_random_probes_in_onnx_runtime(tmp_path):
    model = timm.create_model("repvgg_a0", pretrained=False, num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    pipe = Pipeline(["fold_reparam", BreaksOnlyRandomProbes, "fold_batchnorm"])
    result = attn2conv.convert(model, "trt", x, pipeline=pipe, export=tmp_path / "m.onnx")
    records = {r.id: r for r in result.report.passes}
    assert records["test_breaks_only_random_probes"].status == "rolled back"
    assert "re-ran every pass" in result.report.extra["guard"]
    exp = result.report.extra["export"]
    assert result.certified and max(exp["parity_vs_original_each"]) < 1e-4 and result.report.rel_error < 1e-4
    clean = attn2conv.convert(model, "trt", x, pipeline=Pipeline(["fold_reparam", "fold_batchnorm"]),
                              export=tmp_path / "ok.onnx")
    each = clean.report.extra["export"]["parity_vs_original_each"]
    assert "guard" not in clean.report.extra and len(each) == 3 and clean.report.rel_error == pytest.approx(
        max(clean.report.rel_error, *each[1:]))


def test_final_guard_over_its_memory_budget_checks_each_pass_with_whole_forwards(monkeypatch):
    """Past RECORD_BUDGET_BYTES the guard keeps no node values (1024 px inputs would keep GBs) and still rolls back."""
    from attn2conv import guard as guard_module
    from attn2conv.pipeline import run_pass

    model, x, gm, ctx, guard = _tiny_vit_guarded()
    assert guard.recorded is not None and guard.recorded.nbytes > 0
    monkeypatch.setattr(guard_module, "RECORD_BUDGET_BYTES", guard.recorded.nbytes - 1)
    gm, record = run_pass(Pipeline(["gelu_decompose"]).passes[0], gm, ctx, guard)
    assert record.status == "applied" and guard.recorded is None and 0 < record.rel_error < 1e-5
    gm, record = run_pass(ScaleFirstConv(), gm, ctx, guard)
    assert record.status == "rolled back" and record.rel_error > 1e-3
    assert rel_error(gm(x), model(x)) < 1e-5 and guard.finish(gm) < 1e-5


class RebuildsProductReaders(GraphPass):
    """Exact: every node that reads a product the guard's record let go is replaced by a fresh copy of itself (new
    name), and with scale != 1 also multiplied by it, so the guard must recompute the dropped product to check it."""

    id = "test_rebuilds_product_readers"
    exact = True
    scale = 1.0

    def run(self, gm, ctx):
        from attn2conv.graph import aten

        readers = {u for n in gm.graph.nodes if n.meta.get("dropped_product") for u in n.users}
        for reader in readers:
            users = list(reader.users)
            with gm.graph.inserting_after(reader):
                fresh = gm.graph.call_function(reader.target, reader.args, reader.kwargs)
            with gm.graph.inserting_after(fresh):
                out = gm.graph.call_function(aten.mul.Tensor, (fresh, self.scale)) if self.scale != 1.0 else fresh
            for user in users:
                user.replace_input_with(reader, out)
            gm.graph.erase_node(reader)
        return PassResult(changed=bool(readers), rewrites=len(readers))


class ScalesProductReaders(RebuildsProductReaders):
    id = "test_scales_product_readers"
    scale = 1.01


def test_final_guard_lets_broadcast_products_go_and_recomputes_them_when_read(monkeypatch):
    """attention_to_conv's Q*K and E'*V products are far larger than what they are computed from and reduced to: the
    record drops them once their readers ran (converted DeiT-S: 1.4 GB) and recomputes one when a later pass
    rewrites its reader."""
    from attn2conv import guard as guard_module
    from attn2conv.pipeline import run_pass

    monkeypatch.setattr(guard_module, "PRODUCT_MIN_BYTES", 1024)  # the tiny ViT's products are ~200 KB
    model, x, gm, ctx, guard = _tiny_vit_guarded()
    for pass_id in ("linear_to_conv", "attention_to_conv"):
        gm, record = run_pass(Pipeline([pass_id]).passes[0], gm, ctx, guard)
        assert record.status == "applied", (pass_id, record.notes)
    kept = guard.recorded.values
    dropped = [n for n in gm.graph.nodes if kept.get(n.name) is guard_module._DROPPED]
    assert dropped and all(is_op(n, "aten.mul") for n in dropped)
    for n in dropped:
        n.meta["dropped_product"] = True
        assert all(n.meta["val"].numel() >= guard_module.PRODUCT_RATIO * a.meta["val"].numel()
                   for a in (*n.all_input_nodes, *n.users))
    gm, record = run_pass(ScalesProductReaders(), gm, ctx, guard)
    assert record.status == "rolled back" and record.rel_error > 1e-3, record.notes
    gm, record = run_pass(RebuildsProductReaders(), gm, ctx, guard)
    assert record.status == "applied" and record.rewrites == len(dropped) and record.rel_error < 1e-6
    assert rel_error(gm(x), model(x)) < 1e-5 and guard.finish(gm) < 1e-5


def test_convert_freezes_older_objects_only_while_it_runs_and_keeps_a_callers_freeze():
    import gc

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    seen = []
    assert gc.get_freeze_count() == 0
    attn2conv.convert(model, "trt-safe", example_inputs=x, progress=lambda stage: seen.append(gc.get_freeze_count()))
    assert seen and min(seen) > 0  # the objects that existed before the call were frozen during it...
    assert gc.get_freeze_count() == 0  # ...and are not after it
    gc.freeze()  # a caller that froze its objects itself (a pre-fork server) keeps them frozen
    try:
        frozen = gc.get_freeze_count()
        seen.clear()
        attn2conv.convert(model, "trt-safe", example_inputs=x, progress=lambda stage: seen.append(gc.get_freeze_count()))
        # frozen objects that die leave the count, so it only shrinks a little; an unfreeze would make it 0
        assert seen and min(seen) > frozen // 2 and gc.get_freeze_count() > frozen // 2
    finally:
        gc.unfreeze()
