"""Finding whole attention blocks in a captured graph, the per-block plan, and grafting a module in their place.

Used by the architectural passes attention_to_csa and attention_to_sra.

**Block.** Anchor: an attention core (attn2conv.attention_match: sdpa, or softmax between two matmuls). The block is
the innermost source module on the anchor's `nn_module_stack` whose nodes read exactly one tokens tensor (B, N, C)
from outside, hand exactly one tensor of the same shape back, and contain a projection after the core (timm
`blocks.3.attn`; Hugging Face `...layer.3.attention`, which holds the output dense). q/k/v/proj weights are found
by walking from the core's q/k/v back through reshapes/permutes/unbind to a Linear (a fused qkv Linear is split in
thirds), and from its output forward to the projection.

**Grid.** N = P prefix tokens + H x W patches with H/W the example image's aspect ratio (P <= 16, the smallest that
fits); override with the options `grid` ([H, W]) and `prefix_tokens`.

**Plan** (Next-ViT's hybrid strategy, read by both passes): consecutive blocks with the same (tokens, channels) form
a stage; inside a stage every (`every` + 1)-th block and the stage's last block (unless `end_with_attention` is
false) stay attention blocks and the others become convolution blocks; with more than one stage the first is all
convolution (`first_stage_conv`, as Next-ViT's stage 1). Default `every` = 5 (Next-ViT's [NCB x N, NTB] rounds): a
12-block DeiT becomes MHCA x 5, SRA, MHCA x 5, SRA; a 4-block stage MHCA x 3, SRA; Swin-T [2, 2, 6, 2] becomes
MHCA x 2 | MHCA x 2 | MHCA x 6 | MHCA, SRA (attention_stages, below; with "all": MHCA x 2 | MHCA, SRA | MHCA x 5,
SRA | MHCA, SRA). Why so few attention
blocks: at 224 px the MLPs are ~60 % of DeiT-S's MACs and are kept, so the token mixers must be nearly free for the
fast model to beat the original by 20 % (MHCA costs ~1/3 of an attention block; on trt-safe an SRA block's exact
attention core costs broadcast products of N x M x C elements). Convolution blocks use `conv_kind` ("csa" | "mhca",
default "mhca"), attention
blocks `attention_kind` ("sra" | "gsa" | "lsa" | "hmhsa" | "twins" (LSA and GSA alternating), default "sra").
`attention_stages` (stage indices, negative from the end, "last" = [-1], or "all") limits attention blocks to those
stages; the other stages' blocks become convolution blocks. Default: "last" for windowed models with more than one
stage (Swin), "all" otherwise. Why: a Swin stage whose windows are smaller than its map mixes tokens locally, as
MHCA's 3x3 conv does; at 224 px only Swin-T's last stage (7 x 7 = one window) attends globally, which SRA keeps
(R = 1). And on trt-safe an SRA block's exact core costs broadcast products of N x M x C elements, N = 16384 tokens
in stage 2 at 1024 px: measured (ONNX Runtime CPU, 2 threads, shared machine) Swin-T fast 0.68x the original at
224 px with attention in the last stage only vs 0.80x with the Next-ViT plan (3 SRA blocks), and with mlp_prune
0.30x vs 0.37x at 1024 px.
`plan` = {module path or fnmatch glob: kind} overrides single blocks ("keep" leaves a block as it is). The options
are read from both passes' option tables (attention_to_csa's first, then attention_to_sra's), so one plan serves
both.

**Graft.** The replacement module's parameters and buffers are registered under the replaced module's path
(`blocks.3.attn` -> `blocks.3.attn_csa.value.weight`, ...), its BatchNorm statistics are calibrated on the block's real
inputs (one sweep over the calibration batches, in graph order), and its forward is exported with torch.export and
inlined in the graph, every node carrying the replaced block's provenance plus an `nn_module_stack` entry naming the
new module and its class. Inlined nodes stay visible to the exact passes (fold_batchnorm, attention_to_conv, ...) and to
the legality report; the module's parameters stay trainable for distillation.
"""
from __future__ import annotations

import fnmatch
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from attn2conv.attention_match import AttentionMatch, find_attention
from attn2conv.graph import copy_provenance, get_constant, is_op, shape, where

FAST_META = "attn2conv_fast"  # node.meta key marking nodes a fast pass grafted (never matched again)
CONV_KINDS = ("csa", "mhca")
ATTENTION_KINDS = ("sra", "gsa", "lsa", "hmhsa")
PASS_IDS = ("attention_to_csa", "attention_to_sra")
UNWINDOWED_KINDS = CONV_KINDS + ("sra", "gsa", "lsa")  # kinds that can take a whole (B, H, W, C) map
_WALK = ("aten.reshape", "aten.view", "aten._unsafe_view", "aten.permute", "aten.transpose", "aten.clone",
         "aten.contiguous", "aten.unsqueeze", "aten.squeeze", "aten.alias", "aten.detach", "aten.expand",
         "aten.dropout", "aten.t")


@dataclass
class AttentionBlock:
    path: str
    match: AttentionMatch
    nodes: list[fx.Node]
    input: fx.Node
    output: fx.Node
    dim: int
    tokens: int
    heads: int
    scale: float
    weights: dict[str, torch.Tensor | None] = field(default_factory=dict)
    grid: tuple[int, int] | None = None
    prefix: int = 0
    window_span: tuple | None = None  # (map before partition, map after reverse, layout nodes in between) for windows
    channels_last: bool = False       # the block reads and writes the (B, H, W, C) map (its windows dropped)

    @property
    def where(self) -> str:
        return where(self.match.anchor)


# --- finding blocks --------------------------------------------------------------------------------------------------

def find_blocks(gm: fx.GraphModule, example_inputs: tuple, options: dict) -> tuple[list[AttentionBlock], list[str]]:
    matches, match_misses = find_attention(gm)
    misses = [f"{where(n)}: {r}" for n, r in match_misses if not n.meta.get(FAST_META)]
    live = _live_nodes(gm)
    blocks, seen = [], set()
    for m in matches:
        if m.anchor.meta.get(FAST_META):
            continue
        res = _block_of(gm, m, live)
        if isinstance(res, str):
            misses.append(f"{where(m.anchor)}: {res}")
            continue
        if res.path in seen:
            misses.append(f"{where(m.anchor)}: a second attention core in {res.path}")
            continue
        grid = _grid(res.tokens, example_inputs, options)
        if isinstance(grid, str):
            misses.append(f"{res.path}: {grid}")
            continue
        res.grid, res.prefix = grid
        res.window_span = _window_span(res)
        seen.add(res.path)
        blocks.append(res)
    return blocks, misses


def _live_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    live = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or (n.op in ("call_function", "call_module", "call_method")
                                     and any(a in live for a in n.all_input_nodes)):
            live.add(n)
    return live


def _block_of(gm: fx.GraphModule, m: AttentionMatch, live: set[fx.Node]) -> AttentionBlock | str:
    stack = [_clean(p) for p, _cls in (m.anchor.meta.get("nn_module_stack") or {}).values()]
    if not stack:
        return "the attention core has no source module (no nn_module_stack)"
    reason = "no enclosing module reads one (B, N, C) tensor and returns one of the same shape"
    for path in reversed(stack):
        if not path:
            break
        nodes = [n for n in gm.graph.nodes if n in live and n.op != "placeholder" and _inside(n, path)]
        region = set(nodes)
        inputs = {a for n in nodes for a in n.all_input_nodes if a in live and a not in region}
        outputs = [n for n in nodes if any(u not in region for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1:
            reason = f"{path} reads {len(inputs)} and returns {len(outputs)} activation tensors (want 1 and 1)"
            continue
        (x,), out = inputs, outputs[0]
        xs, os_ = shape(x), shape(out)
        if xs is None or len(xs) != 3 or xs != os_:
            reason = f"{path} maps {xs} to {os_}, not (B, N, C) tokens to the same shape"
            continue
        proj = _forward_to_linear(m.output, region)
        if proj is None:
            reason = f"{path} has no projection after the attention core"
            continue
        lead = m.lead
        heads = int(lead[-1]) if len(lead) >= 2 else max(1, xs[2] // m.d)
        weights = _qkv_weights(gm, m, region)
        weights["proj_w"], weights["proj_b"] = _linear_params(gm, proj)
        return AttentionBlock(path, m, nodes, x, out, xs[2], xs[1], heads, m.scale, weights)
    return reason


def _clean(path: str) -> str:
    from attn2conv.graph import _clean_path

    return _clean_path(path)


def _inside(node: fx.Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(_clean(p) == path for p, _ in stack.values())


def _forward_to_linear(node: fx.Node, region: set[fx.Node]) -> fx.Node | None:
    for _ in range(16):
        users = [u for u in node.users if u in region]
        if len(users) != 1:
            return None
        node = users[0]
        if is_op(node, "aten.linear") or (is_op(node, "aten.conv2d") and node.args[0] is not None):
            return node
        if not is_op(node, *_WALK):
            return None
    return None


def _back_to_linear(node: Any, region: set[fx.Node]) -> tuple[fx.Node | None, int | None]:
    """Walks q/k/v back to the Linear producing it; returns (linear, index of the q/k/v slice when one was taken)."""
    index = None
    for _ in range(32):
        if not isinstance(node, fx.Node) or node not in region:
            return None, None
        if is_op(node, "aten.linear"):
            return node, index
        if node.target is operator.getitem:
            index = node.args[1] if index is None else index
            node = node.args[0]
        elif is_op(node, "aten.select"):
            index = node.args[2] if index is None else index
            node = node.args[0]
        elif is_op(node, "aten.unbind", "aten.split", "aten.split_with_sizes", "aten.chunk", *_WALK):
            node = node.args[0]
        elif is_op(node, "aten.mul", "aten.div") and not isinstance(node.args[1], fx.Node):
            node = node.args[0]  # a scale on q; the match already carries it
        else:
            return None, None
    return None, None


def _linear_params(gm: fx.GraphModule, lin: fx.Node) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    w = get_constant(gm, lin.args[1])
    b_node = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    b = get_constant(gm, b_node) if b_node is not None else None
    if w is not None and w.dim() == 4:  # already a 1x1 conv
        w = w.reshape(w.shape[0], w.shape[1])
    return (w.detach().clone() if w is not None else None), (b.detach().clone() if b is not None else None)


def _qkv_weights(gm: fx.GraphModule, m: AttentionMatch, region: set[fx.Node]) -> dict:
    found = {name: _back_to_linear(src, region) for name, src in (("q", m.q), ("k", m.k if m.k is not None else m.k_t),
                                                                  ("v", m.v))}
    out: dict[str, torch.Tensor | None] = {}
    lins = {lin for lin, _ in found.values()}
    if len(lins) == 1 and None not in lins:  # one fused qkv Linear: (3C, C), sliced q, k, v
        lin = lins.pop()
        w, b = _linear_params(gm, lin)
        if w is not None and w.shape[0] % 3 == 0:
            c = w.shape[0] // 3
            idx = [i for _, i in found.values()]
            order = idx if sorted(i for i in idx if isinstance(i, int)) == [0, 1, 2] else [0, 1, 2]
            for name, i in zip(("q", "k", "v"), order):
                out[f"{name}_w"] = w[i * c:(i + 1) * c]
                out[f"{name}_b"] = b[i * c:(i + 1) * c] if b is not None else None
        return out
    for name, (lin, _) in found.items():
        if lin is not None:
            out[f"{name}_w"], out[f"{name}_b"] = _linear_params(gm, lin)
    return out


_WINDOW_LAYOUT = _WALK + ("aten.roll", "aten.pad", "aten.constant_pad_nd", "aten.slice")


def _is_window_layout(node: fx.Node) -> bool:
    """A data-movement op of a window partition / reverse (Swin: roll, pad, reshape, permute, clone, slice)."""
    if not is_op(node, *_WINDOW_LAYOUT):
        return False
    if is_op(node, "aten.pad", "aten.constant_pad_nd", "aten.slice"):  # only as no-ops (the map tiles exactly)
        return shape(node) is not None and shape(node) == shape(node.args[0])
    return True


def _window_span(blk: AttentionBlock) -> tuple | None:
    """For attention over windows (B*nW, ws*ws, C) cut from a (B, H, W, C) map by layout ops only and pasted back by
    layout ops only (Swin's roll + window partition ... window reverse + roll): (map in, map out, the layout nodes).
    A convolution block can then run on the whole map, with no partition, shift or reverse left."""
    ins = shape(blk.input)
    if ins is None or len(ins) != 3:
        return None

    def is_map(n):  # (B, H, W, C) holding every window's tokens, more than one window
        s = shape(n)
        return (s is not None and len(s) == 4 and s[3] == blk.dim and s[1] * s[2] > blk.tokens
                and s[0] * s[1] * s[2] == ins[0] * ins[1])

    chain, node = [blk.input], blk.input  # back: input <- ... <- the farthest map reached by layout ops only
    while _is_window_layout(node) and len(node.users) == 1 and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        chain.append(node)
    starts = [i for i, n in enumerate(chain) if i > 0 and is_map(n)]
    if not starts:
        return None
    src, back = chain[starts[-1]], chain[:starts[-1]]
    fwd, node = [], blk.output
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not _is_window_layout(user) or user.args[0] is not node:
            break
        fwd.append(user)
        node = user
    ends = [i for i, n in enumerate(fwd) if shape(n) == shape(src)]
    if not ends:
        return None
    dst, fwd = fwd[ends[-1]], fwd[:ends[-1] + 1]
    return src, dst, list(reversed(back)) + fwd


def unwindowed(blk: AttentionBlock) -> AttentionBlock:
    """The block widened to the whole (B, H, W, C) map: its input before the window partition, its output after the
    window reverse, the layout nodes in between replaced too."""
    src, dst, layout = blk.window_span
    order = {n: i for i, n in enumerate(src.graph.nodes)}
    nodes = sorted(set(blk.nodes) | set(layout), key=order.__getitem__)
    _, h, w, _ = shape(src)
    return AttentionBlock(blk.path, blk.match, nodes, src, dst, blk.dim, h * w, blk.heads, blk.scale, blk.weights,
                          grid=(h, w), prefix=0, channels_last=True)


def _grid(tokens: int, example_inputs: tuple, options: dict) -> tuple[tuple[int, int], int] | str:
    if options.get("grid"):
        h, w = (int(s) for s in options["grid"])
        prefix = int(options.get("prefix_tokens", tokens - h * w))
        if prefix < 0 or prefix + h * w != tokens or ("prefix_tokens" not in options and prefix > 16):
            return f"grid {h}x{w} and {prefix} prefix tokens do not make {tokens} tokens"
        return (h, w), prefix
    img = next((t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 4), None)
    aspect = img.shape[-2] / img.shape[-1] if img is not None else 1.0
    prefixes = [int(options["prefix_tokens"])] if "prefix_tokens" in options else range(0, 17)
    for p in prefixes:
        n = tokens - p
        if n <= 0:
            break
        h = round(math.sqrt(n * aspect))
        if h > 0 and n % h == 0 and abs((h / (n // h)) - aspect) < 1e-6 + 0.01 * aspect:
            return (h, n // h), p
    return f"{tokens} tokens do not split into prefix tokens and an image-shaped grid (give options grid=[H, W])"


# --- the plan --------------------------------------------------------------------------------------------------------

def merged_options(ctx) -> dict:
    opts: dict = {}
    for pid in PASS_IDS:
        for key, value in (ctx.options.get(pid) or {}).items():
            if key == "plan":
                opts.setdefault("plan", {}).update(value)
            else:
                opts.setdefault(key, value)
    return opts


DEFAULT_EVERY = 5  # Next-ViT stage 3: [NCB x 4, NTB]; 5 makes a 12-block DeiT two (5 conv + 1 attention) rounds
DEFAULT_CONV_KIND = "mhca"


def make_plan(blocks: list[AttentionBlock], options: dict) -> dict[str, str]:
    every = int(options.get("every", DEFAULT_EVERY))
    conv_kind = options.get("conv_kind", DEFAULT_CONV_KIND)
    attn_kind = options.get("attention_kind", "sra")
    keys = [(blk.tokens, blk.dim) for blk in blocks]
    stages = sum(1 for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k)
    # Next-ViT's first stage is convolution only (the most tokens: attention costs most there, helps least)
    conv_first = stages > 1 and options.get("first_stage_conv", True)
    only = options.get("attention_stages", "last" if stages > 1 and any(b.window_span for b in blocks) else "all")
    if only == "last":
        only = [-1]
    only = None if only == "all" else {int(i) % stages for i in only} if stages else set()
    plan, stage_key, pos, attn_pos, stage = {}, None, 0, 0, -1
    for i, blk in enumerate(blocks):
        key = keys[i]
        if key != stage_key:
            stage_key, pos, attn_pos, stage = key, 0, 0, stage + 1
        stage_ends = i + 1 == len(blocks) or keys[i + 1] != key
        if (conv_first and stage == 0) or (only is not None and stage not in only):
            kind = conv_kind
        elif (pos + 1) % (every + 1) == 0 or (stage_ends and options.get("end_with_attention", True)):
            kind = attn_kind
            if kind == "twins":
                kind = ("lsa", "gsa")[attn_pos % 2]
            attn_pos += 1
        else:
            kind = conv_kind
        plan[blk.path] = kind
        pos += 1
    for pattern, kind in (options.get("plan") or {}).items():
        for blk in blocks:
            if blk.path == pattern or fnmatch.fnmatchcase(blk.path, pattern):
                plan[blk.path] = kind
    for path, kind in plan.items():
        if kind not in CONV_KINDS + ATTENTION_KINDS + ("keep",):
            raise ValueError(f"plan for {path}: unknown kind {kind!r}; use one of "
                             f"{', '.join(CONV_KINDS + ATTENTION_KINDS + ('keep',))}")
    return plan


def build_module(blk: AttentionBlock, kind: str, options: dict) -> torch.nn.Module:
    from attn2conv.modules import CSA, MHCA, HierarchicalAttention, LocallyGroupedAttention, \
        SpatialReductionAttention

    common = dict(dim=blk.dim, grid=blk.grid, prefix=blk.prefix)
    if kind == "csa":
        reduced = int(options.get("csa_reduced", min(7, *blk.grid)))
        mod = CSA(heads=blk.heads, reduced=reduced, kernel=int(options.get("csa_kernel", 5)), **common)
    elif kind == "mhca":
        mod = MHCA(head_dim=int(options.get("head_dim", 32)), **common)
    elif kind in ("sra", "gsa"):
        mod = SpatialReductionAttention(heads=blk.heads, reduction=_reduction(options, blk),
                                        mode="conv" if kind == "gsa" else "avgpool", scale=blk.scale, **common)
    elif kind == "lsa":
        mod = LocallyGroupedAttention(heads=blk.heads, window=options.get("window"), scale=blk.scale, **common)
    elif kind == "hmhsa":
        mod = HierarchicalAttention(heads=blk.heads, window=options.get("window"),
                                    reduction=_reduction(options, blk), scale=blk.scale, **common)
    else:
        raise ValueError(kind)
    mod.reused = mod.load_from(blk.weights)
    mod.channels_last = blk.channels_last
    return mod


def _reduction(options: dict, blk: AttentionBlock) -> int | None:
    r = options.get("reduction")
    if isinstance(r, dict):  # per stage: {tokens: R} or {module glob: R}
        for key, value in r.items():
            if str(key) == str(blk.tokens) or fnmatch.fnmatchcase(blk.path, str(key)):
                return int(value)
        return None
    return int(r) if r else None


# --- calibration and grafting ----------------------------------------------------------------------------------------

def calibration_inputs(ctx, gm: fx.GraphModule, samples: int | None = None) -> list[tuple]:
    """Input tuples of the graph's static batch size: ctx.calibration batches (split/padded to that size, up to
    `samples` samples, default option calibration_samples or 32), or the example input plus 3 seeded random inputs."""
    from attn2conv.guard import probe_inputs

    if ctx.calibration is None:
        return probe_inputs(ctx.example_inputs, n_random=3, seed=1)
    samples = int(samples or merged_options(ctx).get("calibration_samples", 32))
    b0 = _static_batch(gm) or 1
    data = [ctx.calibration] if isinstance(ctx.calibration, torch.Tensor) else ctx.calibration
    xs, total = [], 0
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        xs.append(x[: samples - total])
        total += xs[-1].shape[0]
        if total >= samples:
            break
    x = torch.cat(xs)
    if x.shape[0] % b0:  # pad by repeating samples; the static graph only runs whole batches
        x = torch.cat([x, x[: b0 - x.shape[0] % b0]])
    return [(chunk,) for chunk in x.split(b0)]


def lockstep(gm: fx.GraphModule, batches: list[tuple], hooks: dict) -> None:
    """Runs `gm` on every batch at once, node by node. hooks[node](values) sees the node's value on every batch (in
    batch order) and `fetch(arg)`, the values of one of the node's arguments; it may return replacement values, so a
    statistic measured at one node already sees the effect of the replacements made before it (calibration in one
    sweep, in graph order)."""
    interps = []
    for batch in batches:
        it = fx.Interpreter(gm)
        it.env, it.args_iter = {}, iter(batch)
        interps.append(it)
    # a value is dropped after its last user ran: at camera resolutions every intermediate of every batch kept
    # alive at once is tens of GiB (hooks fetch only the arguments of their own node, alive by then)
    last_user: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        for a in node.all_input_nodes:
            last_user[a] = node
    dies_after: dict[fx.Node, list[fx.Node]] = {}
    for value, user in last_user.items():
        dies_after.setdefault(user, []).append(value)
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "output":
                break
            values = [it.run_node(node) for it in interps]
            if node in hooks:
                values = hooks[node](values, lambda n: [it.env[n] for it in interps]) or values
            for it, v in zip(interps, values):
                it.env[node] = v
                for dead in dies_after.get(node, ()):
                    it.env.pop(dead, None)


def _static_batch(gm: fx.GraphModule) -> int | None:
    ph = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    s = shape(ph) if ph is not None else None
    return s[0] if s else None


def calibrate_batchnorm(module: torch.nn.Module, inputs: torch.Tensor, batch: int = 64) -> None:
    """Sets every BatchNorm's running statistics to the exact mean/variance of its input over `inputs`."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(bn.momentum, bn.training) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    module.train()
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch):
            module(inputs[i:i + batch])
    module.eval()
    for bn, (mom, _) in zip(bns, saved):
        bn.momentum = mom


def graft(gm: fx.GraphModule, blk: AttentionBlock, module: torch.nn.Module, kind: str) -> str:
    """Registers `module` at '<block path>_<kind>', inlines its forward in place of the block; returns the name."""
    module = module.eval()
    for t in module.parameters():
        t.requires_grad_(False)  # as capture leaves every parameter; distill switches them on
    name, i = f"{blk.path}_{kind}", 1
    while _has_path(gm, name):
        i += 1
        name = f"{blk.path}_{kind}{i}"
    # Parameters and buffers go under plain containers that mirror the module's tree (same state_dict names):
    # later passes delete tensors they folded away, which would leave a real BatchNorm2d half-built and unprintable.
    gm.add_submodule(name, _plain_tree(module))
    example = torch.zeros(shape(blk.input), dtype=blk.input.meta["val"].dtype)
    with torch.no_grad():
        ep = torch.export.export(module, (example,), strict=False).run_decompositions({})
    sub = ep.module()
    own = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env[placeholders[0]] = blk.input
    result = None
    with gm.graph.inserting_before(blk.output):
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                result = fx.node.map_arg(n.args[0], lambda a: env[a])
                break
            if n.op == "call_module":  # the export's shape-guard module
                continue
            if n.op == "get_attr":
                if n.target in own:
                    target = f"{name}.{n.target}"
                else:  # a tensor constant the export lifted: keep it as a buffer of the new module
                    from attn2conv.graph import add_tensor

                    target = add_tensor(gm, name, n.target.replace(".", "_"), _get(sub, n.target))
                new = gm.graph.get_attr(target)
            else:
                new = gm.graph.node_copy(n, lambda a: env[a])
                if new.target in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default):
                    new.target = torch.ops.aten.reshape.default  # as capture does: later layouts may not be viewable
            for key in ("nn_module_stack", "stack_trace", "torch_fn", "from_node"):
                new.meta.pop(key, None)
            copy_provenance(blk.output, new)
            stack = dict(blk.output.meta.get("nn_module_stack") or {})
            stack[name] = (name, f"{type(module).__module__}.{type(module).__qualname__}")
            new.meta["nn_module_stack"] = stack
            new.meta[FAST_META] = kind
            if "val" in n.meta:
                new.meta["val"] = n.meta["val"]
            env[n] = new
    out = result[0] if isinstance(result, (tuple, list)) else result
    blk.output.replace_all_uses_with(out)
    for node in reversed(blk.nodes):  # sdpa is impure for dead-code elimination: erase the old block explicitly
        if not node.users:
            gm.graph.erase_node(node)
    return name


def _plain_tree(module: torch.nn.Module) -> torch.nn.Module:
    root = torch.nn.Module()
    for path, sub in module.named_modules():
        owner = root
        for atom in [a for a in path.split(".") if a]:
            if not hasattr(owner, atom):
                owner.add_module(atom, torch.nn.Module())
            owner = getattr(owner, atom)
        for key, p in sub._parameters.items():
            if p is not None:
                owner.register_parameter(key, p)
        for key, b in sub._buffers.items():
            if b is not None:
                owner.register_buffer(key, b)
    return root


def _has_path(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
        return True
    except AttributeError:
        return False


def _get(obj: Any, target: str) -> Any:
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def replace_blocks(gm: fx.GraphModule, ctx, owned: tuple[str, ...]):
    """The body of attention_to_csa / attention_to_sra: replaces the blocks the plan gives one of `owned` kinds."""
    from attn2conv.pass_infra import PassResult

    result = PassResult(changed=False)
    options = merged_options(ctx)
    blocks, result.misses = find_blocks(gm, ctx.example_inputs, options)
    plan = gm.meta.get("attn2conv_plan")
    if plan is None or any(b.path not in plan for b in blocks):
        plan = make_plan(blocks, options)
        gm.meta["attn2conv_plan"] = dict(plan)  # both passes see the plan made on the untouched graph
    todo = [b for b in blocks if plan.get(b.path) in owned]
    if options.get("unwindow", True):  # the new blocks need no windows: they run on the whole map
        todo = [unwindowed(b) if b.window_span and plan[b.path] in UNWINDOWED_KINDS else b for b in todo]
    if not todo:
        result.notes.append(f"no block planned as {'/'.join(owned)} (plan: {_plan_summary(plan)})")
        return result
    built = []
    for blk in todo:
        try:
            built.append((blk, build_module(blk, plan[blk.path], options)))
        except ValueError as exc:
            result.misses.append(f"{blk.path}: {exc}")
    _calibrate_modules(gm, built, calibration_inputs(ctx, gm))
    for blk, module in built:
        kind = plan[blk.path]
        name = graft(gm, blk, module, kind)
        reused = ", ".join(module.reused) or "none"
        whole = ", whole map: window partition/shift dropped" if blk.channels_last else ""
        result.notes.append(f"{blk.path} -> {name} ({type(module).__name__}, grid {blk.grid[0]}x{blk.grid[1]}{whole}"
                            f"{f' + {blk.prefix} prefix' if blk.prefix else ''}, heads {blk.heads}; reused: {reused})")
        result.rewrites += 1
    result.changed = result.rewrites > 0
    if result.changed:
        result.notes.append(f"plan: {_plan_summary(plan)}; needs distillation")
    return result


def _calibrate_modules(gm: fx.GraphModule, built: list, batches: list[tuple]) -> None:
    """BN statistics of each new module from its real inputs, in one sweep: later blocks see the outputs of the
    replaced earlier ones, as they will after the rewrite."""
    by_input: dict = {}
    by_output: dict = {}
    for blk, module in built:
        by_input.setdefault(blk.input, []).append(module)
        by_output[blk.output] = (module, blk.input)
    seen: dict = {}

    def hook_for(node):
        def hook(values, fetch):
            if node in by_input:
                seen[node] = values
                for module in by_input[node]:
                    calibrate_batchnorm(module, torch.cat(values))
            if node in by_output:
                module, x = by_output[node]
                return [module(v) for v in seen[x]]
            return None
        return hook

    lockstep(gm, batches, {n: hook_for(n) for n in set(by_input) | set(by_output)})


def _plan_summary(plan: dict[str, str]) -> str:
    return ", ".join(f"{p}={k}" for p, k in plan.items()) or "empty"
