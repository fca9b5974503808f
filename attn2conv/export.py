"""Export: a (rewritten) fx.GraphModule -> a clean, checked ONNX file that still names the user's modules.

    info = export_onnx(result.module, (x,), "model.onnx", target="trt-safe")
    info.opset, info.parity, info.path

Steps, all on a temporary copy next to the destination (the destination only ever holds a complete file):

1. The dynamo exporter's translation at opset 18 (the lowest it translates to) with static shapes. A GraphModule
   from attn2conv.capture and the passes is functional ATen with a recorded value on every node already, so it is
   not traced again: its get_attrs are lifted into an ExportedProgram's parameter/buffer/constant placeholders and
   torch.onnx translates that directly (re-tracing the converted DeiT-S was most of the export time); anything else
   goes through ``torch.onnx.export(dynamo=True)``. Then onnxscript's constant folding and a chosen subset of its rewrite rules (no-op removal, Reshape/Transpose/
   Slice/Cast chain collapsing, Pad and BatchNorm into Conv): the exporter's full optimiser tries ~46 rules on every
   node and was 1/5 of the end-to-end time on DeiT-S for the same result. Every node carries ``metadata_props``
   written by the exporter:
   ``pkg.torch.onnx.name_scopes`` (module path, e.g. ``blocks.3.attn.qkv``), ``pkg.torch.onnx.stack_trace`` (the
   Python line), ``namespace``, ``class_hierarchy``.
2. If the target profile caps the opset below 18 (TensorRT 8.6 parses opsets 7..17), ``onnx.version_converter``
   brings the model down. The converter drops ``metadata_props``; they are put back by node name.
3. onnx-graphsurgeon clean-up: fold constants, bypass Identity nodes, remove dead nodes, topological sort. Graph
   surgeon drops ``metadata_props`` too; they are put back by node name, and a node the clean-up created inherits the
   provenance of a neighbour, so the verifier can still say ``blocks.3.attn``.
4. Write: a single file, or weights as external data (``<name>.data`` next to the model) when they pass 2 GiB; then
   ``onnx.checker.check_model(full_check=True)`` on the written file.
5. Parity: ONNX Runtime (CPU, fp32) against the torch module on the example input and a random input (or on the
   inputs/outputs the caller already has); relative error = max|y_ort - y_torch| / max|y_torch| over all outputs.
6. Optionally (``certify=True``) the verifier runs on the same bytes and the certificate ``<name>.cert.json`` is
   written; then everything is moved into place (data file first, then the model, then the certificate).

Any failure raises :class:`ExportError` (one line) and leaves nothing new at the destination.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnx.numpy_helper

from attn2conv.errors import Attn2ConvError

# The dynamo exporter translates to opset 18 and up; lower opsets are reached with onnx's version converter.
EXPORTER_MIN_OPSET = 18
# protobuf cannot serialise a message of 2 GiB or more; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
# graph surgeon does not fold constants into tensors larger than this (a folded Expand can bloat the file).
FOLD_SIZE_LIMIT = 16 * 1024**2
PROVENANCE_PREFIX = "pkg.torch.onnx."


class ExportError(Attn2ConvError):
    """The graph could not be exported, cleaned or written as valid ONNX. The message is one line."""


@dataclass
class ExportResult:
    path: str
    opset: int
    nodes: int
    external_data: bool = False
    parity: float | None = None  # ONNX Runtime vs the exported torch module, relative error
    parity_vs_original: float | None = None  # ONNX Runtime vs the original model's outputs, when given
    parity_vs_original_each: list[float] = field(default_factory=list)  # the same, per probe input
    parity_inputs: int = 0  # probes compared with the torch module (the first ones, where a reference is given)
    rtol: float = 1e-4
    nodes_with_provenance: int = 0
    check: Any = None  # attn2conv.check.CheckResult when certify=True
    certificate_path: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def parity_ok(self) -> bool:
        return self.parity is not None and self.parity <= self.rtol

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "opset": self.opset, "nodes": self.nodes, "external_data": self.external_data,
            "parity": self.parity, "parity_vs_original": self.parity_vs_original,
            "parity_vs_original_each": list(self.parity_vs_original_each), "parity_inputs": self.parity_inputs, "parity_ok": self.parity_ok, "rtol": self.rtol,
            "nodes_with_provenance": self.nodes_with_provenance, "certificate": self.certificate_path,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, "notes": list(self.notes),
        }


def choose_opset(profile) -> int:
    """The opset to write: 18 when the profile allows it, else the profile's bound (17 for TensorRT 8.6)."""
    highest = min(int(profile.opset_max), onnx.defs.onnx_opset_version())
    opset = min(max(EXPORTER_MIN_OPSET, int(profile.opset_min)), highest)
    if opset < int(profile.opset_min):
        raise ExportError(f"profile {profile.id} asks for opset {profile.opset_min}..{profile.opset_max}, which this "
                          f"onnx ({onnx.__version__}, up to opset {onnx.defs.onnx_opset_version()}) cannot write")
    return opset


def validate_destination(path: str | os.PathLike, suffix: str = ".onnx") -> Path:
    """Fails early (ExportError) when `path` cannot receive the model: wrong suffix, a folder, a missing or
    unwritable folder. Tries a real temporary file, as permission bits do not tell the whole story (root, ACLs)."""
    dest = Path(path)
    if dest.is_dir():
        raise ExportError(f"{dest} is a folder; give a file name such as {dest / ('model' + suffix)}")
    if suffix and dest.suffix.lower() != suffix:
        raise ExportError(f"{dest}: the output file name must end in {suffix}")
    parent = dest.parent
    if not parent.exists():
        raise ExportError(f"cannot write {dest}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise ExportError(f"cannot write {dest}: {parent} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ExportError(f"cannot write {dest}: {exc.strerror or exc}") from None
    return dest


def export_onnx(
    graph_module,
    example_inputs: Any,
    path: str | os.PathLike,
    target: Any = "trt-safe",
    *,
    rtol: float = 1e-4,
    parity: bool = True,
    parity_inputs: Sequence[tuple] | None = None,
    parity_reference: Sequence[list] | None = None,
    original_reference: Sequence[list] | None = None,
    certify: bool = False,
    external_data: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Exports `graph_module` (any nn.Module) to `path` for `target` (a profile, its id or an alias).

    parity_inputs/parity_reference: probe inputs and the torch outputs on them, when the caller already has them (the
    conversion guard does); otherwise the example input and one seeded random input are run through the module.
    parity_reference may cover only the first probes (the rest are compared with original_reference only).
    original_reference: the original model's outputs on the same probes, for an end-to-end figure.
    external_data: None = only when the weights pass 2 GiB.
    """
    from attn2conv.capture import as_input_tuple
    from attn2conv.targets import resolve_target

    profile = resolve_target(target)
    inputs = as_input_tuple(example_inputs)
    dest = validate_destination(path)
    say = progress or (lambda stage: None)
    opset = choose_opset(profile)
    seconds: dict[str, float] = {}
    notes: list[str] = []

    start = time.perf_counter()
    model = _torch_export(graph_module, inputs, max(opset, EXPORTER_MIN_OPSET))
    seconds["torch_export"] = time.perf_counter() - start

    start = time.perf_counter()
    saved = _provenance_by_name(model)
    if opset < EXPORTER_MIN_OPSET:
        model = _down_convert(model, opset)
    # graph surgeon copies every initializer twice on export; when it folds nothing it needs only their dtypes and
    # shapes, so the weights sit out the clean-up and go straight into the file (_write_model)
    weights = {} if _foldable(model) else _detach_weights(model)
    model = _clean(model)
    with_provenance = _restore_provenance(model, saved)
    _stamp(model, profile)
    seconds["cleanup"] = time.perf_counter() - start

    weight_bytes = _initializer_bytes(model) + sum(map(len, weights.values()))
    use_external = external_data if external_data is not None else weight_bytes >= EXTERNAL_DATA_THRESHOLD
    result = ExportResult(path=str(dest), opset=opset, nodes=len(model.graph.node), external_data=use_external,
                          rtol=rtol, nodes_with_provenance=with_provenance, seconds=seconds, notes=notes)

    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as exc:
        raise ExportError(f"cannot write {dest}: {exc.strerror or exc}") from None
    try:
        tmp = tmpdir / dest.name
        data_name = f"{dest.name}.data"
        start = time.perf_counter()
        try:
            if use_external:
                _attach_weights(model, weights)
                onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data_name, size_threshold=1024)
            else:
                _write_model(model, weights, tmp)
        except OSError as exc:
            raise ExportError(f"cannot write {dest}: {exc.strerror or exc}") from None
        except ValueError as exc:  # protobuf refuses > 2 GiB
            raise ExportError(f"cannot serialise {dest.name}: {_one_line(exc)}; retry with external_data=True") from None
        seconds["write"] = time.perf_counter() - start
        del model, weights  # the file is the truth from here on

        start = time.perf_counter()
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:  # noqa: BLE001 - checker raises ValidationError, InferenceError, ...
            raise ExportError(f"the exported model fails onnx.checker: {_one_line(exc)}") from None
        seconds["onnx_checker"] = time.perf_counter() - start

        if parity:
            say("parity")
            start = time.perf_counter()
            probes = list(parity_inputs) if parity_inputs is not None else None
            if probes is None:
                from attn2conv.guard import probe_inputs

                probes = probe_inputs(inputs, n_random=1)
            reference = list(parity_reference) if parity_reference is not None else _torch_outputs(graph_module, probes)
            ort_outs = _ort_outputs(tmp, probes)
            result.parity = _worst(ort_outs, reference)
            if original_reference is not None:
                result.parity_vs_original_each = [_worst([o], [r]) for o, r in zip(ort_outs, original_reference)]
                result.parity_vs_original = max(result.parity_vs_original_each)
            result.parity_inputs = min(len(probes), len(reference))
            seconds["parity"] = time.perf_counter() - start
            if not result.parity_ok:
                notes.append(f"ONNX Runtime differs from torch by {result.parity:.2e} (bound {rtol:g})")

        cert_text = None
        if certify:
            say("check")
            start = time.perf_counter()
            from attn2conv.check import check
            from attn2conv.check._report import certificate

            result.check = check(tmp, target=profile)
            cert_text = certificate(result.check)
            seconds["check"] = time.perf_counter() - start

        # commit: the data file first (the model refers to it), then the model, then its certificate
        try:
            if use_external:
                os.replace(tmpdir / data_name, dest.with_name(data_name))
            os.replace(tmp, dest)
            if cert_text is not None:
                cert = dest.with_name(dest.name + ".cert.json")
                cert_tmp = tmpdir / cert.name
                cert_tmp.write_text(cert_text, encoding="utf-8")
                os.replace(cert_tmp, cert)
                result.certificate_path = str(cert)
        except OSError as exc:
            for leftover in (dest, dest.with_name(data_name) if use_external else None):
                if leftover is not None:
                    with contextlib.suppress(OSError):
                        leftover.unlink()
            raise ExportError(f"cannot write {dest}: {exc.strerror or exc}") from None
        if result.check is not None and result.check.loaded is not None:
            result.check.loaded.path = dest  # the checked bytes now live here (external-data digests read from it)
        return result
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


# --- steps -----------------------------------------------------------------------------------------------------------

def _torch_export(module, inputs: tuple, opset: int) -> onnx.ModelProto:
    import torch

    # the exporter prints progress and raises warnings about internals; the user sees one line on failure
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), torch.no_grad():
            warnings.simplefilter("ignore")
            program = _translate_functional_graph(module, inputs, opset)
            if program is None:
                program = torch.onnx.export(module, inputs, dynamo=True, opset_version=opset, optimize=False,
                                            verbose=False, external_data=False)
            _optimize(program)
            return program.model_proto
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        raise ExportError(f"torch.onnx export failed: {_one_line(exc)}") from exc


def _translate_functional_graph(module, inputs: tuple, opset: int):
    """The dynamo exporter minus its decomposition step, for graphs that are functional ATen already (what
    attn2conv.capture and the passes produce) and whose every op has a torchlib translation: torch.onnx.export would
    re-trace the whole graph once more to decompose ops it then leaves as they are (on converted DeiT-S that re-trace
    was most of the export time). Returns None (use torch.onnx.export) for anything else or if torch's private
    exporter API has moved."""
    import torch
    import torch.fx as fx

    if not isinstance(module, fx.GraphModule):
        return None
    try:
        from torch.onnx._internal.exporter import _constants, _core, _fx_passes
    except ImportError:
        return None
    if opset != _constants.TORCHLIB_OPSET:
        return None
    registry = _torchlib_registry(opset)
    for node in module.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and \
                not registry.is_registered(node.target):
            return None
    program = _lifted_program(module) if _has_shapes(module) else None
    if program is None:  # no recorded shapes or an unusual attribute: let torch.export trace it
        program = torch.export.export(module, inputs, strict=False)
    graph = program.graph_module
    if not _same_dtypes(graph):  # the type-promotion pass re-runs the graph on fake tensors: only when it matters
        _fx_passes.insert_type_promotion_nodes(graph)
    program._graph_module = _fx_passes.remove_assertion_nodes(graph)
    return _core._exported_program_to_onnx_program(program, registry=registry)


@functools.lru_cache(maxsize=None)
def _torchlib_registry(opset: int):
    """torch.onnx builds this table of ~2,000 ONNX functions on every export (0.4-1 s); built once here, with the
    static-size translations of _static_size_translations in front of torchlib's."""
    from torch.onnx._internal.exporter import _registration

    registry = _registration.ONNXRegistry.from_torchlib(opset_version=opset)
    for target, function in _static_size_translations().items():
        registry.register_op(target, function)  # custom entries are tried first
    return registry


def _static_size_translations() -> dict:
    """Translations of reshape, slice and equal-part split for int sizes (what a static-shape graph has): one ONNX op
    reading shared constants. torchlib writes them for symbolic sizes (a Constant per dimension and a Concat for a
    reshape; a Cast, a Reshape and a Constant per argument of a slice) and constant folding then removes that again:
    on converted Swin-T (553 reshapes, 234 slices) building and folding those nodes was 2/3 of the translation.
    The folded graph is the same. Symbolic sizes go to torchlib's functions."""
    import torch
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops import core

    def ints(*values) -> bool:
        return all(type(v) is int for v in values)

    def reshape(self, shape):
        return op.Reshape(self, list(shape)) if ints(*shape) else core.aten_reshape(self, shape)

    def slice_(self, dim=0, start=None, end=None, step=1):
        start, end = 0 if start is None else start, _INT64_MAX if end is None else end
        if ints(dim, start, end, step):
            return op.Slice(self, [start], [end], [dim], [step])
        return core.aten_slice(self, dim, start, end, step)

    def split_with_sizes(self, split_sizes, dim=0):
        if ints(*split_sizes, dim) and len(split_sizes) > 1 and len(set(split_sizes)) == 1:
            return op.Split(self, axis=dim, num_outputs=len(split_sizes))  # equal parts: the opset-18 form
        return core.aten_split_with_sizes(self, split_sizes, dim)

    aten = torch.ops.aten
    return {aten.reshape.default: reshape, aten.slice.Tensor: slice_, aten.split_with_sizes.default: split_with_sizes}


_INT64_MAX = 2**63 - 1


def _has_shapes(module) -> bool:
    """Every computed node carries a tensor value in meta['val'] (what capture and the guard's runs record)."""
    return all("val" in n.meta for n in module.graph.nodes if n.op in ("placeholder", "call_function", "get_attr"))


def _lifted_program(module):
    """The ExportedProgram of an unlifted ATen GraphModule (the form ExportedProgram.module() gives and the passes
    edit), built without tracing it again: every get_attr becomes a placeholder named in the graph signature as a
    parameter, buffer or constant tensor, in front of the user inputs. Node metadata (nn_module_stack, stack_trace)
    is kept as the passes left it, which is what the exporter writes into each ONNX node's provenance. Returns None
    where the graph reads something other than a tensor attribute (the caller then traces it)."""
    import torch
    import torch.fx as fx
    from torch.export import ExportedProgram
    from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
    from torch.export.graph_signature import (ExportGraphSignature, InputKind, InputSpec, OutputKind, OutputSpec,
                                              TensorArgument)

    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    graph = fx.Graph()
    env: dict = {}
    out = graph.graph_copy(module.graph, env)
    graph.output(out)
    zero_biases = _give_convs_zero_bias(graph)
    first_user_input = next((n for n in graph.nodes if n.op == "placeholder"), None)
    anchor = first_user_input or next(iter(graph.nodes))
    lifted: dict[str, tuple[InputKind, Any]] = {}
    readers: dict[str, list] = {}
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        target = node.target
        if target not in lifted:
            if target in zero_biases:
                lifted[target] = (InputKind.CONSTANT_TENSOR, zero_biases[target])
            elif target in params:
                lifted[target] = (InputKind.PARAMETER, params[target])
            elif target in buffers:
                lifted[target] = (InputKind.BUFFER, buffers[target])
            else:
                value = module
                for atom in target.split("."):
                    value = getattr(value, atom, None)
                if not isinstance(value, torch.Tensor):
                    return None
                lifted[target] = (InputKind.CONSTANT_TENSOR, value)
        readers.setdefault(target, []).append(node)
    prefix = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_", InputKind.CONSTANT_TENSOR: "c_"}
    order = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    input_specs, state_dict, constants = [], {}, {}
    for kind in order:
        for target, (k, value) in lifted.items():
            if k is not kind:
                continue
            with graph.inserting_before(anchor):
                ph = graph.placeholder(prefix[kind] + target.replace(".", "_"))
            first = readers[target][0]
            ph.meta.update(first.meta)
            ph.meta["val"] = first.meta.get("val", value)
            for reader in readers[target]:
                reader.replace_all_uses_with(ph)
                graph.erase_node(reader)
            input_specs.append(InputSpec(kind=kind, arg=TensorArgument(name=ph.name), target=target,
                                         persistent=True if kind is InputKind.BUFFER else None))
            (constants if kind is InputKind.CONSTANT_TENSOR else state_dict)[target] = value
    for node in graph.nodes:
        if node.op == "placeholder" and node.name not in {s.arg.name for s in input_specs}:
            input_specs.append(InputSpec(kind=InputKind.USER_INPUT, arg=TensorArgument(name=node.name), target=None))
    flat_out = torch.utils._pytree.tree_leaves(out)
    if not all(isinstance(o, fx.Node) for o in flat_out):
        return None
    graph.output_node().args = (tuple(flat_out),)
    output_specs = [OutputSpec(kind=OutputKind.USER_OUTPUT, arg=TensorArgument(name=o.name), target=None)
                    for o in flat_out]
    info = getattr(module.graph._codegen, "pytree_info", None)
    call = ModuleCallSignature(inputs=[], outputs=[], in_spec=getattr(info, "in_spec", None),
                               out_spec=getattr(info, "out_spec", None))
    try:
        return ExportedProgram(root=torch.nn.Module(), graph=graph,
                               graph_signature=ExportGraphSignature(input_specs, output_specs),
                               state_dict=state_dict, range_constraints={},
                               module_call_graph=[ModuleCallEntry(fqn="", signature=call)], constants=constants)
    except Exception:  # noqa: BLE001 - torch's verifier refused the graph: trace it instead
        return None


def _give_convs_zero_bias(graph) -> dict:
    """Gives every bias-less aten.conv2d a zero bias read through get_attr; returns the new attributes (one per
    channel count and dtype). torchlib writes a bias-less conv2d as Conv plus a five-op chain (Shape, Expand, CastLike,
    Expand) that builds the same zero bias and is then constant-folded: on converted DeiT-S (508 Convs, 482 of them the
    attention's constant sums) that chain was half of all ONNX ops built and folded. The written model is the same."""
    import torch
    import torch.fx as fx

    zeros: dict = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.conv2d.default:
            continue
        args = list(node.args)
        if len(args) < 2 or "bias" in node.kwargs or (len(args) > 2 and args[2] is not None):
            continue
        weight = args[1].meta.get("val") if isinstance(args[1], fx.Node) else None
        if not isinstance(weight, torch.Tensor):
            continue
        name = f"_attn2conv_zero_bias_{weight.shape[0]}_{str(weight.dtype).removeprefix('torch.')}"
        zeros.setdefault(name, torch.zeros(weight.shape[0], dtype=weight.dtype))
        with graph.inserting_before(node):
            bias = graph.get_attr(name)
        bias.meta["val"] = zeros[name]
        if len(args) == 2:
            args.append(bias)
        else:
            args[2] = bias
        node.args = tuple(args)
    return zeros


def _same_dtypes(graph_module) -> bool:
    """True when no node mixes dtypes: the inputs and the output of every call share one dtype (and integer tensors
    meet no float scalars), so torch's type-promotion pass would insert nothing."""
    import torch
    import torch.fx as fx

    from attn2conv.graph import leaves

    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        dtypes, float_scalar = set(), False
        for a in leaves((node.args, node.kwargs, node.meta.get("val"))):
            v = a.meta.get("val") if isinstance(a, fx.Node) else a
            if isinstance(v, torch.Tensor):
                dtypes.add(v.dtype)
            elif isinstance(a, float):
                float_scalar = True
        if len(dtypes) > 1 or (float_scalar and dtypes and not next(iter(dtypes)).is_floating_point):
            return False
    return True


def _optimize(program) -> None:
    """Constant folding, then the exporter's own tidy-up passes; the full optimiser if the onnxscript API moved.

    No onnxscript rewrite rules: the FX passes already cancel layout chains and fold BatchNorm, and on the converted
    DeiT-S (2,085 nodes) the 23 common rules changed no node while their matcher took 60 % of the export (36 s)."""
    try:
        import onnx_ir as ir
        import onnx_ir.passes.common as common
        import onnxscript.optimizer as optimizer
        model = program.model
    except (ImportError, AttributeError):
        program.optimize()
        return
    common.InlinePass()(model)
    # one round: a second found nothing more on DeiT-S/Swin-T and cost half as much again; graph surgeon folds after
    optimizer.fold_constants(model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.NameFixPass(),
    )(model)


def _down_convert(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx.version_converter, with the weights detached: it serialises the model, which must stay under 2 GiB."""
    from onnx import version_converter

    detached = _detach_weights(model)
    held = _hold_splits(model)
    try:
        converted = version_converter.convert_version(model, opset)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"cannot convert the exported model to opset {opset}: {_one_line(exc)}") from exc
    finally:
        _release_splits(model, held)
        _attach_weights(model, detached)
    _release_splits(converted, held)
    _attach_weights(converted, detached)
    _drop_newer_attributes(converted, opset)
    return converted


# onnx's version converter has no 18 -> 17 adapter for Split (opset 18 added `num_outputs`). Splits are parked in a
# private domain while it runs and come back in the opset-13 form: sizes as an explicit `split` input.
_HOLD_DOMAIN = "attn2conv.hold"


def _hold_splits(model: onnx.ModelProto) -> bool:
    splits = [n for n in model.graph.node if n.op_type == "Split" and n.domain in ("", "ai.onnx")]
    if not splits:
        return False
    shapes = _static_shapes(model)
    size_inputs: dict[tuple, str] = {}  # one initializer per distinct list of sizes
    for node in splits:
        num_outputs = next((a.i for a in node.attribute if a.name == "num_outputs"), None)
        if num_outputs is not None:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = shapes.get(node.input[0])
            if dims is None or not isinstance(dims[axis], int):
                raise ExportError(f"Split node {node.name!r} has no static input shape; cannot write it at opset 17")
            size, count = dims[axis], num_outputs
            chunk = -(-size // count)  # ceil, as opset 18 defines it: the last piece may be smaller
            sizes = [chunk] * (count - 1) + [size - chunk * (count - 1)]
            name = size_inputs.get(tuple(sizes))
            if name is None:
                name = size_inputs[tuple(sizes)] = f"{node.name or node.output[0]}_split_sizes"
                model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(sizes, dtype=np.int64), name))
            del node.input[1:]
            node.input.append(name)
            node.attribute.remove(next(a for a in node.attribute if a.name == "num_outputs"))
        node.domain = _HOLD_DOMAIN
        node.op_type = "HeldSplit"
    model.opset_import.append(onnx.helper.make_opsetid(_HOLD_DOMAIN, 1))
    return True


def _release_splits(model: onnx.ModelProto, held: bool) -> None:
    if not held:
        return
    for node in model.graph.node:
        if node.domain == _HOLD_DOMAIN:
            node.domain, node.op_type = "", "Split"
    for i, entry in reversed(list(enumerate(model.opset_import))):
        if entry.domain == _HOLD_DOMAIN:
            del model.opset_import[i]


def _static_shapes(model: onnx.ModelProto) -> dict[str, list]:
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


# attributes that later opsets added with a default meaning "as before"; the converter sometimes leaves them behind
_ADDED_ATTRIBUTE_DEFAULTS = {"noop_with_empty_axes": 0}


def _drop_newer_attributes(model: onnx.ModelProto, opset: int) -> None:
    """The down-converted ReduceX keep opset 18's `noop_with_empty_axes`; at its default it can simply go."""
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            known = onnx.defs.get_schema(node.op_type, opset, node.domain).attributes
        except onnx.defs.SchemaError:
            continue
        for attr in list(node.attribute):
            if attr.name not in known and _ADDED_ATTRIBUTE_DEFAULTS.get(attr.name) == onnx.helper.get_attribute_value(attr):
                node.attribute.remove(attr)


def _detach_weights(model: onnx.ModelProto) -> dict[str, bytes]:
    out = {}
    for t in model.graph.initializer:
        if t.HasField("raw_data") and len(t.raw_data) > 4096:
            out[t.name] = t.raw_data
            t.ClearField("raw_data")
    return out


def _attach_weights(model: onnx.ModelProto, detached: dict[str, bytes]) -> None:
    for t in model.graph.initializer:
        if t.name in detached and not t.HasField("raw_data") and not t.external_data:
            t.raw_data = detached[t.name]


def _write_model(model: onnx.ModelProto, weights: dict[str, bytes], path: Path) -> None:
    """Writes `model` with the detached `weights` back in their initializers: the message _attach_weights plus
    onnx.save_model would write, streamed one initializer at a time. Serialising the whole model at once holds about
    three copies of the weights in fresh memory (upb grows its buffer by doubling), 0.5 s of page faults on
    converted DeiT-S; here each weight is written from the bytes already held."""
    from attn2conv.check._wire import _encode_varint as _varint

    graph = model.graph
    initializers = onnx.GraphProto()
    initializers.initializer.extend(graph.initializer)  # cheap: the large ones have no raw_data now
    del graph.initializer[:]
    try:
        rest = onnx.ModelProto()
        rest.CopyFrom(model)
        rest.ClearField("graph")
        head, body = rest.SerializeToString(), graph.SerializeToString()
    finally:
        graph.initializer.extend(initializers.initializer)
    records = []
    for tensor in initializers.initializer:
        fields = tensor.SerializeToString()
        raw = weights.get(tensor.name)
        if raw is not None:
            fields += _RAW_DATA_TAG + _varint(len(raw))
        records.append((fields, raw or b""))
    length = len(body) + sum(1 + len(_varint(len(f) + len(r))) + len(f) + len(r) for f, r in records)
    with open(path, "wb") as f:
        f.write(head + _GRAPH_TAG + _varint(length) + body)
        for fields, raw in records:
            f.write(_INITIALIZER_TAG + _varint(len(fields) + len(raw)) + fields)
            f.write(raw)


# protobuf tags (field number << 3 | 2, length-delimited): ModelProto.graph, GraphProto.initializer, TensorProto.raw_data
_GRAPH_TAG, _INITIALIZER_TAG, _RAW_DATA_TAG = b"\x3a", b"\x2a", b"\x4a"


def _clean(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx-graphsurgeon: fold constants, bypass Identity, drop dead nodes, topological order."""
    import onnx_graphsurgeon as gs

    try:
        graph = gs.import_onnx(model)
        if _foldable(model):
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                graph.fold_constants(size_threshold=FOLD_SIZE_LIMIT, error_ok=True)
        _bypass_identities(graph)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        cleaned = gs.export_onnx(graph, do_type_check=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnx-graphsurgeon clean-up failed: {_one_line(exc)}") from exc
    # graph surgeon rebuilds the ModelProto; keep the exporter's model-level fields
    cleaned.ir_version = model.ir_version
    cleaned.producer_name, cleaned.producer_version = model.producer_name, model.producer_version
    cleaned.doc_string = model.doc_string
    del cleaned.metadata_props[:]
    cleaned.metadata_props.extend(model.metadata_props)
    return cleaned


def _foldable(model: onnx.ModelProto) -> bool:
    """Whether graph surgeon's constant folding has anything to fold: a node that reads only constants, or a shape
    query. After onnxscript's folding (export step 1) there is usually none, and the fold copies the whole graph
    (a third of the clean-up on converted DeiT-S)."""
    constant = {t.name for t in model.graph.initializer} | {""}
    for node in model.graph.node:
        if node.op_type == "Constant":
            constant.update(node.output)
        elif node.op_type in ("Shape", "Size") or all(i in constant for i in node.input):
            return True
    return False


def _bypass_identities(graph) -> None:
    """Consumers of an Identity read its input instead; an Identity that produces a graph output stays."""
    outputs = set(id(t) for t in graph.outputs)
    for node in graph.nodes:
        if node.op != "Identity" or len(node.inputs) != 1 or len(node.outputs) != 1:
            continue
        src, dst = node.inputs[0], node.outputs[0]
        if id(dst) in outputs:
            continue
        for consumer in list(dst.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is dst:
                    consumer.inputs[i] = src
        node.outputs.clear()


def _provenance_by_name(model: onnx.ModelProto) -> dict[str, list[tuple[str, str]]]:
    return {n.name: [(p.key, p.value) for p in n.metadata_props] for n in model.graph.node
            if n.name and len(n.metadata_props)}


def _restore_provenance(model: onnx.ModelProto, saved: dict[str, list[tuple[str, str]]]) -> int:
    """Puts metadata_props back by node name; a node without a saved entry borrows a neighbour's. Returns the number of
    nodes that carry the exporter's module path afterwards."""
    nodes = list(model.graph.node)
    for n in nodes:
        if not len(n.metadata_props) and n.name in saved:
            for key, value in saved[n.name]:
                n.metadata_props.add(key=key, value=value)
    # nodes created by the converter or the clean-up: take the provenance of a consumer, else of a producer
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in nodes:
        if len(n.metadata_props):
            continue
        for neighbour in [c for o in n.output for c in consumers.get(o, ())] + [producer[i] for i in n.input
                                                                               if i in producer]:
            if len(neighbour.metadata_props):
                n.metadata_props.extend(neighbour.metadata_props)
                break
    return sum(any(p.key == PROVENANCE_PREFIX + "name_scopes" for p in n.metadata_props) for n in nodes)


def _stamp(model: onnx.ModelProto, profile) -> None:
    from attn2conv import __version__

    stamps = {"attn2conv.version": __version__, "attn2conv.target": profile.id}
    keep = [p for p in model.metadata_props if p.key not in stamps]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in stamps.items():
        model.metadata_props.add(key=key, value=value)


def _initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            n = 1
            for d in t.dims:
                n *= d
            total += n * max(1, onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
    return total


# --- parity ----------------------------------------------------------------------------------------------------------

def _torch_outputs(module, probes: Sequence[tuple]) -> list[list]:
    from attn2conv.guard import run_outputs

    return run_outputs(module, list(probes))


def _ort_outputs(path: Path, probes: Sequence[tuple]) -> list[list]:
    import numpy as np
    import onnxruntime as ort
    import torch

    from attn2conv.graph import flat_tensors

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # the graph as written, fused little
    opts.log_severity_level = 3
    from attn2conv.guard import free_cores

    # as for the guard's torch runs: no more threads than free cores, and none spinning while another process waits
    opts.intra_op_num_threads = min(free_cores(), os.cpu_count() or 1)
    if free_cores() < (os.cpu_count() or 1):
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"ONNX Runtime cannot load the exported model: {_one_line(exc)}") from exc
    names = [i.name for i in session.get_inputs()]
    outs = []
    for probe in probes:
        tensors = flat_tensors(probe)
        if len(tensors) != len(names):
            raise ExportError(f"the exported model takes {len(names)} input(s), the probe has {len(tensors)}")
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
        try:
            result = session.run(None, feed)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"ONNX Runtime cannot run the exported model: {_one_line(exc)}") from exc
        outs.append([torch.from_numpy(np.asarray(r)) for r in result])
    return outs


def _worst(outputs: list[list], references: list[list]) -> float:
    from attn2conv.guard import relative_error

    return max(relative_error(o, r) for o, r in zip(outputs, references))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
