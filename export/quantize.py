"""How each weight scheme is written as ONNX nodes: linear layers (y = x @ W), the token
embedding lookup and the LM head.

The numbers and names are not decided here: craft.runtime.weights defines every scheme's
stored tensors, its quantizer (which reports its own worst-case error, printed in the export
report) and the numpy arithmetic that must equal these nodes. This file is the graph side only.

int8 (the default for --quantize int8): activations are quantized on the fly to uint8 per
tensor: DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul, the pattern ONNX Runtime fuses
into DynamicQuantizeMatMul and runs with VNNI (x86) or SDOT/I8MM (ARM) integer kernels. Why
this one: README "int8 scheme" has the measurements. The embedding is stored transposed,
(dim, vocab) with a scale per token, so that one int8 tensor serves both the lookup (Gather
along axis 1) and a tied LM head (a plain linear).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from craft.runtime import weights as W


class SchemeOps:
    """Writes one scheme's weights and nodes; `errors` collects each weight's quantization error."""

    scheme: W.Scheme

    def __init__(self):
        self.errors: dict[str, float] = {}

    def store(self, g, name: str, w: np.ndarray) -> tuple[str, ...]:
        stored, self.errors[name] = self.scheme.quantize(w)
        return tuple(g.weight(n, a) for n, a in zip(self.scheme.stored_names(name), stored))

    def store_embedding(self, g, e: np.ndarray) -> tuple[str, ...]:
        stored, self.errors[W.EMBEDDING] = self.scheme.quantize_embedding(e)
        return tuple(g.weight(n, a) for n, a in zip(self.scheme.stored_names(W.EMBEDDING), stored))


class Float32Ops(SchemeOps):
    scheme = W.SCHEMES[W.NONE]

    def linear(self, g, x: str, name: str, w: np.ndarray) -> str:
        return g.op("MatMul", x, *self.store(g, name, w))

    def embedding(self, g, weights: dict, ids: str) -> str:
        return g.op("Gather", *self.store_embedding(g, weights[W.EMBEDDING]), ids, axis=0)  # (B, T, dim)

    def head(self, g, weights: dict, x: str, out: str, spec) -> None:
        if not spec.tie_embeddings:
            g.op("MatMul", x, *self.store(g, W.HEAD, weights[W.HEAD]), outputs=[out])
            return
        # x @ E^T with E (vocab, dim) as stored: Gemm with transB reads E in place, where a
        # Transpose would be constant-folded into a second copy of the table at load.
        flat = g.op("Reshape", x, g.const([-1, spec.dim]))  # (B * T, dim)
        logits = g.op("Gemm", flat, *self.scheme.stored_names(W.EMBEDDING), transB=1)  # (B * T, vocab)
        batch_seq = g.op("Slice", g.op("Shape", x), g.const([0]), g.const([2]))
        g.op("Reshape", logits, g.op("Concat", batch_seq, g.const([spec.vocab_size]), axis=0), outputs=[out])


class Int8Ops(SchemeOps):
    """int8 weights (q, scale), dynamic uint8 activations (see module docstring)."""

    scheme = W.SCHEMES[W.INT8]

    def _matmul(self, g, x: str, q: str, scale: str, out: list[str] | int = 1) -> str:
        xq, x_scale, x_zero = g.op("DynamicQuantizeLinear", x, outputs=3)  # uint8, per tensor
        acc = g.op("MatMulInteger", xq, q, x_zero)  # int32
        return g.op("Mul", g.op("Cast", acc, to=TensorProto.FLOAT), g.op("Mul", x_scale, scale), outputs=out)

    def linear(self, g, x: str, name: str, w: np.ndarray) -> str:
        return self._matmul(g, x, *self.store(g, name, w))

    def embedding(self, g, weights: dict, ids: str) -> str:
        q, scale = self.store_embedding(g, weights[W.EMBEDDING])  # (dim, vocab), scale per token
        rows = g.op("Transpose", g.op("Gather", q, ids, axis=1), perm=[1, 2, 0])  # (dim, B, T) -> (B, T, dim)
        row_scale = g.op("Unsqueeze", g.op("Gather", scale, ids, axis=0), g.const([-1]))  # (B, T, 1)
        return g.op("Mul", g.op("Cast", rows, to=TensorProto.FLOAT), row_scale)

    def head(self, g, weights: dict, x: str, out: str, spec) -> None:
        if spec.tie_embeddings:
            self._matmul(g, x, *self.scheme.stored_names(W.EMBEDDING), out=[out])
        else:
            self._matmul(g, x, *self.store(g, W.HEAD, weights[W.HEAD]), out=[out])


OPS: dict[str, type[SchemeOps]] = {ops.scheme.name: ops for ops in (Float32Ops, Int8Ops)}  # one per weights.SCHEMES entry
