"""Semantic matcher for attention cores in captured ATen graphs.

An attention core is  out = softmax(scale * q @ k^T + bias, over keys) @ v  with
    q (L..., N, d), k (L..., M, d), v (L..., M, dv), out (L..., N, dv)
where L... are leading batch/head dims (B, h), (B*windows, h), (B*h) ... Two anchors find it:

* `aten.scaled_dot_product_attention` (timm/HF fused paths): q, k, v are its arguments; `attn_mask` (float: additive,
  bool: -inf where False), `is_causal` and `scale` become the bias and the scale.
* `aten.softmax` / `aten._softmax` over the last axis (eager paths): walked *down* to the matmul that multiplies the
  probabilities with v (P @ v, or v @ P^T with v as (L..., dv, M): EfficientViT-MSRA's channels-first values), and *up* through scalar multiplies/divides (the scale), additions/subtractions of any other
  tensor (relative-position bias, shifted-window or HF masks), `masked_fill(-inf)` and reshapes (Swin views scores as
  (B, windows, h, N, N) to add its mask) to the matmul q @ k^T.

The chain between q @ k^T and the softmax is affine in the scores: chain(s) = scale * s + chain(0). The matcher keeps
the chain's nodes so that the rewrite can evaluate chain(0) (the total additive bias) once, at compile time when it
depends only on parameters and buffers, or in the graph otherwise. Misses return a reason string instead of a match.

Talking heads (CaiT): a linear over the head axis before and/or after the softmax, written as permute -> Linear(h, h)
-> permute (or, after linear_to_conv, a 1x1 convolution whose channels are the heads). Such chains (`replay=True`:
they contain a channel mix or a permute; also chains that multiply the scores by a tensor independent of them: XCiT's
per-head temperature, SwinV2's logit scale) are kept as they are, before the softmax in `chain` and between the softmax
and the matmul with v in `post`; the rewrite re-runs them verbatim on its own scores / probabilities, so any per-
position linear map stays exact. The queries and keys must stay on the last two axes at both ends.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from attn2conv.graph import arg, get_constant, is_op, op_kind, shape

MATMULS = ("aten.matmul", "aten.bmm")
PERMUTES = ("aten.permute", "aten.transpose", "aten.t")
SOFTMAXES = ("aten.softmax", "aten._softmax")
# Ops that pass a tensor through unchanged in value (eval mode).
NEUTRAL = ("aten.clone", "aten.contiguous", "aten.alias", "aten.detach", "aten.dropout", "aten.lift_fresh_copy")
RESHAPES = ("aten.reshape", "aten.view", "aten._unsafe_view", "aten.flatten", "aten.unflatten", "aten.squeeze",
            "aten.unsqueeze")


@dataclass
class AttentionMatch:
    form: str  # "sdpa" or "softmax"
    anchor: fx.Node  # the sdpa or softmax node
    output: fx.Node  # the node whose value is the attention output (L..., N, dv); the rewrite replaces it
    q: fx.Node  # (L..., N, d)
    k: fx.Node | None  # (L..., M, d), or None when only k^T is at hand
    k_t: fx.Node | None  # (L..., d, M)
    v: fx.Node  # (L..., M, dv), or (L..., dv, M) when v_transposed
    scale: float
    lead: tuple[int, ...]  # L..., the leading dims of q
    n: int
    m: int
    d: int
    dv: int
    scores: fx.Node | None = None  # q @ k^T (softmax form): the root of the bias chain
    chain: list[fx.Node] = field(default_factory=list)  # nodes from `scores` (excluded) to the softmax input
    mask: fx.Node | None = None  # sdpa attn_mask
    causal: bool = False
    replay: bool = False  # chain/post mix channels (talking heads), permute or scale by a tensor: re-run verbatim
    post: list[fx.Node] = field(default_factory=list)  # nodes from the softmax (excluded) to the matmul with v
    # v @ P^T (EfficientViT-MSRA): v is (L..., dv, M) and the output (L..., dv, N), the transpose of P @ v^T
    v_transposed: bool = False

    @property
    def groups(self) -> int:
        return math.prod(self.lead) if self.lead else 1

    @property
    def has_bias(self) -> bool:
        return bool(self.chain and any(_is_bias_step(n) for n in self.chain)) or self.mask is not None or self.causal


def find_attention(gm: fx.GraphModule) -> tuple[list[AttentionMatch], list[tuple[fx.Node, str]]]:
    """All attention cores of `gm`, and (candidate, reason) for anchors that did not match."""
    found, misses = [], []
    for node in list(gm.graph.nodes):
        if is_op(node, "aten.scaled_dot_product_attention"):
            res = match_sdpa(gm, node)
        elif is_op(node, *SOFTMAXES):
            res = match_softmax(gm, node)
        else:
            continue
        (found if isinstance(res, AttentionMatch) else misses).append(res if isinstance(res, AttentionMatch)
                                                                     else (node, res))
    return found, misses


# --- sdpa ------------------------------------------------------------------------------------------------------------

def match_sdpa(gm: fx.GraphModule, node: fx.Node) -> AttentionMatch | str:
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    dropout = arg(node, 4, "dropout_p", 0.0)
    causal = bool(arg(node, 5, "is_causal", False))
    scale = arg(node, 6, "scale")
    if arg(node, 7, "enable_gqa", False):
        return "grouped-query attention (enable_gqa) is not supported"
    if dropout:
        return f"dropout_p={dropout} is not zero (capture the model in eval mode)"
    qs, ks, vs = shape(q), shape(k), shape(v)
    if qs is None or ks is None or vs is None:
        return "q, k or v has no known shape"
    if len(qs) < 2 or qs[:-2] != ks[:-2] or ks[:-1] != vs[:-1] or qs[-1] != ks[-1]:
        return f"q {qs}, k {ks}, v {vs} are not (L, N, d), (L, M, d), (L, M, dv) with equal L"
    if not isinstance(scale, (int, float, type(None))):
        return "scale is not a number"
    d = qs[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if mask is not None and not isinstance(mask, fx.Node):
        return "attn_mask is not a tensor"
    return AttentionMatch("sdpa", node, node, q, k, None, v, scale, qs[:-2], qs[-2], ks[-2], d, vs[-1],
                          mask=mask, causal=causal)


# --- softmax(q @ k^T ...) @ v ----------------------------------------------------------------------------------------

def match_softmax(gm: fx.GraphModule, node: fx.Node) -> AttentionMatch | str:
    x = node.args[0]
    xs = shape(x)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if xs is None or len(xs) < 2:
        return "softmax input has no known shape of rank >= 2"
    if dim not in (-1, len(xs) - 1):
        return f"softmax over dim {dim}, not over the last (key) axis"
    if is_op(node, "aten._softmax") and node.args[2]:
        return "softmax with half_to_float"
    dtype = arg(node, 2, "dtype") if is_op(node, "aten.softmax") else None
    if dtype is not None and dtype != x.meta["val"].dtype:
        return f"softmax casts to {dtype}"
    # Down: probabilities -> (neutral ops, leading-dim reshapes, head mixes, gates, re-normalisation) -> matmul(., v).
    walked = _walk_probs(node, xs)
    if isinstance(walked, str):
        return walked
    probs, av, post, post_replay, v_transposed = walked
    v = av.args[0] if v_transposed else av.args[1]
    vs = shape(v)
    n, m = xs[-2], xs[-1]
    if shape(probs) is None or shape(probs)[-2:] != (n, m):
        return f"probabilities reach the matmul with v as {shape(probs)}, not with (queries, keys) {(n, m)} last"
    if v_transposed and (vs is None or len(vs) < 2 or vs[-1] != m or math.prod(vs[:-2]) != math.prod(xs[:-2])):
        return f"v {vs} and probabilities^T do not multiply as (L, dv, M) @ (L, M, N) with probabilities {xs}"
    if not v_transposed and (vs is None or len(vs) < 2 or vs[-2] != m or math.prod(vs[:-2]) != math.prod(xs[:-2])):
        return f"probabilities {xs} and v {vs} do not multiply as (L, N, M) @ (L, M, dv)"
    # Up: softmax input -> scale/bias/reshape chain -> q @ k^T.
    walked = _walk_scores(x)
    if isinstance(walked, str):
        return walked
    scores, chain, scale, mixes = walked
    replay = mixes or post_replay
    q, k_t = scores.args[:2]
    qs, kts, ss = shape(q), shape(k_t), shape(scores)
    if qs is None or kts is None or qs[:-2] != kts[:-2] or qs[-1] != kts[-2]:
        return f"q {qs} and k^T {kts} are not (L, N, d) and (L, d, M) with equal L"
    if ss[-2:] != (n, m) or math.prod(ss[:-2]) != math.prod(xs[:-2]):
        return f"scores {ss} and softmax input {xs} differ in more than their leading dims"
    if math.prod(qs[:-2]) != math.prod(vs[:-2]):
        return f"q {qs} and v {vs} have different leading dims"
    dv = vs[-2] if v_transposed else vs[-1]
    return AttentionMatch("softmax", node, av, q, None, k_t, v, scale, qs[:-2], n, m, qs[-1], dv,
                          scores=scores, chain=chain, replay=replay, post=post, v_transposed=v_transposed)


# Ops between the softmax and the matmul with v that the rewrite re-runs verbatim (replay): element-wise gates and
# mixes with tensors independent of the probabilities (ConViT's gated positional attention), sums over an axis with
# the division by them (ConViT's re-normalisation), any reshape.
POST_REPLAYED = ("aten.mul", "aten.div", "aten.add", "aten.sub", "aten.rsub", "aten.sum")


def _walk_probs(softmax: fx.Node, xs) -> tuple[fx.Node, fx.Node, list[fx.Node], bool, bool] | str:
    """From the softmax down to the matmul with v: (probabilities node read by the matmul, the matmul, the nodes in
    between in graph order, whether they must be replayed, whether the matmul is v @ P^T). The nodes in between form
    a region that nothing outside reads: a chain (CaiT's talking heads) or a small DAG (ConViT: gate, add, sum,
    divide). For v @ P^T the transpose read by the matmul belongs to the matmul, not to the region: the probabilities
    node is the transpose's input."""
    region, frontier, av, swap = {softmax}, [softmax], None, None
    while frontier:
        cur = frontier.pop()
        for user in cur.users:
            if is_assert(user) or user in region:
                continue
            if is_op(user, *MATMULS) and user.args[0] is cur and user.args[1] not in region and av in (None, user):
                av = user
                continue
            if (is_op(user, *MATMULS) and user.args[1] is cur and user.args[0] not in region
                    and swaps_last_two_axes(cur) and av in (None, user)):
                av, swap = user, cur  # v @ P^T
                continue
            neutral = is_op(user, *NEUTRAL) or (is_op(user, *RESHAPES) and shape(user) and
                                                 shape(user)[-2:] == xs[-2:])
            if not (neutral or is_op(user, *RESHAPES, *PERMUTES, *POST_REPLAYED) or _is_channel_mix(user, cur)):
                return f"softmax output feeds {op_kind(user)} ({user.name}), not a matmul with v"
            region.add(user)
            frontier.append(user)
            if len(region) > 64:
                return "more than 64 ops between the softmax and the matmul with v"
    if av is None:
        return "the softmax output does not reach a matmul with v"
    if swap is not None and av.args[0] is not swap:
        region.discard(swap)
        probs = swap.args[0]
        if probs not in region:
            return f"{swap.name}: the transposed probabilities do not come from the softmax"
    else:
        swap, probs = None, av.args[0]
    reader = swap if swap is not None else av
    for node in region:
        outside = [u for u in node.users if not is_assert(u) and u not in region]
        if outside != ([reader] if node is probs else []):
            return f"{node.name}: the probabilities are also read outside the attention ({len(outside)} readers)"
    if swap is not None and [u for u in swap.users if not is_assert(u)] != [av]:
        return f"{swap.name}: the transposed probabilities are also read outside the attention"
    post = [n for n in softmax.graph.nodes if n in region and n is not softmax]
    replay = any(not (is_op(n, *NEUTRAL) or (is_op(n, *RESHAPES) and shape(n) and shape(n)[-2:] == xs[-2:]))
                 for n in post)
    return probs, av, post, replay, swap is not None


def _walk_scores(x: fx.Node) -> tuple[fx.Node, list[fx.Node], float, bool] | str:
    """From the softmax input up to q @ k^T: (scores node, chain nodes in data-flow order, product of scalars, whether
    the chain mixes channels or permutes)."""
    chain, scale, mixes = [], 1.0, False
    node = x
    for _ in range(64):
        if is_op(node, *MATMULS):
            return node, list(reversed(chain)), scale, mixes
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return f"softmax input does not come from q @ k^T (reached {getattr(node, 'name', node)})"
        chain.append(node)
        if is_op(node, *NEUTRAL, *RESHAPES) or (is_op(node, "aten._to_copy") and not node.kwargs.get("dtype")):
            node = node.args[0]
        elif is_op(node, *PERMUTES) or _is_channel_mix(node):
            mixes = True
            node = node.args[0]
        elif is_op(node, "aten.mul", "aten.div"):
            a, b = node.args[:2]
            factor_node, factor = (b, _scalar(b)) if _scalar(b) is not None else (a, _scalar(a))
            if factor is None:  # a tensor scale (XCiT's per-head temperature, SwinV2's logit scale): replayed
                scores_side = a if _reaches_matmul(a) else b
                other = b if scores_side is a else a
                if not isinstance(scores_side, fx.Node) or _reaches_matmul(other) or \
                        (is_op(node, "aten.div") and scores_side is not a):
                    return f"{node.name}: scores are multiplied by a tensor that is not a scale independent of them"
                mixes = True
                node = scores_side
                continue
            scale = scale * factor if is_op(node, "aten.mul") else scale / factor
            node = a if factor_node is b else b
        elif is_op(node, "aten.add", "aten.sub"):
            a, b = node.args[:2]
            alpha = node.kwargs.get("alpha", 1)
            if _reaches_matmul(a):
                node = a
            elif _reaches_matmul(b) and is_op(node, "aten.add") and alpha == 1:
                node = b
            else:
                return f"{node.name}: neither operand of the addition comes from q @ k^T"
        elif is_op(node, "aten.copy") and shape(node.args[1]) == shape(node):
            node = node.args[1]  # copy(dst, src) of dst's shape is src: MViTv2's attn[:, :, 0:, 0:] = attn + rel_pos
        elif is_op(node, "aten.masked_fill"):
            fill = node.args[2]
            if not (isinstance(fill, (int, float)) and fill == float("-inf")):
                return f"{node.name}: masked_fill with {fill!r} (only -inf keeps the softmax exact as a bias)"
            node = node.args[0]
        else:
            return f"{node.name}: scores pass through {op_kind(node)}, which is not a scale, bias or reshape"
    return "the chain from q @ k^T to the softmax is longer than 64 nodes"


def swaps_last_two_axes(node) -> bool:
    """Whether `node` is a transpose of its input's last two axes (transpose(-2, -1), permute(..., -1, -2), t)."""
    if not isinstance(node, fx.Node) or not is_op(node, *PERMUTES):
        return False
    rank = len(shape(node) or ())
    if rank < 2:
        return False
    if is_op(node, "aten.t"):
        return rank == 2
    if is_op(node, "aten.transpose"):
        return sorted(a % rank for a in node.args[1:3]) == [rank - 2, rank - 1]
    dims = [a % rank for a in node.args[1]]
    return dims == list(range(rank - 2)) + [rank - 1, rank - 2]


def _reaches_matmul(node, depth: int = 16) -> bool:
    """Whether `node` is (through the ops a score chain may contain) a matmul: tells scores from bias in an add."""
    for _ in range(depth):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return False
        if is_op(node, *MATMULS):
            return True
        if is_op(node, "aten.mul", "aten.div"):
            a, b = node.args[:2]
            if _scalar(a) is None and _scalar(b) is None:  # a tensor scale: either side may carry the scores
                return _reaches_matmul(a, depth - 1) or _reaches_matmul(b, depth - 1)
            node = a if _scalar(b) is not None else b
        elif is_op(node, *NEUTRAL, *RESHAPES, *PERMUTES, "aten.masked_fill", "aten._to_copy") or \
                _is_channel_mix(node):
            node = node.args[0]
        elif is_op(node, "aten.copy"):
            node = node.args[1]
        elif is_op(node, "aten.add", "aten.sub"):
            return _reaches_matmul(node.args[0], depth - 1) or _reaches_matmul(node.args[1], depth - 1)
        else:
            return False
    return False


def _is_channel_mix(node: fx.Node, src: fx.Node | None = None) -> bool:
    """A per-position linear map with constant weights (talking heads): Linear over the last axis, or a 1x1
    convolution (stride 1, no padding, one group) over the channel axis; `src`, if given, must be its input."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or (src is not None and node.args[0] is not src):
        return False
    gm = node.graph.owning_module
    weight = node.args[1] if len(node.args) > 1 else None
    if not isinstance(weight, fx.Node) or gm is None or get_constant(gm, weight) is None:
        return False
    if is_op(node, "aten.linear"):
        return True
    if not is_op(node, "aten.conv2d"):
        return False
    w = get_constant(gm, weight)
    stride, padding, dilation, groups = (arg(node, i, name, d) for i, name, d in
                                         ((3, "stride", [1, 1]), (4, "padding", [0, 0]), (5, "dilation", [1, 1]),
                                          (6, "groups", 1)))
    return w.dim() == 4 and tuple(w.shape[2:]) == (1, 1) and groups == 1 and \
        all(v == 1 for v in _ints(stride)) and all(v == 0 for v in _ints(padding))


def _ints(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _scalar(x) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, fx.Node) and x.op == "get_attr":
        gm = x.graph.owning_module
        t = get_constant(gm, x) if gm is not None else None
        if t is not None and t.numel() == 1:
            return float(t.reshape(()))
    return None


def _is_bias_step(node: fx.Node) -> bool:
    return is_op(node, "aten.add", "aten.sub", "aten.masked_fill")


# --- constant evaluation ---------------------------------------------------------------------------------------------

class _Missing:
    pass


_MISSING = _Missing()


def _const(gm: fx.GraphModule, x, memo: dict):
    """Value of `x` from parameters, buffers and literals only, or _MISSING when it depends on a graph input."""
    if isinstance(x, (list, tuple)):
        vals = [_const(gm, a, memo) for a in x]
        return _MISSING if any(v is _MISSING for v in vals) else type(x)(vals)
    if not isinstance(x, fx.Node):
        return x
    if x in memo:
        return memo[x]
    result = _MISSING
    if x.op == "get_attr":
        t = get_constant(gm, x)
        result = _MISSING if t is None else t
    elif x.op == "call_function":
        args = _const(gm, list(x.args), memo)
        kwargs = {k: _const(gm, a, memo) for k, a in x.kwargs.items()}
        if args is not _MISSING and all(a is not _MISSING for a in kwargs.values()):
            with torch.no_grad():
                result = x.target(*args, **kwargs)
    memo[x] = result
    return result


def _reads_an_input(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    seen, stack = {node}, [node]
    while stack:
        n = stack.pop()
        if n.op == "placeholder":
            return True
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return False


def constant_value(gm: fx.GraphModule, node):
    """The value of `node` when it depends only on parameters, buffers and literals (evaluated eagerly); else None."""
    if _reads_an_input(node):  # found by a plain walk, before any constant branch is evaluated on the way
        return None
    value = _const(gm, node, {})
    return None if value is _MISSING else value


def replay_chain(match: AttentionMatch, scores_value: torch.Tensor, gm: fx.GraphModule) -> torch.Tensor | None:
    """chain(scores_value) evaluated eagerly when every other operand of the chain is a constant; else None."""
    memo: dict = {match.scores: scores_value}
    value = scores_value
    for node in match.chain:
        value = _const(gm, node, memo)
        if value is _MISSING:
            return None
    return value


def is_assert(node: fx.Node) -> bool:
    """torch.export's metadata assertions (aten._assert_tensor_metadata ...): checks, not uses of a value."""
    return node.op == "call_function" and op_kind(node).split(".")[-1].startswith("_assert")


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Dead-code elimination that also drops export's metadata assertions on values nothing else reads (they are
    impure, so they would keep a replaced softmax or reshape alive)."""
    from attn2conv.graph import eliminate_dead_code as fx_dead_code

    while True:
        fx_dead_code(gm.graph)
        stale = [n for n in gm.graph.nodes if is_assert(n) and not n.users and n.args
                 and isinstance(n.args[0], fx.Node) and all(is_assert(u) for u in n.args[0].users)]
        if not stale:
            return
        for node in stale:
            gm.graph.erase_node(node)
