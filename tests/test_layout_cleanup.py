import pytest
import timm
import torch
import torch.fx as fx

import attn2conv
from attn2conv.graph import is_op, module_path
from attn2conv.legality import op_counts
from attn2conv.passes.layout_cleanup import is_layout

from conftest import rel_error

LAYOUT_KINDS = ("aten.permute", "aten.reshape", "aten.transpose")


def _layout_count(gm):
    return sum(is_layout(n) for n in gm.graph.nodes)


def _between(start: fx.Node, stop) -> list[fx.Node]:
    """Nodes on every path from `start` forward until a node for which stop(node) is true."""
    seen, stack = [], list(start.users)
    while stack:
        n = stack.pop()
        if n in seen or stop(n) or n.op == "output":
            continue
        seen.append(n)
        stack.extend(n.users)
    return seen


def test_vit_mlp_is_conv_act_conv_and_stream_stays_channels_first():
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    passes = ["layernorm_decompose", "gelu_decompose", "linear_to_conv"]
    before = attn2conv.convert(model, "trt-safe", x, pipeline=attn2conv.Pipeline(passes))
    # guard 'each': whole forwards, so the pass's error is against the graph just before it (the incremental 'final'
    # guard compares with recorded values that may carry the rounding of earlier passes)
    after = attn2conv.convert(model, "trt-safe", x, pipeline=attn2conv.Pipeline(passes + ["layout_cleanup"]),
                              guard="each")
    rec = after.report.passes[-1]
    assert rec.id == "layout_cleanup" and rec.status == "applied" and rec.rel_error == 0.0  # moves bits only
    assert _layout_count(after.module) * 3 <= _layout_count(before.module)
    gm = after.module
    for fc1 in [n for n in gm.graph.nodes if is_op(n, "aten.conv2d") and module_path(n).endswith("mlp.fc1")]:
        chain = _between(fc1, lambda n: is_op(n, "aten.conv2d") and module_path(n).endswith("mlp.fc2"))
        assert chain and not any(is_layout(n) for n in chain), [n.name for n in chain if is_layout(n)]
    # every block-level Add of the residual stream works on (B, C, 1, N)
    adds = [n for n in gm.graph.nodes if is_op(n, "aten.add") and module_path(n) in ("blocks.0", "blocks.1") and
            any(is_op(a, "aten.conv2d") for a in n.all_input_nodes)]
    assert len(adds) == 4 and all(len(n.meta["val"].shape) == 4 for n in adds)
    assert rel_error(gm(x), model(x)) <= 1e-5


class Wrapped(torch.nn.Module):
    """Token-layout ops between two channels-first convolutions, as other passes leave them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(4, 6, 1), torch.nn.Conv2d(6, 6, 1)
        self.scale = torch.nn.Parameter(torch.randn(6))
        self.bias = torch.nn.Parameter(torch.randn(1, 1, 6))

    def forward(self, x):  # x: (B, 4, 1, N)
        t = self.a(x).reshape(2, 6, 10).permute(0, 2, 1)  # (B, N, C)
        t = torch.relu(t * self.scale + self.bias) + 0.5 * t
        t = t.permute(0, 2, 1).reshape(2, 6, 1, 10)
        y = self.b(t)
        return y.permute(0, 2, 3, 1).permute(0, 3, 1, 2).reshape(2, 6, 10).reshape(2, 6, 1, 10)


def test_region_with_constants_and_identity_chains():
    net = Wrapped().eval()
    x = torch.randn(2, 4, 1, 10)
    result = attn2conv.convert(net, "trt-safe", x, pipeline=attn2conv.Pipeline(["layout_cleanup"]))
    counts = op_counts(result.module)
    assert not any(counts.get(k, 0) for k in LAYOUT_KINDS), counts
    consts = {n.target: result.module.get_buffer(n.target).shape for n in result.module.graph.nodes
              if n.op == "get_attr" and "layout_const" in n.target}
    assert sorted(tuple(s) for s in consts.values()) == [(1, 6, 1, 1)] * 2  # per-channel, not per element
    assert torch.equal(result.module(x), net(x))


def test_chain_that_is_not_an_inverse_stays():
    class Net(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x.permute(0, 2, 1)).reshape(2, -1)

    net = Net()
    x = torch.randn(2, 3, 5)
    result = attn2conv.convert(net, "trt-safe", x, pipeline=attn2conv.Pipeline(["layout_cleanup"]))
    assert op_counts(result.module)["aten.permute"] == 1
    assert torch.equal(result.module(x), net(x))


def _random_chain(rng, xs):
    """An fx chain of 1-4 random layout ops (permutes, reshapes that may or may not be views, (un)squeezes)."""
    from attn2conv.graph import aten

    g = fx.Graph()
    node = g.placeholder("x")
    chain, cur = [], list(xs)
    for _ in range(int(rng.integers(1, 5))):
        kind = rng.integers(0, 4)
        if kind == 0 and len(cur) > 1:
            node = g.call_function(aten.permute.default, (node, [int(d) for d in rng.permutation(len(cur))]))
            cur = [cur[d] for d in node.args[1]]
        elif kind == 1:  # regroup the elements into a random factorisation of numel
            n, dims = int(torch.tensor(cur).prod()), []
            while n > 1 and len(dims) < 4:
                factors = [d for d in (2, 3, 4, 6, n) if n % d == 0]
                f = factors[int(rng.integers(0, len(factors)))]
                dims.append(f)
                n //= f
            cur = dims + ([n] if n > 1 else []) or [1]
            node = g.call_function(aten.reshape.default, (node, list(cur)))
        elif kind == 2:
            d = int(rng.integers(0, len(cur) + 1))
            node = g.call_function(aten.unsqueeze.default, (node, d))
            cur.insert(d, 1)
        else:
            node = g.call_function(aten.transpose.int, (node, 0, len(cur) - 1))
            cur[0], cur[-1] = cur[-1], cur[0]
        chain.append(node)
    return chain, tuple(cur)


def test_strided_layout_maps_agree_with_index_tensors():
    """LayoutMap decides identity, equality and the shortest form from strides alone; index tensors are the truth."""
    import numpy as np

    from attn2conv.passes.layout_cleanup import LayoutMap, _express_tensor, express, index_map

    rng = np.random.default_rng(0)
    strided = copied = three_op = 0
    maps = []
    for _ in range(400):
        xs = tuple(int(d) for d in rng.choice([2, 3, 4, 6], size=int(rng.integers(2, 5))))
        chain, ys = _random_chain(rng, xs)
        m, idx = LayoutMap(chain, xs), index_map(chain, xs)
        strided, copied = strided + (m.key is not None), copied + (m.key is None)
        assert m.shape == tuple(idx.shape) == ys
        assert m.is_identity() == torch.equal(idx.flatten(), torch.arange(idx.numel()))
        form = express(xs, ys, m)
        assert form == express(xs, ys, idx)
        if form is not None:  # the form rebuilds the map exactly
            t = torch.arange(idx.numel()).reshape(xs)
            for op, val in form:
                t = t.reshape(val) if op == "reshape" else t.permute(val)
            assert torch.equal(t, idx)
            three_op += len(form) == 3 and _express_tensor(xs, ys, idx) is None
        maps.append((xs, m, idx))
    for (xa, a, ia), (xb, b, ib) in zip(maps, maps[1:] + maps[:1]):
        if xa == xb and ia.shape == ib.shape:
            assert a.equals(b) == torch.equal(ia, ib)
    assert strided > 200 and copied > 20  # both representations were exercised
    assert three_op >= 3  # reshape + permute + reshape forms, beyond the two-op search


def test_swin_shifted_blocks_keep_the_residual_stream_channels_first():
    """Rolls (window_ops' slice + cat) commute with permutes: the shifted window partition reads the channels-first
    LayerNorm output directly, the window reverse writes channels-first, and every residual Add is channels-first."""
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(2, 2), num_heads=(2, 4),
                              embed_dim=32, img_size=112).eval()
    x = torch.randn(1, 3, 112, 112)
    passes = ["constant_fold", "window_ops", "layernorm_decompose", "gelu_decompose", "linear_to_conv"]
    before = attn2conv.convert(model, "trt-safe", x, pipeline=attn2conv.Pipeline(passes))
    after = attn2conv.convert(model, "trt-safe", x, pipeline=attn2conv.Pipeline(passes + ["layout_cleanup"]))
    assert after.report.passes[-1].rel_error <= 1e-6  # convs reading (C, H, W) instead of (C, 1, N): fp32 order
    gm = after.module
    permutes = sum(is_op(n, "aten.permute") for n in gm.graph.nodes)
    assert permutes * 3 <= sum(is_op(n, "aten.permute") for n in before.module.graph.nodes)
    shifted = [n for n in gm.graph.nodes if is_op(n, "aten.cat") and module_path(n) == "layers.0.blocks.1"]
    assert len(shifted) == 4  # the roll before the attention and the one back, two axes each
    for cat in shifted:  # (B, C, H, W): rolled along H and W, channels untouched
        assert tuple(cat.meta["val"].shape) == (1, 32, 28, 28) and cat.args[1] in (2, 3)
    adds = [n for n in gm.graph.nodes if is_op(n, "aten.add") and module_path(n) in ("layers.0.blocks.0",
                                                                                       "layers.0.blocks.1")]
    assert len(adds) == 4 and all(tuple(n.meta["val"].shape)[1] == 32 for n in adds)  # channels on dim 1
    assert rel_error(gm(x), model(x)) <= 1e-5


# --- the target's batch limit (trt-safe: axis 0 <= 16) --------------------------------------------------------------

class PooledHeads(torch.nn.Module):
    """MViTv2's pooled attention input: heads on the batch axis for a depthwise pool, then LayerNorm over the head
    dim. Composed naively, (heads, d, H, W) -> (1, d, heads, H*W) is permute [1, 0, 2, 3] (axis 0 = d = 24) + reshape."""

    def __init__(self, heads=4, d=24):
        super().__init__()
        self.heads, self.d = heads, d
        self.pool = torch.nn.Conv2d(d, d, 3, padding=1, groups=d, bias=False)
        self.norm = torch.nn.LayerNorm(d)
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x):  # x: (1, heads, 64, d)
        t = x.reshape(self.heads, 8, 8, self.d).permute(0, 3, 1, 2)
        t = self.pool(t).reshape(1, self.heads, self.d, 64).transpose(2, 3)
        return self.proj(self.norm(t))


class PatchUnfold(torch.nn.Module):
    """MobileViT's unfold to patches and fold back: views of shape (B*C*nh, ph, nw, pw), batch 16*4 = 64."""

    def __init__(self, c=16):
        super().__init__()
        self.c = c
        self.inp, self.out = torch.nn.Conv2d(3, c, 1), torch.nn.Conv2d(c, c, 1)
        self.mix = torch.nn.Linear(c, c)

    def forward(self, x):  # x: (1, 3, 8, 8); patches 2x2, 4x4 of them
        b, c = 1, self.c
        t = self.inp(x).reshape(b * c * 4, 2, 4, 2).transpose(1, 2)
        t = t.reshape(b, c, 16, 4).transpose(1, 3).reshape(b * 4, 16, c)
        t = self.mix(t)
        t = t.contiguous().view(b, 4, 16, c).transpose(1, 3).reshape(b * c * 4, 4, 2, 2)
        t = t.transpose(1, 2).reshape(b, c, 8, 8)
        return self.out(t)


def _over_batch(gm, limit=16):
    from attn2conv.graph import compute_nodes, shape

    return [(n.name, shape(n)) for n in compute_nodes(gm) if shape(n) and len(shape(n)) >= 3 and shape(n)[0] > limit]


@pytest.mark.parametrize("net,x", [(PooledHeads(), torch.randn(1, 4, 64, 24)),
                                   (PatchUnfold(), torch.randn(1, 3, 8, 8))], ids=["mvit_pooled", "mobilevit_unfold"])
def test_composed_chains_keep_the_batch_axis_within_the_limit(net, x, tmp_path):
    from attn2conv.coverage import run_target

    net.eval()
    with torch.no_grad():
        ref = net(x)
    tr = run_target(net, (x,), "trt-safe", tmp_path / "m.onnx")
    assert tr.certified, tr.reason  # before: A2C-SAFE-TENSOR-BATCH on a Transpose / Reshape
    assert tr.rel_error <= 1e-5 and tr.parity <= 1e-5
    result = attn2conv.convert(net, "trt-safe", x)
    assert _over_batch(result.module) == []
    assert rel_error(result.module(x), ref) <= 1e-5
    # without a batch limit (trt) the shortest forms are kept, whatever their axis 0
    assert attn2conv.convert(net, "trt", x).report.rel_error <= 1e-5


def test_batch_limited_forms_agree_with_index_tensors():
    import numpy as np

    from attn2conv.passes.layout_cleanup import LayoutMap, _intermediates, express, index_map

    rng = np.random.default_rng(1)
    lead = (4, 3)
    found = 0
    for _ in range(300):
        xs = tuple(int(d) for d in rng.choice([2, 3, 4, 6], size=int(rng.integers(2, 5))))
        chain, ys = _random_chain(rng, xs)
        m, idx = LayoutMap(chain, xs), index_map(chain, xs)
        form = express(xs, ys, m, lead)
        assert form == express(xs, ys, idx, lead)  # strided and index-tensor paths agree
        if form:
            found += 1
            assert all(len(s) < 3 or s[0] <= 4 for s in _intermediates(xs, form))
            t = torch.arange(idx.numel()).reshape(xs)
            for op, val in form:
                t = t.reshape(val) if op == "reshape" else t.permute(val)
            assert torch.equal(t, idx)
    assert found > 100


def test_gathers_stay_on_the_channel_axis_where_the_target_concatenates_only_there():
    """DLA concatenates along the channel axis only: concat_channel_axis puts Swin's rolls there, and the gather step
    must not move one back off it when it commutes the roll with a permute."""
    from attn2conv.legality import concat_axis_legal, concat_axis_rule
    from attn2conv.targets import resolve_target

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=[2, 2], num_heads=[2, 4],
                              embed_dim=48, img_size=56).eval()
    x = torch.randn(1, 3, 56, 56)
    result = attn2conv.convert(model, "dla", x)
    rule = concat_axis_rule(resolve_target("dla"))
    cats = [n for n in result.module.graph.nodes if n.target is torch.ops.aten.cat.default]
    assert cats and all(concat_axis_legal(rule, n.args[1], len(n.meta["val"].shape)) for n in cats)
    assert not [op for op in result.report.illegal_ops if op["severity"] == "error"]
