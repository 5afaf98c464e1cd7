"""Rotation of the residual stream and GPTQ rounding (craft/export/rotation.py, gptq.py,
calibration.py): exact where they claim to be, better than rounding where they claim to be."""

from __future__ import annotations

import numpy as np
import pytest

from craft.config import ModelConfig
from craft.export.calibration import calibration_windows, prepare
from craft.export.exporter import artifact_weights, model_spec, random_run
from craft.export.gptq import gptq, output_error
from craft.export.rotation import orthogonal, rotate
from craft.runtime import weights as W
from craft.runtime.numpy_backend import NumpyBackend

SHAPES = {  # GQA; dims that are and are not powers of two
    "tied": dict(vocab_size=50, dim=32, n_layer=2, n_head=4, n_kv_head=2, context_length=16),
    "untied, biases": dict(
        vocab_size=50, dim=48, n_layer=2, n_head=6, n_kv_head=2, context_length=16, tie_embeddings=False, qkv_bias=True
    ),
    "hidden not in blocks of 32": dict(
        vocab_size=50, dim=32, n_layer=2, n_head=4, n_kv_head=2, context_length=16, ffn_dim=72
    ),
}


def logits(weights: dict, spec, ids: np.ndarray) -> np.ndarray:
    backend = NumpyBackend("<test>", spec, W.NONE, initializers=weights)
    backend.reset(1)
    return backend.forward(ids[None], np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None])[0]


@pytest.mark.parametrize("n", [32, 48, 6, 7])
def test_orthogonal_is_orthogonal(n):
    q = orthogonal(n, np.random.default_rng(0))
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    assert np.abs(q).min() > 0  # mixes every channel with every other


@pytest.mark.parametrize("shape", SHAPES)
def test_rotation_leaves_the_logits_unchanged(shape):
    run = random_run(ModelConfig(**SHAPES[shape]), seed=1)
    spec = model_spec(run.config)
    weights = artifact_weights(run.model)
    rng = np.random.default_rng(2)
    for name in weights:  # norms that are not all ones and biases that are not zero: both must be rotated
        if name.endswith("norm.weight"):
            weights[name] = rng.uniform(0.5, 2.0, weights[name].shape).astype(np.float32)
        if name.endswith("wqkv.bias"):
            weights[name] = rng.standard_normal(weights[name].shape).astype(np.float32)
    ids = np.random.default_rng(3).integers(0, spec.vocab_size, 12)
    rotated, rotated_spec = rotate(weights, spec)
    assert rotated_spec.head_rotation == spec.tie_embeddings
    assert rotated_spec.ffn_rotation == (spec.hidden_dim % W.FFN_ROTATION_BLOCK == 0)  # w2's input turned at run time
    assert not np.allclose(rotated[W.EMBEDDING], weights[W.EMBEDDING])
    reference = logits(weights, spec, ids)
    np.testing.assert_allclose(logits(rotated, rotated_spec, ids), reference, atol=1e-4 * np.abs(reference).max())


def test_rotation_spreads_an_outlier_channel():
    """What it is for: one huge channel becomes many moderate ones."""
    x = np.ones(64)
    x[5] = 1000.0
    q = orthogonal(64, np.random.default_rng(0))
    assert np.abs(x @ q).max() < np.abs(x).max() / 5


@pytest.mark.parametrize("bits, block", [(8, 16), (4, 32)])
def test_gptq_beats_rounding_on_correlated_inputs_and_stays_on_the_grid(bits, block):
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((40, 40))
    x = rng.standard_normal((400, 40)) @ mix  # correlated inputs: where GPTQ has something to win
    w = rng.standard_normal((40, 24)).astype(np.float32)  # K = 40: the last block is partly padding
    h = x.T @ x
    scheme = W.BlockQuant(bits, block, "t", "t")
    w_q, scale, ratio = gptq(w, h, scheme)
    rounded = scheme.dequantize(scheme.quantize(w)[0], w.shape)
    assert ratio < 0.8 and ratio == pytest.approx(output_error(w, w_q, h) / output_error(w, rounded, h))
    stored, error = scheme.quantize(w_q, scale)
    np.testing.assert_array_equal(scheme.dequantize(stored, w.shape), w_q)  # stored exactly as it was rounded
    assert error == 0.0
    again = gptq(w, h, scheme)
    np.testing.assert_array_equal(again[0], w_q)  # deterministic


def test_calibration_windows_are_fixed_and_bounded():
    tokens = np.arange(10_000)
    windows = calibration_windows(tokens, context_length=128)
    assert all(len(w) == 128 for w in windows) and sum(map(len, windows)) <= 1024
    assert windows[0][0] == 0 and windows[-1][-1] == 9_999  # spread over the whole text
    assert [w.tolist() for w in calibration_windows(tokens, 128)] == [w.tolist() for w in windows]
    assert calibration_windows(None, 128) == [] and calibration_windows(np.arange(1), 128) == []
    assert [len(w) for w in calibration_windows(np.arange(50), 128)] == [50]


@pytest.mark.parametrize("rotate", [True, False])
def test_prepare_rounds_every_linear_weight_and_the_head_with_gptq(rotate):
    run = random_run(ModelConfig(**SHAPES["tied"]), seed=1)
    spec = model_spec(run.config)
    tokens = np.random.default_rng(0).integers(0, spec.vocab_size, 200)
    scheme = W.SCHEMES[W.INT8]
    weights = artifact_weights(run.model)
    prepared = prepare(weights, spec, scheme, tokens, rotate=rotate)
    assert prepared.spec.head_rotation == rotate and prepared.report["rotated"] == rotate
    assert set(prepared.scales) == set(W.scheme_weights(prepared.spec))  # the tied table included
    assert prepared.report["calibration_tokens"] == 192 and prepared.report["gptq_error_ratio"] < 1
    wo = weights[W.layer(0).wo]
    change = np.abs(prepared.weights[W.layer(0).wo] - wo).max()
    assert (change > np.abs(wo).max() / 100) == rotate  # rotated: a new basis; else moved by rounding only
    for name, scale in prepared.scales.items():
        w = prepared.weights[name]
        stored, error = (scheme.quantize_embedding if name == W.EMBEDDING else scheme.quantize)(w, scale)
        assert error < 1e-6 * np.abs(w).max(), name  # already on the scheme's grid
