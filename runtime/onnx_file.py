"""Read an ONNX model file using only the standard library and numpy.

Craft runs models on Raspberry Pi-class devices, where neither `onnx` nor
`google.protobuf` should be needed and where a 60 MB model must not be read or
copied more than necessary.  This module memory-maps the file and decodes the
protobuf wire format by hand, looking only at the fields Craft uses (numbers as
in onnx.proto) and skipping everything else:

  ModelProto        ir_version=1 producer_name=2 producer_version=3 graph=7
                    opset_import=8 metadata_props=14
  GraphProto        node=1 initializer=5 input=11 output=12
  NodeProto         input=1 output=2 name=3 op_type=4 attribute=5 domain=7
  AttributeProto    name=1 f=2 i=3 s=4 t=5 g=6 floats=7 ints=8 strings=9 tensors=10
                    graphs=11 type=20  (a graph attribute - Scan's body - is a GraphProto:
                    its nodes are read like the main graph's, its initializers' headers checked)
  TensorProto       dims=1 data_type=2 float_data=4 int32_data=5 int64_data=7 name=8
                    raw_data=9 double_data=10 uint64_data=11 data_location=14
  ValueInfoProto    name=1 type=2 -> TypeProto.tensor_type=1 -> elem_type=1 shape=2
                    -> TensorShapeProto.dim=1 -> dim_value=1 | dim_param=2

Tensors come back as read-only numpy arrays.  Little-endian raw_data at an
aligned file offset is returned as a view of the mapping (no copy); other
tensors are copied once.  Because such views read the file lazily, replace a
model file atomically (write elsewhere, then os.replace) rather than rewriting it
in place while its arrays are in use: truncating a mapped file makes later reads
of it kill the process with SIGBUS.  Arrays that live as long as the process (the
numpy backend's weights) are read with in_memory=True, which reads the file instead.

The file is untrusted: every length, count and size it claims is checked against the
bytes actually present before anything is allocated from it (a packed field may not claim
more values than its bytes hold, raw_data must be exactly dims x the type's size), packed
values are decoded in bounded chunks, and callers may cap how many nodes, tensors and
values the reader builds objects for (a file of millions of empty entries would otherwise
cost a hundred times its size in Python objects).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator

import numpy as np

__all__ = ["OnnxFormatError", "ValueInfo", "Node", "TensorInfo", "OnnxModel", "read_model", "read_metadata"]

MAX_RANK = 64  # numpy's own limit: no tensor or value may claim more dims
MAX_PAIRS = 4096  # metadata_props and opset_import entries; real files have a few dozen
MAX_GRAPH_DEPTH = 4  # graphs inside graph attributes inside ...: Craft's Scan body is depth 1


class OnnxFormatError(ValueError):
    """The file is not a usable ONNX model: not ONNX at all, truncated, malformed,
    or using a feature Craft does not read (external data, exotic tensor types).
    The message is one line that starts with the file's path."""


@dataclass(frozen=True)
class ValueInfo:
    """A graph input or output.  `elem_type` is a TensorProto data type (0 if the
    value is not a tensor or its type is unset); each shape entry is an int for
    a fixed dim, a str for a named (dynamic) dim and None for an unknown one.
    The shape is () both for scalars and when the rank is unknown."""

    name: str
    elem_type: int
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class Node:
    """One graph node.  Attribute values are float (FLOAT), int (INT), bytes
    (STRING), np.ndarray (TENSOR), a subgraph's nodes as a tuple of Node (GRAPH),
    or lists of those (FLOATS, INTS, STRINGS, TENSORS, GRAPHS); kinds Craft does
    not read (sparse tensors, type protos) map to None so that their presence is
    still visible.  A subgraph's nodes count against the same max_entries as the
    main graph's (in OnnxModel.node_count), and its initializers are checked as
    the main graph's are (external data refused), though not decoded."""

    op_type: str
    domain: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, object] = field(hash=False)


@dataclass(frozen=True)
class TensorInfo:
    """An initializer as its header describes it, read without decoding its data.  `dtype`
    is None for a data type Craft does not read.  For the others the reader has checked that
    the file holds exactly the data the shape claims."""

    name: str
    data_type: int
    shape: tuple[int, ...]
    dtype: np.dtype | None


@dataclass
class OnnxModel:
    """What Craft needs from a ModelProto.  `opsets` maps domain to version, with
    '' for the default ai.onnx domain (also used for nodes' `domain`).  `inputs`
    lists graph inputs as stored, so models older than IR version 4 may also
    list their initializers there.  `tensors` has every initializer's header,
    `initializers` the decoded ones that were asked for; `node_count` counts the
    nodes even when they were not parsed, `sparse_initializer_count` the sparse
    initializers, which are not parsed at all.  `structure_bytes` is the part of the
    file that is neither initializer raw_data nor metadata: what a runtime turns
    into objects (nodes, names, types, typed values), whatever their number."""

    ir_version: int
    opsets: dict[str, int]
    producer: str
    metadata: dict[str, str]
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    nodes: list[Node]
    initializers: dict[str, np.ndarray]
    producer_version: str = ""
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    node_count: int = 0
    sparse_initializer_count: int = 0
    structure_bytes: int = 0


def read_model(
    path: str | os.PathLike,
    *,
    with_weights: bool | Collection[str] = True,
    with_nodes: bool = True,
    max_entries: int | None = None,
    in_memory: bool = False,
) -> OnnxModel:
    """Read the model at `path`.  `with_weights`: decode every initializer (True),
    none (False: only their headers, in `tensors`; tensor-valued node attributes,
    as in Constant nodes, are still decoded), or only those named.  Reading the
    metadata, inputs, outputs and nodes of a large model then takes milliseconds.
    `with_nodes=False` only counts the nodes.  `max_entries` caps the nodes, the
    initializers, the inputs and the outputs (each); a file with more is refused.
    `in_memory`: read the file into memory instead of mapping it, for arrays that outlive the
    read - they then survive the file being rewritten in place (`cp new.onnx model.onnx`), which
    kills a process reading a mapping of it with SIGBUS. The same resident size once every page
    is read, but anonymous memory, which the kernel cannot drop and re-read under pressure.
    Raises OnnxFormatError as described there; OSError if the file cannot be opened."""
    wanted = (lambda name: with_weights) if isinstance(with_weights, bool) else frozenset(with_weights).__contains__
    return _read(path, _Options(True, wanted, with_nodes, max_entries, in_memory))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return the model's metadata_props as a dict, without reading the graph."""
    return _read(path, _Options(False, lambda name: False, False, None)).metadata


@dataclass(frozen=True)
class _Options:
    graph: bool  # parse the graph at all
    decode: Callable[[str], bool]  # which initializers to decode
    nodes: bool
    max_entries: int | None
    in_memory: bool = False  # read the file rather than map it (read_model)


# --- protobuf wire format ----------------------------------------------------

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


class _Malformed(Exception):
    """Internal: what is wrong with the file; _read() adds the path."""


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decode the varint at `pos`; return (value as unsigned 64-bit, next position)."""
    result = shift = 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & 0xFFFF_FFFF_FFFF_FFFF, pos
        shift += 7
        if shift >= 70:
            raise _Malformed(f"malformed protobuf: varint longer than 10 bytes at byte {pos}")
    raise _Malformed(f"truncated or malformed protobuf: varint runs past byte {end}")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field number, wire type, a, b) for each field of the message in
    buf[start:end]: for varints a is the value; otherwise buf[a:b] is the payload.
    One-byte varints, by far the most common, are decoded inline for speed."""
    pos = start
    while pos < end:
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed(f"malformed protobuf: field number 0 at byte {pos}")
        if wire == _VARINT or wire == _LEN:
            value = buf[pos] if pos < end else 0x80  # 0x80: let _read_varint report truncation
            if value < 0x80:
                pos += 1
            else:
                value, pos = _read_varint(buf, pos, end)
            if wire == _VARINT:
                yield number, wire, value, 0
                continue
            size = value
        elif wire == _FIXED32 or wire == _FIXED64:
            size = 4 if wire == _FIXED32 else 8
        else:
            raise _Malformed(f"malformed protobuf: unsupported wire type {wire} at byte {pos}")
        if size > end - pos:
            raise _Malformed(
                f"truncated or malformed protobuf: field {number} at byte {pos} needs {size} bytes, {end - pos} left"
            )
        yield number, wire, pos, pos + size
        pos += size


def _text(buf: memoryview, a: int, b: int) -> str:
    try:
        return str(buf[a:b], "utf-8")
    except UnicodeDecodeError:
        raise _Malformed(f"malformed protobuf: invalid UTF-8 in string at byte {a}") from None


def _add_ints(out: list[int], buf: memoryview, wire: int, a: int, b: int, limit: int | None = None) -> None:
    """Append a repeated int64 field's values, whether sent one by one or packed;
    _Malformed once there are more than `limit`."""
    if wire == _VARINT:
        out.append(_signed(a))
    elif wire == _LEN:
        while a < b:
            value, a = _read_varint(buf, a, b)
            out.append(_signed(value))
            if limit is not None and len(out) > limit:
                break
    if limit is not None and len(out) > limit:
        raise _Malformed(f"more than {limit} dims (rank) at byte {a}")


def _add_floats(out: list[float], buf: memoryview, wire: int, a: int, b: int) -> None:
    """Append a repeated float field's values, whether sent one by one or packed."""
    if wire in (_FIXED32, _LEN):
        if (b - a) % 4:
            raise _Malformed(f"malformed protobuf: packed floats of {b - a} bytes at byte {a}")
        out.extend(struct.unpack_from(f"<{(b - a) // 4}f", buf, a))


_CHUNK = 1 << 20  # packed varints are decoded this many bytes at a time: bounds the temporaries


def _count_varints(data: np.ndarray) -> int:
    """How many varints a packed run (uint8 array) holds: the bytes that end one."""
    if data.size and data[-1] >= 0x80:
        raise _Malformed("truncated or malformed protobuf: packed varints end mid-value")
    return sum(int(np.count_nonzero(data[i : i + _CHUNK] < 0x80)) for i in range(0, data.size, _CHUNK))


def _decode_varints(data: np.ndarray) -> Iterator[np.ndarray]:
    """Decode a packed run of varints (uint8 array) into uint64 arrays, vectorized, one
    chunk of at most _CHUNK bytes at a time (each chunk ends with a whole value)."""
    start = 0
    while start < data.size:
        stop = min(start + _CHUNK, data.size)
        if stop < data.size:
            ends = np.flatnonzero(data[start:stop] < 0x80)
            if ends.size == 0:
                raise _Malformed("malformed protobuf: packed varint longer than 10 bytes")
            stop = start + int(ends[-1]) + 1
        yield _decode_chunk(data[start:stop])
        start = stop


def _decode_chunk(data: np.ndarray) -> np.ndarray:
    if data.max() < 0x80:  # every value fits in one byte
        return data.astype(np.uint64)
    if data[-1] >= 0x80:
        raise _Malformed("truncated or malformed protobuf: packed varints end mid-value")
    ends = np.flatnonzero(data < 0x80)
    starts = np.concatenate(([0], ends[:-1] + 1))
    if (ends - starts).max() >= 10:
        raise _Malformed("malformed protobuf: packed varint longer than 10 bytes")
    shifts = 7 * (np.arange(data.size) - np.repeat(starts, ends - starts + 1))
    parts = (data & 0x7F).astype(np.uint64) << shifts.astype(np.uint64)
    return np.bitwise_or.reduceat(parts, starts)


# --- tensors -----------------------------------------------------------------

# TensorProto.DataType -> (little-endian numpy dtype, field holding typed values)
_TENSOR_TYPES = {
    1: ("<f4", 4),
    2: ("u1", 5),
    3: ("i1", 5),
    4: ("<u2", 5),
    5: ("<i2", 5),
    6: ("<i4", 5),
    7: ("<i8", 7),
    9: ("?", 5),
    10: ("<f2", 5),
    11: ("<f8", 10),
    12: ("<u4", 11),
    13: ("<u8", 11),
}
# float_data and double_data hold fixed-width values; the other typed fields hold varints
_FIXED_WIDTH_FIELDS = {4: (np.dtype("<f4"), _FIXED32), 10: (np.dtype("<f8"), _FIXED64)}


def _frozen(array: np.ndarray) -> np.ndarray:
    """Make `array` native-endian and aligned (copying only if needed), read-only."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    elif not array.flags.aligned:
        array = array.copy()
    array.flags.writeable = False
    return array


@dataclass
class _Tensor:
    """A TensorProto's header and where its data lies: buf[raw[0]:raw[1]] or the typed spans."""

    name: str = ""
    data_type: int = 0
    dims: list[int] = field(default_factory=list)
    raw: tuple[int, int] | None = None
    typed: list[tuple[int, int, int]] = field(default_factory=list)  # (wire, a, b) of the typed field
    external: bool = False

    @property
    def dtype(self) -> np.dtype | None:
        return np.dtype(_TENSOR_TYPES[self.data_type][0]) if self.data_type in _TENSOR_TYPES else None

    @property
    def raw_bytes(self) -> int:
        return self.raw[1] - self.raw[0] if self.raw else 0


def _tensor_header(buf: memoryview, start: int, end: int) -> _Tensor:
    """Read a TensorProto's fields (not its data) and check that the data present is exactly
    what dims and type claim; nothing is allocated from the claims."""
    t = _Tensor()
    typed = {}
    for number, wire, a, b in _fields(buf, start, end):
        if number == 1:
            _add_ints(t.dims, buf, wire, a, b, MAX_RANK)
        elif number == 2 and wire == _VARINT:
            t.data_type = a
        elif number == 8 and wire == _LEN:
            t.name = _text(buf, a, b)
        elif number == 9 and wire == _LEN:
            t.raw = (a, b)
        elif number == 14 and wire == _VARINT:
            t.external = a == 1
        elif number in (4, 5, 7, 10, 11):
            typed.setdefault(number, []).append((wire, a, b))
    if t.external:
        raise _Malformed(
            f"tensor {t.name!r} keeps its data in an external file "
            "(data_location=EXTERNAL); Craft models must be self-contained"
        )
    if any(d < 0 for d in t.dims):
        raise _Malformed(f"tensor {t.name!r} has negative dims {t.dims}")
    if t.dtype is None:
        return t  # refused if decoded; its header may still be looked at
    t.typed = typed.get(_TENSOR_TYPES[t.data_type][1], [])
    count = math.prod(t.dims)
    if t.raw is not None:
        if t.raw_bytes != count * t.dtype.itemsize:
            raise _Malformed(
                f"tensor {t.name!r} of shape {tuple(t.dims)} has {t.raw_bytes} "
                f"bytes of raw_data, expected {count * t.dtype.itemsize}"
            )
    else:
        present = _count_typed(buf, _TENSOR_TYPES[t.data_type][1], t.typed)
        if present != count:
            raise _Malformed(f"tensor {t.name!r} of shape {tuple(t.dims)} has {present} values, expected {count}")
    return t


def _count_typed(buf: memoryview, number: int, spans: list[tuple[int, int, int]]) -> int:
    """How many values typed-data field `number` holds (packed or not), without decoding them."""
    count = 0
    if number in _FIXED_WIDTH_FIELDS:
        dtype, single_wire = _FIXED_WIDTH_FIELDS[number]
        for wire, a, b in spans:
            if wire in (_LEN, single_wire):
                if (b - a) % dtype.itemsize:
                    raise _Malformed(f"malformed protobuf: packed field {number} of {b - a} bytes")
                count += (b - a) // dtype.itemsize
    else:
        for wire, a, b in spans:
            if wire == _LEN:
                count += _count_varints(np.frombuffer(buf, np.uint8, b - a, a))
            elif wire == _VARINT:
                count += 1
    return count


def _tensor_values(buf: memoryview, t: _Tensor) -> np.ndarray:
    """The data of a checked header, as a read-only array of its shape."""
    if t.dtype is None:
        raise _Malformed(f"tensor {t.name!r} has data type {t.data_type}, which Craft does not read")
    count = math.prod(t.dims)
    if t.raw is not None:
        values = np.frombuffer(buf, t.dtype, count, t.raw[0]) if count else np.empty(0, t.dtype)
        return _frozen(values.reshape(t.dims))
    number = _TENSOR_TYPES[t.data_type][1]
    # float16 values are stored as their uint16 bit patterns
    values = np.empty(count, np.uint16 if t.data_type == 10 else t.dtype.newbyteorder("="))
    filled = 0
    for part in _typed_parts(buf, number, t.typed):
        values[filled : filled + part.size] = part  # a cast, as astype would (int32_data holds int8 ... bool)
        filled += part.size
    assert filled == count, "checked by _tensor_header"
    if t.data_type == 10:
        values = values.view(np.float16)
    return _frozen(values.reshape(t.dims))


def _typed_parts(buf: memoryview, number: int, spans: list[tuple[int, int, int]]) -> Iterator[np.ndarray]:
    """The values of typed-data field `number` (packed or not), in bounded pieces."""
    if number in _FIXED_WIDTH_FIELDS:
        dtype, single_wire = _FIXED_WIDTH_FIELDS[number]
        for wire, a, b in spans:
            if wire in (_LEN, single_wire):
                yield np.frombuffer(buf, dtype, (b - a) // dtype.itemsize, a)
    else:
        dtype = np.dtype(np.int64 if number in (5, 7) else np.uint64)  # int32/int64 vs uint64
        for wire, a, b in spans:
            if wire == _LEN:
                for part in _decode_varints(np.frombuffer(buf, np.uint8, b - a, a)):
                    yield part.view(dtype)
            elif wire == _VARINT:
                yield np.array([a], np.uint64).view(dtype)


def _parse_tensor(buf: memoryview, start: int, end: int) -> tuple[str, np.ndarray]:
    t = _tensor_header(buf, start, end)
    return t.name, _tensor_values(buf, t)


# --- graph structure ---------------------------------------------------------

_ATTR_FLOAT, _ATTR_INT, _ATTR_STRING, _ATTR_TENSOR, _ATTR_GRAPH = 1, 2, 3, 4, 5
_ATTR_FLOATS, _ATTR_INTS, _ATTR_STRINGS, _ATTR_TENSORS, _ATTR_GRAPHS = 6, 7, 8, 9, 10


def _parse_attribute(
    buf: memoryview, start: int, end: int, model: OnnxModel, options: _Options, depth: int
) -> tuple[str, object]:
    name, kind, f, i, s = "", 0, 0.0, 0, b""
    floats: list[float] = []
    ints: list[int] = []
    strings: list[bytes] = []
    tensor: tuple[int, int] | None = None  # span of t
    tensors: list[tuple[int, int]] = []  # spans of tensors
    graph: tuple[int, int] | None = None  # span of g
    graphs: list[tuple[int, int]] = []  # spans of graphs
    for number, wire, a, b in _fields(buf, start, end):
        if number == 1 and wire == _LEN:
            name = _text(buf, a, b)
        elif number == 20 and wire == _VARINT:
            kind = a
        elif number == 2 and wire == _FIXED32:
            f = struct.unpack_from("<f", buf, a)[0]
        elif number == 3 and wire == _VARINT:
            i = _signed(a)
        elif number == 4 and wire == _LEN:
            s = bytes(buf[a:b])
        elif number == 5 and wire == _LEN:
            _once(tensor, f"the tensor of attribute {name[:80]!r}")
            tensor = (a, b)
        elif number == 7:
            _add_floats(floats, buf, wire, a, b)
        elif number == 8:
            _add_ints(ints, buf, wire, a, b)
        elif number == 9 and wire == _LEN:
            strings.append(bytes(buf[a:b]))
        elif number == 10 and wire == _LEN:
            tensors.append((a, b))
        elif number == 6 and wire == _LEN:
            _once(graph, f"the graph of attribute {name[:80]!r}")
            graph = (a, b)
        elif number == 11 and wire == _LEN:
            graphs.append((a, b))
    # The type field comes last on the wire, so tensors are decoded only now, if wanted.
    if kind == _ATTR_GRAPH:
        return name, _parse_subgraph(buf, *graph, model, options, depth + 1) if graph else None
    if kind == _ATTR_GRAPHS:
        return name, [_parse_subgraph(buf, a, b, model, options, depth + 1) for a, b in graphs]
    if kind == _ATTR_TENSOR:
        return name, _parse_tensor(buf, *tensor)[1] if tensor else None
    if kind == _ATTR_TENSORS:
        return name, [_parse_tensor(buf, a, b)[1] for a, b in tensors]
    values = {
        _ATTR_FLOAT: f,
        _ATTR_INT: i,
        _ATTR_STRING: s,
        _ATTR_FLOATS: floats,
        _ATTR_INTS: ints,
        _ATTR_STRINGS: strings,
    }
    return name, values.get(kind)


def _domain(name: str) -> str:
    return "" if name == "ai.onnx" else name


def _parse_node(buf: memoryview, start: int, end: int, model: OnnxModel, options: _Options, depth: int = 0) -> Node:
    inputs, outputs, attributes = [], [], {}
    name = op_type = domain = ""
    for number, wire, a, b in _fields(buf, start, end):
        if wire != _LEN:
            continue
        if number == 1:
            inputs.append(_text(buf, a, b))
        elif number == 2:
            outputs.append(_text(buf, a, b))
        elif number == 3:
            name = _text(buf, a, b)
        elif number == 4:
            op_type = _text(buf, a, b)
        elif number == 5:
            key, value = _parse_attribute(buf, a, b, model, options, depth)
            attributes[key] = value
        elif number == 7:
            domain = _domain(_text(buf, a, b))
    return Node(op_type, domain, name, tuple(inputs), tuple(outputs), attributes)


def _once(span: tuple[int, int] | None, what: str) -> None:
    """Refuse a second occurrence of a singular message field: protobuf (and so ONNX Runtime) merges
    the two into one message, so a file could hide a second graph - its nodes and initializers -
    from checks that read one of them."""
    if span is not None:
        raise _Malformed(f"{what} appears twice (ONNX Runtime would merge the two)")


def _submessage(buf: memoryview, start: int, end: int, number: int, what: str) -> tuple[int, int] | None:
    """Span of embedded-message field `number`, if present (once: see _once)."""
    span = None
    for n, wire, a, b in _fields(buf, start, end):
        if n == number and wire == _LEN:
            _once(span, what)
            span = (a, b)
    return span


def _parse_value_info(buf: memoryview, start: int, end: int) -> ValueInfo:
    name, elem_type, shape = "", 0, []
    type_span = tensor_type = None
    for number, wire, a, b in _fields(buf, start, end):
        if number == 1 and wire == _LEN:
            name = _text(buf, a, b)
        elif number == 2 and wire == _LEN:
            _once(type_span, f"the type of value {name[:80]!r}")
            type_span = (a, b)
            tensor_type = _submessage(buf, a, b, 1, f"the tensor type of value {name[:80]!r}")  # TypeProto.tensor_type
    if tensor_type is not None:
        shape_span = None
        for number, wire, a, b in _fields(buf, *tensor_type):
            if number == 1 and wire == _VARINT:
                elem_type = a
            elif number == 2 and wire == _LEN:  # TensorShapeProto; its field 1 is repeated dim
                _once(shape_span, f"the shape of value {name[:80]!r}")
                shape_span = (a, b)
                for n, w, da, db in _fields(buf, a, b):
                    if n == 1 and w == _LEN:
                        if len(shape) == MAX_RANK:
                            raise _Malformed(f"value {name!r} has more than {MAX_RANK} dims")
                        shape.append(_parse_dim(buf, da, db))
    return ValueInfo(name, elem_type, tuple(shape))


def _parse_dim(buf: memoryview, start: int, end: int) -> int | str | None:
    dim: int | str | None = None
    for number, wire, a, b in _fields(buf, start, end):
        if number == 1 and wire == _VARINT:
            dim = _signed(a)
        elif number == 2 and wire == _LEN:
            dim = _text(buf, a, b)
    return dim


def _count_node(model: OnnxModel, options: _Options) -> None:
    model.node_count += 1
    if options.max_entries is not None and model.node_count > options.max_entries:
        raise _Malformed(f"more than {options.max_entries} nodes in the graph")


def _parse_subgraph(
    buf: memoryview, start: int, end: int, model: OnnxModel, options: _Options, depth: int
) -> tuple[Node, ...]:
    """A graph attribute's GraphProto: its nodes (counted with the main graph's). Its initializers
    are checked, not decoded: ONNX Runtime would read one that says data_location=EXTERNAL from a
    file beside the model, so such a file is refused here as for the main graph."""
    if depth > MAX_GRAPH_DEPTH:
        raise _Malformed(f"graphs nested more than {MAX_GRAPH_DEPTH} deep in node attributes")
    nodes = []
    for number, wire, a, b in _fields(buf, start, end):
        if wire != _LEN:
            continue
        if number == 1:
            _count_node(model, options)
            nodes.append(_parse_node(buf, a, b, model, options, depth))
        elif number == 5:
            _tensor_header(buf, a, b)
        elif number == 15:
            model.sparse_initializer_count += 1
    return tuple(nodes)


def _parse_graph(buf: memoryview, start: int, end: int, model: OnnxModel, options: _Options) -> None:
    limit = options.max_entries
    counts = [0, 0, 0]  # initializers, inputs, outputs (nodes: model.node_count)
    for number, wire, a, b in _fields(buf, start, end):
        if wire == _LEN and number == 15:  # a SparseTensorProto
            model.sparse_initializer_count += 1
        if wire != _LEN or number not in (1, 5, 11, 12):
            continue
        index = (1, 5, 11, 12).index(number)
        if index == 0:
            _count_node(model, options)
        else:
            counts[index - 1] += 1
            if limit is not None and counts[index - 1] > limit:
                raise _Malformed(f"more than {limit} {('initializers', 'inputs', 'outputs')[index - 1]} in the graph")
        if number == 1:
            if options.nodes:
                model.nodes.append(_parse_node(buf, a, b, model, options))
        elif number == 5:
            tensor = _tensor_header(buf, a, b)
            if tensor.name in model.tensors:  # ONNX Runtime would use the first, the checks the last
                raise _Malformed(f"initializer '{tensor.name[:80]}' appears twice in the graph")
            model.structure_bytes -= tensor.raw_bytes
            model.tensors[tensor.name] = TensorInfo(tensor.name, tensor.data_type, tuple(tensor.dims), tensor.dtype)
            if options.decode(tensor.name):
                model.initializers[tensor.name] = _tensor_values(buf, tensor)
        elif number == 11:
            model.inputs.append(_parse_value_info(buf, a, b))
        elif number == 12:
            model.outputs.append(_parse_value_info(buf, a, b))


def _parse_pair(buf: memoryview, start: int, end: int) -> tuple[str, int | str | None]:
    """Decode a StringStringEntryProto (key=1, value=2) or an OperatorSetIdProto
    (domain=1, version=2): field 2 is a string in one and an int64 in the other."""
    key, value = "", None
    for number, wire, a, b in _fields(buf, start, end):
        if number == 1 and wire == _LEN:
            key = _text(buf, a, b)
        elif number == 2 and wire == _LEN:
            value = _text(buf, a, b)
        elif number == 2 and wire == _VARINT:
            value = _signed(a)
    return key, value


def _parse_model(buf: memoryview, options: _Options) -> OnnxModel:
    model = OnnxModel(0, {}, "", {}, [], [], [], {}, structure_bytes=len(buf))
    ir_version = graph = None
    pairs = 0
    for number, wire, a, b in _fields(buf, 0, len(buf)):
        if number == 1 and wire == _VARINT:
            ir_version = _signed(a)
        elif number == 2 and wire == _LEN:
            model.producer = _text(buf, a, b)
        elif number == 3 and wire == _LEN:
            model.producer_version = _text(buf, a, b)
        elif number == 7 and wire == _LEN:
            _once(graph, "the graph")
            graph = (a, b)
        elif number in (8, 14) and wire == _LEN:
            pairs += 1
            if pairs > MAX_PAIRS:
                raise _Malformed(f"more than {MAX_PAIRS} metadata_props and opset_import entries")
            key, value = _parse_pair(buf, a, b)
            if number == 8:
                model.opsets[_domain(key)] = value if isinstance(value, int) else 0
            else:
                model.metadata[key] = value if isinstance(value, str) else ""
                model.structure_bytes -= b - a
    if ir_version is None or ir_version <= 0:
        raise _Malformed("not an ONNX model (no ir_version)")
    model.ir_version = ir_version
    if options.graph:
        if graph is None:
            raise _Malformed("not an ONNX model (no graph)")
        _parse_graph(buf, *graph, model, options)
    return model


def _mapped(file) -> mmap.mmap | None:
    """A read-only mapping of the open file; None where it cannot be mapped (empty, a pipe, some
    network file systems): the caller reads it instead."""
    try:
        return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None


def _read(path: str | os.PathLike, options: _Options) -> OnnxModel:
    shown = os.fsdecode(path)
    with open(path, "rb") as file:
        data = None if options.in_memory else _mapped(file)
        if data is None:
            data = file.read()
    if len(data) == 0:
        raise OnnxFormatError(f"{shown}: empty file, not an ONNX model")
    try:
        return _parse_model(memoryview(data), options)
    except _Malformed as error:
        raise OnnxFormatError(f"{shown}: {error}") from None
    except (IndexError, ValueError, OverflowError, MemoryError, struct.error) as error:  # safety net
        raise OnnxFormatError(f"{shown}: malformed ONNX file ({type(error).__name__}: {error})") from None
