"""mlp_prune (architectural, not exact, opt-in): structured pruning of the hidden units of every MLP.

    MLP:     y = fc2(act(fc1(x))) = W2 act(W1 x + b1) + b2,    W1: (H, C), W2: (C', H)
    pruned:  keep K of the H hidden units: rows of W1 and b1, the matching columns of W2   (K = hidden_ratio * C)

The kept units keep their weights (in their original order); a dropped unit j is replaced by its mean activation
m_j on the calibration batches, folded into the bias: b2' = b2 + W2[:, dropped] m_dropped (with score="weight",
no statistics: m = 0). Why: after the attention swaps, a Swin-T's windowed attention is already linear in the number
of pixels and its MLPs (hidden ratio 4) are ~61 % of its MACs, so only narrower MLPs bring it well below the
original's latency; hidden_ratio 1 cuts each MLP's MACs by 4.

Off unless asked: options={"mlp_prune": {"hidden_ratio": r}} (hidden units per input channel, as timm's mlp_ratio:
a DeiT-S/Swin-T MLP has 4; 1.0 keeps a quarter) or {"keep": f} (fraction of the hidden units kept; 1.0 keeps all).
Either may be a {module glob: value} table matched against the MLP's path ('blocks.3.mlp', 'layers.2.blocks.*');
MLPs it does not match are left as they are. Other options: score ("activation": RMS of the unit's activation on
the calibration batches times ||W2[:, j]||, the default; "weight": ||[W1[j], b1[j]]|| * ||W2[:, j]||, no data),
multiple_of (K rounded up to it, default 8: channel counts TensorRT tiles well).

Which chains: a Linear with constant weights whose output reaches exactly one consumer Linear (constant weights)
only through element-wise ops on the hidden units alone (GELU, ReLU, SiLU, x * sigmoid(x), dropout, ...), at least
one of them. Gated MLPs (SwiGLU: two fc1, a product of both) and chains whose hidden units reach anything else are
reported, not pruned. Nodes the attention swaps grafted are not touched. Introduces no op; removes none.
Runs first in the fast presets, so the BatchNorm statistics of layernorm_to_batchnorm and of the new attention
modules are measured on the pruned graph. Needs distillation.
"""
from __future__ import annotations

import fnmatch
import math

import torch
import torch.fx as fx

from attn2conv.graph import Builder, arg, aten, get_constant, is_op, module_path, nodes_of, replace_uses, where
from attn2conv.modules.replace import FAST_META, calibration_inputs, lockstep
from attn2conv.pass_infra import GraphPass, PassContext, PassResult, register

# element-wise ops that act on each hidden unit alone (a second tensor operand must come from the same chain)
_UNIT_OPS = ("aten.gelu", "aten.relu", "aten.silu", "aten.sigmoid", "aten.tanh", "aten.hardswish",
             "aten.hardsigmoid", "aten.relu6", "aten.hardtanh", "aten.clamp", "aten.leaky_relu", "aten.elu",
             "aten.mish", "aten.erf", "aten.dropout", "aten.clone", "aten.alias", "aten.detach", "aten.neg",
             "aten.mul", "aten.add", "aten.sub", "aten.div", "aten.pow", "aten.square", "aten.abs")
_NOT_ACTIVATIONS = ("aten.dropout", "aten.clone", "aten.alias", "aten.detach")
SCORES = ("activation", "weight")


class MlpChain:
    def __init__(self, fc1: fx.Node, fc2: fx.Node, hidden_out: fx.Node, region: list[fx.Node]):
        self.fc1, self.fc2, self.hidden_out, self.region = fc1, fc2, hidden_out, region
        fc1_path = module_path(fc1)
        self.path = fc1_path.rpartition(".")[0] or fc1_path or fc1.name  # 'blocks.3.mlp'


def find_mlp_chains(gm: fx.GraphModule) -> tuple[list[MlpChain], list[str]]:
    """Linear -> element-wise ops on the hidden units -> Linear chains; misses say why a candidate was skipped."""
    chains, misses = [], []
    for fc1 in nodes_of(gm, "aten.linear"):
        if fc1.meta.get(FAST_META) or get_constant(gm, fc1.args[1]) is None:
            continue
        res = _chain_from(gm, fc1)
        if isinstance(res, MlpChain):
            chains.append(res)
        elif res:
            misses.append(f"{where(fc1)}: {res}")
    return chains, misses


def _chain_from(gm: fx.GraphModule, fc1: fx.Node) -> MlpChain | str | None:
    """The chain starting at fc1; a reason when it looks like an MLP but cannot be pruned; None when it is not one."""
    region, queue, fc2 = {fc1}, [fc1], None
    order = []
    while queue:
        node = queue.pop(0)
        for u in node.users:
            if u in region:
                continue
            if is_op(u, "aten.linear") and u.args[0] is node and node is not fc1:
                if fc2 is not None and fc2 is not u:
                    return None if len(region) == 1 else f"the hidden units reach two Linears ({fc2.name}, {u.name})"
                if get_constant(gm, u.args[1]) is None or u.meta.get(FAST_META):
                    return f"{u.name} has computed weights"
                fc2 = u
            elif is_op(u, *_UNIT_OPS) and _reads_only(u, region | {u}):
                region.add(u)
                order.append(u)
                queue.append(u)
            else:
                # not an MLP at all unless an activation was already seen (qkv -> reshape is not a candidate)
                acts = [n for n in order if not is_op(n, *_NOT_ACTIVATIONS)]
                return f"the hidden units also reach {u.name} ({u.target})" if acts else None
    if fc2 is None:
        return None
    hidden_out = fc2.args[0]
    if not [n for n in order if not is_op(n, *_NOT_ACTIVATIONS)]:
        return None  # Linear -> Linear: no MLP
    if any(u is not fc2 and u not in region for n in region for u in n.users if n is not hidden_out) or \
            any(u is not fc2 for u in hidden_out.users):
        return "the hidden units are read outside the MLP"
    return MlpChain(fc1, fc2, hidden_out, order)


def _reads_only(node: fx.Node, region: set[fx.Node]) -> bool:
    """Every tensor operand of `node` is in the chain (scalars are fine; a constant tensor would need pruning too)."""
    return all(a in region for a in node.all_input_nodes)


def _target_width(hidden: int, channels: int, path: str, opts: dict) -> int | None:
    """K for one MLP, or None when the options do not name it."""
    key = "hidden_ratio" if "hidden_ratio" in opts else "keep"
    value = opts[key]
    if isinstance(value, dict):
        value = next((v for glob, v in value.items() if path == glob or fnmatch.fnmatchcase(path, glob)), None)
        if value is None:
            return None
    value = float(value)
    if value <= 0:
        raise ValueError(f"mlp_prune: option {key}={value} must be positive")
    k = value * channels if key == "hidden_ratio" else value * hidden
    multiple = int(opts.get("multiple_of", 8))
    k = int(math.ceil(round(k, 6) / multiple) * multiple) if multiple > 1 else int(math.ceil(round(k, 6)))
    return max(1, min(hidden, k))


@register
class MlpPrune(GraphPass):
    id = "mlp_prune"
    exact = False
    removes = ()
    introduces = ()
    summary = "MLP hidden units pruned to hidden_ratio x channels (opt-in; needs distillation)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        opts = dict(ctx.options.get(self.id) or {})
        if "hidden_ratio" not in opts and "keep" not in opts:
            result.notes.append("off: options={'mlp_prune': {'hidden_ratio': 1.0}} (hidden units per channel) or "
                                "{'keep': 0.25} (fraction kept) turns it on")
            return result
        if "hidden_ratio" in opts and "keep" in opts:
            raise ValueError("mlp_prune: give hidden_ratio or keep, not both")
        score = opts.get("score", "activation")
        if score not in SCORES:
            raise ValueError(f"mlp_prune: option score={score!r}, use one of {', '.join(SCORES)}")
        chains, result.misses = find_mlp_chains(gm)
        todo = []
        for chain in chains:
            w1 = get_constant(gm, chain.fc1.args[1])
            hidden, channels = w1.shape[0], w1.shape[-1]
            k = _target_width(hidden, channels, chain.path, opts)
            if k is None:
                continue
            if k >= hidden:
                result.notes.append(f"{chain.path}: keeps all {hidden} hidden units")
                continue
            todo.append((chain, k))
        if not todo:
            return result
        plans = self._activation_plans(gm, ctx, todo) if score == "activation" else \
            {c.fc1: (self._weight_keep(gm, c, k), None) for c, k in todo}
        for chain, k in todo:
            keep, means = plans[chain.fc1]
            hidden = get_constant(gm, chain.fc1.args[1]).shape[0]
            self._prune(gm, chain, keep, means)
            result.notes.append(f"{chain.path}: hidden {hidden} -> {len(keep)} units ({score} score)")
            result.rewrites += 1
        result.changed = result.rewrites > 0
        if result.changed:
            result.notes.append(f"{result.rewrites} MLPs narrowed; needs distillation")
        return result

    @staticmethod
    def _weight_keep(gm: fx.GraphModule, chain: MlpChain, k: int) -> torch.Tensor:
        w1, b1, w2 = _weights(gm, chain)
        rows = w1 if b1 is None else torch.cat([w1, b1[:, None]], dim=1)
        scores = rows.norm(dim=1) * w2.norm(dim=0)
        return torch.topk(scores, k).indices.sort().values

    @staticmethod
    def _activation_plans(gm: fx.GraphModule, ctx: PassContext, todo: list) -> dict:
        """One sweep in graph order over the calibration batches: each MLP is scored on inputs that already went
        through the pruned MLPs before it; its dropped units then carry their mean, as the folded bias will."""
        plans: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook_for(chain: MlpChain, k: int):
            def hook(values, _fetch):
                h = values[0].shape[-1]
                sample = torch.cat([v.double().reshape(-1, h) for v in values])
                mean, rms = sample.mean(0), sample.square().mean(0).sqrt()
                _, _, w2 = _weights(gm, chain)
                keep = torch.topk(rms * w2.norm(dim=0), k).indices.sort().values
                dropped = torch.ones(h, dtype=torch.bool)
                dropped[keep] = False
                plans[chain.fc1] = (keep, mean[dropped])
                fill = mean[dropped]
                out = []
                for v in values:
                    v = v.clone()
                    v[..., dropped] = fill.to(v.dtype)
                    out.append(v)
                return out
            return hook

        lockstep(gm, calibration_inputs(ctx, gm), {c.hidden_out: hook_for(c, k) for c, k in todo})
        return plans

    @staticmethod
    def _prune(gm: fx.GraphModule, chain: MlpChain, keep: torch.Tensor, dropped_means: torch.Tensor | None) -> None:
        w1, b1, w2 = _weights(gm, chain)
        b2_node = arg(chain.fc2, 2, "bias")
        b2 = get_constant(gm, b2_node) if b2_node is not None else None
        dropped = torch.ones(w1.shape[0], dtype=torch.bool)
        dropped[keep] = False
        b = Builder(gm, chain.fc1)
        new_w1 = b.constant(w1[keep].clone(), "pruned_weight", trainable=True)
        new_b1 = b.constant(b1[keep].clone(), "pruned_bias", trainable=True) if b1 is not None else None
        fc1 = b.call(aten.linear.default, chain.fc1.args[0], new_w1, new_b1)
        replace_uses(chain.fc1, fc1)
        gm.graph.erase_node(chain.fc1)
        chain.fc1 = fc1
        for node in chain.region:  # the hidden width changed: shapes are re-inferred after the pass
            node.meta.pop("val", None)
        b = Builder(gm, chain.fc2)
        new_w2 = b.constant(w2[:, keep].clone(), "pruned_weight", trainable=True)
        bias = b2.double() if b2 is not None else torch.zeros(w2.shape[0], dtype=torch.float64)
        if dropped_means is not None:  # the dropped units as constants: their mean contribution moves into the bias
            bias = bias + w2[:, dropped].double() @ dropped_means
        new_b2 = b.constant(bias.to(w2.dtype), "pruned_bias", trainable=True) \
            if b2 is not None or dropped_means is not None else None
        fc2 = b.call(aten.linear.default, chain.fc2.args[0], new_w2, new_b2)
        replace_uses(chain.fc2, fc2)
        gm.graph.erase_node(chain.fc2)


def _weights(gm: fx.GraphModule, chain: MlpChain):
    w1 = get_constant(gm, chain.fc1.args[1]).detach()
    b1_node = arg(chain.fc1, 2, "bias")
    b1 = get_constant(gm, b1_node).detach() if b1_node is not None else None
    w2 = get_constant(gm, chain.fc2.args[1]).detach()
    return w1, b1, w2
