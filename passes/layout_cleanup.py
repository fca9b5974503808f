"""layout_cleanup (exact: moves elements only): cancel, compose and sink the permutes/reshapes the other passes wrap ops in.

linear_to_conv, layernorm_decompose and friends wrap each op in "to channels-first" / "back" layout chains, so a
Linear -> GELU -> Linear becomes conv -> P -> gelu -> P^-1 -> conv with P = reshape(B, C, N) + permute(0, 2, 1).
This pass removes those pairs. Layout ops move elements and never change values; the only numeric change is a
consumer that now reads another view (a conv over (C, H, W) instead of (C, 1, N) may sum in another fp32 order).

1. Chains. A chain is a run of layout ops (reshape/view, permute, transpose, (un)squeeze, flatten, clone) from a
   source x to a node y. Applying the chain to an index tensor arange(numel(x)).reshape(x.shape) gives its index map
   M (y = x.flatten()[M]). A chain is replaced by the shortest equivalent: nothing (M is the identity: P^-1 after P),
   one reshape (M = arange), one permute, or permute+reshape / reshape+permute. Consecutive permutes compose this way;
   identical layout nodes on the same input are merged.
2. Sinking. Element-wise ops commute with any layout map: f(L(a), L(b)) = L(f(a, b)), f(L(a), c) = L(f(a, L^-1(c)))
   for a constant c (permuted at conversion time and shrunk back to its broadcast shape), and f(L(a), b) =
   L(f(L^-1(b), a)) when the graph already computes L^-1(b) (a residual stream whose LayerNorm reads it channels-first).
   A connected region of element-wise ops (add, sub, mul, div, max/min, relu, gelu, sigmoid, silu, tanh, erf, sqrt,
   ...) whose inputs are all L-wrapped, constants or already available as L^-1 is recomputed in the source layout,
   with L applied once to each of its outputs. It is done when the L chains that die are at least as many as the
   outputs that need a new L before a non-layout consumer; outputs read by layout ops count zero, since step 1 then
   cancels them. So conv -> P -> gelu -> P^-1 -> conv becomes conv -> gelu -> conv, and a ViT residual stream stays
   channels-first from the first LayerNorm to the last.
3. Gathers. Slices of one tensor concatenated along the same axis (window_ops' rolls) commute with a permute:
   cat([slice(P(t), d)...], d) = P(cat([slice(t, p[d])...], p[d])) for y = P(t) = permute(t, p). When the slices read
   a layout chain whose permute can move past them, the gather runs in the chain's source layout and the permute
   after it, where step 1 fuses it with the chain that follows (Swin: the shifted window partition of a
   channels-first LayerNorm output keeps one Transpose instead of two) or step 2 cancels it (the residual Add).
4. Batch limit. Where the target limits axis 0 (trt-safe: 16 from rank 3), a composed form whose intermediate breaks
   it is not used when another exists (MViTv2: reshape + permute, not permute [1, 0, 2, 3] + reshape), and a chain
   that breaks it itself (MobileViT's (B*C*nh, ph, nw, pw) patch views) is re-expressed as reshape -> permute ->
   reshape with small leading axes (`express_index_map`), even when that is not shorter.
Chains are written as at most reshape + permute + reshape (graph.express_index_map: a permutation of the digits of
the flat index). Introduces only aten.permute / aten.reshape (fewer than it removes) and
moves aten.slice / aten.cat. Run it last, and again after any pass that wraps.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.fx as fx

from attn2conv.graph import eliminate_dead_code as fx_dead_code
from attn2conv.graph import Builder, arg, aten, express_index_map, get_constant, replace_uses, shape
from attn2conv.legality import batch_limit, concat_axis_legal, concat_axis_rule
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register

LAYOUT = {
    aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.permute.default, aten.transpose.int,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints,
    aten.t.default, aten.clone.default, aten.alias.default,
}
UNARY = {
    aten.relu.default, aten.gelu.default, aten.sigmoid.default, aten.silu.default, aten.tanh.default,
    aten.neg.default, aten.abs.default, aten.erf.default, aten.sqrt.default, aten.rsqrt.default,
    aten.reciprocal.default, aten.exp.default, aten.hardswish.default, aten.hardsigmoid.default,
    aten.clamp.default, aten.clamp_min.default, aten.leaky_relu.default, aten.hardtanh.default,
    aten.mul.Scalar, aten.add.Scalar, aten.sub.Scalar, aten.div.Scalar, aten.pow.Tensor_Scalar,
}
BINARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.maximum.default,
          aten.minimum.default}
MAX_SWEEPS = 12
# index maps up to this many elements are searched for a reshape + permute + reshape form (int64: 32 MiB)
MAX_DIGIT_SEARCH = 4 * 1024 * 1024


def is_layout(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in LAYOUT and \
        (node.target is not aten.clone.default or
         node.kwargs.get("memory_format") in (None, torch.contiguous_format, torch.preserve_format))


def _meta(shape_, dtype) -> torch.Tensor:
    return torch.empty(shape_, dtype=dtype, device="meta")


@register
class LayoutCleanup(GraphPass):
    id = "layout_cleanup"
    exact = True
    removes = ("aten.permute", "aten.reshape", "aten.transpose")
    introduces = ("aten.permute", "aten.reshape")
    summary = "cancel inverse permute/reshape pairs, compose chains, sink layout ops through element-wise regions"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        self._forms: dict[tuple, list | None] = {}
        self._lead = batch_limit(ctx.profile)  # (max, min rank): intermediates must not break the batch limit
        self._concat_rule = concat_axis_rule(ctx.profile)  # DLA: a moved gather must stay on the channel axis
        return self._run(gm, result)

    def _run(self, gm: fx.GraphModule, result: PassResult) -> PassResult:
        before = sum(is_layout(n) for n in gm.graph.nodes)
        chains = regions = 0
        for _ in range(MAX_SWEEPS):
            c = self._simplify_chains(gm) + self._sink_gathers(gm)
            r = self._sink_regions(gm)
            fx_dead_code(gm.graph)
            chains, regions = chains + c, regions + r
            if not c and not r:
                break
        after = sum(is_layout(n) for n in gm.graph.nodes)
        result.rewrites = chains + regions
        result.changed = result.rewrites > 0
        result.notes.append(f"layout ops {before} -> {after} ({chains} chains shortened, {regions} element-wise "
                            f"regions moved to the source layout)")
        return result

    # --- 1. chains -------------------------------------------------------------------------------------------------
    def _simplify_chains(self, gm: fx.GraphModule) -> int:
        changed = _merge_duplicates(gm)
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or not is_layout(node) or not node.users:
                continue
            chain, src = _chain_to(node)
            xs, ys = shape(src), shape(node)
            if xs is None or ys is None:
                continue
            sig = _signature(chain, xs)  # the same chain is met again in every sweep
            if sig not in self._forms:
                self._forms[sig] = self._express_chain(chain, xs, ys)
            form, fixes, cut = self._forms[sig]
            if cut:  # only the part of the chain after chain[cut - 1] is re-expressed
                src, chain = chain[cut - 1], chain[cut:]
            if form is None or (len(form) >= len(chain) and not fixes):
                continue
            new = _build(gm, node, src, form, node.meta["val"].dtype)
            replace_uses(node, new)
            changed += 1
        return changed

    def _express_chain(self, chain: list[fx.Node], xs, ys) -> tuple[list[tuple] | None, bool]:
        """(the shortest form of the chain whose intermediates keep axis 0 within the target's batch limit, whether
        it removes intermediates of the chain that break the limit: then it is taken even when not shorter).
        MViTv2's pooled q/k/v, (B*heads, C, H, W) -> (B, C, heads, H*W), becomes reshape + permute, not
        permute [1, 0, 2, 3] + reshape; MobileViT's unfold to patches, views of (B*C*nh, ph, nw, pw), becomes
        reshape -> permute -> reshape. A form that breaks the limit only as often as the chain did is taken when
        there is no other."""
        m = LayoutMap(chain, xs)
        if self._lead is None:
            return express(xs, ys, m), False, 0
        over = _over_lead([shape(n) for n in chain[:-1]], self._lead)
        fixed = self._within_lead(chain, xs, ys, m, over)
        if fixed is not None:
            return fixed, over > 0, 0
        # the whole chain has no such form (Hiera's unroll: rank > 8): the longest tail that starts on a tensor
        # within the limit and has one
        for cut in range(1, len(chain) - 1) if over else ():
            sub, sub_xs = chain[cut:], shape(chain[cut - 1])
            sub_over = _over_lead([shape(n) for n in sub[:-1]], self._lead)
            if sub_xs is None or not sub_over or _over_lead([sub_xs], self._lead):
                continue
            fixed = self._within_lead(sub, sub_xs, ys, LayoutMap(sub, sub_xs), sub_over)
            if fixed is not None:
                return fixed, True, cut
        form = express(xs, ys, m)
        if form is not None and _over_lead(_intermediates(xs, form), self._lead) > over:
            return None, False, 0
        return form, False, 0

    def _within_lead(self, chain, xs, ys, m: "LayoutMap", over: int) -> list[tuple] | None:
        """A form of the chain with no intermediate over the batch limit: two ops, or (when the chain has such
        intermediates) reshape -> permute -> reshape."""
        form = express(xs, ys, m, self._lead)
        if form is not None or not over:
            return form
        plan = express_index_map(xs, m.tensor(), self._lead[0])
        if plan is not None and all(op != "slice" for op, *_ in plan) and \
                not _over_lead(_intermediates(xs, plan), self._lead):
            return plan
        return None

    # --- 2. element-wise regions -----------------------------------------------------------------------------------
    def _sink_regions(self, gm: fx.GraphModule) -> int:
        done = 0
        for seed in list(gm.graph.nodes):
            if seed.graph is not gm.graph or not is_layout(seed) or not seed.users:
                continue
            if any(is_layout(u) for u in seed.users):
                continue  # not a chain end
            chain, src = _chain_to(seed)
            xs, ys = shape(src), shape(seed)
            if xs is None or ys is None:
                continue
            fwd = LayoutMap(chain, xs)
            if xs == ys and fwd.is_identity():
                continue
            if self._try_region(gm, seed, src, xs, ys, fwd):
                done += 1
        return done

    def _try_region(self, gm, seed, src, xs, ys, fwd: "LayoutMap") -> bool:
        region: list[fx.Node] = []
        members: set[fx.Node] = set()
        plan: dict[fx.Node, list] = {}  # node -> operand plan
        entry_ends: set[fx.Node] = set()
        frontier = list(seed.users)
        while frontier:
            e = frontier.pop(0)
            if e in members or not _elementwise(e) or shape(e) != ys:
                continue
            ops = self._plan_operands(gm, e, members, xs, ys, fwd)
            if ops is None:
                continue
            region.append(e)
            members.add(e)
            plan[e] = ops
            entry_ends.update(o[1] for o in ops if o[0] == "wrapped")
            frontier.extend(e.users)
            for o in ops:  # siblings reading the same wrapped input may join too
                if o[0] == "wrapped":
                    frontier.extend(u for u in o[1].users if u not in members)
        if not region:
            return False
        gain = sum(1 for end in entry_ends if all(u in members for u in end.users))
        cost = 0
        for e in region:
            outside = [u for u in e.users if u not in members]
            if any(not is_layout(u) for u in outside):
                cost += 1
        if gain == 0 or cost > gain:
            return False
        self._rewrite(gm, region, members, plan, xs, ys, fwd)
        return True

    def _plan_operands(self, gm, e, members, xs, ys, fwd: "LayoutMap"):
        ops = []
        for a in list(e.args):
            if not isinstance(a, fx.Node):
                if isinstance(a, (list, tuple)) and any(isinstance(v, fx.Node) for v in a):
                    return None
                ops.append(("value", a))
                continue
            if a in members:
                ops.append(("member", a))
                continue
            const = get_constant(gm, a)
            if const is not None:
                moved = _move_constant(const, xs, ys, fwd.tensor())
                if moved is None:
                    return None
                ops.append(("constant", moved))
                continue
            if shape(a) != ys:
                return None
            if is_layout(a):
                chain, s = _chain_to(a)
                if shape(s) == xs and LayoutMap(chain, xs).equals(fwd):
                    ops.append(("wrapped", a, s))
                    continue
            z = _existing_inverse(a, xs, fwd)
            if z is not None:
                ops.append(("inverse", z))
                continue
            rechain = _rechain(a, xs, fwd, self._lead) if is_layout(a) else None
            if rechain is None:
                return None
            ops.append(("rechain", *rechain))
        if any(isinstance(v, fx.Node) for v in e.kwargs.values()):
            return None
        return ops

    def _rewrite(self, gm, region, members, plan, xs, ys, fwd) -> None:
        clones: dict[fx.Node, fx.Node] = {}
        form = (self._lead and express(xs, ys, fwd, self._lead)) or express(xs, ys, fwd)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for e in sorted(region, key=order.get):
            b = Builder(gm, e)
            args = []
            for o in plan[e]:
                kind = o[0]
                if kind == "value":
                    args.append(o[1])
                elif kind == "member":
                    args.append(clones[o[1]])
                elif kind == "constant":
                    args.append(b.constant(o[1], "layout_const"))
                elif kind == "wrapped":
                    args.append(o[2])
                elif kind == "rechain":  # another chain from a's source straight to the source layout
                    args.append(_build(gm, e, o[1], o[2], e.meta["val"].dtype))
                else:  # an existing L^-1 chain: make sure it is computed before e
                    _hoist_before(o[1], e, order)
                    args.append(o[1])
            clone = b.call(e.target, *args, **e.kwargs)
            clone.meta["val"] = _meta(xs, e.meta["val"].dtype)
            clones[e] = clone
        for e in region:
            outside = [u for u in e.users if u not in members]
            if outside:
                anchor = min(outside, key=lambda u: order.get(u, len(order)))
                wrapped = _build(gm, anchor, clones[e], form, e.meta["val"].dtype)
                for u in outside:
                    u.replace_input_with(e, wrapped)
        for e in sorted(region, key=order.get, reverse=True):
            if not e.users:
                gm.graph.erase_node(e)


    # --- 3. gathers (slice + cat along one axis) ---------------------------------------------------------------------
    def _sink_gathers(self, gm: fx.GraphModule) -> int:
        done = 0
        for c in list(gm.graph.nodes):
            if c.graph is not gm.graph or c.op != "call_function" or c.target is not aten.cat.default or not c.users:
                continue
            group = _gather_group(c)
            if group is None:
                continue
            y, d, bounds = group
            chain, src = _chain_to(y)
            xs, ys = shape(src), shape(y)
            if xs is None or ys is None:
                continue
            preferred = _sibling_permutes(c, ys)
            key = ("gather", _signature(chain, xs), tuple(preferred))
            if key not in self._forms:
                self._forms[key] = _factor_permute(chain, xs, ys, preferred, self._lead)
            found = self._forms[key]
            if found is None:
                continue
            perm, form = found
            if concat_axis_legal(self._concat_rule, d, len(ys)) and not concat_axis_legal(
                    self._concat_rule, perm[d], len(perm)):
                continue  # the gather would move off the only Concat axis the target accepts
            dtype = c.meta["val"].dtype
            t = _build(gm, c, src, form, dtype)
            b = Builder(gm, c)
            t_shape = list(shape(t))
            td = perm[d]
            parts = []
            for start, end in bounds:
                part = b.call(aten.slice.Tensor, t, td, start, end)
                part.meta["val"] = _meta(t_shape[:td] + [end - start] + t_shape[td + 1:], dtype)
                parts.append(part)
            cat = b.call(aten.cat.default, parts, td)
            cat.meta["val"] = _meta(t_shape, dtype)
            out = _build(gm, c, cat, [("permute", list(perm))], dtype)
            replace_uses(c, out)
            done += 1
        return done


def _gather_group(c: fx.Node) -> tuple[fx.Node, int, list[tuple[int, int]]] | None:
    """(y, axis, [(start, end)...]) when cat(c) concatenates step-1 slices of one layout node y along their axis."""
    parts, ys = c.args[0], shape(c)
    if ys is None or not parts or not all(isinstance(p, fx.Node) and p.target is aten.slice.Tensor for p in parts):
        return None
    d = arg(c, 1, "dim", 0) % len(ys)
    y = parts[0].args[0]
    if not is_layout(y) or shape(y) is None or len(shape(y)) != len(ys):
        return None
    bounds = []
    for p in parts:
        size = shape(y)[d]
        if p.args[0] is not y or arg(p, 1, "dim", 0) % len(ys) != d or arg(p, 4, "step", 1) != 1:
            return None
        start, end = arg(p, 2, "start", None), arg(p, 3, "end", None)
        start = 0 if start is None else (start + size if start < 0 else start)
        end = size if end is None or end > size else (end + size if end < 0 else end)
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end):
            return None
        bounds.append((start, end))
    return y, d, bounds


class _Op:
    """A layout op that is not (yet) in the graph, for LayoutMap/index_map."""

    def __init__(self, target, *args):
        self.target, self.args, self.kwargs = target, (None, *args), {}


def _permute_count(form) -> int:
    return sum(op == "permute" for op, _ in form)


def _chain_permutes(chain: list[fx.Node]) -> int:
    return sum(n.target in (aten.permute.default, aten.transpose.int, aten.t.default) for n in chain)


def _inverse(p) -> list[int]:
    inv = [0] * len(p)
    for i, q in enumerate(p):
        inv[q] = i
    return inv


def _factor_permute(chain: list[fx.Node], xs, ys, preferred: list[tuple[int, ...]], lead=None):
    """(p, form) with chain(x) == permute(form(x), p), or None.

    A p in `preferred` (the layout an operand of the gather's consumer is already read in, see _sibling_permutes)
    is taken when form has no more permutes than the chain: the permute after the gather then dies in step 2.
    Otherwise form must have fewer permutes than the chain (the permute moves past the gather for step 1 to fuse)."""
    rank = len(ys)
    if rank > 6:
        return None
    have = _chain_permutes(chain)

    def factor(p):
        inv = _inverse(p)
        return express(xs, tuple(ys[q] for q in inv), LayoutMap([*chain, _Op(aten.permute.default, inv)], xs), lead)

    for p in preferred:
        form = factor(p)
        if form is not None and _permute_count(form) <= have:
            return list(p), form
    best = None
    for p in itertools.permutations(range(rank)):
        if list(p) == sorted(p):
            continue
        form = factor(p)
        if form is None or _permute_count(form) >= have:
            continue
        score = (_permute_count(form), len(form))
        if best is None or score < best[0]:
            best = (score, list(p), form)
    return None if best is None else (best[1], best[2])


def _sibling_permutes(c: fx.Node, ys) -> list[tuple[int, ...]]:
    """Permutes p such that an element-wise consumer of c has another operand a that the graph already reads as
    a permute of it, a' = permute(a, q) with p = q^-1: the consumer can then run in a's layout."""
    found = []
    for u in c.users:
        if u.target is aten.slice.Tensor:  # a second gather on c (the other axis of a 2-D roll): look past it
            for cat in u.users:
                if cat.target is aten.cat.default and shape(cat) == tuple(ys):
                    found += [p for p in _sibling_permutes(cat, ys) if p not in found]
            continue
        if not _elementwise(u):
            continue
        for a in u.args:
            if not isinstance(a, fx.Node) or a is c or shape(a) != tuple(ys):
                continue
            for v in a.users:
                if v.target in (aten.permute.default,) and len(v.args[1]) == len(ys):
                    inv = tuple(_inverse([d % len(ys) for d in v.args[1]]))
                    if inv not in found:
                        found.append(inv)
    return found


# --- index maps ------------------------------------------------------------------------------------------------------

def _chain_to(node: fx.Node) -> tuple[list[fx.Node], fx.Node]:
    chain = []
    while is_layout(node):
        chain.append(node)
        node = node.args[0]
    return chain[::-1], node


def index_map(chain: list[fx.Node], xs: tuple[int, ...]) -> torch.Tensor:
    """Flat source index of every element of the chain's output."""
    idx = torch.arange(math.prod(xs)).reshape(xs)
    for node in chain:
        idx = node.target(idx, *node.args[1:], **{k: v for k, v in node.kwargs.items() if k != "memory_format"})
    return idx


def _signature(chain: list[fx.Node], xs) -> tuple:
    """What a chain's index map depends on: the source shape and each op with its arguments."""
    return tuple(xs), tuple((n.target, repr(n.args[1:]), repr(sorted(n.kwargs.items()))) for n in chain)


def _contiguous_strides(shape_) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape_):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


def _key(shape_, strides, offset=0) -> tuple:
    """Two strided views of the same flat source hold the same indices iff these keys are equal (the stride of a
    size-1 dim means nothing)."""
    return tuple(shape_), tuple(s if d != 1 else 0 for d, s in zip(shape_, strides)), offset


def _view_key(shape_, strides, new_shape) -> tuple | None:
    """Key of `new_shape` viewed over a strided tensor; None when torch would have to copy (then the indices are no
    strided pattern, see LayoutMap)."""
    try:
        v = torch.empty_strided(tuple(shape_), tuple(strides), device="meta").view(list(new_shape))
    except RuntimeError:
        return None
    return _key(v.shape, v.stride())


class LayoutMap:
    """The index map of a layout chain over a source of shape xs, without building it where it can be avoided.

    Most chains (permutes, reshapes that torch can do as views, (un)squeezes) map element i of the output to
    offset + sum(i_k * stride_k) of the flat source: a strided view. Such a map is held as (shape, strides, offset),
    computed on meta tensors in microseconds; equality, identity and the permute/reshape search in `express` compare
    those keys. A reshape that needs a copy leaves the strided form (torch's view refuses exactly the regroupings no
    strides describe); then the map is the int64 index tensor of `index_map` (one element per tensor element, which
    on a 15M-element attention product is what made this pass slow)."""

    def __init__(self, chain: list[fx.Node], xs: tuple[int, ...]):
        self.chain, self.xs = list(chain), tuple(xs)
        self.key = _strided_key(self.chain, self.xs)
        self._tensor = None

    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            self._tensor = index_map(self.chain, self.xs)
        return self._tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return self.key[0] if self.key is not None else tuple(self.tensor().shape)

    def is_identity(self) -> bool:
        """The flat order is the source's (the map is nothing or one reshape)."""
        if self.key is not None:
            return self.key == _key(self.key[0], _contiguous_strides(self.key[0]))
        flat = self.tensor().flatten()
        return torch.equal(flat, torch.arange(flat.numel()))

    def equals(self, other: "LayoutMap") -> bool:
        if self.key is not None and other.key is not None:
            return self.key == other.key
        return torch.equal(self.tensor(), other.tensor())


def _strided_key(chain: list[fx.Node], xs: tuple[int, ...]) -> tuple | None:
    t = torch.empty(xs, device="meta")
    for node in chain:
        target, args = node.target, node.args[1:]
        if target is aten.clone.default or target is aten.alias.default:
            continue
        try:
            if target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
                t = t.view(list(args[0]))
            elif target is aten.flatten.using_ints:
                t = t.view(torch.empty(t.shape, device="meta").flatten(*args).shape)
            else:  # permute, transpose, t, (un)squeeze: views by definition
                t = target(t, *args, **node.kwargs)
        except RuntimeError:
            return None
    return _key(t.shape, t.stride(), t.storage_offset())


def express(xs, ys, idx: "LayoutMap | torch.Tensor", lead: tuple[int, int] | None = None) -> list[tuple] | None:
    """Shortest list of ('reshape', shape) / ('permute', dims) ops mapping a tensor of shape xs to idx's layout.
    With `lead` = (max, min rank), only forms whose intermediate has axis 0 <= max (or rank < min rank)."""
    xs, ys = tuple(xs), tuple(ys)
    ok = (lambda s: _over_lead([s], lead) == 0) if lead is not None else (lambda s: True)
    if isinstance(idx, LayoutMap):
        form = _express_tensor(xs, ys, idx.tensor(), ok) if idx.key is None else _express_strided(xs, ys, idx, ok)
        idx = idx.tensor() if form is None and math.prod(xs) <= MAX_DIGIT_SEARCH else None
    else:
        form = _express_tensor(xs, ys, idx, ok)
    if form is None and idx is not None and idx.numel() <= MAX_DIGIT_SEARCH:
        plan = express_index_map(xs, idx, lead[0] if lead is not None else None)
        if plan is not None and all(op != "slice" for op, *_ in plan) and all(ok(s) for s in _intermediates(xs, plan)):
            form = [(op, list(v[0])) for op, *v in plan]
    return form


def _over_lead(shapes, lead: tuple[int, int]) -> int:
    """How many of `shapes` break the batch limit `lead` = (max, min rank)."""
    return sum(1 for s in shapes if s is not None and len(s) >= lead[1] and s[0] > lead[0])


def _intermediates(xs, form: list[tuple]) -> list[tuple]:
    """The shapes between the ops of a form."""
    out, cur = [], tuple(xs)
    for op, val in form[:-1]:
        cur = tuple(val) if op == "reshape" else tuple(cur[i] for i in val)
        out.append(cur)
    return out


def _express_strided(xs, ys, m: LayoutMap, ok=lambda s: True) -> list[tuple] | None:
    """`_express_tensor` on strided keys: the same candidates in the same order, so the same answer."""
    if m.is_identity():
        return [] if xs == ys else [("reshape", list(ys))]
    n = math.prod(xs)
    base = _contiguous_strides(xs)
    if len(xs) == len(ys) and len(xs) <= 6:
        for p in itertools.permutations(range(len(xs))):
            if tuple(xs[i] for i in p) == ys and _key(ys, [base[i] for i in p]) == m.key:
                return [("permute", list(p))]
    if len(xs) <= 6:
        for p in itertools.permutations(range(len(xs))):
            if ok([xs[i] for i in p]) and _view_key([xs[i] for i in p], [base[i] for i in p], ys) == m.key:
                return [("permute", list(p)), ("reshape", list(ys))]
    if len(ys) <= 6:
        for p in itertools.permutations(range(len(ys))):
            mid = [0] * len(ys)
            for i, d in enumerate(p):
                mid[d] = ys[i]
            if math.prod(mid) == n and ok(mid):
                mid_strides = _contiguous_strides(mid)
                if _key([mid[d] for d in p], [mid_strides[d] for d in p]) == m.key:
                    return [("reshape", mid), ("permute", list(p))]
    return None


def _express_tensor(xs, ys, idx: torch.Tensor, ok=lambda s: True) -> list[tuple] | None:
    flat = idx.flatten()
    base = torch.arange(flat.numel())
    if torch.equal(flat, base):
        return [] if xs == ys else [("reshape", list(ys))]
    a = base.reshape(xs)
    # every candidate is first compared on a few sampled positions (computed, not materialised): on a 15M-element
    # map the full comparison of each of up to 720 candidates is what cost the time
    where = torch.unique(torch.cat([torch.arange(min(64, flat.numel())),
                                    torch.randint(flat.numel(), (256,), generator=torch.Generator().manual_seed(0)),
                                    torch.tensor([flat.numel() - 1])]))
    sample = flat[where]
    strides = _contiguous_strides(xs)

    def plausible(dims, dim_strides) -> bool:  # the sampled flat positions of a strided candidate of shape `dims`
        rest, value = where.clone(), torch.zeros_like(where)
        for d, st in zip(reversed(dims), reversed(dim_strides)):
            value += (rest % d) * st
            rest //= d
        return torch.equal(value, sample)

    if len(xs) == len(ys) and len(xs) <= 6:
        for p in itertools.permutations(range(len(xs))):
            if tuple(xs[i] for i in p) == ys and torch.equal(a.permute(p), idx):
                return [("permute", list(p))]
    if len(xs) <= 6:
        for p in itertools.permutations(range(len(xs))):
            # permute then reshape keeps the permuted tensor's flat order
            if not ok([xs[i] for i in p]) or not plausible([xs[i] for i in p], [strides[i] for i in p]):
                continue
            t = a.permute(p)
            if torch.equal(t.reshape(ys), idx):
                return [("permute", list(p)), ("reshape", list(ys))]
    if len(ys) <= 6:
        for p in itertools.permutations(range(len(ys))):
            mid = [0] * len(ys)
            for i, d in enumerate(p):
                mid[d] = ys[i]
            if math.prod(mid) == flat.numel() and ok(mid):
                mid_strides = _contiguous_strides(mid)
                if not plausible([mid[d] for d in p], [mid_strides[d] for d in p]):
                    continue
                if torch.equal(a.reshape(mid).permute(p), idx):
                    return [("reshape", mid), ("permute", list(p))]
    return None


def _build(gm, anchor: fx.Node, x: fx.Node, form: list[tuple], dtype) -> fx.Node:
    b = Builder(gm, anchor)
    cur_shape = shape(x)
    for op, val in form:
        if op == "reshape":
            x = b.call(aten.reshape.default, x, list(val))
            cur_shape = tuple(val)
        else:
            x = b.call(aten.permute.default, x, list(val))
            cur_shape = tuple(cur_shape[i] for i in val)
        x.meta["val"] = _meta(cur_shape, dtype)
    return x


def _move_constant(const: torch.Tensor, xs, ys, fwd: torch.Tensor) -> torch.Tensor | None:
    """c' with L(c' broadcast to xs) == c broadcast to ys, shrunk to size 1 along every dim it does not vary on."""
    try:
        full = const.expand(ys) if const.dim() <= len(ys) else None
    except RuntimeError:
        return None
    if full is None:
        return None
    if const.numel() == 1:
        return const.reshape([1] * len(xs))
    moved = torch.empty(math.prod(xs), dtype=const.dtype)
    moved[fwd.flatten()] = full.reshape(-1)
    moved = moved.reshape(xs)
    for d in range(len(xs)):
        first = moved.narrow(d, 0, 1)
        if moved.shape[d] > 1 and torch.equal(moved, first.expand_as(moved)):
            moved = first
    return moved.contiguous()


def _existing_inverse(a: fx.Node, xs, fwd: LayoutMap) -> fx.Node | None:
    """A layout chain already in the graph that reads `a` and yields L^-1(a) (shape xs): L followed by it is the
    identity on xs."""
    stack = [(u, 1) for u in a.users if is_layout(u)]
    while stack:
        node, depth = stack.pop()
        if shape(node) == xs:
            chain, src = _chain_to(node)
            if a in chain:  # a is itself a layout op (a reshape of the residual stream): the part after it
                chain, src = chain[chain.index(a) + 1:], a
            if src is a and LayoutMap(fwd.chain + chain, xs).is_identity():
                return node
        if depth < 3:
            stack.extend((u, depth + 1) for u in node.users if is_layout(u))
    return None


def _rechain(a: fx.Node, xs, fwd: LayoutMap, lead=None) -> tuple[fx.Node, list[tuple]] | None:
    """(s, form) with L(form(s)) == a, where a = chain(s) is a layout chain and form has no more permutes than the
    chain: the operand joins the region in the source layout at no extra cost (Swin's window reverse feeding a
    residual Add: windows -> image channels-first is one Transpose, like windows -> image channels-last)."""
    chain, src = _chain_to(a)
    n = math.prod(xs)
    if shape(src) is None or n > MAX_DIGIT_SEARCH or xs[0] > shape(a)[0]:
        return None  # never into a layout with a longer leading dim (windows): trt-safe and DLA bound dim 0
    wanted = torch.empty(n, dtype=torch.int64)
    wanted[fwd.tensor().flatten()] = index_map(chain, shape(src)).flatten()  # t with L(t) = a, as src indices
    form = express(shape(src), xs, wanted.reshape(xs), lead)
    have = _chain_permutes(chain)
    if form is None or _permute_count(form) > have:
        return None
    return src, form


def _hoist_before(node: fx.Node, anchor: fx.Node, order: dict) -> None:
    """Moves a layout chain that is placed after `anchor` to just before it (its inputs come earlier)."""
    chain, _src = _chain_to(node)
    if order.get(node, -1) < order.get(anchor, -1):
        return
    for n in chain:
        anchor.prepend(n)
        order[n] = order[anchor] - 0.5


def _elementwise(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in UNARY or node.target in BINARY)


def _merge_duplicates(gm: fx.GraphModule) -> int:
    """Identical layout nodes on the same input become one (the wrappers of parallel consumers)."""
    seen: dict[tuple, fx.Node] = {}
    merged = 0
    for node in list(gm.graph.nodes):
        if not is_layout(node):
            continue
        key = (node.target, node.args[0], repr(node.args[1:]), repr(sorted(node.kwargs.items())))
        if key in seen:
            replace_uses(node, seen[key])
            gm.graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return merged
