"""batch_to_space (exact: the same arithmetic on moved data; convolution kernels picked for the new shapes may
round differently, ~1e-8 relative): tensors whose batch axis exceeds the target's limit are
recomputed with the excess on a spatial axis.

Why. Swin's window partition views (B, H, W, C) as (B*nW, ws, ws, C): every window becomes an image of the batch, so
the qkv/proj convolutions, the attention core and their layout ops run on tensors with batch B*nW (64 for Swin-T at
224). TensorRT safety limits the batch axis to 16 (trt-safe-8.6: A2C-SAFE-TENSOR-BATCH, rank >= 3). Every op of that
region acts on each window alone, so the window index can live on a spatial axis instead.

Representation. A flagged tensor t of shape (B*W, s1, s2, ..., sk) (axis 0 > the profile's batch limit; B = the
model's batch, W = the excess factor) is carried as

    t~ = t.reshape(B, W, s1, ..., sk).movedim(1, 2)          shape (B, s1, W, s2, ..., sk)

i.e. the excess sits just after the channel axis. Each op that produced a flagged tensor is rebuilt on t~:
  * element-wise ops (add, mul, div, sigmoid, ...): the same op; a constant operand is folded the same way at
    conversion time, an operand broadcast over the batch gets a size-1 W axis;
  * conv2d / max_pool2d / avg_pool2d on (B*W, C, H, X) whose H windows do not straddle images (kernel = stride along
    H, no padding, H divisible): on t~ reshaped (free) to (B, C, W*H, X), then viewed back as (B, C', W, H', X');
  * linear, and softmax / log-softmax over a non-batch axis: the same op with the axis renumbered;
  * cat along a non-batch axis: the same op on the folded operands, the axis renumbered; cat along the batch axis
    (pieces of the windows, e.g. attention_to_conv's chunks) when the model batch is 1: along the folded W axis.
Layout ops (reshape, permute, transpose, slice, select, unbind, clone, ...) are not rebuilt one by one: the chain
between a rebuilt op's operand and the tensor it comes from is composed into one index map and re-expressed from
the folded source as reshape -> slice(s) -> permute -> reshape, with every intermediate's axis 0 at most the source's
or target's (see `express_index_map`). Where such a chain leaves the region (Swin's window reverse), the same is done
from the folded source to the chain's first unflagged tensor.

For the Swin attention core that attention_to_conv writes with windows on the batch axis this gives, per block,
    Q~ (B, h*d, W, 1, N) * K~ (B, h*d, W, M, 1) -> (B, h*d, W, M, N) -> view (B, h*d, W*M, N) -> grouped 1x1 conv
    -> (B, h, W*M, N);  MaxPool (M, 1) over W*M keys-per-window rows;  A~ (B, h*M, W, 1, N) * V~ (B, h*M, W, dv, 1)
    -> view (B, h*M, W*dv, N) -> grouped 1x1 conv of ones -> (B, h, W*dv, N)
so no tensor has batch > B, channels stay those of one window (h*d, h*M), and the work is the same as before.

Ops introduced: the rebuilt ops themselves (same ONNX op types as before) plus aten.reshape / aten.permute /
aten.slice (Reshape, Transpose, Slice). Ranks grow by one inside the region (5-D element-wise ops; convolutions and
pools stay 4-D). Runs after attention_to_conv and before layout_cleanup, which cancels the permute pairs left around
element-wise ops. Does nothing on targets without a batch limit. If any op of the region cannot be rebuilt, the graph
is left unchanged and the reason is reported.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from attn2conv.attention_match import constant_value, eliminate_dead_code, is_assert
from attn2conv.graph import Builder, aten, compute_nodes, express_index_map, pair, replace_uses, shape, where
from attn2conv.legality import batch_limit
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register

# Ops that only move or select elements (applied to index tensors to compose index maps).
LAYOUT_OPS = {
    aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.permute.default, aten.transpose.int,
    aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.flatten.using_ints, aten.unflatten.int, aten.clone.default, aten.alias.default, aten.detach.default,
    aten.lift_fresh_copy.default, aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.expand.default,
}
MULTI_OUTPUT_LAYOUT = {aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.maximum.default, aten.minimum.default,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.pow.Tensor_Scalar, aten.where.self,
    aten.relu.default, aten.gelu.default, aten.sigmoid.default, aten.silu.default, aten.tanh.default,
    aten.neg.default, aten.abs.default, aten.erf.default, aten.exp.default, aten.sqrt.default, aten.rsqrt.default,
    aten.reciprocal.default, aten.hardswish.default, aten.hardsigmoid.default, aten.clamp.default,
    aten.clamp_min.default, aten.leaky_relu.default, aten.hardtanh.default, aten.dropout.default,
}
WINDOWED = {aten.conv2d.default, aten.max_pool2d.default, aten.avg_pool2d.default}
AXIS_OPS = {aten.softmax.int: 1, aten._softmax.default: 1, aten._log_softmax.default: 1, aten.log_softmax.int: 1}


class Unsupported(Exception):
    pass


@register
class BatchToSpace(GraphPass):
    id = "batch_to_space"
    exact = True
    removes = ()
    introduces = ("aten.reshape", "aten.permute", "aten.slice")
    summary = "batch axis above the target limit (Swin windows) moved to a spatial axis"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        limits = batch_limit(ctx.profile)
        if limits is None:
            result.notes.append("the target sets no batch limit")
            return result
        max_batch, min_rank = limits
        batch = _model_batch(ctx.example_inputs)
        if batch > max_batch:
            result.misses.append(f"the model's own batch {batch} exceeds the target's limit {max_batch}")
            return result
        folder = _Folder(gm, batch, max_batch, min_rank)
        if not folder.compute_nodes:
            return result
        try:
            folder.check()
        except Unsupported as err:
            result.misses.append(str(err))
            return result
        folder.rewrite()
        eliminate_dead_code(gm)
        left = [n for n in gm.graph.nodes if n.op == "call_function" and folder.flagged(n)]
        result.rewrites = len(folder.compute_nodes)
        result.changed = True
        result.notes.append(f"{len(folder.compute_nodes)} ops on batch up to {folder.largest} rebuilt with the excess "
                            f"on a spatial axis (batch {batch}, limit {max_batch}); {len(left)} flagged tensors left")
        return result


def _model_batch(example_inputs) -> int:
    for t in torch.utils._pytree.tree_leaves(example_inputs):
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return 1


# --- the region ------------------------------------------------------------------------------------------------------

def _is_layout(node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in LAYOUT_OPS:
        return node.target is not aten.clone.default or node.kwargs.get("memory_format") in (None,
                                                                                           torch.contiguous_format)
    return node.target is operator.getitem and isinstance(node.args[0], fx.Node) and \
        node.args[0].target in MULTI_OUTPUT_LAYOUT


def _apply_layout(node: fx.Node, idx: torch.Tensor) -> torch.Tensor:
    if node.target is operator.getitem:
        producer = node.args[0]
        return producer.target(idx, *producer.args[1:], **producer.kwargs)[node.args[1]]
    kwargs = {k: v for k, v in node.kwargs.items() if k != "memory_format"}
    return node.target(idx, *node.args[1:], **kwargs)


def _source(node: fx.Node) -> fx.Node:
    return node.args[0].args[0] if node.target is operator.getitem else node.args[0]


def _layout_root(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """(the first non-layout ancestor, the layout chain from it to `node` in data-flow order)."""
    chain = []
    while _is_layout(node):
        chain.append(node)
        node = _source(node)
    return node, chain[::-1]


def _layout_users(node: fx.Node) -> list[fx.Node]:
    out = []
    for u in node.users:
        if u.op == "call_function" and u.target in MULTI_OUTPUT_LAYOUT and u.args[0] is node:
            out.extend(u.users)
        else:
            out.append(u)
    return [u for u in out if not is_assert(u)]


class _Folder:
    def __init__(self, gm: fx.GraphModule, batch: int, max_batch: int, min_rank: int):
        self.gm, self.batch, self.max_batch, self.min_rank = gm, batch, max_batch, min_rank
        self.compute_nodes = [n for n in compute_nodes(gm) if self.flagged(n) and not _is_layout(n)
                              and not is_assert(n) and n.target not in MULTI_OUTPUT_LAYOUT]
        self.folded: dict[fx.Node, fx.Node] = {}
        self.largest = max((shape(n)[0] for n in self.compute_nodes), default=0)

    def flagged(self, node) -> bool:
        """An activation whose batch axis is over the limit (parameters and buffers are not activations)."""
        s = shape(node) if isinstance(node, fx.Node) and node.op != "get_attr" else None
        return s is not None and len(s) >= self.min_rank and s[0] > self.max_batch

    # shapes and index maps of the folded representation
    def fold_shape(self, s) -> list[int]:
        return [self.batch, s[1], s[0] // self.batch, *s[2:]]

    def fold_idx(self, idx: torch.Tensor) -> torch.Tensor:
        s = idx.shape
        return idx.reshape(self.batch, s[0] // self.batch, *s[1:]).movedim(1, 2)

    def unfold_idx(self, idx: torch.Tensor, s) -> torch.Tensor:
        return idx.movedim(2, 1).reshape(s)

    # --- planning: everything that can fail, before the graph is touched ---------------------------------------------
    def check(self) -> None:
        for node in self.compute_nodes:
            s = shape(node)
            if s[0] % self.batch:
                raise Unsupported(f"{where(node)}: batch axis {s[0]} is not a multiple of the model batch "
                                  f"{self.batch}")
            if len(s) < 2:
                raise Unsupported(f"{where(node)}: rank {len(s)}")
            self._check_op(node)
        for node in self.gm.graph.nodes:  # flagged values read by ops that cannot be rebuilt
            if node.op == "placeholder" and self.flagged(node):
                raise Unsupported(f"graph input {node.name} has batch {shape(node)[0]}")
            if node in self.compute_nodes or _is_layout(node) or is_assert(node):
                continue
            if node.op == "call_function" and node.target in MULTI_OUTPUT_LAYOUT:
                continue
            for a in node.all_input_nodes:
                if self.flagged(a):
                    raise Unsupported(f"{where(node)}: {node.name} ({node.op} {node.target}) reads {a.name} "
                                      f"of shape {shape(a)}, which it cannot take in the folded layout")

    def _check_op(self, node: fx.Node) -> None:
        t = node.target
        if t in ELEMENTWISE:
            if t is aten.dropout.default and _arg(node, 2, False):
                raise Unsupported(f"{where(node)}: dropout in training mode")
            return
        if t is aten.linear.default or t in AXIS_OPS:
            if len(shape(node)) < 3:
                raise Unsupported(f"{where(node)}: {t} on rank < 3")
            return
        if t is aten.cat.default:
            dim = _arg(node, 1, 0) % len(shape(node))
            if dim == 0 and self.batch != 1:
                raise Unsupported(f"{where(node)}: concatenation along the batch axis of a model batch "
                                  f"{self.batch} > 1")
            return
        if t in WINDOWED:
            x = node.args[0]
            xs = shape(x)
            if xs is None or len(xs) != 4:
                raise Unsupported(f"{where(node)}: {t} input is not 4-D")
            if t is aten.conv2d.default:
                if self.flagged(node.args[1]) or (len(node.args) > 2 and self.flagged(node.args[2])):
                    raise Unsupported(f"{where(node)}: conv weights computed per window")
                kh = shape(node.args[1])[2]
                stride, pad, dil = (list(_arg(node, i, d)) for i, d in ((3, [1, 1]), (4, [0, 0]), (5, [1, 1])))
            else:
                kh = list(node.args[1])[0]
                stride = list(_arg(node, 2, []) or node.args[1])
                pad = list(_arg(node, 3, [0, 0]))
                dil = list(_arg(node, 4, [1, 1])) if t is aten.max_pool2d.default else [1]
            sh = pair(stride)[0]
            if not (pair(pad)[0] == 0 and pair(dil)[0] == 1 and (kh == sh) and xs[2] % sh == 0):
                raise Unsupported(f"{where(node)}: {t} windows along H (kernel {kh}, stride {sh}, padding "
                                  f"{pair(pad)[0]}) would straddle images once they are stacked")
            return
        raise Unsupported(f"{where(node)}: {node.name} ({t}) on batch {shape(node)[0]} cannot be rebuilt with the "
                          f"batch on a spatial axis")

    # --- building ----------------------------------------------------------------------------------------------------
    def rewrite(self) -> None:
        exits = self._exits()
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        todo = sorted(set(self.compute_nodes) | set(exits), key=order.get)
        for node in todo:
            if node in exits:
                new = self._operand(Builder(self.gm, node), node, folded=False)
                new.meta["val"] = node.meta.get("val")
                replace_uses(node, new)
            else:
                self.folded[node] = self._rebuild(node)

    def _exits(self) -> list[fx.Node]:
        """Layout nodes with an unflagged value that read a flagged one and are read outside the region."""
        exits = []
        for node in self.gm.graph.nodes:
            if not _is_layout(node) or self.flagged(node) or not self.flagged(_source(node)):
                continue
            root, _ = _layout_root(node)
            if root not in self.compute_nodes and not self.flagged(root):
                continue
            if any(not (_is_layout(u) and self.flagged(u)) and u not in self.compute_nodes
                   for u in _layout_users(node)):
                exits.append(node)
        return exits

    def _operand(self, b: Builder, a: fx.Node, folded: bool) -> fx.Node:
        """`a` in the folded layout (folded=True) or as it is, built from the folded values of the region."""
        root, chain = _layout_root(a)
        if root in self.folded:
            rs = shape(root)
            src_shape = self.fold_shape(rs)
            idx = self.unfold_idx(torch.arange(math.prod(rs)).reshape(src_shape), rs)
            src = self.folded[root]
        else:
            src_shape = list(shape(root))
            idx = torch.arange(math.prod(src_shape)).reshape(src_shape)
            src = root
        for node in chain:
            idx = _apply_layout(node, idx)
        if folded:
            idx = self.fold_idx(idx)
        plan = express_index_map(src_shape, idx, self.max_batch)
        if plan is None:
            raise RuntimeError(f"{where(a)}: no reshape/slice/permute form for the layout of {a.name}")
        return _build(b, src, plan)

    def _arg(self, b: Builder, a, out_shape):
        """An operand of a rebuilt element-wise op, in the folded layout of `out_shape`."""
        if not isinstance(a, fx.Node):
            return a
        rank = len(out_shape)
        value = constant_value(self.gm, a)
        if value is not None and isinstance(value, torch.Tensor):
            full = value.reshape([1] * (rank - value.dim()) + list(value.shape))
            if full.shape[0] == 1:
                folded = full.unsqueeze(2)
            else:
                folded = full.expand(out_shape[0], *full.shape[1:]).reshape(
                    self.batch, -1, *full.shape[1:]).movedim(1, 2)
                folded = _shrink(folded)
            return b.constant(folded.contiguous(), "batch_to_space_const")
        s = list(shape(a))
        padded = [1] * (rank - len(s)) + s
        if padded[0] == 1:
            return b.call(aten.reshape.default, a, [1, padded[1], 1, *padded[2:]])
        if len(s) != rank:
            raise RuntimeError(f"{where(a)}: batched operand of lower rank")
        return self._operand(b, a, folded=True)

    def _rebuild(self, node: fx.Node) -> fx.Node:
        b = Builder(self.gm, node)
        s = list(shape(node))
        fs = self.fold_shape(s)
        t = node.target
        if t in ELEMENTWISE:
            args = [self._arg(b, a, s) for a in node.args]
            kwargs = {k: self._arg(b, v, s) for k, v in node.kwargs.items()}
            new = b.call(t, *args, **kwargs)
        elif t is aten.linear.default:
            new = b.call(t, self._operand(b, node.args[0], True), *node.args[1:], **node.kwargs)
        elif t is aten.cat.default:  # along a non-batch axis, or pieces of the batch axis (model batch 1)
            dim = _arg(node, 1, 0) % len(s)
            new = b.call(t, [self._operand(b, a, True) for a in node.args[0]], 2 if dim == 0 else 1 if dim == 1
                         else dim + 1)
        elif t in AXIS_OPS:
            dim = node.args[1] % len(s)
            dim = 1 if dim == 1 else dim + 1
            if dim == 0:
                raise RuntimeError("softmax over the batch axis")
            new = b.call(t, self._operand(b, node.args[0], True), dim, *node.args[2:], **node.kwargs)
        else:  # conv / pool with the windows stacked along H
            xs = list(shape(node.args[0]))
            x = self._operand(b, node.args[0], True)
            x = b.call(aten.reshape.default, x, [self.batch, xs[1], fs[2] * xs[2], xs[3]])
            y = b.call(t, x, *node.args[1:], **node.kwargs)
            new = b.call(aten.reshape.default, y, fs)
        return new


def _arg(node: fx.Node, index: int, default):
    return node.args[index] if len(node.args) > index else default


def _shrink(t: torch.Tensor) -> torch.Tensor:
    """`t` with every axis it does not vary along reduced to size 1 (a constant broadcasts the same)."""
    for d in range(t.dim()):
        first = t.narrow(d, 0, 1)
        if t.shape[d] > 1 and torch.equal(t, first.expand_as(t)):
            t = first
    return t


def _build(b: Builder, x: fx.Node, plan: list[tuple]) -> fx.Node:
    for op, *val in plan:
        if op == "reshape":
            x = b.call(aten.reshape.default, x, list(val[0]))
        elif op == "permute":
            x = b.call(aten.permute.default, x, list(val[0]))
        else:
            x = b.call(aten.slice.Tensor, x, *val)
    return x
