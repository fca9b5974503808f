"""attn2conv: rewrite vision-transformer attention into convolutions and certify the ONNX for TensorRT targets.

    import attn2conv
    result = attn2conv.convert(model, target="trt-safe")      # exact: same numbers, checked after every pass
    print(result.report)

    attn2conv.check("model.onnx", target="dla")              # the ONNX verifier, usable without torch

Names are imported lazily so that `attn2conv-check` and `attn2conv.check` never import torch.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_LAZY = {
    "capture": "attn2conv.capture",
    "default_example_inputs": "attn2conv.capture",
    "convert": "attn2conv.convert",
    "ConversionResult": "attn2conv.convert",
    "export_onnx": "attn2conv.export",
    "ExportError": "attn2conv.export",
    "Pipeline": "attn2conv.pipeline",
    "GraphPass": "attn2conv.pass_infra",
    "PassResult": "attn2conv.pass_infra",
    "PassContext": "attn2conv.pass_infra",
    "register": "attn2conv.pass_infra",
    "all_passes": "attn2conv.pass_infra",
    "ConversionReport": "attn2conv.report",
    "check": "attn2conv.check",
    "distill": "attn2conv.distill",
    "CheckResult": "attn2conv.check",
    "resolve_target": "attn2conv.targets",
    "list_targets": "attn2conv.targets",
    "Attn2ConvError": "attn2conv.errors",
    "CaptureError": "attn2conv.errors",
    "PipelineError": "attn2conv.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attn2conv' has no attribute {name!r}")


class _Package(types.ModuleType):
    """`capture`, `convert`, `distill` and `check` name both a submodule and the function it exports. Importing the
    submodule would rebind `attn2conv.convert` to the module; this keeps the public name bound to the function
    (the submodule stays importable: `from attn2conv.convert import ConversionResult`)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and name in _LAZY and value.__name__ == _LAZY[name]:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
