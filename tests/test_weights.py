"""craft.runtime.weights: every scheme round-trips within the error it reports, its numpy
arithmetic equals its graph ops under ONNX Runtime, and the exporter and the numpy backend
name and lay out weights exactly as the home says."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from craft.config import ModelConfig
from craft.export.exporter import artifact_weights, build_model_proto, model_spec, random_run
from craft.export.graph import DEFAULT_OPSET, GraphBuilder, ir_version_for
from craft.export.quantize import OPS
from craft.runtime import weights as W
from craft.runtime.artifact import ArtifactError
from craft.runtime.generator import load_artifact
from craft.runtime.numpy_backend import NumpyBackend

SCHEMES = list(W.SCHEMES)


def random_weight(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Normal weights with a wide spread of column magnitudes, one all-zero column and one outlier."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 2.0, shape[1]).astype(np.float32)
    w[:, 1] = 0.0
    w[3, 2] = 40.0
    return w


def check_stored(stored: tuple[np.ndarray, ...], layout) -> None:
    assert len(stored) == len(layout)
    assert [(a.shape, a.dtype) for a in stored] == [(tuple(s), np.dtype(d)) for s, d in layout]


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("shape", [(64, 96), (96, 40), (160, 8)])
def test_round_trip_within_the_reported_error(name, shape):
    scheme = W.SCHEMES[name]
    w = random_weight(shape)
    stored, error = scheme.quantize(w)
    assert len(scheme.suffixes) == len(scheme.layout(shape))
    check_stored(stored, scheme.layout(shape))
    back = scheme.dequantize(stored, shape)
    assert back.shape == shape and back.dtype == np.float32
    assert error == float(np.abs(back - w).max())  # the reported error is the real one
    assert error <= np.abs(w).max() / (2 ** (scheme.weight_bits - 1) - 1)  # half a step of the widest range, with room
    zero_back = scheme.dequantize(scheme.quantize(np.zeros(shape, np.float32))[0], shape)
    assert not zero_back.any()


@pytest.mark.parametrize("name", SCHEMES)
def test_embedding_round_trip_and_numpy_lookup(name):
    scheme = W.SCHEMES[name].scheme_for(W.EMBEDDING)
    shape = (50, 32)  # (vocab, dim)
    e = random_weight(shape[::-1], seed=1).T.copy()
    stored, error = scheme.quantize_embedding(e)
    check_stored(stored, scheme.embedding_layout(shape))
    back = scheme.dequantize_embedding(stored, shape)
    assert back.shape == shape and error == float(np.abs(back - e).max())
    rows, head = scheme.embedding(stored, shape)
    ids = np.array([[0, 7, 49], [3, 3, 1]])
    assert np.array_equal(rows(ids), back[ids])  # the lookup is exactly the dequantized table
    x = np.random.default_rng(2).standard_normal((2, 3, shape[1])).astype(np.float32)
    ref = x @ back.T
    assert np.abs(head(x) - ref).max() <= 0.02 * (np.abs(x) @ np.abs(back).T).max()


@pytest.mark.parametrize("name", SCHEMES)
def test_numpy_linear_is_x_at_w_and_last_only_slices(name):
    scheme = W.SCHEMES[name]
    shape = (64, 48)
    stored, _ = scheme.quantize(random_weight(shape))
    back = scheme.dequantize(stored, shape)
    linear = scheme.linear(stored, shape)
    x = np.random.default_rng(3).standard_normal((2, 5, shape[0])).astype(np.float32)
    y = linear(x)
    assert y.shape == (2, 5, shape[1]) and y.dtype == np.float32
    assert np.abs(y - x @ back).max() <= 0.02 * (np.abs(x) @ np.abs(back)).max()
    # per-row activation quantization: the last row alone quantizes as it does among the others; only BLAS's
    # summation order may differ between 1 row and 10 (OpenBLAS's kernels for AMD Zen: a few float32 ulps)
    assert np.abs(linear(x, last_only=True) - y[:, -1:]).max() <= 1e-6 * np.abs(y).max()


@pytest.mark.parametrize("name, bits", [(W.INT8, 8), (W.INT4, 4)])
def test_block_layout_details(name, bits):
    """MatMulNBits' layout: (N, blocks, bytes) holding q + 2^(bits-1), even k in the low nibble."""
    scheme = W.SCHEMES[name]
    B = scheme.block
    K = 2 * B + B // 2  # the last block is half padding
    w = random_weight((K, 16))
    (packed, scale), _ = scheme.quantize(w)
    assert packed.shape == (16, 3, B * bits // 8) and scale.shape == (16, 3)
    assert scale[1].tolist() == [1.0] * 3  # an all-zero column's blocks get scale 1
    blocks = np.zeros((16, 3 * B), np.float32)
    blocks[:, :K] = w.T
    amax = np.abs(blocks.reshape(16, 3, B)).max(-1)
    assert np.allclose(scale[amax > 0], amax[amax > 0] / (2 ** (bits - 1) - 1), rtol=1e-6)  # symmetric, per block
    q = packed if bits == 8 else np.stack([packed & 15, packed >> 4], -1).reshape(16, 3, B)
    expected = np.clip(np.rint(blocks.reshape(16, 3, B) / scale[..., None]), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert np.array_equal(q.astype(int) - 2 ** (bits - 1), expected)
    assert np.all(q.reshape(16, 3 * B)[:, K:] == 2 ** (bits - 1))  # padding stores zero


def test_activation_blocks_follow_mlas():
    """Per row and block of 32: scale amax / 127, x * (127 / amax) rounded half to even."""
    x = np.zeros((2, 40), np.float32)
    x[0, :4] = [127.0, 2.5, 3.5, -0.5]  # amax 127: step 1, so the halves show the rounding
    x[1, 33], x[1, 34] = -4.0, 1.0  # the second block of row 1 alone sets its own scale
    got = W.quantize_activation_blocks(x, 32)
    assert got[0, :4].tolist() == [127.0, 2.0, 4.0, -0.0]
    step = np.float32(4) / np.float32(127)
    assert got[1, 33] == np.float32(-127) * step and got[1, 34] == np.float32(32) * step
    assert not got[1, :32].any() and not got[0, 4:].any()


@pytest.mark.parametrize("amax", [3e-37, 1e-38, 1e-44])
def test_activation_blocks_too_small_to_invert_are_zero_as_in_onnx_runtime(amax):
    """Below ~3.7e-37, 127 / amax overflows: ONNX Runtime's MatMulNBits returns ~0 for such a block (0 with
    AVX-512 VNNI; its AVX2 kernel a saturated int8 times the block's scale, ~1e-36), the numpy backend returned
    NaN (inf * 0), and GPTQ's calibration turned that into zeroed layers."""
    x = np.zeros((1, 32), np.float32)
    x[0, :3] = [amax, -amax / 2, amax / 4]
    got = W.quantize_activation_blocks(x, 32)
    assert np.isfinite(got).all() and not got.any()
    w = random_weight((32, 8))
    graph_ops = OPS["int8"]()
    g = GraphBuilder(DEFAULT_OPSET)
    out = graph_ops.linear(g, "x", "w", w)
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializers}
    linear = W.SCHEMES["int8"].linear(tuple(stored[n] for n in W.SCHEMES["int8"].stored_names("w")), w.shape)
    theirs = run_graph(g.nodes, g.initializers, {"x": x[None]}, out)
    assert not linear(x[None]).any() and np.isfinite(theirs).all() and np.abs(theirs).max() < 1e-30


def run_graph(nodes, initializers, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    import onnxruntime as ort

    def info(name, array):
        elem = TensorProto.INT64 if array.dtype == np.int64 else TensorProto.FLOAT
        return helper.make_tensor_value_info(name, elem, list(array.shape))

    graph = helper.make_graph(
        nodes,
        "t",
        [info(k, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = ir_version_for(DEFAULT_OPSET)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run([output], inputs)[0]


@pytest.mark.parametrize("name", SCHEMES)
def test_numpy_arithmetic_equals_the_graph_ops(name):
    """The numpy backend's linear, lookup and tied head vs the scheme's nodes run by ONNX Runtime."""
    scheme, ops = W.SCHEMES[name], OPS[name]()
    rng = np.random.default_rng(4)
    w, e = random_weight((64, 48)), random_weight((32, 40), seed=5).T.copy()  # e: (vocab 40, dim 32)
    x, h = rng.standard_normal((2, 3, 64)).astype(np.float32), rng.standard_normal((2, 3, 32)).astype(np.float32)
    x[0, 1, 7] = 30.0  # an outlier: it sets the scale of its own row's block only
    ids = np.array([[0, 39, 5], [2, 2, 17]], np.int64)
    spec = model_spec(ModelConfig(vocab_size=40, dim=32, n_head=2, tie_embeddings=True))

    g = GraphBuilder(DEFAULT_OPSET)
    linear_out = ops.linear(g, "x", "w", w)
    rows_out = ops.embedding(g, {W.EMBEDDING: e}, "ids")
    ops.head(g, {W.EMBEDDING: e}, "h", "logits", spec)
    feeds = {"x": x, "h": h, "ids": ids}
    got = {out: run_graph(g.nodes, g.initializers, feeds, out) for out in (linear_out, rows_out, "logits")}

    stored = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializers}
    linear = scheme.linear(tuple(stored[n] for n in scheme.stored_names("w")), w.shape)
    embedding = scheme.scheme_for(W.EMBEDDING)
    rows, head = embedding.embedding(tuple(stored[n] for n in embedding.stored_names(W.EMBEDDING)), e.shape)
    # MatMulNBits sums the exact integer block products in its own float32 order, not bit for bit: ~1e-7 of the
    # largest output with AVX-512 VNNI; its AVX2 kernel multiplies the stored unsigned values and subtracts the
    # zero point times each block's sum in float32, ~6e-6 (an all-zero weight column gives 3e-5, not 0)
    for mine, theirs in ((linear(x), got[linear_out]), (head(h), got["logits"])):
        assert np.abs(mine - theirs).max() <= 2e-5 * np.abs(theirs).max()
    np.testing.assert_array_equal(rows(ids), got[rows_out])


TINY = {"vocab_size": 40, "dim": 32, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "context_length": 16}


@pytest.mark.parametrize("source", ["run", "hf"])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("name", SCHEMES)
def test_exporter_and_numpy_backend_use_the_names_of_the_home(name, tie, source, tmp_path):
    run = dataclasses.replace(random_run(ModelConfig(**TINY, tie_embeddings=tie)), source_kind=source)
    spec = model_spec(run.config)
    floats, by_scheme = W.float_weights(spec), W.scheme_weights(spec)
    assert not floats.keys() & by_scheme.keys()
    weights = artifact_weights(run.model)
    assert {k: v.shape for k, v in weights.items()} == {**floats, **by_scheme}

    proto = build_model_proto(run, name, weights=weights)[0]
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    spec = load_artifact(path).spec  # a quantized import: a rotated residual stream, and a tied head's rotation
    rotated = name != W.NONE and W.SCHEMES[name].calibrated and source != "run"
    assert spec.head_rotation == (rotated and tie) and spec.ffn_rotation == rotated
    assert load_artifact(path).format_version == (4 if rotated else 3)  # the oldest that holds it: 3 still runs
    floats = W.float_weights(spec)
    scheme = W.SCHEMES[name]
    defaults = {v.name for v in proto.graph.input}  # an input's default (logits_to_keep) is not a weight
    stored = {
        t.name: onnx.numpy_helper.to_array(t)
        for t in proto.graph.initializer
        if not t.name.startswith("const_") and t.name not in defaults
    }
    expected = dict(floats)
    for weight, shape in by_scheme.items():
        stored_as = scheme.scheme_for(weight)
        layout = stored_as.embedding_layout(shape) if weight == W.EMBEDDING else stored_as.layout(shape)
        expected.update({n: s for n, (s, _) in zip(stored_as.stored_names(weight), layout, strict=True)})
    assert {k: v.shape for k, v in stored.items()} == expected
    NumpyBackend(str(path), spec, name)  # finds every weight it needs by the home's names


@pytest.mark.parametrize(
    "change, pattern",
    [
        ("rename", "lacks weight 'layers.1.attention.wo.weight"),
        ("reshape", "weight 'layers.1.attention.wo.weight.*is float32 \\(32, 16\\)"),
    ],
)
def test_numpy_backend_refuses_weights_off_the_layout(change, pattern, tmp_path):
    run = random_run(ModelConfig(**TINY))
    proto = build_model_proto(run, W.NONE)[0]
    tensor = next(t for t in proto.graph.initializer if t.name == W.layer(1).wo)
    if change == "rename":
        tensor.name = "renamed"
    else:
        tensor.CopyFrom(onnx.numpy_helper.from_array(np.zeros((32, 16), np.float32), tensor.name))
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ArtifactError, match=pattern):
        NumpyBackend(str(path), model_spec(run.config), W.NONE)


def test_every_scheme_has_graph_ops_and_a_command_line_choice():
    from craft.export.cli import main

    assert list(OPS) == SCHEMES and all(OPS[n].scheme is W.SCHEMES[n] for n in SCHEMES)
    quantize = next(p for p in main.params if p.name == "quantize")
    assert list(quantize.type.choices) == SCHEMES and quantize.default == W.INT8
