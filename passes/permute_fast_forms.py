"""permute_fast_forms (exact, bit-identical): every permute that ONNX Runtime would copy element by element is
rewritten as Reshape -> Transpose [-> Reshape -> Transpose] -> Reshape in forms it copies as contiguous blocks.

ONNX Runtime's CPU Transpose has three speeds (onnxruntime/core/providers/cpu/tensor/transpose.cc, measured on a
2-core AMD EPYC with 2 threads, benchmarks/bench_attention.py --op-profile):
  - a permutation that only moves size-1 axes is a copy; one that moves a single axis is a fast strided block copy;
  - any other permutation that keeps the last axis in place copies runs of that axis (fast when the run is long);
  - any other permutation that moves the last axis is copied one element at a time with an index computed per
    element: 5-10x slower. It is also what size-1 axes cause: [1, 96, 4, 49] -> perm (2, 1, 3, 0) -> [4, 96, 49, 1]
    (a Swin key chunk, windows onto the batch axis) took 67 us; the same data as [96, 4, 49] -> perm (1, 0, 2)
    took 9.6 us. A value chunk [3, 32, 4, 49] -> perm (2, 0, 3, 1) took 69 us; moving axis 1 last, (0, 2, 3, 1),
    then the windows out, [3, 4, 1568] -> (1, 0, 2), took 10 + 7 us.

So each slow permute is first put in its canonical form: size-1 axes dropped and input axes that stay neighbours
merged (a Reshape, free). If the canonical permutation still moves the last axis and is not a single-axis move, it
is done in two steps: move the axis that must end up last to the end (a single-axis move), then the rest (which
keeps the last axis). Shapes are left-padded with 1s where the target's tensor rules need it (trt-safe: axis 0 <= 16,
axis 1 and H, W <= 4096); a form that breaks one anyway is not used. Data movement only: the output is
bit-identical. TensorRT fuses Reshape/Transpose chains into one shuffle layer, so the extra nodes cost nothing there.

ONNX Runtime's own graph optimiser also moves Transposes: it merges a Transpose with a following Reshape that keeps
the rank and only moves size-1 axes (so such a Reshape is never emitted: the padding changes the rank instead), and
it can push Transposes through a Split and fuse them with their neighbours. That last effect is not modelled: in a
two-op graph it fuses the two steps of a value chunk back into one slow Transpose, and in a one-head Swin config it
pushed one transpose per chunk up through a Split. Measured on the models (ORT op profile, trt-safe): Swin-T
Transpose time 27 -> 13 ms per image; a two-stage Swin at 224 px: elements copied by slow Transposes 2.41M -> 1.20M
(tests/test_permute_fast_forms.py checks that).

Runs after layout_cleanup (which would otherwise compose the pieces back into one permute).
"""
from __future__ import annotations

import itertools
import math

import torch.fx as fx

from attn2conv.graph import Builder, aten, is_op, replace_uses, shape
from attn2conv.legality import dim_limit, shape_breaks_rules
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register

# A permutation keeping the last axis copies runs of that axis; below this many elements a run is too short to pay.
MIN_FAST_RUN = 8


@register
class PermuteFastForms(GraphPass):
    id = "permute_fast_forms"
    exact = True
    removes = ()
    introduces = ("aten.reshape", "aten.permute")
    summary = "permutes ONNX Runtime copies element-wise -> canonical Reshape/Transpose forms it copies as blocks"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        no_form = 0
        channels = dim_limit(ctx.profile, 1)
        max_merge = channels[0] if channels else None  # merged axes as long as an axis may be (trt-safe: 4096)
        for node in list(gm.graph.nodes):
            if not is_op(node, "aten.permute") or not isinstance(node.args[0], fx.Node):
                continue
            in_shape, out_shape = shape(node.args[0]), shape(node)
            if in_shape is None or out_shape is None:
                continue
            anchor, perm = _as_onnxruntime_sees_it(node, list(in_shape))
            if is_fast(in_shape, perm):
                continue
            forms = [steps for steps in (fast_steps(in_shape, perm), fast_steps(in_shape, perm, max_merge))
                     if steps is not None]
            if not forms:
                no_form += 1
            else:
                result.tally(node, _rewrite(gm, anchor, forms, ctx.profile))
        if no_form:
            result.notes.append(f"{no_form} slow permute(s) have no faster form (a short axis or run moves last)")
        return result


def _as_onnxruntime_sees_it(node: fx.Node, in_shape: list[int]) -> tuple[fx.Node, list[int]]:
    """(the node to replace, the permutation ONNX Runtime will run): a reshape reading only this permute that keeps
    the rank and only moves size-1 axes is merged into the Transpose by ONNX Runtime's optimiser."""
    perm = [p % len(in_shape) for p in node.args[1]]
    users = list(node.users)
    if len(users) != 1 or not is_op(users[0], "aten.reshape", "aten.view", "aten._unsafe_view"):
        return node, perm
    out = shape(users[0])
    if out is None or len(out) != len(perm) or not _only_ones_move(shape(node), out):
        return node, perm
    moved = iter(a for a in perm if in_shape[a] != 1)
    ones = iter(a for a in range(len(in_shape)) if in_shape[a] == 1)
    return users[0], [next(ones) if d == 1 else next(moved) for d in out]


def is_fast(in_shape, perm) -> bool:
    """Whether ONNX Runtime copies this permute as blocks (see the module docstring)."""
    moved = [a for a in perm if in_shape[a] != 1]
    if moved == sorted(moved) or _single_move(list(perm)):
        return True
    return perm[-1] == len(perm) - 1 and in_shape[-1] >= MIN_FAST_RUN


def _single_move(perm: list[int]) -> bool:
    rank = len(perm)
    for source in range(rank):
        rest = [a for a in range(rank) if a != source]
        for target in range(rank):
            if rest[:target] + [source] + rest[target:] == perm:
                return True
    return False


def canonical(in_shape, perm, max_merge: int | None = None) -> tuple[list[int], list[int]]:
    """(shape, perm) of the same permute with size-1 axes dropped and neighbouring axes that stay neighbours merged
    (into axes of at most `max_merge` elements, when given)."""
    kept = [a for a in range(len(in_shape)) if in_shape[a] != 1]
    order = {a: i for i, a in enumerate(kept)}
    out = [order[a] for a in perm if in_shape[a] != 1]  # kept axes, in output order, as positions among `kept`
    runs: list[list[int]] = []
    for a in out:
        if runs and runs[-1][-1] + 1 == a and (
                max_merge is None or math.prod(in_shape[kept[x]] for x in runs[-1] + [a]) <= max_merge):
            runs[-1].append(a)
        else:
            runs.append([a])
    by_input = sorted(range(len(runs)), key=lambda r: runs[r][0])
    c_shape = [math.prod(in_shape[kept[a]] for a in runs[r]) for r in by_input]
    c_perm = [by_input.index(r) for r in range(len(runs))]
    return c_shape, c_perm


def fast_steps(in_shape, perm, max_merge: int | None = None) -> list[tuple[list[int], list[int]]] | None:
    """The (input shape, permutation) of each Transpose that replaces this permute, in canonical forms: none when
    only size-1 axes move, one when the canonical permutation is fast, two when it moves its last axis (that axis
    first, then the rest); None when there is no fast form (the axis that must go last, or the run behind it, is
    shorter than MIN_FAST_RUN: moving it is a slow copy too)."""
    c_shape, c_perm = canonical(in_shape, perm, max_merge)
    if c_perm == sorted(c_perm):
        return []
    if is_fast(c_shape, c_perm):
        return [(c_shape, c_perm)]
    last = c_perm[-1]
    if last == len(c_perm) - 1 or c_shape[last] < MIN_FAST_RUN or math.prod(c_shape[last + 1:]) < MIN_FAST_RUN:
        return None
    first = [a for a in range(len(c_perm)) if a != last] + [last]
    rest = fast_steps([c_shape[a] for a in first], [first.index(a) for a in c_perm], max_merge)
    return None if rest is None else [(c_shape, first)] + rest


def _padded(shape_, rank: int) -> list[int]:
    return [1] * (rank - len(shape_)) + list(shape_)


def _only_ones_move(a, b) -> bool:
    """Whether a reshape from shape a to shape b only adds, drops or moves size-1 axes."""
    return [x for x in a if x != 1] == [x for x in b if x != 1]


def _choose_ranks(tensors: list[list[int]], out_shape: list[int], profile) -> list[int] | None:
    """One padded rank per step (tensors: each step's canonical input and output shape, in order), each the least
    that keeps the target's tensor rules (batch, channel, spatial and rank limits), and such that no Reshape between
    two Transposes (or after the last) keeps its rank while only moving size-1 axes: ONNX Runtime's optimiser merges
    such a Reshape into the Transpose next to it, giving back the slow permutation."""
    def legal(t, rank):
        return shape_breaks_rules(profile, _padded(t, rank)) is None

    steps = len(tensors) // 2
    for extra in itertools.product(range(3), repeat=steps):
        ranks = [len(tensors[2 * i]) + extra[i] for i in range(steps)]
        if not all(legal(tensors[2 * i], r) and legal(tensors[2 * i + 1], r) for i, r in enumerate(ranks)):
            continue
        joins = [(tensors[2 * i + 1], ranks[i], tensors[2 * i + 2], ranks[i + 1]) for i in range(steps - 1)]
        joins.append((tensors[-1], ranks[-1], out_shape, len(out_shape)))
        if any(r1 == r2 and _only_ones_move(t1, t2) for t1, r1, t2, r2 in joins):
            continue
        return ranks
    return None


def _source(node: fx.Node) -> fx.Node:
    return node.args[0] if is_op(node, "aten.permute") else node.args[0].args[0]


def _rewrite(gm: fx.GraphModule, node: fx.Node, forms, profile) -> str | None:
    """Replaces `node` (a permute, or the 1-move reshape reading one) by the first of `forms` (lists of steps: all
    neighbours merged, then merged up to the target's axis length) that keeps the target's tensor rules."""
    out_shape = list(shape(node))
    for steps in forms:
        tensors = [t for s, p in steps for t in (s, [s[a] for a in p])]
        ranks = _choose_ranks(tensors, out_shape, profile) if steps else []
        if ranks is not None:
            break
    else:
        return "every fast form would break a tensor rule of the target: left as it is"
    b = Builder(gm, node)
    y = _source(node)
    for (s, p), rank in zip(steps, ranks):
        pad = rank - len(s)
        y = b.call(aten.reshape.default, y, _padded(s, rank))
        y = b.call(aten.permute.default, y, list(range(pad)) + [pad + a for a in p])
    y = b.call(aten.reshape.default, y, out_shape)
    replace_uses(node, y)
    permute = node if is_op(node, "aten.permute") else node.args[0]
    gm.graph.erase_node(node)
    if permute is not node and not permute.users:
        gm.graph.erase_node(permute)
    return None
