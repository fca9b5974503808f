"""attention_to_conv (exact): multi-head attention cores become broadcast multiplies and constant-weight convolutions.

Matches (attn2conv/attention_match.py): `scaled_dot_product_attention`, and `softmax(scale * q @ k^T + bias) @ v` in
any arrangement of reshapes/permutes (also `v @ softmax(...)^T` with channels-first v (L, dv, M), EfficientViT-MSRA:
its output (L, dv, N) is O below without the final permute), with scalar scales, additive biases (relative-position tables, shifted-window
masks, HF masks), `masked_fill(-inf)`, class attention (N = 1) and reduced keys (M != N).

Maths. With q (L, N, d), k (L, M, d), v (L, M, dv), the leading dims L = (B, g...) become a batch axis B (L[0]) and
g channel groups (one per head/window, g = prod(L[1:])). Heads stay in channel groups so the batch axis keeps the
model's batch (TensorRT safety: batch <= 16):

    Q  (B, g*d, 1, N)   = q permuted to channels-first
    K  (B, g*d, M, 1)   = k^T reshaped (no data movement when the model already wrote k.transpose(-2, -1))
    S  (B, g, M, N)     = Conv1x1_groups=g( Q * K , weight = scale * ones(g, d, 1, 1) )     # q.k, scale folded in
    S += bias           (constant bias folded at compile time into one (1|B, g, M, N) buffer)
    A  = softmax over axis 2 (keys)                               [where the target allows Softmax]
    A' (B, g*M, 1, N)   = A reshaped (free)
    V  (B, g*M, dv, 1)  = v reshaped (free)
    O  (B, g, dv, N)    = Conv1x1_groups=g( A' * V , weight = ones(g, M, 1, 1) )              # sum over keys

Both reductions are 1x1 grouped convolutions over channels with constant weights: legal on DLA (kernel and pool
windows are small there, so no reduction runs over a spatial axis) and in the conservative TRT safety scope.

Where the target does not allow Softmax (trt-safe), it is decomposed exactly, with the normalisation moved after
the sum over keys (dividing O costs g*dv*N instead of g*M*N):

    mx = MaxPool(kernel (M, 1))(S)                       (B, g, 1, N)   max over keys
    z  = S - mx  <= 0                                     (computed as S + (-1)*mx, and -z as (-1)*z: Mul/Add only)
    E  = Sigmoid(z) / Sigmoid(-z)  = e^z                  exact identity; for z <= 0 the denominator is in [1/2, 1]
                                                          (no 0/0), and -inf biases give 0/1 = 0
    den = Conv1x1_groups=g(E', ones(g, M, 1, 1))          (B, g, 1, N)   sum over keys
    O   = Conv1x1_groups=g(E' * V, ones(g, M, 1, 1)) / den

Talking heads (CaiT): a Linear(h, h) over the head axis before and/or after the softmax (permute -> Linear ->
permute, or the 1x1 convolution over head channels that linear_to_conv makes of it) mixes heads per (query, key)
position. The chains around the softmax are then re-run verbatim on the new tensors (moved from (B, h, M, N) to the
model's (B, h, N, M) layout and back; layout_cleanup cancels most of those permutes), with the scale taken from the
chain (dot weight = ones). With a mix after the softmax, the decomposition normalises before it,
    A = E' / den  (B, h, M, N);  A' = mix(A);  O = Conv1x1_groups=h(A'' * V, ones)
since the division by each head's key sum does not commute with mixing heads. These cores are never chunked (a head
chunk cannot be mixed with the others; query chunks would need the chains sliced), so the budget is not enforced.

Memory and speed (ONNX Runtime CPU, measured on a 2-core AMD EPYC, 2 MiB L2 per core, 32 MiB L3): the broadcast
products Q*K and E'*V hold B*g*max(d, dv)*M*N elements (DeiT-S: 14.9M = 57 MiB per product per layer) and are the
whole cost: ORT's broadcast Mul writes ~0.15 ns/element on one thread when its output stays in cache and ~0.2-0.5 ns
when it does not, and the grouped conv reading it back costs 0.06 ns/element in cache and 2-3x that from DRAM (per-op
profile, one DeiT-S core on one thread: Mul 5.9 ms + Conv 4.2 ms unchunked, 4.3 + 1.9 ms in one-head chunks; softmax
pieces, Split, Concat and Add together < 1 ms). So every core is computed in static chunks whose product holds at
most the option `max_broadcast_elems` (ctx.option("attention_to_conv", "max_broadcast_elems"), default
DEFAULT_MAX_BROADCAST: 1M elements = 4 MiB fp32, so a chunk and the conv reading it stay in L2/L3): first whole
images of the batch axis (Swin windows), then heads (channel slices), then keys (for Q*K the key axis of K; for E'*V
the key channels, one head at a time, whose partial sums are added). Queries are not cut: N is the innermost,
contiguous axis of both products, the run ORT's broadcast Mul works along (query chunks shortened it and measured
1.4x slower). Except on the values side when one head exceeds the budget and N is long (SRA on large maps): there
a chunk of few keys sums into an output as large as itself, so E'*V takes all keys of one or two heads for runs of
>= MIN_QUERY_RUN queries instead (Swin-T SRA at 1024 px: 2 heads x 64 keys x 32 x 256 queries). Phase 1 computes S chunk by chunk and concatenates it (S is d times smaller than its products); the
softmax (or its decomposition) runs once on the whole S; phase 2 splits E' and V and sums chunk by chunk. The peak
(largest product) is reported in the pass notes. Measured on DeiT-S (attention_to_conv only, one thread, CPU time):
1.92x the original at budget 4M (one head per chunk), 1.87x at 1M (one head x 66 keys), 1.88x at 512K, 2.8x at 256K
(per-node overhead of 10 key chunks per head), 2.46x unchunked; Swin-T: 1.72x unchunked, 1.64x at 4M, 1.58x at 1M.

A one-head chunk is a group-1 conv; ORT converts group-1 convs whose input channels are a multiple of its NCHWc
block (d = 32, 64) to its blocked layout and first copies the whole product into it (ReorderInput: 6-7 ms for a
DeiT-S head whose product takes 0.4 ms). Such sums are done as two half-groups (groups=2, two outputs per head), and
the halves of all heads are merged by one grouped conv of ones on S (or an Add for a single head); grouped convs with
one output per group are never reordered. Where the keys are cut (a head exceeds the budget), Q*K instead takes two
heads per chunk with half the keys (same product size): one output per head, no halves, no merge conv, and half
the Concat volume (DeiT-S at 1M: per pair of heads, 5 chunks of 40 keys instead of 2 x 3 chunks of 66 keys).

Batch axis: L[0] (B for ViTs; B*windows for Swin, whose window partition already puts windows on the batch axis).

Alternative layout (option layout="pooled", used only where the profile allows the pool windows and the batch axis):
heads on the batch axis, q.k summed by AveragePool(1, d) over the contiguous last axis, the key sum by
AveragePool(M, 1). It needs no channel groups but measured 20x slower on ONNX Runtime CPU (its AveragePool is slow
for such windows), so the grouped-conv layout is the default everywhere.

Accuracy of the sigmoid ratio: in float32 PyTorch, sigmoid(z)/sigmoid(-z) matches exp(z) to 2.2e-7 relative on
[-87, 0]. ONNX Runtime's Sigmoid is accurate to ~1.4e-7 *absolute* only (relative error grows for z < -10), which
after the division by the key sum (>= 1, the max term is exactly 1) leaves probabilities with <= 1.4e-7 absolute
error: whole-model relative errors stay around 1e-6.

Ops introduced (ATen -> ONNX):
  every target: aten.mul (Mul), aten.conv2d (Conv, constant weights), aten.reshape (Reshape), aten.permute
  (Transpose), aten.add (Add: bias, half sums of one head, partial sums over key chunks); chunking adds
  aten.split_with_sizes (Split) and aten.cat (Concat) (the pooled layout: aten.slice, Slice); a
  float mask computed in the graph (not folded) adds aten.expand (Expand) when it needs broadcasting. All rank <= 4.
  Softmax allowed (dla): aten.softmax (Softmax, axis 2 of a 4-D tensor).
  Softmax not allowed (trt-safe): aten.max_pool2d (MaxPool), aten.sigmoid (Sigmoid), aten.div (Div).
  On trt-safe-8.6, MaxPool, Div, Split, Slice and Concat are "undocumented" warnings; MatMul, Einsum and Softmax
  are gone. No formulation uses a convolution whose weights are computed in the graph (q or k as a kernel would make
  a 1x1 conv a matrix product, far cheaper on a CPU), because no profile here documents such weights as legal.
Targets whose profile accepts MatMul of two activations (trt) are left alone: the pass does nothing there.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from attn2conv.attention_match import (AttentionMatch, constant_value, eliminate_dead_code, find_attention, replay_chain)
from attn2conv.graph import Builder, aten, replace_uses, shape, where
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register

# Elements of one broadcast product (Q*K or E'*V) computed in one op: 1M floats = 4 MiB, so that a chunk and the conv
# reading it stay in cache (module docstring: measured 1.87x at 1M vs 1.92x at 4M and 2.46x unchunked for DeiT-S).
DEFAULT_MAX_BROADCAST = 1024 * 1024


@register
class AttentionToConv(GraphPass):
    id = "attention_to_conv"
    exact = True
    removes = ("aten.scaled_dot_product_attention", "aten.matmul", "aten.bmm", "aten.softmax", "aten._softmax")
    introduces = ("aten.mul", "aten.conv2d", "aten.reshape", "aten.permute", "aten.add", "aten.slice", "aten.cat",
                  "aten.split_with_sizes",
                  "aten.softmax", "aten.max_pool2d", "aten.sigmoid", "aten.div")
    summary = "attention core -> broadcast Mul + constant grouped 1x1 Conv (softmax kept or decomposed)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        if _matmul_of_activations_allowed(ctx.profile):
            result.notes.append(f"{ctx.profile.id} accepts MatMul of two activations: attention left as it is")
            return result
        budget = int(ctx.option(self.id, "max_broadcast_elems", DEFAULT_MAX_BROADCAST))
        keep_softmax = ctx.allows("Softmax")
        limits = _TargetLimits(ctx.profile)
        layout = ctx.option(self.id, "layout", "grouped")
        matches, misses = find_attention(gm)
        result.misses += [f"{where(node)}: {reason}" for node, reason in misses]
        peak, layouts = 0, set()
        for match in matches:
            outcome = _rewrite(gm, match, budget, keep_softmax, limits, layout)
            if isinstance(outcome, str):
                result.misses.append(f"{where(match.anchor)}: {outcome}")
                continue
            result.rewrites += 1
            peak = max(peak, outcome.peak)
            layouts.add(outcome.layout)
            if outcome.chunks > 1:
                cut = f"{outcome.batch_chunk} images x " if outcome.batch_chunk else ""
                result.notes.append(f"{where(match.anchor)}: {outcome.chunks} chunks "
                                    f"({cut}{outcome.head_chunk} heads x {outcome.key_chunk} keys)"
                                    + (f"; values in {outcome.query_runs} query runs" if outcome.query_runs else ""))
        result.changed = result.rewrites > 0
        if result.changed:
            eliminate_dead_code(gm)
            result.notes.append(f"layout {'/'.join(sorted(layouts))}; "
                                f"softmax {'kept' if keep_softmax else 'decomposed (MaxPool, Sigmoid ratio, Div)'}; "
                                f"peak broadcast tensor {peak} elements ({peak * 4 / 2**20:.1f} MiB fp32), "
                                f"budget {budget}")
        return result


def _matmul_of_activations_allowed(profile) -> bool:
    """True for targets that accept MatMul whose second input is computed (plain TensorRT), not for DLA/safety."""
    if profile is None or not profile.op_allowed("MatMul"):
        return False
    for rule in profile.rules:
        if rule.check == "input_const" and "MatMul" in (rule.params.get("inputs") or {}):
            return False
    return True


class _TargetLimits:
    """What the profile says about the ops the pooled layout needs: AveragePool/MaxPool allowed at all, their largest
    window, and the largest batch axis (TensorRT safety: 16)."""

    def __init__(self, profile):
        self.pool_ok = profile is None or (profile.op_allowed("AveragePool") or profile.op_rule("AveragePool")
                                           .severity != "error")
        self.max_window, self.max_batch = None, None
        for rule in profile.rules if profile is not None else ():
            if rule.check == "attr_range" and rule.params.get("attr") == "kernel_shape" and \
                    "AveragePool" in rule.params.get("ops", ()):
                self.max_window = min(self.max_window or 1 << 30, int(rule.params["max"]))
            if rule.check == "tensor_dims_max" and str(rule.params.get("axes")) == "0":
                self.max_batch = min(self.max_batch or 1 << 30, int(rule.params["max"]))

    def pooled_layout_fits(self, batch_axis: int, window: int) -> bool:
        return self.pool_ok and (self.max_window is None or window <= self.max_window) and \
            (self.max_batch is None or batch_axis <= self.max_batch)


class _Outcome:
    def __init__(self, peak: int, chunks: int, head_chunk: int, key_chunk: int, layout: str, batch_chunk: int = 0,
                 query_runs: int = 0):
        self.peak, self.chunks, self.head_chunk, self.key_chunk = peak, chunks, head_chunk, key_chunk
        self.layout, self.batch_chunk, self.query_runs = layout, batch_chunk, query_runs


def _rewrite(gm: fx.GraphModule, match: AttentionMatch, budget: int, keep_softmax: bool,
             limits: "_TargetLimits", layout: str) -> _Outcome | str:
    if match.replay:
        return _rewrite_replayed(gm, match, keep_softmax)
    if layout == "pooled" and limits.pooled_layout_fits(match.groups, max(match.d, match.m)):
        return _rewrite_pooled(gm, match, budget, keep_softmax)
    return _rewrite_grouped(gm, match, budget, keep_softmax)


def _rewrite_grouped(gm: fx.GraphModule, match: AttentionMatch, budget: int, keep_softmax: bool) -> _Outcome | str:
    lead = match.lead
    batch = lead[0] if lead else 1
    groups = match.groups // batch
    n, m, d, dv = match.n, match.m, match.d, match.dv
    out_shape = shape(match.output)
    if out_shape is None or math.prod(out_shape) != batch * groups * n * dv:
        return f"attention output shape {out_shape} does not hold {batch}x{groups}x{n}x{dv} values"
    b = Builder(gm, match.output)
    bias = _bias(gm, b, match, batch, groups)
    if isinstance(bias, str):
        return bias

    q, k, v = _channels_first_qkv(b, match, batch, groups)  # see the module docstring
    plan = _Chunks.plan(batch, groups, m, n, max(d, dv), budget)
    by_queries = _query_sizes(plan, dv, n, budget)
    weights = _Weights(b, match.scale, d, m)
    scores_plan = plan.for_scores(d, n, budget)
    s = _scores(b, weights, scores_plan, q, k, d)  # (B, g, M, N)
    if bias is not None:
        s = b.call(aten.add.Tensor, s, bias)
    if keep_softmax:
        e = b.call(aten.reshape.default, b.call(aten.softmax.int, s, 2), [batch, groups * m, 1, n])
        o = _weighted_values(b, weights, plan, e, v, by_queries)
    else:
        e = b.call(aten.reshape.default, _exp_shifted(b, s, m), [batch, groups * m, 1, n])
        den = _channel_sum(b, e, groups, m, weights.keysum(groups, m))  # (B, g, 1, N)
        o = b.call(aten.div.Tensor, _weighted_values(b, weights, plan, e, v, by_queries), den)
    o = _output_layout(b, match, o, out_shape)
    replace_uses(match.output, o)
    for dead in dict.fromkeys((match.output, match.anchor)):  # sdpa counts as impure for dead-code elimination: erase it here
        if not dead.users:
            gm.graph.erase_node(dead)
    values_peak = by_queries[0] * m * dv * max(by_queries[1]) if by_queries else plan.peak(dv, n)
    return _Outcome(max(scores_plan.peak(d, n), values_peak), plan.count, plan.heads, plan.keys, "grouped-conv",
                    batch_chunk=plan.images, query_runs=len(by_queries[1]) if by_queries else 0)


class _Chunks:
    """How one core is cut so that each broadcast product holds at most `budget` elements: first whole images of the
    batch axis, then heads (channel groups), then keys. Queries are not cut here: they are the innermost axis of both
    products, the contiguous run ONNX Runtime's broadcast Mul works along (cutting it shortens every run); the
    values side may cut long ones instead of keys (_query_sizes)."""

    def __init__(self, batch: int, groups: int, m: int, images: int, heads: int, keys: int):
        self.batch, self.groups, self.m = batch, groups, m
        self.images, self.heads, self.keys = images, heads, keys

    @classmethod
    def plan(cls, batch: int, groups: int, m: int, n: int, depth: int, budget: int) -> "_Chunks":
        per_head = depth * m * n  # one image, one head
        if batch * groups * per_head <= budget:
            return cls(batch, groups, m, batch, groups, m)
        for bc in _divisors_desc(batch):
            if bc * groups * per_head <= budget:
                return cls(batch, groups, m, bc, groups, m)
        for gc in _divisors_desc(groups):
            if gc * per_head <= budget:
                return cls(batch, groups, m, 1, gc, m)
        return cls(batch, groups, m, 1, 1, max(1, min(m, budget // (depth * n))))

    def for_scores(self, d: int, n: int, budget: int) -> "_Chunks":
        """The cut for Q*K: this one, except that one head of d channels cut into key chunks becomes two heads per
        chunk with half as many keys (same product size) where ONNX Runtime would reorder a one-head sum (see
        _partial_sums): a grouped conv with one output per head sums them, no half sums, no merge."""
        if self.heads != 1 or len(self.key_sizes()) == 1 or self.groups % 2 or not _reordered_by_ort(1, d):
            return self
        return _Chunks(self.batch, self.groups, self.m, self.images, 2, max(1, min(self.m, budget // (2 * d * n))))

    @property
    def count(self) -> int:
        return len(self.image_sizes()) * len(self.head_sizes()) * len(self.key_sizes())

    def peak(self, depth: int, n: int) -> int:
        return self.images * self.heads * depth * max(self.key_sizes()) * n

    def image_sizes(self) -> list[int]:
        return _even_sizes(self.batch, self.images)

    def head_sizes(self) -> list[int]:
        return _even_sizes(self.groups, self.heads)

    def key_sizes(self) -> list[int]:
        return _even_sizes(self.m, self.keys)


def _divisors_desc(x: int) -> list[int]:
    return [c for c in range(x - 1, 0, -1) if x % c == 0]


def _even_sizes(total: int, at_most: int) -> list[int]:
    """`total` cut into the fewest pieces of at most `at_most`, as equal as possible."""
    count = -(-total // at_most)
    return [total // count + (i < total % count) for i in range(count)]


def _scores(b: Builder, w: "_Weights", plan: _Chunks, q, k, d: int) -> fx.Node:
    """q.k^T * scale in (B, g, M, N): Q (B, g*d, 1, N) * K (B, g*d, M, 1) summed over each head's d channels, chunk
    by chunk (the chunks are concatenated: S is d times smaller than the products)."""
    image_rows, parts = [], 1
    for qb, kb in zip(_pieces(b, q, 0, plan.image_sizes()), _pieces(b, k, 0, plan.image_sizes())):
        heads = plan.head_sizes()
        head_rows = []
        for gc, qh, kh in zip(heads, _pieces(b, qb, 1, [g * d for g in heads]), _pieces(b, kb, 1, [g * d for g in heads])):
            sums = [_partial_sums(b, b.call(aten.mul.Tensor, qh, kc), gc, d, w.dot(gc))
                    for kc in _pieces(b, kh, 2, plan.key_sizes())]
            parts = sums[0][1]
            head_rows.append(_cat(b, [s for s, _ in sums], 2))
        image_rows.append(_cat(b, head_rows, 1))
    return _merge_partial_sums(b, w, _cat(b, image_rows, 0), plan.groups, parts)


def _weighted_values(b: Builder, w: "_Weights", plan: _Chunks, e, v, by_queries=None) -> fx.Node:
    """sum over keys of E' (B, g*M, 1, N) * V (B, g*M, dv, 1) per head -> (B, g, dv, N), chunk by chunk. Where one
    head exceeds the budget, the queries are cut if the runs stay long (_query_sizes), else the keys (one head at a
    time, partial sums added up)."""
    m = plan.m
    keys = plan.key_sizes()
    heads = [by_queries[0]] * (plan.groups // by_queries[0]) if by_queries else plan.head_sizes()
    channel_sizes = [x for gc in heads for x in ([gc * m] if by_queries or len(keys) == 1 else keys)]
    image_rows, parts = [], 1
    for eb, vb in zip(_pieces(b, e, 0, plan.image_sizes()), _pieces(b, v, 0, plan.image_sizes())):
        ec, vc = _pieces(b, eb, 1, channel_sizes), _pieces(b, vb, 1, channel_sizes)
        head_rows, at = [], 0
        for gc in heads:
            if by_queries:  # all keys of gc heads for a run of queries; the runs concatenated back
                runs = []
                for eq in _pieces(b, ec[at], 3, by_queries[1]):
                    y, parts = _partial_sums(b, b.call(aten.mul.Tensor, eq, vc[at]), gc, m, w.keysum(gc, m))
                    runs.append(y)
                total = _cat(b, runs, 3)
                at += 1
            elif len(keys) == 1:
                total, parts = _partial_sums(b, b.call(aten.mul.Tensor, ec[at], vc[at]), gc, m, w.keysum(gc, m))
                at += 1
            else:  # one head, its keys in chunks: partial sums over the chunks, added up
                total = None
                for mc in keys:
                    part = _channel_sum(b, b.call(aten.mul.Tensor, ec[at], vc[at]), 1, mc, w.keysum(1, mc))
                    total = part if total is None else b.call(aten.add.Tensor, total, part)
                    at += 1
            head_rows.append(total)
        image_rows.append(_cat(b, head_rows, 1))
    return _merge_partial_sums(b, w, _cat(b, image_rows, 0), plan.groups, parts)


# Shortest run of queries a values chunk may be cut to. Where one head's E'*V exceeds the budget, cutting its keys
# leaves chunks of a few keys at large N (Swin-T's SRA at 1024 px: N = 16384, dv = 32, budget 1M -> 2 keys), each
# summed by a conv whose output is as large as its input, and partial sums added up: measured 1.4 s of ONNX Runtime
# time per image there. Cutting the queries instead keeps every key of a head in one chunk (the conv sums M channels
# into one) and runs of >= 256 contiguous floats for the broadcast Mul (DeiT-S's 197 queries cut to ~50 were 1.4x
# slower: too short).
MIN_QUERY_RUN = 256


def _query_sizes(plan: _Chunks, dv: int, n: int, budget: int) -> tuple[int, list[int]] | None:
    """(heads per chunk, query run sizes) for the values side when one head exceeds the budget, or None. Two heads
    per chunk where they fit (a two-group conv with one output per head sums them: no half sums), else one."""
    if len(plan.key_sizes()) == 1 or plan.images != 1:
        return None
    for hc in (2, 1):
        run = budget // (hc * plan.m * dv)
        if plan.groups % hc == 0 and run >= MIN_QUERY_RUN:
            return hc, _even_sizes(n, run)
    return None


# ONNX Runtime (CPU) runs a group-1 Conv whose input channels are a multiple of its NCHWc block (8 or 16 floats) in
# the blocked layout and first copies the whole input into it (ReorderInput): for a one-head product that copy costs
# more than the sum (measured: 6-7 ms for a DeiT-S head, whose product takes 0.4 ms to compute). Grouped convs with
# one output per group are never converted, so one such group is summed as two half-groups (two outputs) instead.
_NCHWC_BLOCK = 8


def _reordered_by_ort(groups: int, per_group: int) -> bool:
    """Group-1 convs ORT converts: input channels a multiple of the block, or fewer than the block (8 or 16 by CPU),
    which it reads in NCHW and writes with the outputs padded to the block (a one-output sum of 2 channels then
    writes 16: measured 7 ms per Swin-T SRA key chunk at 1024 px). Odd counts cannot be halved and are left."""
    return groups == 1 and per_group % 2 == 0 and (per_group < 2 * _NCHWC_BLOCK or per_group % _NCHWC_BLOCK == 0)


def _partial_sums(b: Builder, x, groups: int, per_group: int, weight: fx.Node) -> tuple[fx.Node, int]:
    """(y, parts): the grouped 1x1 conv summing each group's `per_group` channels (times the weight's constant), with
    `parts` = 2 outputs per group (half sums) where one full group would be reordered by ONNX Runtime, else 1."""
    conv = aten.conv2d.default
    if not _reordered_by_ort(groups, per_group):
        return b.call(conv, x, weight, None, [1, 1], [0, 0], [1, 1], groups), 1
    tensor = weight.meta["val"]
    halves = b.constant(tensor.reshape(2, per_group // 2, 1, 1).clone(), "attn_half_sum_weight")
    return b.call(conv, x, halves, None, [1, 1], [0, 0], [1, 1], 2), 2


def _merge_partial_sums(b: Builder, w: "_Weights", y, groups: int, parts: int) -> fx.Node:
    """(B, groups*parts, H, W) half sums -> (B, groups, H, W): one grouped conv of ones over all heads (or, for a
    single group, the two halves added)."""
    if parts == 1:
        return y
    if groups == 1:
        first, second = _pieces(b, y, 1, [1, 1])
        return b.call(aten.add.Tensor, first, second)
    return b.call(aten.conv2d.default, y, w.ones(groups, parts), None, [1, 1], [0, 0], [1, 1], groups)


def _channel_sum(b: Builder, x, groups: int, per_group: int, weight: fx.Node) -> fx.Node:
    """Grouped 1x1 conv summing each group's `per_group` channels (times the weight's constant): (B, groups, H, W)."""
    y, parts = _partial_sums(b, x, groups, per_group, weight)
    if parts == 1:
        return y
    first, second = _pieces(b, y, 1, [1, 1])
    return b.call(aten.add.Tensor, first, second)


def _pieces(b: Builder, x, dim: int, sizes: list[int]) -> list:
    """x cut along `dim` into `sizes` (one Split; x itself when there is one piece)."""
    if len(sizes) == 1:
        return [x]
    parts = b.call(aten.split_with_sizes.default, x, list(sizes), dim)
    return [b.call(operator.getitem, parts, i) for i in range(len(sizes))]


def _rewrite_pooled(gm: fx.GraphModule, match: AttentionMatch, budget: int, keep_softmax: bool) -> _Outcome | str:
    """Heads on the batch axis, reductions by AveragePool over a spatial axis (contiguous for q.k):

        P  (G, N, M, d)  = q (G, N, 1, d) * k (G, 1, M, d)           G = prod(L); q pre-scaled by scale * d
        S  (G, N, M, 1)  = AvgPool(1, d)(P)                          = scale * q.k
        A  = softmax over M (on the free view (G, 1, N, M), last axis)
        P2 (G, N, M, dv) = A (G, N, M, 1) * v (G, 1, M, dv)
        O  (G, N, 1, dv) = AvgPool(M, 1)(P2) * M                     (decomposed softmax: the M cancels in the ratio)
    """
    g, n, m, d, dv = match.groups, match.n, match.m, match.d, match.dv
    out_shape = shape(match.output)
    if out_shape is None or math.prod(out_shape) != g * n * dv:
        return f"attention output shape {out_shape} does not hold {g}x{n}x{dv} values"
    b = Builder(gm, match.output)
    bias = _bias(gm, b, match, 1, g)  # (1, g, M, N) keys-first
    if isinstance(bias, str):
        return bias
    if bias is not None:  # to (G, N, M, 1): queries on channels, keys on H
        bias = b.call(aten.reshape.default, b.call(aten.permute.default, bias, [1, 3, 2, 0]), [g, n, m, 1])
    q = b.call(aten.reshape.default, match.q, [g, n, 1, d])
    q = b.call(aten.mul.Tensor, q, float(match.scale * d))
    if match.k is not None:
        k = b.call(aten.reshape.default, match.k, [g, 1, m, d])
    else:
        k = b.call(aten.reshape.default, b.call(aten.permute.default, b.call(aten.reshape.default, match.k_t,
                                                                              [g, d, m]), [0, 2, 1]), [g, 1, m, d])
    if match.v_transposed:  # (L..., dv, M)
        v = b.call(aten.permute.default, b.call(aten.reshape.default, match.v, [g, dv, m]), [0, 2, 1])
    v = b.call(aten.reshape.default, v if match.v_transposed else match.v, [g, 1, m, dv])
    query_chunk = n if g * n * m * max(d, dv) <= budget else max(1, budget // (g * m * max(d, dv)))
    outputs = []
    for n0 in range(0, n, query_chunk):
        nc = min(query_chunk, n - n0)
        qc = _slice(b, q, 1, n0, n0 + nc, n)
        bc = _slice(b, bias, 1, n0, n0 + nc, n)
        s = b.call(aten.avg_pool2d.default, b.call(aten.mul.Tensor, qc, k), [1, d], [1, d])  # (G, nc, M, 1)
        if bc is not None:
            s = b.call(aten.add.Tensor, s, bc)
        row = b.call(aten.reshape.default, s, [g, 1, nc, m])  # keys on the last axis
        if keep_softmax:
            a = b.call(aten.reshape.default, b.call(aten.softmax.int, row, 3), [g, nc, m, 1])
            o = b.call(aten.avg_pool2d.default, b.call(aten.mul.Tensor, a, v), [m, 1], [m, 1])  # (G, nc, 1, dv)
            outputs.append(b.call(aten.mul.Tensor, o, float(m)))
            continue
        mx = b.call(aten.max_pool2d.default, row, [1, m], [1, m])  # (G, 1, nc, 1)
        z = b.call(aten.add.Tensor, row, b.call(aten.mul.Tensor, mx, -1.0))
        neg_z = b.call(aten.add.Tensor, b.call(aten.mul.Tensor, row, -1.0), mx)
        e = b.call(aten.div.Tensor, b.call(aten.sigmoid.default, z), b.call(aten.sigmoid.default, neg_z))
        den = b.call(aten.reshape.default, b.call(aten.avg_pool2d.default, e, [1, m], [1, m]), [g, nc, 1, 1])
        e = b.call(aten.reshape.default, e, [g, nc, m, 1])
        o = b.call(aten.avg_pool2d.default, b.call(aten.mul.Tensor, e, v), [m, 1], [m, 1])  # (G, nc, 1, dv)
        outputs.append(b.call(aten.div.Tensor, o, den))
    o = _cat(b, outputs, 1)  # (G, N, 1, dv)
    if match.v_transposed:
        o = b.call(aten.permute.default, b.call(aten.reshape.default, o, [g, n, dv]), [0, 2, 1])
    o = b.call(aten.reshape.default, o, list(out_shape))
    replace_uses(match.output, o)
    for dead in dict.fromkeys((match.output, match.anchor)):
        if not dead.users:
            gm.graph.erase_node(dead)
    return _Outcome(g * query_chunk * m * max(d, dv), math.ceil(n / query_chunk), g, query_chunk, "pooled")


def _rewrite_replayed(gm: fx.GraphModule, match: AttentionMatch, keep_softmax: bool) -> _Outcome | str:
    """Talking heads (CaiT): the chains around the softmax mix heads, so they are re-run verbatim (see the module
    docstring); no chunking (head chunks cannot be mixed, and the cores these models have fit the budget)."""
    lead = match.lead
    batch = lead[0] if lead else 1
    groups = match.groups // batch
    n, m, d, dv = match.n, match.m, match.d, match.dv
    xs = shape(match.anchor.args[0])
    out_shape = shape(match.output)
    if math.prod(xs[:-2]) % batch:
        return f"softmax input {xs} does not keep the batch {batch} in front"
    mixed = math.prod(xs[:-2]) // batch  # heads between the two mixes
    if out_shape is None or math.prod(out_shape) != batch * groups * n * dv:
        return f"attention output shape {out_shape} does not hold {batch}x{groups}x{n}x{dv} values"
    if not match.post and mixed != groups:
        return f"{mixed} heads reach the matmul with v, which has {groups}"
    b = Builder(gm, match.output)
    q, k, v = _channels_first_qkv(b, match, batch, groups)
    weights = _Weights(b, 1.0, d, m)  # scalar scales are part of the re-run chain
    s = _channel_sum(b, b.call(aten.mul.Tensor, q, k), groups, d, weights.dot(groups))
    s = _natural(b, s, shape(match.scores))
    s = _replay(gm, b, match.scores, match.chain, s)
    s = _keys_first(b, s, batch, mixed, n, m)  # (B, h', M, N)
    if keep_softmax:
        a = b.call(aten.softmax.int, s, 2)
    else:
        e = _exp_shifted(b, s, m)
        den = _channel_sum(b, b.call(aten.reshape.default, e, [batch, mixed * m, 1, n]), mixed, m,
                           weights.keysum(mixed, m))
        if not match.post:  # normalise after the sum over keys (cheaper), as in _rewrite_grouped
            e = b.call(aten.reshape.default, e, [batch, groups * m, 1, n])
            o = _channel_sum(b, b.call(aten.mul.Tensor, e, v), groups, m, weights.keysum(groups, m))
            return _finish(gm, b, match, b.call(aten.div.Tensor, o, den), out_shape, batch * groups * d * m * n)
        a = b.call(aten.div.Tensor, e, den)
    if match.post:
        a = _natural(b, a, xs)
        a = _replay(gm, b, match.anchor, match.post, a)
        a = _keys_first(b, a, batch, groups, n, m)
    a = b.call(aten.reshape.default, a, [batch, groups * m, 1, n])
    o = _channel_sum(b, b.call(aten.mul.Tensor, a, v), groups, m, weights.keysum(groups, m))
    return _finish(gm, b, match, o, out_shape, batch * groups * max(d, dv) * m * n)


def _channels_first_qkv(b: Builder, match: AttentionMatch, batch: int, groups: int):
    n, m, d, dv = match.n, match.m, match.d, match.dv
    q = b.call(aten.reshape.default, match.q, [batch, groups, n, d])
    q = b.call(aten.reshape.default, b.call(aten.permute.default, q, [0, 1, 3, 2]), [batch, groups * d, 1, n])
    if match.k_t is not None:
        k = b.call(aten.reshape.default, match.k_t, [batch, groups * d, m, 1])
    else:
        k = b.call(aten.reshape.default, match.k, [batch, groups, m, d])
        k = b.call(aten.reshape.default, b.call(aten.permute.default, k, [0, 1, 3, 2]), [batch, groups * d, m, 1])
    if match.v_transposed:  # (L..., dv, M)
        v = b.call(aten.permute.default, b.call(aten.reshape.default, match.v, [batch, groups, dv, m]), [0, 1, 3, 2])
    v = b.call(aten.reshape.default, v if match.v_transposed else match.v, [batch, groups * m, dv, 1])
    return q, k, v


def _natural(b: Builder, x, natural_shape) -> fx.Node:
    """(B, g, M, N) keys-first -> the model's (L..., N, M) layout."""
    return b.call(aten.reshape.default, b.call(aten.permute.default, x, [0, 1, 3, 2]), list(natural_shape))


def _keys_first(b: Builder, x, batch: int, groups: int, n: int, m: int) -> fx.Node:
    """The model's (L..., N, M) layout -> (B, g, M, N)."""
    return b.call(aten.permute.default, b.call(aten.reshape.default, x, [batch, groups, n, m]), [0, 1, 3, 2])


def _exp_shifted(b: Builder, s, m: int) -> fx.Node:
    """e^(s - max over keys) from Mul/Add/MaxPool/Sigmoid/Div only (see the module docstring)."""
    mx = b.call(aten.max_pool2d.default, s, [m, 1], [m, 1])
    z = b.call(aten.add.Tensor, s, b.call(aten.mul.Tensor, mx, -1.0))  # (Sub is outside the safety scope)
    neg_z = b.call(aten.mul.Tensor, z, -1.0)
    return b.call(aten.div.Tensor, b.call(aten.sigmoid.default, z), b.call(aten.sigmoid.default, neg_z))


def _replay(gm: fx.GraphModule, b: Builder, root: fx.Node, nodes: list[fx.Node], value: fx.Node) -> fx.Node:
    """`nodes` (a chain starting at `root`) copied before the anchor, reading `value` where they read `root`."""
    env = {root: value}
    node = value
    for original in nodes:
        with gm.graph.inserting_before(b.anchor):
            node = gm.graph.node_copy(original, lambda x: env.get(x, x))
        node.meta = dict(original.meta)
        env[original] = node
        b.created.append(node)
    return node


def _output_layout(b: Builder, match: AttentionMatch, o, out_shape) -> fx.Node:
    """(B, g, dv, N) -> the model's output: (L..., N, dv), or (L..., dv, N) as it is for v @ P^T (no permute)."""
    if not match.v_transposed:
        o = b.call(aten.permute.default, o, [0, 1, 3, 2])
    return b.call(aten.reshape.default, o, list(out_shape))


def _finish(gm: fx.GraphModule, b: Builder, match: AttentionMatch, o, out_shape, peak: int) -> _Outcome:
    o = _output_layout(b, match, o, out_shape)
    replace_uses(match.output, o)
    for dead in dict.fromkeys((match.output, match.anchor)):
        if not dead.users:
            gm.graph.erase_node(dead)
    return _Outcome(peak, 1, match.groups, match.n, "grouped-conv (talking heads)")


class _Weights:
    """Constant conv weights, registered once per attention and shared by its chunks."""

    def __init__(self, b: Builder, scale: float, d: int, m: int):
        self.b, self.scale, self.d, self.m = b, scale, d, m
        self.cache: dict[tuple[str, int, int], fx.Node] = {}

    def dot(self, gc: int) -> fx.Node:  # sums each head's d channels of Q*K, times the attention scale
        key = ("dot", gc, self.d)
        if key not in self.cache:
            self.cache[key] = self.b.constant(torch.full((gc, self.d, 1, 1), self.scale), "attn_dot_weight")
        return self.cache[key]

    def keysum(self, gc: int, mc: int) -> fx.Node:  # sums each head's mc key channels
        return self.ones(gc, mc)

    def ones(self, groups: int, per_group: int) -> fx.Node:
        key = ("ones", groups, per_group)
        if key not in self.cache:
            self.cache[key] = self.b.constant(torch.ones(groups, per_group, 1, 1), "attn_keysum_weight")
        return self.cache[key]


def _slice(b: Builder, x, dim: int, start: int, end: int, size: int):
    if x is None or (start == 0 and end == size):
        return x
    return b.call(aten.slice.Tensor, x, dim, start, end)


def _cat(b: Builder, parts: list, dim: int):
    return parts[0] if len(parts) == 1 else b.call(aten.cat.default, parts, dim)


# --- the additive bias ---------------------------------------------------------------------------------------------

def _bias(gm: fx.GraphModule, b: Builder, match: AttentionMatch, batch: int, groups: int):
    """The total additive bias in (1|B, g, M, N) layout: a constant buffer when it depends on parameters only, graph
    ops otherwise; None when there is none; a reason string when it cannot be expressed."""
    n, m = match.n, match.m
    full = (batch, groups, n, m)
    if match.form == "sdpa":
        if match.mask is None and not match.causal:
            return None
        natural = (*match.lead, n, m)
        total = torch.zeros(())
        if match.causal:
            total = torch.zeros(n, m).masked_fill(~torch.ones(n, m, dtype=torch.bool).tril(), float("-inf"))
        if match.mask is not None:
            mask = constant_value(gm, match.mask)
            if mask is None:
                if match.mask.meta["val"].dtype == torch.bool:
                    return "attn_mask is a boolean tensor computed in the graph (only constant ones are folded)"
                if match.causal:
                    return "is_causal together with a computed attn_mask"
                return _graph_bias(b, match.mask, natural, full)
            mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else mask
            total = total + mask.float()
        return _constant_bias(b, total, natural, full)
    if not match.has_bias:
        return None
    natural = shape(match.chain[-1])
    zero_bias = replay_chain(match, torch.zeros(shape(match.scores)), gm)
    if zero_bias is not None:
        return _constant_bias(b, zero_bias, natural, full)
    return _graph_bias(b, _replay_in_graph(gm, b, match, shape(match.scores)), natural, full)


def _constant_bias(b: Builder, bias: torch.Tensor, natural, full) -> fx.Node:
    """`bias` broadcast to the softmax input's shape, regrouped to (B, g, N, M), stored keys-first (1|B, g, M, N)."""
    batch, groups, n, m = full
    bias = bias.float().broadcast_to(natural).reshape(full)
    if batch > 1 and bool((bias == bias[:1]).all()):
        bias = bias[:1]  # the same for every image: keep one copy
    return b.constant(bias.permute(0, 1, 3, 2).contiguous(), "attn_bias")


def _graph_bias(b: Builder, bias: fx.Node, natural, full) -> fx.Node:
    if shape(bias) != tuple(natural):
        bias = b.call(aten.expand.default, bias, list(natural))
    bias = b.call(aten.reshape.default, bias, list(full))
    return b.call(aten.permute.default, bias, [0, 1, 3, 2])


def _replay_in_graph(gm: fx.GraphModule, b: Builder, match: AttentionMatch, scores_shape) -> fx.Node:
    """chain(0) as graph nodes: the chain copied with the scores replaced by a zero constant."""
    env = {match.scores: b.constant(torch.zeros(scores_shape), "attn_zero_scores")}
    node = env[match.scores]
    for original in match.chain:
        with gm.graph.inserting_before(b.anchor):
            node = gm.graph.node_copy(original, lambda x: env.get(x, x))
        node.meta = {k: v for k, v in original.meta.items()}
        env[original] = node
        b.created.append(node)
    return node
