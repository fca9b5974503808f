"""attention_to_conv: every attention form rewritten to Mul/Conv (no MatMul, no SDPA, no Softmax on trt-safe) with the
same outputs; timm models through attn2conv.convert; misses and the plain-TensorRT no-op."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import attn2conv
from attn2conv.capture import capture
from attn2conv.graph import refresh_shapes
from attn2conv.legality import illegal_ops, op_counts
from attn2conv.pass_infra import PassContext, get_pass
from attn2conv.targets import resolve_target

from conftest import rel_error

ATTENTION_OPS = ("aten.matmul", "aten.bmm", "aten.scaled_dot_product_attention", "aten.einsum")


def run_pass(model, x, target="trt-safe", **options):
    """(reference output, rewritten module, PassResult) for attention_to_conv alone."""
    gm = capture(model, (x,))
    ref = gm(x)
    ctx = PassContext(example_inputs=(x,), profile=resolve_target(target) if target else None,
                      options={"attention_to_conv": options})
    result = get_pass("attention_to_conv")().run(gm, ctx)
    gm.recompile()
    refresh_shapes(gm, (x,))
    return ref, gm, result


def assert_exact(model, x, target="trt-safe", rewrites=1, **options):
    ref, gm, result = run_pass(model, x, target, **options)
    assert result.rewrites == rewrites, result.misses
    counts = op_counts(gm)
    assert not any(counts.get(op) for op in ATTENTION_OPS), counts
    if target == "trt-safe":  # Softmax is not in the safety scope: decomposed
        assert not counts.get("aten.softmax") and not counts.get("aten._softmax"), counts
        assert counts["aten.sigmoid"] >= 2 * rewrites  # two per chunk
    for probe in (x, torch.randn_like(x) * 3):
        assert rel_error(gm(probe), model(probe)) <= 1e-5
    return gm, result


class Sdpa(torch.nn.Module):
    def __init__(self, dim=16, heads=2, mask=None, causal=False):
        super().__init__()
        self.qkv, self.heads, self.causal = torch.nn.Linear(dim, 3 * dim), heads, causal
        if mask is not None:
            self.register_buffer("mask", mask)
        else:
            self.mask = None

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal)
        return o.transpose(1, 2).reshape(b, n, c)


class Manual(torch.nn.Module):
    """softmax(q @ k^T * scale + bias) @ v with an optional learned bias table and a -inf masked_fill."""

    def __init__(self, dim=16, heads=2, n=9, bias=False, mask=None, scale_after=True):
        super().__init__()
        self.q, self.kv, self.heads, self.scale_after = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 2 * dim), \
            heads, scale_after
        self.bias = torch.nn.Parameter(torch.randn(heads, n, n)) if bias else None
        self.register_buffer("mask", mask if mask is not None else torch.zeros(0, dtype=torch.bool))

    def forward(self, x, kv_tokens=None):
        b, n, c = x.shape
        kv_tokens = x if kv_tokens is None else kv_tokens
        m = kv_tokens.shape[1]
        d = c // self.heads
        q = self.q(x).reshape(b, n, self.heads, d).transpose(1, 2)
        k, v = self.kv(kv_tokens).reshape(b, m, 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        if self.scale_after:
            attn = (q @ k.transpose(-2, -1)) / math.sqrt(d)
        else:
            attn = (q * d ** -0.5) @ k.transpose(-2, -1)
        if self.bias is not None:
            attn = attn + self.bias.unsqueeze(0)
        if self.mask.numel():
            attn = attn.masked_fill(self.mask, float("-inf"))
        attn = attn.softmax(dim=-1)
        return (attn @ v).transpose(1, 2).reshape(b, n, c)


def test_sdpa():
    assert_exact(Sdpa().eval(), torch.randn(2, 9, 16))


def test_sdpa_kept_softmax_on_dla():
    gm, result = assert_exact(Sdpa().eval(), torch.randn(2, 9, 16), target="dla")
    assert op_counts(gm)["aten.softmax"] == 1
    assert "softmax kept" in result.notes[-1]


def test_sdpa_with_bool_mask_and_causal():
    mask = torch.rand(9, 9) > 0.3
    mask.fill_diagonal_(True)  # every query keeps at least one key
    assert_exact(Sdpa(mask=mask).eval(), torch.randn(1, 9, 16))
    assert_exact(Sdpa(causal=True).eval(), torch.randn(1, 9, 16))


@pytest.mark.parametrize("scale_after", [True, False])
def test_manual_softmax(scale_after):
    assert_exact(Manual(scale_after=scale_after).eval(), torch.randn(2, 9, 16))


def test_manual_with_additive_bias():
    _, result = assert_exact(Manual(bias=True).eval(), torch.randn(2, 9, 16))
    assert not result.misses


def test_manual_with_masked_fill():
    mask = torch.rand(9, 9) > 0.7
    mask.fill_diagonal_(False)
    assert_exact(Manual(bias=True, mask=mask).eval(), torch.randn(1, 9, 16))


def test_reduced_keys_pvt_style():
    class Reduced(Manual):
        def forward(self, x):  # keys and values from 2x-pooled tokens: M = N / 2 (+ cls)
            pooled = F.avg_pool1d(x.transpose(1, 2), 2).transpose(1, 2)
            return super().forward(x, pooled)

    assert_exact(Reduced().eval(), torch.randn(2, 12, 16))


def test_class_attention_cait_style():
    class ClassAttention(Manual):
        def forward(self, x):  # one query (the class token) over all tokens
            return super().forward(x[:, :1], x)

    assert_exact(ClassAttention().eval(), torch.randn(2, 9, 16))


def test_chunking_stays_exact_and_reports_peak():
    model, x = Sdpa(dim=32, heads=4).eval(), torch.randn(1, 17, 32)
    full = 4 * 8 * 17 * 17
    gm, result = assert_exact(model, x, max_broadcast_elems=full // 6)
    assert any("chunks" in note for note in result.notes)
    assert op_counts(gm)["aten.cat"] >= 2
    peak = int(result.notes[-1].split("peak broadcast tensor ")[1].split()[0])
    assert peak <= full // 6


@pytest.mark.parametrize("target", ["trt-safe", "dla"])
def test_chunks_over_images_heads_and_keys_stay_exact(target):
    """Budgets that cut the batch axis (2 images), then heads, then keys (partial sums over key chunks added up)."""
    model, x = Sdpa(dim=32, heads=4).eval(), torch.randn(2, 17, 32)
    per_head = 8 * 17 * 17  # one image, one head
    for budget, cut in ((4 * per_head, "1 images x 4 heads x 17 keys"), (2 * per_head, "1 images x 2 heads x 17 keys"),
                        (per_head // 3, "1 images x 1 heads x 5 keys")):
        gm, result = assert_exact(model, x, target=target, max_broadcast_elems=budget)
        assert any(cut in note for note in result.notes), result.notes
        peak = int(result.notes[-1].split("peak broadcast tensor ")[1].split()[0])
        assert peak <= budget
        assert op_counts(gm)["aten.split_with_sizes"] >= 2


def test_one_head_chunk_sums_halves_to_keep_ort_off_nchwc():
    """A one-head chunk whose d (here 16) is a multiple of ONNX Runtime's NCHWc block is summed by a two-group conv
    (half sums), merged for all heads by one grouped conv of ones; still exact."""
    model, x = Sdpa(dim=64, heads=4).eval(), torch.randn(1, 9, 64)
    gm, result = assert_exact(model, x, max_broadcast_elems=16 * 9 * 9)
    convs = [n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    groups = sorted(n.args[6] for n in convs)
    assert groups.count(2) == 4 and 4 in groups  # four half-sum convs (one per head), the merge has groups=4
    assert all(not (n.args[6] == 1 and n.args[0].meta["val"].shape[1] % 8 == 0) for n in convs)


def test_key_chunked_scores_take_two_heads_per_chunk_instead_of_half_sums():
    """Where one head no longer fits the budget (keys cut), Q*K takes two heads per chunk with half the keys: each
    chunk is summed by a two-group conv with one output per head (never reordered by ONNX Runtime), so no half sums
    and no merge conv; the values side keeps one head per chunk (a head's keys are contiguous channels there)."""
    model, x = Sdpa(dim=64, heads=4).eval(), torch.randn(1, 9, 64)
    budget = 16 * 9 * 9 // 2  # half a head
    gm, result = assert_exact(model, x, max_broadcast_elems=budget)
    convs = [n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    score_sums = [n for n in convs if n.args[0].meta["val"].shape[1] == 2 * 16]  # (1, 2 heads x d, keys, N)
    assert score_sums and all(n.args[6] == 2 and n.meta["val"].shape[1] == 2 for n in score_sums)
    assert not [n for n in convs if n.args[0].meta["val"].shape[1] == 2 * 4]  # no merge of 2 half sums x 4 heads
    products = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor and n.meta["val"].dim() == 4
                and n.meta["val"].shape[-2] > 1 and n.meta["val"].shape[-1] == 9]
    assert products and max(n.meta["val"].numel() for n in products) <= budget


class ReducedKeys(torch.nn.Module):
    """SRA-like attention: N queries, M << N keys and values (the first M tokens, as a pooled grid would give)."""

    def __init__(self, dim=32, heads=2, keys=16):
        super().__init__()
        self.qkv, self.heads, self.keys = torch.nn.Linear(dim, 3 * dim), heads, keys

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k[:, :, :self.keys], v[:, :, :self.keys])
        return o.transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("budget, heads_per_run", [(16 * 16 * 512, 2), (16 * 16 * 256, 1)])
def test_values_of_a_head_over_budget_are_cut_by_queries(budget, heads_per_run):
    """Many queries, few keys (Swin SRA at 1024 px): where one head's E'*V exceeds the budget, the values side cuts
    the queries into runs of >= MIN_QUERY_RUN with every key of the head (two heads per chunk where they fit) instead
    of few-key chunks; exact, no group-1 sum conv, every product within the budget."""
    from attn2conv.passes.attention_to_conv import MIN_QUERY_RUN

    model, x = ReducedKeys().eval(), torch.randn(1, 1024, 32)
    gm, result = assert_exact(model, x, max_broadcast_elems=budget)
    runs = 1024 // (budget // (heads_per_run * 16 * 16))
    assert any(f"values in {runs} query runs" in note for note in result.notes), result.notes
    convs = [n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert not [n for n in convs if n.args[6] == 1 and n.args[0].meta["val"].shape[1] > 1]
    products = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor and n.meta["val"].dim() == 4
                and isinstance(n.args[1], torch.fx.Node) and n.meta["val"].shape[2] == 16]  # E'*V (1, keys, dv, N)
    assert products and all(n.meta["val"].shape[-1] >= MIN_QUERY_RUN for n in products)
    assert all(n.meta["val"].shape[1] == heads_per_run * 16 for n in products)
    assert max(n.meta["val"].numel() for n in products) <= budget
    peak = int(result.notes[-1].split("peak broadcast tensor ")[1].split()[0])
    assert peak <= budget


def test_small_key_chunks_are_summed_off_nchwc():
    """A one-head key chunk of fewer channels than ONNX Runtime's NCHWc block (here 2 keys, queries too short to cut)
    is summed as two half-groups: ORT would read a group-1 conv of < 16 inputs in NCHW and pad its one output to
    16 channels."""
    model, x = ReducedKeys(dim=32, heads=2, keys=16).eval(), torch.randn(1, 64, 32)
    gm, result = assert_exact(model, x, max_broadcast_elems=2 * 16 * 64)
    convs = [n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert not [n for n in convs if n.args[6] == 1 and n.args[0].meta["val"].shape[1] % 2 == 0]


def test_trt_target_left_alone():
    _, gm, result = run_pass(Sdpa().eval(), torch.randn(1, 9, 16), target="trt")
    assert not result.changed and "accepts MatMul" in result.notes[0]
    assert op_counts(gm)["aten.scaled_dot_product_attention"] == 1


def test_miss_says_why():
    class KeysOnDim2(torch.nn.Module):
        def forward(self, x):
            return (x @ x.transpose(-2, -1)).softmax(dim=-2) @ x

    _, _, result = run_pass(KeysOnDim2().eval(), torch.randn(1, 5, 4))
    assert result.rewrites == 0
    assert "not over the last (key) axis" in result.misses[0]


def _timm_fused(fused):
    old = timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(fused)
    return old


@pytest.mark.parametrize("fused", [True, False])
def test_deit_tiny_cls_token(fused):
    old = _timm_fused(fused)
    try:
        model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    finally:
        timm.layers.set_fused_attn(old)
    assert_exact(model, torch.randn(1, 3, 64, 64), rewrites=2)


def _convert_and_check(model, x):
    result = attn2conv.convert(model, target="trt-safe", example_inputs=(x,))
    record = next(p for p in result.report.passes if p.id == "attention_to_conv")
    assert record.rewrites > 0
    bad = [op for op in result.report.illegal_ops if op["onnx_op"] in ("MatMul", "Gemm", "Einsum", "Softmax")]
    assert not bad, bad
    counts = op_counts(result.module)
    assert not any(counts.get(op) for op in ATTENTION_OPS), counts
    for probe in (x, torch.randn_like(x)):
        assert rel_error(result.module(probe), model(probe)) <= 1e-4
    return result


def test_convert_deit_tiny_trt_safe():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2).eval()
    _convert_and_check(model, torch.randn(1, 3, 224, 224))


def test_convert_pvt_v2_small_config_trt_safe():
    model = timm.models.pvt_v2.PyramidVisionTransformerV2(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128),
                                                          num_heads=(1, 2, 4, 8), num_classes=10).eval()
    result = _convert_and_check(model, torch.randn(1, 3, 64, 64))
    assert next(p for p in result.report.passes if p.id == "attention_to_conv").rewrites == 4


def test_hf_vit_eager_attention():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8, attn_implementation="eager")
    model = transformers.ViTModel(cfg).eval()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(pixel_values=x).last_hidden_state

    assert_exact(Wrap().eval(), torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("fused", [True, False])
def test_swin_window_attention_with_relative_bias_and_shift_mask(fused):
    """sdpa with attn_mask (fused) and the eager view -> +mask -> view chain; rel-pos bias and mask fold to buffers."""
    old = _timm_fused(fused)
    try:
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(2, 2), num_heads=(2, 4),
                                  embed_dim=32, img_size=56, window_size=7).eval()
    finally:
        timm.layers.set_fused_attn(old)
    assert_exact(model, torch.randn(1, 3, 56, 56), rewrites=4)


def _cait(**kw):
    # layer scale 1 (timm's default 1e-5 would hide any error of the attention in the output)
    return timm.create_model("cait_xxs24_224", pretrained=False, depth=2, init_values=1.0, **kw).eval()


@pytest.mark.parametrize("target", ["trt-safe", "dla"])
def test_cait_talking_heads(target):
    """Linear(h, h) over heads before and after the softmax (CaiT talking heads) plus CaiT's class attention."""
    gm, result = assert_exact(_cait(img_size=64), torch.randn(1, 3, 64, 64), target=target, rewrites=4)
    assert "talking heads" in result.notes[-1] and not result.misses
    assert op_counts(gm).get("aten.softmax", 0) == (4 if target == "dla" else 0)


def test_convert_cait_small_config_trt_safe():
    """Through convert: the head mixes are 1x1 convolutions over head channels by then (linear_to_conv runs first)."""
    result = _convert_and_check(_cait(img_size=32, depth_token_only=1), torch.randn(1, 3, 32, 32))
    assert next(p for p in result.report.passes if p.id == "attention_to_conv").rewrites == 3


class ChannelsFirstValues(torch.nn.Module):
    """EfficientViT-MSRA's arrangement: q, k, v channels-first (B, h, d, N), scores q^T @ k, output v @ P^T."""

    def __init__(self, dim=16, heads=2, n=9, swap="transpose", bias=False):
        super().__init__()
        self.qkv, self.heads, self.swap = torch.nn.Conv1d(dim, 3 * dim, 1), heads, swap
        self.bias = torch.nn.Parameter(torch.randn(heads, n, n)) if bias else None

    def forward(self, x):  # x (B, C, N)
        b, c, n = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, self.heads, c // self.heads, n).unbind(1)
        attn = (q * (c // self.heads) ** -0.5).transpose(-2, -1) @ k  # (B, h, N, N)
        if self.bias is not None:
            attn = attn + self.bias
        attn = attn.softmax(dim=-1)
        attn_t = {"transpose": attn.transpose(-2, -1), "transpose_pos": attn.transpose(3, 2),
                  "permute": attn.permute(0, 1, 3, 2)}[self.swap]
        return (v @ attn_t).reshape(b, c, n)  # (B, h, dv, N)


@pytest.mark.parametrize("swap", ["transpose", "transpose_pos", "permute"])
@pytest.mark.parametrize("target", ["trt-safe", "dla"])
def test_values_times_transposed_probabilities(swap, target):
    model = ChannelsFirstValues(swap=swap, bias=True).eval()
    gm, result = assert_exact(model, torch.randn(2, 16, 9), target=target)
    assert not result.misses
    # the output is channels-first already: the rewrite adds no permute after the key sum
    assert op_counts(gm)["aten.permute"] <= 2, op_counts(gm)


def test_values_times_probabilities_not_transposed_is_a_miss():
    """v @ P (contracting over queries) is not attention: left alone, with the reason."""

    class ValuesTimesProbs(ChannelsFirstValues):
        def forward(self, x):
            b, c, n = x.shape
            q, k, v = self.qkv(x).reshape(b, 3, self.heads, c // self.heads, n).unbind(1)
            return (v @ (q.transpose(-2, -1) @ k).softmax(dim=-1)).reshape(b, c, n)

    _, gm, result = run_pass(ValuesTimesProbs().eval(), torch.randn(1, 16, 9))
    assert result.rewrites == 0 and "not a matmul with v" in result.misses[0]


def test_efficientvit_msra_cascaded_group_attention():
    """timm efficientvit_m0: per-head cascaded attention with a bias table, `v @ attn.transpose(-2, -1)`."""
    model = timm.create_model("efficientvit_m0", pretrained=False, depth=(1, 1, 1), img_size=64).eval()
    with torch.no_grad():  # timm zero-inits the biases: random ones make the bias fold count
        for mod in model.modules():
            if hasattr(mod, "attention_biases"):
                mod.attention_biases.normal_()
    x = torch.randn(1, 3, 64, 64)
    own_ops = set(op_counts(capture(model, (x,))))
    gm, result = assert_exact(model, x, rewrites=12)
    assert not result.misses
    # trt-safe legality of what the rewrite left: no MatMul, no Softmax, and no error from an op kind it added
    errors = [o for o in illegal_ops(gm, resolve_target("trt-safe")) if o.severity == "error" and
              (o.op_kind in ATTENTION_OPS + ("aten.softmax",) or o.op_kind not in own_ops)]
    assert not errors, errors


@pytest.mark.slow  # capture and 16 passes: ~25 s on a quiet 2-core machine
def test_convert_efficientvit_msra_trt_safe():
    """Through convert: no MatMul/Softmax left and nothing the trt-safe profile flags as an error."""
    model = timm.create_model("efficientvit_m0", pretrained=False, depth=(1, 1, 1), img_size=64).eval()
    result = _convert_and_check(model, torch.randn(1, 3, 64, 64))
    assert next(p for p in result.report.passes if p.id == "attention_to_conv").rewrites == 12
    assert not [op for op in result.report.illegal_ops if op["severity"] == "error"], result.report.illegal_ops
