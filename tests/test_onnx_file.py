"""Tests for runtime/onnx_file.py: everything it reads must match onnx.load."""

from __future__ import annotations

import base64
import os
import re
import struct
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from craft.runtime import onnx_file

OnnxFormatError = onnx_file.OnnxFormatError

# TensorProto data type -> numpy dtype, for every type onnx_file supports
SUPPORTED = {
    TensorProto.FLOAT: np.float32,
    TensorProto.UINT8: np.uint8,
    TensorProto.INT8: np.int8,
    TensorProto.UINT16: np.uint16,
    TensorProto.INT16: np.int16,
    TensorProto.INT32: np.int32,
    TensorProto.INT64: np.int64,
    TensorProto.BOOL: np.bool_,
    TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64,
    TensorProto.UINT32: np.uint32,
    TensorProto.UINT64: np.uint64,
}
SHAPES = [(), (0,), (3, 0, 2), (5,), (2, 3, 4)]


def sample(dtype: type, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Values spanning the dtype's range (extremes and negatives included)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind == "f":
        values = rng.standard_normal(shape) * 1e3
        if values.size >= 4:
            values.flat[:4] = [np.inf, -0.0, np.finfo(dtype).max, np.nan]
        return values.astype(dtype)
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if values.size >= 2:
        values.flat[:2] = [info.min, info.max]
    return values


def typed_tensor(name: str, array: np.ndarray) -> TensorProto:
    """A TensorProto holding `array` in its typed field (float_data, int32_data, ...)."""
    data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    return helper.make_tensor(name, data_type, array.shape, array.flatten().tolist(), raw=False)


def build_model(with_big_metadata: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    initializers = []
    for data_type, dtype in SUPPORTED.items():
        for index, shape in enumerate(SHAPES):
            array = sample(dtype, shape, rng)
            name = f"{TensorProto.DataType.Name(data_type).lower()}_{index}"
            initializers.append(numpy_helper.from_array(array, name + "_raw"))
            initializers.append(typed_tensor(name + "_typed", array))
    for tensor in initializers:  # both encodings really are in use
        assert tensor.HasField("raw_data") == tensor.name.endswith("_raw"), tensor.name

    attrs = dict(
        alpha=1.5,
        count=-7,
        mode=b"reflect",
        axes=[0, -1, 2**40],
        scales=[0.5, -2.25],
        labels=[b"a", "ü€".encode(), b""],
        value=numpy_helper.from_array(np.arange(6, dtype=np.int64).reshape(2, 3)),
        pair=[numpy_helper.from_array(np.ones(2, np.float32)), typed_tensor("", np.array([-3, 4], np.int8))],
    )
    nodes = [
        helper.make_node("Custom", ["x", "float_0_raw"], ["h"], name="custom", domain="craft.ops", **attrs),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
        helper.make_node("Constant", [], ["c"], value=typed_tensor("", np.array(2.5, np.float16))),
        helper.make_node("Cast", ["y"], ["z"], to=TensorProto.INT64),
        helper.make_node(
            "If",
            ["cond"],
            ["w"],
            then_branch=helper.make_graph([helper.make_node("Neg", ["x"], ["t"], name="neg")], "t", [], []),
            else_branch=helper.make_graph([], "e", [], []),
        ),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, None, 224]),
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        helper.make_tensor_value_info("untyped_rank", TensorProto.FLOAT, None),
    ]
    outputs = [
        helper.make_tensor_value_info("z", TensorProto.INT64, ["batch", 10]),
        helper.make_tensor_value_info("w", TensorProto.FLOAT16, [1]),
        helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None),
    ]
    graph = helper.make_graph(
        nodes,
        "craft_graph",
        inputs,
        outputs,
        initializers,
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(
        graph,
        producer_name="craft-export",
        producer_version="0.3.1",
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("craft.ops", 2)],
    )
    metadata = {"task": "classification", "labels": "chat,chien,Hund,犬,🐕", "empty": ""}
    if with_big_metadata:
        metadata["blob"] = base64.b64encode(np.random.default_rng(1).bytes(768 * 1024)).decode()
    helper.set_model_props(model, metadata)
    return model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    onnx.save(build_model(), path)
    return str(path)


def shape_of(value_info: onnx.ValueInfoProto) -> tuple:
    if not value_info.type.HasField("tensor_type"):
        return ()
    return tuple(
        d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None
        for d in value_info.type.tensor_type.shape.dim
    )


def assert_same_array(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    assert np.array_equal(actual, expected, equal_nan=actual.dtype.kind == "f"), what


def test_header_and_metadata_match_onnx(model_path: str) -> None:
    expected = onnx.load(model_path)
    model = onnx_file.read_model(model_path)
    assert model.ir_version == expected.ir_version
    assert model.producer == "craft-export" and model.producer_version == "0.3.1"
    assert model.opsets == {o.domain: o.version for o in expected.opset_import} == {"": 17, "craft.ops": 2}
    metadata = {p.key: p.value for p in expected.metadata_props}
    assert model.metadata == metadata
    assert len(metadata["blob"]) > 1_000_000 and model.metadata["labels"] == "chat,chien,Hund,犬,🐕"
    assert onnx_file.read_metadata(model_path) == metadata


def test_inputs_and_outputs_match_onnx(model_path: str) -> None:
    expected = onnx.load(model_path).graph
    model = onnx_file.read_model(model_path)
    for ours, theirs in [(model.inputs, expected.input), (model.outputs, expected.output)]:
        assert [(v.name, v.elem_type, v.shape) for v in ours] == [
            (v.name, v.type.tensor_type.elem_type, shape_of(v)) for v in theirs
        ]
    assert model.inputs[0] == onnx_file.ValueInfo("x", TensorProto.FLOAT, ("batch", 3, None, 224))
    assert model.outputs[2] == onnx_file.ValueInfo("seq", 0, ())


def test_initializers_match_onnx(model_path: str) -> None:
    expected = {t.name: numpy_helper.to_array(t) for t in onnx.load(model_path).graph.initializer}
    initializers = onnx_file.read_model(model_path).initializers
    assert initializers.keys() == expected.keys()
    assert len(expected) == 2 * len(SUPPORTED) * len(SHAPES)
    for name, array in initializers.items():
        assert_same_array(array, expected[name], name)
        assert array.dtype.isnative and array.flags.aligned and not array.flags.writeable, name


def test_aligned_raw_data_is_not_copied(tmp_path) -> None:
    """raw_data at an aligned file offset is returned as a view of the mapping."""
    arrays = [np.random.default_rng(i).standard_normal(1000).astype(np.float32) for i in range(8)]
    tensors = [numpy_helper.from_array(a, "w" * (i + 1)) for i, a in enumerate(arrays)]
    model = helper.make_model(helper.make_graph([], "g", [], [], tensors))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    content = path.read_bytes()
    read = onnx_file.read_model(path).initializers
    views = 0
    for i, array in enumerate(arrays):
        offset, root = content.find(array.tobytes()), read["w" * (i + 1)]
        while isinstance(root.base, np.ndarray):
            root = root.base
        is_view = not root.flags.owndata
        assert is_view == (offset % 4 == 0), (offset, i)
        views += is_view
    assert 0 < views < len(arrays)  # both cases were exercised


def test_nodes_and_attributes_match_onnx(model_path: str) -> None:
    expected = onnx.load(model_path).graph.node
    nodes = onnx_file.read_model(model_path).nodes
    assert [(n.op_type, n.domain, n.name, n.inputs, n.outputs) for n in nodes] == [
        (n.op_type, n.domain, n.name, tuple(n.input), tuple(n.output)) for n in expected
    ]
    for node, proto in zip(nodes, expected):
        assert list(node.attributes) == [a.name for a in proto.attribute]
        for attribute in proto.attribute:
            value, ours = helper.get_attribute_value(attribute), node.attributes[attribute.name]
            if attribute.type == onnx.AttributeProto.TENSOR:
                assert_same_array(ours, numpy_helper.to_array(value), attribute.name)
            elif attribute.type == onnx.AttributeProto.TENSORS:
                assert len(ours) == len(value)
                for array, tensor in zip(ours, value):
                    assert_same_array(array, numpy_helper.to_array(tensor), attribute.name)
            elif attribute.type == onnx.AttributeProto.GRAPH:  # its nodes, read like the main graph's
                assert [(n.op_type, n.name, n.inputs) for n in ours] == [
                    (n.op_type, n.name, tuple(n.input)) for n in value.node
                ]
            else:
                assert ours == value and type(ours) is type(value), attribute.name
    custom = nodes[0].attributes
    assert custom["alpha"] == 1.5 and custom["count"] == -7 and custom["axes"] == [0, -1, 2**40]
    assert custom["labels"] == [b"a", "ü€".encode(), b""] and custom["mode"] == b"reflect"


def test_without_weights_reads_everything_but_initializers(model_path: str) -> None:
    full = onnx_file.read_model(model_path)
    light = onnx_file.read_model(model_path, with_weights=False)
    assert light.initializers == {}
    assert (light.ir_version, light.opsets, light.producer, light.metadata, light.inputs, light.outputs) == (
        full.ir_version,
        full.opsets,
        full.producer,
        full.metadata,
        full.inputs,
        full.outputs,
    )
    assert [(n.op_type, n.inputs, list(n.attributes)) for n in light.nodes] == [
        (n.op_type, n.inputs, list(n.attributes)) for n in full.nodes
    ]


def test_accepts_pathlike_and_ai_onnx_domain_alias(tmp_path) -> None:
    model = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["a"], ["b"], domain="ai.onnx")], "g", [], []),
        opset_imports=[helper.make_opsetid("ai.onnx", 13)],
    )
    onnx.save(model, tmp_path / "m.onnx")
    read = onnx_file.read_model(tmp_path / "m.onnx")
    assert read.opsets == {"": 13} and read.nodes[0].domain == ""


# --- hand-encoded protobuf: encodings that onnx's serializer never produces ---


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


def test_unpacked_typed_data_packed_dims_and_unknown_fields(tmp_path) -> None:
    unknown = (
        tag(99, 0) + varint(5) + tag(98, 1) + b"\0" * 8 + tag(97, 5) + b"\0" * 4 + length_delimited(96, b"ignored")
    )
    floats = (
        length_delimited(1, varint(2) + varint(2))
        + tag(2, 0)
        + varint(TensorProto.FLOAT)
        + b"".join(tag(4, 5) + struct.pack("<f", v) for v in [1.0, -2.0, 3.5, 1e-3])
        + length_delimited(8, b"floats")
        + unknown
    )
    int64s = (
        tag(1, 0)
        + varint(3)
        + tag(2, 0)
        + varint(TensorProto.INT64)
        + b"".join(tag(7, 0) + varint(v) for v in [-1, 2**62, -(2**63)])
        + length_delimited(8, b"int64s")
    )
    int32s = (
        length_delimited(1, varint(3))
        + tag(2, 0)
        + varint(TensorProto.INT32)
        + length_delimited(5, varint(-5) + varint(300) + varint(-(2**31)))
        + length_delimited(8, b"int32s")
    )
    graph = b"".join(length_delimited(5, t) for t in [floats, int64s, int32s]) + unknown
    content = (
        tag(1, 0)
        + varint(9)
        + unknown
        + length_delimited(7, graph)
        + length_delimited(8, length_delimited(1, b"") + tag(2, 0) + varint(17))
    )
    path = tmp_path / "hand.onnx"
    path.write_bytes(content)
    expected = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    read = onnx_file.read_model(path)
    assert read.ir_version == 9 and read.opsets == {"": 17}
    for name in ["floats", "int64s", "int32s"]:
        assert_same_array(read.initializers[name], expected[name], name)
    assert read.initializers["int64s"].tolist() == [-1, 2**62, -(2**63)]


# --- refusing what is not a usable ONNX model --------------------------------


def test_truncated_file_is_refused(tmp_path, model_path: str) -> None:
    content = open(model_path, "rb").read()
    graph = onnx.load(model_path).graph.SerializeToString()
    graph_start = content.find(graph)
    # cut 2 leaves a valid ModelProto holding only ir_version: refused for lacking a graph
    cuts = [1, 2, graph_start - 1] + [graph_start + len(graph) * k // 7 for k in range(1, 7)]
    for cut in cuts:
        path = tmp_path / f"cut_{cut}.onnx"
        path.write_bytes(content[:cut])
        with pytest.raises(OnnxFormatError, match=f"^{re.escape(str(path))}: .*(truncated|no graph)"):
            onnx_file.read_model(path)


@pytest.mark.parametrize("size", [1, 16, 1000, 100_000])
def test_random_bytes_are_refused(tmp_path, size: int) -> None:
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(size).bytes(size))
    for read in (onnx_file.read_model, onnx_file.read_metadata):
        with pytest.raises(OnnxFormatError, match=f"^{re.escape(str(path))}: ") as error:
            read(path)
        assert "\n" not in str(error.value)


def test_empty_file_and_non_model_protobuf_are_refused(tmp_path) -> None:
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(OnnxFormatError, match="empty"):
        onnx_file.read_model(tmp_path / "empty.onnx")
    (tmp_path / "graph.onnx").write_bytes(build_model(False).graph.SerializeToString())
    with pytest.raises(OnnxFormatError, match="no ir_version"):
        onnx_file.read_model(tmp_path / "graph.onnx")
    no_graph = onnx.ModelProto(ir_version=9)
    (tmp_path / "no_graph.onnx").write_bytes(no_graph.SerializeToString())
    with pytest.raises(OnnxFormatError, match="no graph"):
        onnx_file.read_model(tmp_path / "no_graph.onnx")


def test_unsupported_tensor_type_is_refused(tmp_path) -> None:
    tensor = helper.make_tensor("names", TensorProto.STRING, [2], [b"a", b"b"])
    onnx.save(helper.make_model(helper.make_graph([], "g", [], [], [tensor])), tmp_path / "s.onnx")
    with pytest.raises(OnnxFormatError, match="tensor 'names' has data type 8"):
        onnx_file.read_model(tmp_path / "s.onnx")
    light = onnx_file.read_model(tmp_path / "s.onnx", with_weights=False)
    assert light.initializers == {} and light.tensors["names"] == onnx_file.TensorInfo("names", 8, (2,), None)


def test_duplicate_initializer_names_are_refused(tmp_path) -> None:
    """ONNX Runtime uses the first of two initializers with one name; the checks and the numpy backend
    would read the last: the backends would run different weights."""
    first, second = (helper.make_tensor("w", TensorProto.FLOAT, [2], v) for v in ([1.0, 2.0], [3.0, 4.0]))
    onnx.save(helper.make_model(helper.make_graph([], "g", [], [], [first, second])), tmp_path / "d.onnx")
    for with_weights in (True, False):
        with pytest.raises(OnnxFormatError, match="initializer 'w' appears twice"):
            onnx_file.read_model(tmp_path / "d.onnx", with_weights=with_weights)


def test_a_singular_message_field_written_twice_is_refused(tmp_path) -> None:
    """Protobuf merges two occurrences of a singular message field, so ONNX Runtime would run a
    graph whose other half (a Loop, external data) the operator checks, reading one, never saw."""
    hidden = helper.make_graph([helper.make_node("Loop", ["n", "", "x"], ["y"])], "h", [], [])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "g", [], []))
    shown = model.SerializeToString()
    twice = shown + length_delimited(7, hidden.SerializeToString())  # ModelProto.graph = 7
    assert [n.op_type for n in onnx.load_from_string(twice).graph.node] == ["Identity", "Loop"]  # merged
    (tmp_path / "graph.onnx").write_bytes(twice)
    with pytest.raises(OnnxFormatError, match="the graph appears twice"):
        onnx_file.read_model(tmp_path / "graph.onnx")
    (tmp_path / "once.onnx").write_bytes(shown)
    assert [n.op_type for n in onnx_file.read_model(tmp_path / "once.onnx").nodes] == ["Identity"]

    # each message with one of its fields written twice, placed in a graph where the reader meets it
    body, zeros = hidden.SerializeToString(), numpy_helper.from_array(np.zeros(1, np.float32))
    zeros_bytes = zeros.SerializeToString()
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    tensor_type, shape = value.type.tensor_type.SerializeToString(), value.type.tensor_type.shape.SerializeToString()
    scan_body = helper.make_attribute("body", hidden).SerializeToString()
    constant = helper.make_attribute("value", zeros).SerializeToString()
    cases = {  # refusal: (GraphProto field, the message's bytes)
        "the graph of attribute 'body'": (1, length_delimited(5, scan_body + length_delimited(6, body))),
        "the tensor of attribute 'value'": (1, length_delimited(5, constant + length_delimited(5, zeros_bytes))),
        "the type of value 'x'": (11, value.SerializeToString() + length_delimited(2, value.type.SerializeToString())),
        "the tensor type of value 'x'": (11, length_delimited(1, b"x") + length_delimited(
            2, length_delimited(1, tensor_type) + length_delimited(1, tensor_type))),
        "the shape of value 'x'": (11, length_delimited(1, b"x") + length_delimited(
            2, length_delimited(1, tensor_type + length_delimited(2, shape)))),
    }  # fmt: skip
    empty = helper.make_model(helper.make_graph([], "g", [], []))
    empty.ClearField("graph")
    for refusal, (number, message) in cases.items():
        if number == 1:  # an attribute, in a node
            message = helper.make_node("Scan", ["x"], ["y"]).SerializeToString() + message
        data = empty.SerializeToString() + length_delimited(7, length_delimited(number, message))
        onnx.load_from_string(data)  # protobuf reads it (merging)
        (tmp_path / "twice.onnx").write_bytes(data)
        with pytest.raises(OnnxFormatError, match=re.escape(refusal) + " appears twice"):
            onnx_file.read_model(tmp_path / "twice.onnx")


def test_external_data_is_refused(tmp_path) -> None:
    model = build_model(False)
    path = tmp_path / "external.onnx"
    onnx.save_model(
        model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0
    )
    assert (tmp_path / "weights.bin").exists()
    with pytest.raises(
        OnnxFormatError, match=f"^{re.escape(str(path))}: tensor '.*' keeps its data in an external file"
    ):
        onnx_file.read_model(path)
    assert onnx_file.read_metadata(path)["task"] == "classification"  # no weights needed for that


def test_corrupted_files_raise_only_onnx_format_error(tmp_path) -> None:
    """Random byte changes and truncations of a small model: either it still reads,
    or OnnxFormatError with a one-line message; never another exception."""
    rng = np.random.default_rng(2024)
    path = tmp_path / "corrupt.onnx"
    refused = 0
    for _ in range(500):
        content = bytearray(SMALL_MODEL)
        for position in rng.integers(0, len(content), rng.integers(1, 5)):
            content[position] = rng.integers(0, 256)
        if rng.random() < 0.3:
            content = content[: rng.integers(1, len(content))]
        path.write_bytes(bytes(content))
        try:
            onnx_file.read_model(path)
        except OnnxFormatError as error:
            assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
            refused += 1
    assert 100 < refused < 450  # both outcomes were exercised


SMALL_MODEL = helper.make_model(
    helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], alpha=0.5, transB=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        [numpy_helper.from_array(np.ones((2, 4), np.float32), "w"), typed_tensor("b", np.array([1, -2], np.int64))],
    )
).SerializeToString()


def test_works_without_onnx_and_protobuf(model_path: str) -> None:
    module_dir = os.path.dirname(onnx_file.__file__)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["onnx"] = None
        sys.modules["google.protobuf"] = None
        sys.path.insert(0, {module_dir!r})
        try:
            from craft.runtime import onnx_file
        except ImportError:
            import onnx_file
        model = onnx_file.read_model({model_path!r})
        assert model.initializers["float_4_raw"].shape == (2, 3, 4)
        assert onnx_file.read_metadata({model_path!r})["task"] == "classification"
        assert "onnx" not in sys.modules or sys.modules["onnx"] is None
        print("ok", len(model.initializers))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", str(2 * len(SUPPORTED) * len(SHAPES))]


# --- bounded by the bytes present: hostile claims allocate nothing --------------------------


def tensor_bytes(name: str, dims: list[int], data_type: int, typed_field: int, payload: bytes) -> bytes:
    """A TensorProto with packed dims and a packed typed-data field, as hand-encoded bytes."""
    return (
        length_delimited(1, b"".join(varint(d) for d in dims))
        + tag(2, 0)
        + varint(data_type)
        + length_delimited(8, name.encode())
        + length_delimited(typed_field, payload)
    )


def model_with_graph(graph: bytes, metadata: bytes = b"") -> bytes:
    return tag(1, 0) + varint(9) + length_delimited(7, graph) + metadata


def peak_allocated(function) -> int:
    """Bytes allocated at the peak while `function` runs (numpy's buffers included)."""
    import tracemalloc

    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "data_type, typed_field, payload, found",
    [
        (TensorProto.INT64, 7, b"\x01" * 8_000_000, 8_000_000),  # varints: one per byte < 0x80
        (TensorProto.FLOAT, 4, b"\x00" * 8_000_000, 2_000_000),  # fixed width: bytes / 4
    ],
)
def test_packed_data_lying_about_its_size_is_refused_before_decoding(
    tmp_path, data_type, typed_field, payload, found
) -> None:
    path = tmp_path / "lie.onnx"
    path.write_bytes(
        model_with_graph(length_delimited(5, tensor_bytes("lie", [100_000_000], data_type, typed_field, payload)))
    )
    for with_weights in (True, False):

        def read():
            with pytest.raises(
                OnnxFormatError, match=f"tensor 'lie' of shape \\(100000000,\\) has {found} values, expected 100000000"
            ):
                onnx_file.read_model(path, with_weights=with_weights)

        assert peak_allocated(read) < 3_000_000  # counted in 1 MB chunks, never decoded (was 680 MB)


def test_large_packed_varints_decode_in_chunks_as_onnx_does(tmp_path) -> None:
    rng = np.random.default_rng(5)
    values = np.concatenate(
        [
            rng.integers(-(2**63), 2**63 - 1, 150_000, dtype=np.int64, endpoint=True),
            rng.integers(-300, 300, 150_000, dtype=np.int64),
        ]
    )
    model = helper.make_model(
        helper.make_graph(
            [], "g", [], [], [typed_tensor("big", values), typed_tensor("small", values[-1000:].astype(np.int8))]
        )
    )
    onnx.save(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx").stat().st_size > 2 * onnx_file._CHUNK  # several chunks, some split mid-run
    read = onnx_file.read_model(tmp_path / "big.onnx").initializers
    assert_same_array(read["big"], values, "big")
    assert_same_array(read["small"], values[-1000:].astype(np.int8), "small")


def test_max_entries_caps_what_the_reader_builds(tmp_path) -> None:
    path = tmp_path / "nodes.onnx"
    path.write_bytes(model_with_graph(length_delimited(1, b"") * 2_000_000))

    def read():  # two million empty nodes: counted, never built (the unbounded reader built 1 GB of them)
        with pytest.raises(OnnxFormatError, match="more than 1000 nodes in the graph"):
            onnx_file.read_model(path, with_nodes=False, max_entries=1000)

    assert peak_allocated(read) < 1_000_000
    assert onnx_file.read_model(path, with_nodes=False).node_count == 2_000_000
    for number, kind in [(5, "initializers"), (11, "inputs"), (12, "outputs")]:
        named = (length_delimited(number, length_delimited(8, f"t{i}".encode())) for i in range(11))  # 8: name
        path.write_bytes(model_with_graph(b"".join(named) if number == 5 else length_delimited(number, b"") * 11))
        with pytest.raises(OnnxFormatError, match=f"more than 10 {kind}"):
            onnx_file.read_model(path, with_weights=False, max_entries=10)
        onnx_file.read_model(path, with_weights=False, max_entries=11)


def test_headers_for_all_decoding_only_the_named(model_path: str) -> None:
    expected = onnx.load(model_path)
    light = onnx_file.read_model(model_path, with_weights=["float_4_raw", "int8_1_typed"], with_nodes=False)
    assert light.nodes == [] and light.node_count == len(expected.graph.node)
    assert set(light.initializers) == {"float_4_raw", "int8_1_typed"}
    assert_same_array(
        light.initializers["int8_1_typed"], onnx_file.read_model(model_path).initializers["int8_1_typed"], "int8"
    )
    assert light.tensors.keys() == {t.name for t in expected.graph.initializer}
    for tensor in expected.graph.initializer:
        info = light.tensors[tensor.name]
        assert (info.data_type, info.shape, info.dtype) == (
            tensor.data_type,
            tuple(tensor.dims),
            numpy_helper.to_array(tensor).dtype,
        )
    # structure: the file less initializers' raw_data and metadata entries (typed values count as structure)
    raw = sum(len(t.raw_data) for t in expected.graph.initializer)
    metadata = sum(p.ByteSize() for p in expected.metadata_props)
    assert light.structure_bytes == os.path.getsize(model_path) - raw - metadata


def test_rank_and_metadata_entries_are_capped(tmp_path) -> None:
    deep = tensor_bytes("deep", [1] * 65, TensorProto.FLOAT, 4, b"\0\0\0\0")
    (tmp_path / "rank.onnx").write_bytes(model_with_graph(length_delimited(5, deep)))
    with pytest.raises(OnnxFormatError, match="more than 64 dims"):
        onnx_file.read_model(tmp_path / "rank.onnx", with_weights=False)
    entries = b"".join(length_delimited(14, length_delimited(1, str(i).encode())) for i in range(5000))
    (tmp_path / "meta.onnx").write_bytes(model_with_graph(b"", entries))
    with pytest.raises(OnnxFormatError, match="more than 4096 metadata_props"):
        onnx_file.read_metadata(tmp_path / "meta.onnx")
