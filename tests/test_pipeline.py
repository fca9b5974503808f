import pytest
import timm
import torch
import torch.fx as fx

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
