"""attn2conv-check: certify an ONNX graph against a TensorRT target profile (never imports torch).

    >>> from attn2conv.check import check
    >>> result = check("model.onnx", target="trt-safe")
    >>> result.ok, [f.rule for f in result.findings]
"""

from ._engine import CheckResult, Finding, check
from ._load import InputError

__all__ = ["CheckResult", "Finding", "InputError", "check"]
