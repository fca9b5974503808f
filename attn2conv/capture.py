"""Capture: nn.Module + example input -> functional ATen fx.GraphModule with static shapes and provenance.

torch.export (non-strict) is the one capture path. `run_decompositions({})` then functionalises the graph (in-place
`add_`/`relu_` become `add`/`relu`, dropout disappears in eval mode) while keeping the high-level ops the passes match
on: linear, layer_norm, gelu, scaled_dot_product_attention, conv2d. It re-traces the whole graph (as long as the
export itself on DeiT-S / Swin-T), so where the exported graph has nothing for it to do but drop eval-mode dropout and
resolve flatten / contiguous (the timm and Hugging Face vision transformers), those are rewritten directly instead.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx

from attn2conv.errors import CaptureError
from attn2conv.graph import refresh_shapes


def default_example_inputs(model: torch.nn.Module, batch: int = 1) -> tuple[torch.Tensor]:
    """(1, C, H, W) from timm's pretrained_cfg['input_size'] or a Hugging Face config's image_size/num_channels."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return (torch.randn(batch, *cfg["input_size"]),)
    hf = getattr(model, "config", None)
    size = getattr(hf, "image_size", None)
    if hf is not None and size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        return (torch.randn(batch, getattr(hf, "num_channels", 3), h, w),)
    raise CaptureError(
        f"{type(model).__name__}: cannot derive an input shape (no timm pretrained_cfg['input_size'] and no "
        "Hugging Face config.image_size); pass example_inputs=(torch.randn(1, 3, 224, 224),)"
    )


def as_input_tuple(example_inputs: Any) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    raise CaptureError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def capture(model: torch.nn.Module, example_inputs: Any = None, *, shapes: bool = True) -> fx.GraphModule:
    """Returns the model as a functional ATen GraphModule. The user's model is deep-copied, never touched.
    shapes=False leaves node.meta['val'] as torch.export wrote it, for a caller that refreshes the shapes itself (the
    conversion's guard does, on its first run of the graph)."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs) or default_example_inputs(model)
    work = copy.deepcopy(model).eval()
    tracker = _ModuleTracker(work)
    try:
        with torch.no_grad():
            ep = torch.export.export(work, inputs, strict=False)
            if not _functional_already(ep.graph_module):
                ep = ep.run_decompositions({})
    except Exception as exc:  # export raises many types; all become one line naming the module
        raise CaptureError(f"capture failed in module '{tracker.innermost()}': {_first_line(exc)}") from exc
    finally:
        tracker.remove()
    gm = ep.module()
    _resolve_composites(gm)
    _drop_guards(gm)
    _views_to_reshapes(gm)
    for p in gm.parameters():
        p.requires_grad_(False)
    gm.meta["example_inputs"] = inputs
    gm.meta["source_class"] = type(model).__name__
    if shapes:
        refresh_shapes(gm, inputs)
    return gm


def _direct_composites() -> dict:
    """Composite ops that run_decompositions would resolve and that are rewritten here instead (eval mode only)."""
    aten = torch.ops.aten
    return {aten.dropout.default: "identity", aten.flatten.using_ints: "reshape", aten.reshape.default: "keep",
            aten.contiguous.default: "clone"}


def _functional_already(gm: fx.GraphModule) -> bool:
    """True when run_decompositions({}) would change nothing but the ops of _direct_composites: every call is an ATen
    op that mutates nothing and either has its own kernel or is a composite export preserves (linear, layer_norm,
    scaled_dot_product_attention, ...). Anything else (in-place ops, other composites, higher-order ops, torch's
    private helpers gone) takes the decomposition."""
    import operator

    try:
        from torch._export.utils import _is_preservable_cia_op
    except ImportError:  # pragma: no cover - torch moved it
        return False
    direct = _direct_composites()
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_method"):
            return False
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        op = node.target
        if op in direct:
            if op is torch.ops.aten.dropout.default and (len(node.args) < 3 or node.args[2] is not False):
                return False  # a dropout that is on (train=True) stays for decomposition to reject
            continue
        if not isinstance(op, torch._ops.OpOverload) or op.namespace != "aten" or op._schema.is_mutable:
            return False
        if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd") and \
                not _is_preservable_cia_op(op):
            return False
    return True


def _resolve_composites(gm: fx.GraphModule) -> None:
    """Eval-mode dropout -> its input, flatten -> reshape to the recorded shape, contiguous -> clone, dead code
    dropped (what run_decompositions gives: the training-IR graph keeps values nothing reads)."""
    from attn2conv.graph import eliminate_dead_code

    aten = torch.ops.aten
    direct = _direct_composites()
    for node in list(gm.graph.nodes):
        how = direct.get(node.target) if node.op == "call_function" else None
        if how == "identity":
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif how == "reshape":
            node.target, node.args, node.kwargs = aten.reshape.default, (node.args[0], list(node.meta["val"].shape)), {}
        elif how == "clone":
            fmt = node.kwargs.get("memory_format", node.args[1] if len(node.args) > 1 else torch.contiguous_format)
            node.target, node.args, node.kwargs = aten.clone.default, (node.args[0],), {"memory_format": fmt}
    eliminate_dead_code(gm.graph)


def _drop_guards(gm: fx.GraphModule) -> None:
    """ep.module() calls a '_guards_fn' shape-check submodule; static shapes make it redundant for our passes."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.graph.lint()  # _views_to_reshapes, next, recompiles


def _views_to_reshapes(gm: fx.GraphModule) -> None:
    """Passes change memory layouts (a permute where a linear was); reshape, unlike view, accepts any layout."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default):
            node.target = torch.ops.aten.reshape.default
    gm.recompile()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}"


class _ModuleTracker:
    """Forward hooks that remember which module was running when tracing failed."""

    def __init__(self, model: torch.nn.Module):
        self.stack: list[str] = []
        self.last_failed = ""
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name or "<root>")))
            self.handles.append(module.register_forward_hook(self._leave()))

    def _enter(self, name: str):
        def hook(_module, _args):
            self.stack.append(name)

        return hook

    def _leave(self):
        def hook(_module, _args, _out):
            if self.stack:
                self.stack.pop()

        return hook

    def innermost(self) -> str:
        return self.stack[-1] if self.stack else "<root>"

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
