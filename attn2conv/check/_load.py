"""Loading an ONNX model for checking, defensively.

- The ``.onnx`` file is read once (size-capped) and parsed from bytes; external weight data is never read.
- External-data ``location`` entries are validated as data: no absolute paths, no ``..``, and the resolved path
  (symlinks followed) must stay inside the model's folder. A model whose weights live outside is refused.
- Subgraph nesting (If/Loop/Scan bodies) is capped.
- Every failure is an :class:`InputError` with a one-line message; callers turn it into exit status 2.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter, methodcaller
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from . import _wire

MAX_MODEL_BYTES = 2 * 1024**3  # protobuf cannot hold more; weights beyond this must be external
MAX_GRAPH_DEPTH = 16  # nested subgraphs (If/Loop/Scan bodies)
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


_OP_TYPE = attrgetter("op_type")
_NAME = attrgetter("name")
_OUTPUT = attrgetter("output")
_TYPE = attrgetter("type")
_SERIALIZE = methodcaller("SerializeToString")


def _merged_view_class():
    """A message class that reads an ONNX model's bytes as one merged node and one merged record per I/O list.

    ``graph.node`` (and ``graph.input``/``output``/``value_info``) are declared as ONE message each: protobuf merges
    repeated occurrences of a singular message field and appends repeated fields, so every node's outputs and op type,
    and every record's name and type, land in order in one repeated field each, parsed in C; reading them costs a
    fraction of creating a Python object per node. Other fields are kept as unknown bytes (copied, weights too).
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="attn2conv_check_view.proto", package="attn2conv_check",
                                             syntax="proto2")
    msg = fdp.message_type.add(name="Nodes")  # NodeProto: output = 2, op_type = 4
    msg.field.add(name="output", number=2, type=f.TYPE_STRING, label=f.LABEL_REPEATED)
    msg.field.add(name="op_type", number=4, type=f.TYPE_STRING, label=f.LABEL_REPEATED)
    msg = fdp.message_type.add(name="Records")  # ValueInfoProto: name = 1, type = 2
    msg.field.add(name="name", number=1, type=f.TYPE_STRING, label=f.LABEL_REPEATED)
    msg.field.add(name="type", number=2, type=f.TYPE_BYTES, label=f.LABEL_REPEATED)
    msg = fdp.message_type.add(name="Graph")  # GraphProto: node = 1, input = 11, output = 12, value_info = 13
    msg.field.add(name="node", number=1, type=f.TYPE_MESSAGE, label=f.LABEL_OPTIONAL,
                  type_name=".attn2conv_check.Nodes")
    for name, number in (("input", 11), ("output", 12), ("value_info", 13)):
        msg.field.add(name=name, number=number, type=f.TYPE_MESSAGE, label=f.LABEL_OPTIONAL,
                      type_name=".attn2conv_check.Records")
    msg = fdp.message_type.add(name="Model")  # ModelProto: graph = 7
    msg.field.add(name="graph", number=7, type=f.TYPE_MESSAGE, label=f.LABEL_OPTIONAL,
                  type_name=".attn2conv_check.Graph")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("attn2conv_check.Model"))


_VIEW_CLASS: list = []  # built on first use
# The merged view copies the model's other bytes (weights included) as unknown fields; creating Python objects node
# by node costs about 1.5 us a node. Use the view when the graph has more than one node per this many bytes.
_MERGE_BYTES_PER_NODE = 4096
_VIEW_MAX_BYTES = 512 * 1024**2  # the view and the canonical-bytes test each hold another copy of the file


def merged_view(model: onnx.ModelProto, data: bytes | None):
    """(main-graph view, canonical) for a model parsed from `data`, or (None, False) when not worth it.

    The concatenated outputs are exact whatever the encoding. Per-element lists (op types, record names and types)
    line up with the nodes and records only if each carries its field exactly once; `canonical` (the bytes are what
    serializing the parsed model gives back, so no field occurs twice) together with equal counts proves that."""
    if data is None or len(model.graph.node) * _MERGE_BYTES_PER_NODE <= len(data) or len(data) > _VIEW_MAX_BYTES:
        return None, False
    if not _VIEW_CLASS:
        _VIEW_CLASS.append(_merged_view_class())
    view = _VIEW_CLASS[0]()
    try:
        view.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):  # the full parse succeeded: the index reads node by node
        return None, False
    return view.graph, model.SerializeToString() == data


class InputError(ValueError):
    """The input cannot be checked (unreadable, not ONNX, unsafe). The message is one line."""


@dataclass
class ExternalRef:
    tensor: str
    location: str
    length: int | None


class GraphIndex:
    """What the checker reads from every node or record of one graph, read once and shared by the loader, the
    shape-inference decision and the rules. ``map``/``attrgetter`` keep the per-element loop in C; `view` (see
    merged_view) avoids the Python object per element altogether."""

    def __init__(self, graph: onnx.GraphProto, view=None, canonical: bool = False):
        self.graph = graph
        self._view = view
        self._canonical = canonical
        ops = self._aligned("node", "op_type", len(graph.node))
        self.op_types: list[str] = ops if ops is not None else list(map(_OP_TYPE, graph.node))
        self._type_keys: dict[str, list[bytes]] = {}
        self._names: dict[str, list[str]] = {}

    def _aligned(self, field_name: str, sub: str, n: int):
        """The view's list `field_name.sub` when it has exactly one entry per element (else None)."""
        if self._view is None or not self._canonical:
            return None
        values = getattr(getattr(self._view, field_name), sub)
        return list(values) if len(values) == n else None

    def type_keys(self, field_name: str) -> list[bytes]:
        """The serialized TypeProto of each entry of ``input``, ``output`` or ``value_info`` (equal bytes, equal
        type: the tensor rules judge each distinct type once)."""
        keys = self._type_keys.get(field_name)
        if keys is None:
            seq = getattr(self.graph, field_name)
            keys = self._aligned(field_name, "type", len(seq))
            if keys is None:
                keys = list(map(_SERIALIZE, map(_TYPE, seq)))
            self._type_keys[field_name] = keys
        return keys

    def names(self, field_name: str) -> list[str]:
        """The names of the entries of ``input``, ``output`` or ``value_info``, in order."""
        names = self._names.get(field_name)
        if names is None:
            seq = getattr(self.graph, field_name)
            names = self._aligned(field_name, "name", len(seq))
            if names is None:
                names = list(map(_NAME, seq))
            self._names[field_name] = names
        return names

    def node_outputs(self):
        """Every output name of every node, in order (empty names included)."""
        if self._view is not None:
            return self._view.node.output
        return chain.from_iterable(map(_OUTPUT, self.graph.node))

    @property
    def has_subgraph_ops(self) -> bool:
        return not _SUBGRAPH_OPS.isdisjoint(self.op_types)


@dataclass
class LoadedModel:
    _model: onnx.ModelProto | None  # None until needed when `wire` holds the decoded graph
    path: Path | None
    data: bytes | onnx.ModelProto = field(repr=False)  # exactly what was checked (hashed on demand)
    size: int = 0
    external: list[ExternalRef] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    has_subgraphs: bool = False  # set by the validation walk; lets the engine skip a second scan
    _sha256: str | None = field(default=None, repr=False)
    _index: GraphIndex | None = field(default=None, repr=False)
    model_is_data: bool = True  # False once `model` was replaced (inlined functions, inferred shapes)
    wire: object | None = field(default=None, repr=False)  # _wire.Wire of the file's bytes, when it decoded

    @property
    def model(self) -> onnx.ModelProto:
        """The parsed model (parsed on first use when the checker worked from the decoded bytes)."""
        if self._model is None:
            self._model = _parse(self.data, self.display_name)
        return self._model

    @model.setter
    def model(self, value: onnx.ModelProto) -> None:
        self._model = value

    @property
    def index(self) -> GraphIndex:
        """The index of the main graph of ``model`` (rebuilt when ``model`` was replaced, e.g. by inference)."""
        if self._index is None or self._index.graph is not self.model.graph:
            data = self.data if isinstance(self.data, bytes) and self.model_is_data else None
            self._index = GraphIndex(self.model.graph, *merged_view(self.model, data))
        return self._index

    @property
    def sha256(self) -> str:
        """sha256 of the checked bytes; computed on first use (a 300 MB model costs ~0.3 s to hash)."""
        if self._sha256 is None:
            data = self.data.SerializeToString() if isinstance(self.data, onnx.ModelProto) else self.data
            self._sha256 = hashlib.sha256(data).hexdigest()
        return self._sha256

    @property
    def display_name(self) -> str:
        return self.path.name if self.path else "<model>"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:300]


def read_model(source: str | os.PathLike | onnx.ModelProto | bytes, max_bytes: int = MAX_MODEL_BYTES,
               decode: bool = True, data: bytes | None = None) -> LoadedModel:
    """Reads and validates a model. Files and bytes are first decoded by _wire (`decode`); what it cannot decode
    exactly is parsed by protobuf, as is everything once the full model is asked for. `data`: the file's bytes,
    already read (the cross-checking tests read a file once)."""
    wire = None
    if isinstance(source, onnx.ModelProto):
        data, model, path = source, source, None
    else:
        if isinstance(source, (bytes, bytearray)):
            data, path, name = bytes(source), None, "<bytes>"
        else:
            path = Path(source)
            data, name = (data if data is not None else _read_bytes(path, max_bytes)), str(path)
        wire = _wire.decode(data) if decode else None
        model = _parse(data, name) if wire is None else None
    size = source.ByteSize() if isinstance(source, onnx.ModelProto) else len(data)
    loaded = LoadedModel(_model=model, path=path, data=data, size=size, wire=wire)
    _validate(loaded)
    return loaded


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    name = str(path)
    try:
        if path.is_dir():
            raise InputError(f"{name}: is a directory, not an ONNX file")
        size = path.stat().st_size
        if size == 0:
            raise InputError(f"{name}: empty file")
        if size > max_bytes:
            raise InputError(f"{name}: {size} bytes is over the {max_bytes}-byte limit for an ONNX protobuf "
                             "(store the weights as external data)")
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read: {exc.strerror or _one_line(exc)}") from None
    if not data:
        raise InputError(f"{name}: empty file")
    if len(data) > max_bytes:
        raise InputError(f"{name}: over the {max_bytes}-byte limit")
    return data


def _parse(data: bytes, name: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InputError(f"{name}: not an ONNX model (protobuf parse failed: {_one_line(exc) or 'truncated'})") from None
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise InputError(f"{name}: not an ONNX model (no graph, IR version or opset import)")
    return model


def _validate(loaded: LoadedModel) -> None:
    name = loaded.display_name
    if loaded.wire is not None:  # every top-level field and every graph field but nodes and value_info, parsed
        model = loaded.wire.model
        if model.ir_version <= 0 or not model.opset_import:  # as _parse says it
            raise InputError(f"{loaded.path or '<bytes>'}: not an ONNX model (no graph, IR version or opset import)")
    else:
        model = loaded.model
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not default:
        raise InputError(f"{name}: no default-domain (ai.onnx) opset import")
    newest = onnx.defs.onnx_opset_version()
    if not 1 <= default[0] <= newest:
        raise InputError(f"{name}: default-domain opset {default[0]} is outside 1..{newest} known to onnx "
                         f"{onnx.__version__}")
    base = loaded.path.parent.resolve() if loaded.path else None
    op_types = loaded.wire.ops if loaded.wire is not None else loaded.index.op_types
    _walk_initializers(model.graph, loaded, base, depth=0, op_types=op_types)
    for fn in model.functions:  # local functions can nest graphs too
        for node in fn.node:
            _check_node_subgraphs(node, loaded, base, 1)


def _walk_initializers(graph: onnx.GraphProto, loaded: LoadedModel, base: Path | None, depth: int,
                       op_types: list[str] | None = None) -> None:
    if depth > MAX_GRAPH_DEPTH:
        raise InputError(f"{loaded.display_name}: subgraphs nested deeper than {MAX_GRAPH_DEPTH} levels")
    for init in graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            loaded.external.append(_external_ref(init, loaded, base))
    for sparse in graph.sparse_initializer:
        for t in (sparse.values, sparse.indices):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                loaded.external.append(_external_ref(t, loaded, base))
    if op_types is None:
        op_types = list(map(_OP_TYPE, graph.node))
    if _SUBGRAPH_OPS.isdisjoint(op_types):
        return
    loaded.has_subgraphs = True
    nodes = graph.node
    for i, op in enumerate(op_types):
        if op in _SUBGRAPH_OPS:
            _check_node_subgraphs(nodes[i], loaded, base, depth + 1)


def _check_node_subgraphs(node: onnx.NodeProto, loaded: LoadedModel, base: Path | None, depth: int) -> None:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            _walk_initializers(attr.g, loaded, base, depth)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                _walk_initializers(g, loaded, base, depth)


def _external_ref(tensor: onnx.TensorProto, loaded: LoadedModel, base: Path | None) -> ExternalRef:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    where = f"{loaded.display_name}: initializer {tensor.name!r}"
    if not location:
        raise InputError(f"{where} has external data without a location")
    if "\x00" in location:
        raise InputError(f"{where}: external-data location contains a NUL byte")
    pure = Path(location)
    if pure.is_absolute() or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise InputError(f"{where}: external-data location {location!r} is an absolute path (refused)")
    if ".." in Path(location.replace("\\", "/")).parts:
        raise InputError(f"{where}: external-data location {location!r} leaves the model folder (refused)")
    if base is not None:
        # Resolve symlinks without reading the file: the target must stay under the model's folder.
        resolved = (base / location).resolve()
        if resolved != base and base not in resolved.parents:
            raise InputError(f"{where}: external-data location {location!r} resolves outside the model folder "
                             "(refused)")
    length = info.get("length")
    try:
        n = int(length) if length is not None else None
    except ValueError:
        raise InputError(f"{where}: external-data length {length!r} is not an integer") from None
    return ExternalRef(tensor=tensor.name, location=location, length=n)


def external_data_digests(loaded: LoadedModel) -> list[dict[str, object]]:
    """sha256 of each external-data file (validated paths only); used for certificates, never for the rules."""
    if loaded.path is None:
        return []
    base = loaded.path.parent
    out = []
    for loc in sorted({ref.location for ref in loaded.external}):
        p = base / loc
        h = hashlib.sha256()
        size = 0
        try:
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
                    size += len(chunk)
            out.append({"location": loc, "sha256": h.hexdigest(), "bytes": size})
        except OSError as exc:
            out.append({"location": loc, "sha256": None, "error": exc.strerror or "unreadable"})
    return out


def infer_shapes(loaded: LoadedModel, mode: str = "auto") -> None:
    """Run ONNX shape inference in place unless the graph already records every shape inference could give.

    ``auto`` skips inference only when every node output is recorded (value_info or graph output) with a tensor
    type of known element type and fully static dims, and no node carries a subgraph: inference keeps recorded
    shapes, so it could not change what the rules see (exporters such as torch.onnx dynamo record them all, and
    inference is the most expensive step on very large graphs). ``always`` and ``never`` force the choice.
    Weights are never needed: initializers with external data still carry their dims.
    """
    if mode not in ("auto", "always", "never"):
        raise InputError(f"shape inference mode {mode!r} is not auto, always or never")
    if mode == "never":
        return
    data = loaded.data if isinstance(loaded.data, bytes) and loaded.model_is_data else None
    if mode == "auto" and not loaded.has_subgraphs and shapes_complete(loaded.index):
        loaded.notes.append("shape inference skipped: the graph records a static shape for every node output")
        return
    try:  # from the file's bytes when they are what was parsed: saves serializing the model again
        inferred = onnx.shape_inference.infer_shapes(data if data is not None else loaded.model, check_type=False,
                                                     strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types; the check goes on without shapes
        loaded.notes.append(f"shape inference failed ({_one_line(exc)[:120]}); shape rules saw recorded shapes only")
        return
    loaded.model = inferred
    loaded.model_is_data = False


def _static_type(key: bytes) -> bool:
    tp = onnx.TypeProto.FromString(key)
    if not tp.HasField("tensor_type"):
        return False
    tt = tp.tensor_type
    return bool(tt.elem_type) and tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim)


def shapes_complete(index: GraphIndex) -> bool:
    """True when every node output of the graph has a recorded, fully static tensor type."""
    g = index.graph
    if len(g.value_info) + len(g.output) < len(g.node):  # cheap: fewer records than nodes (each has an output)
        return False
    names: set[str] = set()
    partial: set[str] = set()  # names with at least one record that is not static
    for field_name in ("value_info", "output"):
        keys = index.type_keys(field_name)
        static = {k: _static_type(k) for k in set(keys)}
        if all(static.values()):
            names.update(index.names(field_name))
        else:
            for name, k in zip(index.names(field_name), keys):
                (names if static[k] else partial).add(name)
    names -= partial
    return names.issuperset(filter(None, index.node_outputs()))
