"""How weights are stored and multiplied: float32, or int8 with per-output-channel scales.

A scheme writes three things into the graph: linear layers (y = x @ W), the token
embedding lookup and the LM head. The quantizers are pure functions that also return
their own worst-case reconstruction error, which the export report prints.

int8 (the default for --quantize int8): symmetric int8 weights, one float scale per output
channel (per vocabulary entry for the embedding / head), activations quantized on the fly
to uint8 per tensor: DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul, the pattern
ONNX Runtime fuses into DynamicQuantizeMatMul and runs with VNNI (x86) or SDOT/I8MM (ARM)
integer kernels. Why this one: README "int8 scheme" has the measurements.

The embedding is stored transposed, (dim, vocab) with a scale per token, so that one int8
tensor serves both the lookup (Gather along axis 1) and a tied LM head (a plain linear).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from craft.runtime import artifact as A

EMBEDDING = "tok_embeddings.weight"
HEAD = "output.weight"


def quantize_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Symmetric int8 quantization of w (in, out) with one scale per output column.

    Returns (q int8 (in, out), scale float32 (out,), max |q * scale - w|); q is in
    [-127, 127] (never -128, so negation cannot overflow) and an all-zero column gets scale 1.
    """
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    error = float(np.abs(q.astype(np.float32) * scale - w).max()) if w.size else 0.0
    return q, scale, error


def dequantize_per_channel(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale


class Float32Scheme:
    name = A.QUANT_NONE

    def __init__(self):
        self.errors: dict[str, float] = {}

    def linear(self, g, x: str, name: str, w: np.ndarray) -> str:
        return g.op("MatMul", x, g.weight(name, w))

    def embedding(self, g, weights: dict, ids: str) -> str:
        return g.op("Gather", g.weight(EMBEDDING, weights[EMBEDDING]), ids, axis=0)  # (B, T, dim)

    def head(self, g, weights: dict, x: str, out: str, spec) -> None:
        if not spec.tie_embeddings:
            g.op("MatMul", x, g.weight(HEAD, weights[HEAD]), outputs=[out])
            return
        # x @ E^T with E (vocab, dim) as stored: Gemm with transB reads E in place, where a
        # Transpose would be constant-folded into a second copy of the table at load.
        flat = g.op("Reshape", x, g.const([-1, spec.dim]))  # (B * T, dim)
        logits = g.op("Gemm", flat, EMBEDDING, transB=1)  # (B * T, vocab)
        batch_seq = g.op("Slice", g.op("Shape", x), g.const([0]), g.const([2]))
        g.op("Reshape", logits, g.op("Concat", batch_seq, g.const([spec.vocab_size]), axis=0), outputs=[out])


class Int8Scheme:
    """Per-output-channel int8 weights, dynamic uint8 activations (see module docstring)."""

    name = A.QUANT_INT8

    def __init__(self):
        self.errors: dict[str, float] = {}

    def _store(self, g, name: str, w: np.ndarray) -> tuple[str, str]:
        q, scale, error = quantize_per_channel(w)
        self.errors[name] = error
        return g.weight(name + ".q", q), g.weight(name + ".scale", scale)

    def _matmul(self, g, x: str, q: str, scale: str, out: list[str] | int = 1) -> str:
        xq, x_scale, x_zero = g.op("DynamicQuantizeLinear", x, outputs=3)  # uint8, per tensor
        acc = g.op("MatMulInteger", xq, q, x_zero)  # int32
        return g.op("Mul", g.op("Cast", acc, to=TensorProto.FLOAT), g.op("Mul", x_scale, scale), outputs=out)

    def linear(self, g, x: str, name: str, w: np.ndarray) -> str:
        return self._matmul(g, x, *self._store(g, name, w))

    def embedding(self, g, weights: dict, ids: str) -> str:
        q, scale = self._store(g, EMBEDDING, weights[EMBEDDING].T)  # (dim, vocab), scale per token
        rows = g.op("Transpose", g.op("Gather", q, ids, axis=1), perm=[1, 2, 0])  # (dim, B, T) -> (B, T, dim)
        row_scale = g.op("Unsqueeze", g.op("Gather", scale, ids, axis=0), g.const([-1]))  # (B, T, 1)
        return g.op("Mul", g.op("Cast", rows, to=TensorProto.FLOAT), row_scale)

    def head(self, g, weights: dict, x: str, out: str, spec) -> None:
        if spec.tie_embeddings:
            self._matmul(g, x, EMBEDDING + ".q", EMBEDDING + ".scale", out=[out])
        else:
            self._matmul(g, x, *self._store(g, HEAD, weights[HEAD]), out=[out])


SCHEMES = {A.QUANT_NONE: Float32Scheme, A.QUANT_INT8: Int8Scheme}
