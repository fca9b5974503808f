"""Optional TensorRT build check for `attn2conv-check MODEL.onnx --build` (never imports torch).

With the `trt` extra (`pip install 'attn2conv[trt]'`) and a CUDA GPU, the ONNX file is parsed with TensorRT's
OnnxParser and an engine is built with the TensorRT Python API, with the capability the profile's kind asks for:

  trt       EngineCapability.STANDARD on the GPU
  trt-safe  EngineCapability.SAFETY (only NVIDIA DRIVE builds of TensorRT support it: "This flag is only supported in
            NVIDIA Drive(R) products", NvInferRuntime.h 8.6); elsewhere the builder refuses it and the standard
            build runs instead, and the verdict says the safety capability could not be checked on this install
  dla       default device DLA core 0, FP16, no GPU fallback (every layer must run on the DLA); skipped on GPUs
            without DLA cores (DLA exists on Jetson/DRIVE Orin and Xavier)

The verdict is one of: "built" (the engine was built with the asked-for capability), "built-standard" (only the
standard capability could be tried), "failed" (parser or builder errors, listed), "skipped" (no TensorRT, no GPU, or
no DLA core; one line says which). Without TensorRT or a GPU nothing fails: the check's own verdict stands.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BuildVerdict:
    status: str  # built | built-standard | failed | skipped
    message: str  # one line
    capability: str | None = None
    tensorrt: str | None = None
    errors: list[str] = field(default_factory=list)
    seconds: float | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return f"TensorRT build: {self.status}: {self.message}"


def cuda_device_count() -> int:
    """Number of CUDA devices the driver sees (0 without a driver or a GPU), via libcuda, without torch."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    return 0


def build_engine(model_path: str | Path, profile: Any) -> BuildVerdict:
    """Parses and builds `model_path` with TensorRT for `profile` (an attn2conv target profile)."""
    try:
        import tensorrt as trt
    except ImportError:
        return BuildVerdict("skipped", "the TensorRT Python package is not installed (pip install 'attn2conv[trt]' "
                                       "on a machine with an NVIDIA GPU)")
    version = getattr(trt, "__version__", "?")
    if cuda_device_count() == 0:
        return BuildVerdict("skipped", f"TensorRT {version} is installed but no CUDA GPU is visible", tensorrt=version)

    kind = getattr(profile, "kind", "trt")
    logger = trt.Logger(trt.Logger.ERROR)
    start = time.perf_counter()
    builder = trt.Builder(logger)
    if kind == "dla" and getattr(builder, "num_DLA_cores", 0) == 0:
        return BuildVerdict("skipped", "this GPU has no DLA core (DLA builds need a Jetson/DRIVE Orin or Xavier)",
                            tensorrt=version)

    def attempt(capability: str) -> tuple[bool, list[str]]:
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # implicit batch is gone in TensorRT 10
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(model_path)):
            return False, [f"parser: {parser.get_error(i).desc()}" for i in range(parser.num_errors)]
        config = builder.create_builder_config()
        if capability == "safety":
            config.engine_capability = trt.EngineCapability.SAFETY
        elif capability == "dla":
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = 0
            config.set_flag(trt.BuilderFlag.FP16)  # DLA runs FP16 or INT8 only
            config.clear_flag(trt.BuilderFlag.GPU_FALLBACK)
        recorder_errors: list[str] = []
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            recorder_errors.append("builder returned no engine (see the TensorRT log above)")
            return False, recorder_errors
        return True, []

    wanted = {"trt-safe": "safety", "dla": "dla"}.get(kind, "standard")
    try:
        ok, errors = attempt(wanted)
    except Exception as exc:  # noqa: BLE001 - the builder raises for unsupported capabilities
        ok, errors = False, [" ".join(str(exc).split())[:300]]
    seconds = round(time.perf_counter() - start, 2)
    if ok:
        return BuildVerdict("built", f"engine built with TensorRT {version} ({wanted} capability)", wanted, version,
                            seconds=seconds)
    if wanted == "safety":
        # A standard (non-DRIVE) TensorRT refuses the safety capability itself; the standard build still says
        # whether the parser and builder accept the graph.
        try:
            ok_std, errors_std = attempt("standard")
        except Exception as exc:  # noqa: BLE001
            ok_std, errors_std = False, [" ".join(str(exc).split())[:300]]
        seconds = round(time.perf_counter() - start, 2)
        if ok_std:
            return BuildVerdict("built-standard", f"the safety capability was refused by TensorRT {version} (only "
                                f"DRIVE builds support it: {errors[0] if errors else 'no reason given'}); the "
                                "standard build succeeded", "standard", version, errors, seconds)
        errors = errors + errors_std
    return BuildVerdict("failed", f"TensorRT {version} could not build the {wanted} engine: "
                        f"{errors[0] if errors else 'no reason given'}", wanted, version, errors, seconds)
