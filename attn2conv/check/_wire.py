"""A vectorised reader of an ONNX file's main graph, for the checker: numpy over the raw protobuf bytes.

Why: the rules need a few facts about every node (op type, attributes, input and output names) and every recorded
tensor (name, type). Reading them from parsed protobuf objects costs one Python object per node and field, several
times what parsing the file costs on graphs of 10^5 nodes. Here the node and value_info records are located and
decoded with numpy over the file's bytes (``np.frombuffer``: no copy): a few array operations per field *slot*, not
per node. Op types, attribute lists, types and names become small integer ids; only the nodes a rule reports on
are parsed into protobuf objects (``node(i)``), from their own bytes.

What it handles, exactly (anything else raises :class:`Unsupported` and the checker parses the file with protobuf):

- ModelProto: any top-level fields but ``functions`` and ``training_info``, with exactly one ``graph``. Everything
  but the graph is parsed by protobuf, and so is every graph field but ``node`` and ``value_info`` (initializers,
  graph inputs and outputs, ...), from zero-copy slices; initializers without their ``raw_data`` (the weights are
  never read on this path, so they are not copied either).
- GraphProto ``node`` (field 1) and ``value_info`` (13) records, in any order and interleaving. A run of records is
  found without a per-record loop: every byte equal to the run's tag is a candidate, each candidate's length varint
  is decoded, and a candidate is kept when no earlier candidate's extent covers it. Every false candidate lies
  inside a true record (records tile the graph), so only true records are kept; true records covered by a false
  extent are found by walking from the kept record before them, and the chain is verified end to end.
- NodeProto fields input, output, name, op_type, attribute, doc_string, domain, overload, metadata_props (all
  length-delimited; op_type and domain as protobuf keeps them, the last occurrence; the attribute records
  contiguous). Attribute lists are parsed by protobuf once per distinct byte string (which validates them
  exactly; graph- or type-valued attributes are not handled), metadata entries are checked field by field.
- ValueInfoProto fields name, type (at most once), doc_string. Types are parsed by protobuf once per distinct byte
  string; only tensor types are handled.
- Nodes of subgraph-carrying op types (If, Loop, Scan, SequenceMap) are not handled.

Byte strings are interned by direct-mapped hash tables (no sort): strings of up to 7 bytes by their exact
zero-padded word and length, longer ones by a 64-bit hash of their 8-byte words, after which every string is
compared word by word with its representative: a hash collision is detected (Unsupported), never trusted.
"""

from __future__ import annotations

import numpy as np
import onnx
from google.protobuf.message import DecodeError

SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_NODE_TAG, _VI_TAG = 0x0A, 0x6A  # GraphProto.node = 1, value_info = 13 (length-delimited)
_NODE_FIELDS = frozenset(range(1, 10))  # NodeProto 1..9 (device_configurations = 10 is not handled)
_VI_FIELDS = frozenset({1, 2, 3})  # ValueInfoProto name, type, doc_string (metadata_props = 4 not handled)
_MODEL_UNHANDLED = frozenset({20, 25})  # training_info, functions
_NODE_FIRST = np.zeros(256, bool)  # the tag bytes a NodeProto can start with (any field, length-delimited)
_NODE_FIRST[[f << 3 | 2 for f in range(1, 11)]] = True
_MAX_WALK = 1 << 15  # records walked one by one (true records hidden by a false candidate) before giving up
_VECTOR_MIN = 64  # slot rounds continue vectorised while at least this many records have fields left


class Unsupported(Exception):
    """The file uses a construct this reader does not decode exactly; the caller falls back to the full parse."""


# -- scalar helpers (top-level fields, walks) -------------------------------------------------------------------------
def _varint(data, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise Unsupported("bad varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _skip(data, pos: int, end: int, wire: int) -> int:
    """Position after the value of a field of wire type `wire` starting at pos."""
    if wire == 0:
        return _varint(data, pos, end)[1]
    if wire == 1:
        pos += 8
    elif wire == 2:
        n, pos = _varint(data, pos, end)
        pos += n
    elif wire == 5:
        pos += 4
    else:
        raise Unsupported("group or invalid wire type")
    if pos > end:
        raise Unsupported("truncated field")
    return pos


_INIT_TAG = 0x2A  # GraphProto.initializer = 5
_RAW_DATA = 9  # TensorProto.raw_data: bytes, any content parses


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _without_raw_data(data: bytes, start: int, end: int) -> bytes | None:
    """The TensorProto record [start, end) without its raw_data fields, or None when it has none."""
    pos, keep, cut = start, [], False
    while pos < end:
        tag, p = _varint(data, pos, end)
        q = _skip(data, p, end, tag & 7)
        if tag >> 3 == _RAW_DATA:
            if tag & 7 != 2:
                raise Unsupported("raw_data of another wire type")
            cut = True
        else:
            keep.append(data[pos:q])
        pos = q
    return b"".join(keep) if cut else None


# -- vectorised helpers -----------------------------------------------------------------------------------------------
class _Bytes:
    """The file as uint8, and words: the 8 bytes from any offset as one little-endian uint64 (zero past the end)."""

    def __init__(self, data: bytes):
        if len(data) < 8:
            raise Unsupported("tiny file")
        self.n = len(data)
        self.buf = data
        self.u8 = np.frombuffer(data, np.uint8)
        self._w8 = np.ndarray((len(data) - 7,), "<u8", data, 0, (1,))  # unaligned view, no copy

    def word(self, pos: np.ndarray) -> np.ndarray:
        if not len(pos) or pos.max() <= self.n - 8:
            return self._w8[pos]
        q = np.minimum(pos, self.n - 8)
        return self._w8[q] >> ((pos - q) * 8).astype(np.uint64)


def _len_varints(w: np.ndarray) -> tuple[np.ndarray, np.ndarray | int]:
    """(value, byte count) of the varint in the low bytes of each int64 (at most 5 bytes, else Unsupported)."""
    long = np.flatnonzero(w & 0x80)
    if not len(long):
        return w & 0x7F, 1
    value = w & 0x7F
    n = np.ones(len(w), np.int64)
    x = w[long]
    v, k_n = x & 0x7F, np.ones(len(long), np.int64)
    cont = (x >> 7) & 1
    for k in range(1, 5):
        byte = (x >> (8 * k)) & 0xFF
        v |= ((byte & 0x7F) << (7 * k)) * cont
        k_n += cont
        cont &= byte >> 7
    if cont.any():
        raise Unsupported("length varint over 5 bytes")
    value[long], n[long] = v, k_n
    return value, n


def _headers(b: _Bytes, pos: np.ndarray):
    """Tag byte, payload start and payload end of the length-delimited fields starting at `pos` (1-byte tags)."""
    word = b.word(pos).view(np.int64)  # the sign bit is the 8th byte's: shifted out below
    if not (word & 0x8000).any():  # every length fits one byte
        start = pos + 2
        return word & 0xFF, start, start + ((word >> 8) & 0x7F)
    length, n = _len_varints((word >> 8) & 0xFFFFFFFFFF)
    start = pos + 1 + n
    return word & 0xFF, start, start + length


def _run(b: _Bytes, start: int, stop: int, tag: int, first_tags: np.ndarray | None = None, window: int = 1 << 17):
    """The records of one run of `tag` records from `start` (a record start) up to the first other record or stop.

    `first_tags` (256 bools), when given, are the tag bytes a record's payload can start with: candidates whose
    payload starts otherwise are dropped before the covering test. Were a true record dropped (it would then be
    malformed), the walk from the record before it finds it and the chain test rejects any false candidate kept
    inside it, so the result is still exact or Unsupported.

    Returns (record starts, payload starts, payload ends, position after the run)."""
    out_s, out_p, out_e = [], [], []
    pos = start
    u8 = b.u8
    while pos < stop and u8[pos] == tag:
        wend = min(stop, pos + window)
        window = min(2 * window, 1 << 20)
        cand = np.flatnonzero(u8[pos:wend] == tag) + pos
        length, n = _len_varints((b.word(cand + 1).view(np.int64)) & 0xFFFFFFFFFF)
        pend = cand + 1 + n + length
        if first_tags is not None:  # a record's payload starts with a field tag (or is empty): drop the others
            plausible = np.flatnonzero(first_tags[u8[np.minimum(pend - length, b.n - 1)]] | (length == 0))
            if len(plausible) < len(cand):
                cand, length, pend = cand[plausible], length[plausible], pend[plausible]
        if len(cand) and pend.max() > stop:  # an extent past the graph: a false candidate (true records end inside it)
            ok = np.flatnonzero(pend <= stop)
            cand, length, pend = cand[ok], length[ok], pend[ok]
        cover = np.maximum.accumulate(pend)
        keep = np.flatnonzero(cand[1:] >= cover[:-1]) + 1
        keep = np.concatenate([[0], keep]) if len(cand) else keep
        cand, pend = cand[keep], pend[keep]
        pstart = pend - length[keep]
        if not len(cand) or cand[0] != pos:
            raise Unsupported("record run does not start with a record")
        gaps = np.flatnonzero(pend[:-1] != cand[1:])
        walked: list[int] = []
        nxt = None  # the position after the last verified record of this window
        for k in list(gaps) + [len(cand) - 1]:
            q, target = int(pend[k]), (int(cand[k + 1]) if k + 1 < len(cand) else wend)
            while q < target:
                if b.buf[q] != tag:  # the run ends here: kept candidates past q are not records of it
                    nxt = q
                    break
                if len(walked) >= _MAX_WALK:
                    raise Unsupported("too many hidden records")
                walked.append(q)
                n, p = _varint(b.buf, q + 1, stop)
                q = p + n
                if q > stop:
                    raise Unsupported("truncated record")
            if nxt is not None:
                last = k
                break
            if k + 1 < len(cand) and q != target:
                raise Unsupported("inconsistent record chain")
            last, nxt = k, q
        keep_to = last + 1
        s, p_, e = cand[:keep_to], pstart[:keep_to], pend[:keep_to]
        if walked:
            w = np.array(walked, np.int64)
            _, wp, we = _headers(b, w)
            order = np.argsort(np.concatenate([s, w]), kind="stable")
            s, p_, e = (np.concatenate([s, w])[order], np.concatenate([p_, wp])[order],
                        np.concatenate([e, we])[order])
        out_s.append(s)
        out_p.append(p_)
        out_e.append(e)
        pos = nxt
        if nxt < wend and (nxt >= stop or u8[nxt] != tag):
            break
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
    return cat(out_s), cat(out_p), cat(out_e), pos


def _fields(b: _Bytes, starts: np.ndarray, ends: np.ndarray, allowed: frozenset[int]):
    """Every field of every message [starts[i], ends[i]); each field must be length-delimited with a 1-byte tag and a
    number in `allowed`. One vectorised round per field slot. Returns a list of rounds (owner, field number, field
    start, payload start, payload end): each owner at most once per round, its fields in order over the rounds."""
    out = []
    owner = np.arange(len(starts))
    pos, end = starts, ends
    allowed_tags = np.zeros(256, bool)
    allowed_tags[[f << 3 | 2 for f in allowed]] = True
    while True:
        live = pos < end
        if not live.all():
            owner, pos, end = owner[live], pos[live], end[live]
        if not len(owner):
            break
        if len(owner) < _VECTOR_MIN and len(out) > 16:  # a few long records (Concat of many inputs): one by one
            rows = []
            for o, q, e in zip(owner.tolist(), pos.tolist(), end.tolist()):
                while q < e:
                    t = b.buf[q]
                    if not allowed_tags[t]:
                        raise Unsupported(f"field tag {t}")
                    n, p = _varint(b.buf, q + 1, e)
                    if p + n > e:
                        raise Unsupported("field overruns its message")
                    rows.append((o, t >> 3, q, p, p + n))
                    q = p + n
            out.extend(_rows_as_rounds(rows))
            break
        tag, ps, pe = _headers(b, pos)
        if not allowed_tags[tag].all():
            raise Unsupported("unhandled field")
        if (pe > end).any():
            raise Unsupported("field overruns its message")
        out.append((owner, tag >> 3, pos, ps, pe))
        pos = pe
    return out


def _rows_as_rounds(rows: list[tuple]) -> list[tuple]:
    """Field rows (owner, field, ...) of a few messages, in message order, as rounds: each owner at most once per
    round, each owner's fields in order."""
    by_owner: dict[int, list] = {}
    for r in rows:
        by_owner.setdefault(r[0], []).append(r)
    out = []
    for k in range(max(map(len, by_owner.values()), default=0)):
        batch = [fs[k] for fs in by_owner.values() if len(fs) > k]
        out.append(tuple(np.array(c, np.int64) for c in zip(*batch)))
    return out


def _cat(rounds, j: int, sel) -> np.ndarray:
    parts = [r[j][m] for r, m in zip(rounds, sel)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


_P = np.uint64(0x9E3779B97F4A7C15)
_MASKS = np.array([0] + [(1 << (8 * k)) - 1 for k in range(1, 8)] + [(1 << 64) - 1], np.uint64)


def _words(b: _Bytes, start: np.ndarray, length: np.ndarray):
    """The 8-byte words of each span (zero-padded), one array per word index, and a 64-bit hash per span."""
    h = length.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
    words = []
    j = 0
    while True:
        live = length > 8 * j
        if not live.any():
            break
        w = b.word(start + 8 * j) & _MASKS[np.minimum(np.maximum(length - 8 * j, 0), 8)]
        words.append(w)
        mixed = (h ^ w) * _P
        h = mixed if j == 0 else np.where(live, mixed, h)  # a span's hash depends on its own words only
        j += 1
    return words, h


_MULT = [np.uint64(m) for m in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                                 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)]


def _group(h: np.ndarray) -> np.ndarray:
    """For each hash, the index of one element with the same hash (a per-hash representative), by direct-mapped
    tables in a few rounds (no sort): elements that lose their slot to a different hash try again."""
    n = len(h)
    rep = np.empty(n, np.int64)
    todo = np.arange(n)
    for mult in _MULT:
        k = max(4, (8 * len(todo)).bit_length())  # a sparse table: few elements lose their slot
        hh = h[todo]
        slot = ((hh * mult) >> np.uint64(64 - k)).view(np.int64)
        table = np.empty(1 << k, np.int32)
        table[slot] = todo
        w = table[slot]
        same = h[w] == hh
        rep[todo[same]] = w[same]
        todo = todo[~same]
        if not len(todo):
            return rep
    raise Unsupported("hash table rounds exhausted")


def intern(*sources: tuple[_Bytes, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ids 0..d-1 of byte spans (buffer, starts, lengths) over all sources: equal byte strings, equal ids (a hash
    collision raises Unsupported). Also returns the index (into the concatenated spans) of one span of each id."""
    length = np.concatenate([n for _, _, n in sources]) if len(sources) > 1 else sources[0][2]
    if not len(length):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if length.max() <= 7:  # short strings: the zero-padded word and the length are the key itself, exactly
        keys = [b.word(s) & _MASKS[n] | (n.astype(np.uint64) << np.uint64(56)) for b, s, n in sources]
        rep = _group(np.concatenate(keys) if len(keys) > 1 else keys[0])
    else:
        parts = [_words(b, s, n) for b, s, n in sources]
        rep = _group(np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1])
        if (length[rep] != length).any():
            raise Unsupported("hash collision")
        for j in range(max(len(p[0]) for p in parts)):
            w = np.concatenate([p[0][j] if j < len(p[0]) else np.zeros(len(p[1]), np.uint64) for p in parts])
            if (w[rep] != w).any():
                raise Unsupported("hash collision")
    first = np.flatnonzero(rep == np.arange(len(rep)))
    dense = np.empty(len(rep), np.int64)
    dense[first] = np.arange(len(first))
    return dense[rep], first


class Wire:
    """The decoded main graph. ``model``: the ModelProto without nodes and value_info (and without weights). Per node
    i (graph order): ``op[i]`` (id into ``ops``), ``attr[i]`` (id into ``attr_keys``, -1 when none), ``dom[i]`` (id
    into ``domains``). Input and output occurrences as flat arrays in node order (``in_node``, ``in_s``/``in_e``
    spans, ``in_first[i]``: node i's first); value_info records as ``vi_type`` (id into ``type_keys``) and name
    spans. ``intern_names`` gives names ids shared with the graph's parsed inputs, outputs and initializers."""

    def __init__(self, data: bytes):
        b = self.b = _Bytes(data)
        self.data = data
        self.model, gpos, gend = self._top(data)
        graph = self.model.graph
        node_s, node_e, vi_s, vi_e = [], [], [], []
        pos = gpos
        while pos < gend:  # graph records: runs of node/value_info records vectorised, the rest parsed by protobuf
            t = data[pos]
            if t == _NODE_TAG or t == _VI_TAG:
                _, ps, pe, pos = _run(b, pos, gend, t, _NODE_FIRST if t == _NODE_TAG else None)
                (node_s if t == _NODE_TAG else vi_s).append(ps)
                (node_e if t == _NODE_TAG else vi_e).append(pe)
                continue
            q, pieces = pos, []
            while q < gend and data[q] not in (_NODE_TAG, _VI_TAG):
                rec = q
                tag, p = _varint(data, q, gend)
                if tag >> 3 == 0:
                    raise Unsupported("field number 0")
                q = _skip(data, p, gend, tag & 7)
                if tag == _INIT_TAG:
                    n, ps = _varint(data, p, gend)
                    stripped = _without_raw_data(data, ps, q)
                    if stripped is not None:  # the weights are never read here: not copied either
                        pieces.append(memoryview(data)[pos:rec])
                        pieces.append(bytes([_INIT_TAG]) + _encode_varint(len(stripped)) + stripped)
                        pos = q
            pieces.append(memoryview(data)[pos:q])
            try:
                for piece in pieces:
                    graph.MergeFromString(piece)
            except (DecodeError, RuntimeError, ValueError):
                raise Unsupported("graph field does not parse") from None
            pos = q
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
        self.node_s, self.node_e = cat(node_s), cat(node_e)
        self.vi_s, self.vi_e = cat(vi_s), cat(vi_e)
        self.n_nodes = len(self.node_s)
        self._nodes()
        self._value_info()

    @staticmethod
    def _top(data: bytes):
        end = len(data)
        pos, graph_at = 0, None
        while pos < end:
            tag, p = _varint(data, pos, end)
            field, wire = tag >> 3, tag & 7
            if field == 0 or field in _MODEL_UNHANDLED:
                raise Unsupported(f"model field {field}")
            q = _skip(data, p, end, wire)
            if field == 7:
                if graph_at is not None or wire != 2:
                    raise Unsupported("graph field repeated")
                n, gpos = _varint(data, p, end)
                graph_at = (pos, gpos, q)
            pos = q
        if graph_at is None:
            raise Unsupported("no graph")
        model = onnx.ModelProto()
        try:
            model.ParseFromString(data[: graph_at[0]] + data[graph_at[2]:])
        except (DecodeError, RuntimeError, ValueError):
            raise Unsupported("model fields do not parse") from None
        model.graph.SetInParent()
        return model, graph_at[1], graph_at[2]

    def _nodes(self) -> None:
        b = self.b
        rounds = _fields(b, self.node_s, self.node_e, _NODE_FIELDS)
        n = self.n_nodes
        # op type and domain: the last occurrence in a node (as protobuf keeps it); absent: the empty string
        op_s, op_e = np.zeros(n, np.int64), np.zeros(n, np.int64)
        dom_s, dom_e = np.zeros(n, np.int64), np.zeros(n, np.int64)
        a_start, a_end, a_total = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
        sel = {f: [] for f in (1, 2, 5, 9)}
        for owner, field, fs, ps, pe in rounds:
            m = np.flatnonzero(field == 4)
            o = owner[m]
            op_s[o], op_e[o] = ps[m], pe[m]
            m = np.flatnonzero(field == 7)
            if len(m):
                o = owner[m]
                dom_s[o], dom_e[o] = ps[m], pe[m]
            m = np.flatnonzero(field == 5)
            if len(m):
                o, f_s, p_e = owner[m], fs[m], pe[m]
                first = a_end[o] == 0
                a_start[o[first]] = f_s[first]
                a_end[o] = p_e
                a_total[o] += p_e - f_s
            for f in sel:
                sel[f].append(np.flatnonzero(field == f))
        self.ops, self.op = self._strings(op_s, op_e)
        if dom_e.any():
            self.domains, self.dom = self._strings(dom_s, dom_e)
        else:
            self.domains, self.dom = [""], np.zeros(n, np.int64)
        if SUBGRAPH_OPS & set(self.ops):
            raise Unsupported("subgraph ops")
        # attribute runs: contiguous attribute records (tag..end), interned by their bytes, parsed once each
        self.attr = np.full(n, -1, np.int64)
        self.attr_keys: list[bytes] = []
        idx = np.flatnonzero(a_end)
        if len(idx):
            span = a_end[idx] - a_start[idx]
            if (a_total[idx] != span).any():
                raise Unsupported("attributes not contiguous")
            ids, first = intern((b, a_start[idx], span))
            self.attr[idx] = ids
            for f in first.tolist():
                key = bytes(b.buf[a_start[idx[f]]: a_end[idx[f]]])
                try:
                    parsed = onnx.NodeProto.FromString(key)
                except (DecodeError, RuntimeError, ValueError):
                    raise Unsupported("attribute does not parse") from None
                if any(a.HasField("g") or a.graphs or a.HasField("tp") or a.type_protos for a in parsed.attribute):
                    raise Unsupported("graph or type attribute")  # nesting depth as the full parse sees it
                self.attr_keys.append(key)
        if any(len(x) for x in sel[9]):  # metadata entries: validated field by field (key, value strings)
            _fields(b, _cat(rounds, 3, sel[9]), _cat(rounds, 4, sel[9]), frozenset({1, 2}))
        # inputs and outputs, node by node (a stable sort of round-major runs), slot order within a node
        for f, prefix in ((1, "in"), (2, "out")):
            owner = _cat(rounds, 0, sel[f])
            order = np.argsort(owner, kind="stable")
            owner = owner[order]
            setattr(self, f"{prefix}_node", owner)
            setattr(self, f"{prefix}_s", _cat(rounds, 3, sel[f])[order])
            setattr(self, f"{prefix}_e", _cat(rounds, 4, sel[f])[order])
            first = np.zeros(n + 1, np.int64)
            np.cumsum(np.bincount(owner, minlength=n), out=first[1:])
            setattr(self, f"{prefix}_first", first)

    def _strings(self, s: np.ndarray, e: np.ndarray):
        """Distinct strings of per-node spans and each node's id into them."""
        ids, first = intern((self.b, s, e - s))
        return [self._str(int(s[i]), int(e[i])) for i in first.tolist()], ids

    def _str(self, s: int, e: int) -> str:
        try:
            return self.b.buf[s:e].decode("utf-8")
        except UnicodeDecodeError:
            raise Unsupported("string is not UTF-8") from None

    def _value_info(self) -> None:
        b = self.b
        n = len(self.vi_s)
        self.vi_name_s, self.vi_name_e = np.zeros(n, np.int64), np.zeros(n, np.int64)
        t_s, t_e = np.zeros(n, np.int64), np.zeros(n, np.int64)
        has_type = np.zeros(n, bool)
        for owner, field, _, ps, pe in _fields(b, self.vi_s, self.vi_e, _VI_FIELDS):
            m = field == 1  # the name: the last occurrence, as protobuf keeps it
            self.vi_name_s[owner[m]], self.vi_name_e[owner[m]] = ps[m], pe[m]
            m = field == 2
            o = owner[m]
            if has_type[o].any():  # a repeated message field is merged by protobuf: not decoded here
                raise Unsupported("value_info type repeated")
            has_type[o] = True
            t_s[o], t_e[o] = ps[m], pe[m]
        # a record without a type field has the default (empty) TypeProto, the same as an empty type field
        ids, first = intern((b, t_s, t_e - t_s))
        self.vi_type = ids
        self.type_keys = [bytes(b.buf[t_s[i]: t_e[i]]) for i in first.tolist()]
        for key in self.type_keys:
            try:
                tp = onnx.TypeProto.FromString(key)
            except (DecodeError, RuntimeError, ValueError):
                raise Unsupported("type does not parse") from None
            if tp.WhichOneof("value") not in (None, "tensor_type"):  # nested types: depth as the full parse sees it
                raise Unsupported("non-tensor type")

    def intern_names(self, inputs: np.ndarray, outputs: np.ndarray) -> None:
        """Name ids (``in_name``, ``out_name``: -1 where not asked for) for the selected input and output
        occurrences, value_info names (``vi_name``) and the names of the graph's parsed inputs, outputs and
        initializers (``gin_name``, ``gout_name``, ``init_name``), all in one id table (``n_names`` ids)."""
        g = self.model.graph
        extra = [v.name for v in g.input] + [v.name for v in g.output] + [t.name for t in g.initializer]
        enc = [x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in extra]
        lens = np.array([len(x) for x in enc], np.int64)
        offs = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if len(enc) else lens
        self._extra = _Bytes(b"".join(enc) + bytes(8))
        spans = [(self.in_s[inputs], self.in_e[inputs] - self.in_s[inputs]),
                 (self.out_s[outputs], self.out_e[outputs] - self.out_s[outputs]),
                 (self.vi_name_s, self.vi_name_e - self.vi_name_s)]
        ids, first = intern(*[(self.b, s, n) for s, n in spans], (self._extra, offs, lens))
        starts = np.concatenate([s for s, _ in spans] + [offs])
        lengths = np.concatenate([n for _, n in spans] + [lens])
        cut = np.cumsum([len(s) for s, _ in spans])
        self._name_s, self._name_len, self._name_extra = starts[first], lengths[first], first >= cut[-1]
        self.n_names = len(first)
        self.in_name = np.full(len(self.in_s), -1, np.int64)
        self.out_name = np.full(len(self.out_s), -1, np.int64)
        self.in_name[inputs], self.out_name[outputs] = ids[: cut[0]], ids[cut[0]: cut[1]]
        self.vi_name = ids[cut[1]: cut[2]]
        rest = ids[cut[2]:]
        ni, no = len(g.input), len(g.output)
        self.gin_name, self.gout_name, self.init_name = rest[:ni], rest[ni: ni + no], rest[ni + no:]

    # -- lookups ------------------------------------------------------------------------------------------------------
    def name(self, i: int) -> str:
        s = int(self._name_s[i])
        raw = (self._extra.buf if self._name_extra[i] else self.b.buf)[s: s + int(self._name_len[i])]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw

    def node(self, i: int) -> onnx.NodeProto:
        """Node i parsed from its own bytes (what the full parse holds at graph.node[i])."""
        return onnx.NodeProto.FromString(self.b.buf[int(self.node_s[i]): int(self.node_e[i])])

    def outputs_named(self, name: str | bytes) -> np.ndarray:
        """Indices (into the output occurrences, in graph order) of the node outputs called `name`."""
        raw = name if isinstance(name, bytes) else name.encode("utf-8", "surrogatepass")
        occ = np.flatnonzero(self.out_e - self.out_s == len(raw))
        if len(raw) and len(occ):
            occ = occ[self.b.u8[self.out_s[occ]] == raw[0]]
        return np.array([k for k in occ.tolist() if self.b.buf[self.out_s[k]: self.out_e[k]] == raw], np.int64)

    def node_inputs(self, i: int) -> np.ndarray:
        return self.in_name[self.in_first[i]: self.in_first[i + 1]]

    def node_outputs(self, i: int) -> np.ndarray:
        return self.out_name[self.out_first[i]: self.out_first[i + 1]]


# Tests set this: an error other than Unsupported is a bug of this module and is raised, not hidden.
STRICT = False


def decode(data: bytes) -> Wire | None:
    """The decoded graph, or None when the file needs the full parse (see the module docstring). Whatever goes
    wrong here, the full parse decides: it alone says what is valid ONNX."""
    try:
        return Wire(data)
    except Unsupported:
        return None
    except Exception:
        if STRICT:
            raise
        return None
