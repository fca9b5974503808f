"""attn2conv-check: certify an ONNX graph against a TensorRT target profile (never imports torch).

    >>> from attn2conv.check import check
    >>> result = check("model.onnx", target="trt-safe")
    >>> result.ok, [f.rule for f in result.findings]
"""

from ._engine import CheckResult, Finding, check
from ._load import InputError

__all__ = ["CheckResult", "Finding", "InputError", "check"]


# `attn2conv.check` names both this package and the function above. Once the package is imported, Python binds
# the attribute `attn2conv.check` to the package, so make the package itself callable as `check(...)`.
import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        return check(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
