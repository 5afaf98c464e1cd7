"""How each weight scheme is written as ONNX nodes: linear layers (y = x @ W), the token
embedding lookup and the LM head.

The numbers and names are not decided here: craft.runtime.weights defines every scheme's
stored tensors, its quantizer (which reports its own worst-case error, printed in the export
report) and the numpy arithmetic that must equal these nodes. This file is the graph side only.

int8 and int4 (blocks of 32): com.microsoft MatMulNBits with accuracy_level 4, which quantizes
each activation row per block to int8 on the fly and runs VNNI (x86) / SDOT (ARM)
integer dot products against the weight blocks. Finer activation scales than the per-tensor
DynamicQuantizeLinear it replaces (one outlier set the step of the whole tensor), at the same
decode speed: README "Quantization" has the measurements. The embedding is stored as the
head's weight (vocab, blocks, bytes); the lookup reads its rows with com.microsoft
GatherBlockQuantized, so one tensor serves both.

q4_1: 4-bit MatMulNBits with the blocks' zero points, and each block's float offset added as
ReduceSum(x per block) @ offset; its embedding and head are int8 blocks as above.
"""

from __future__ import annotations

import numpy as np

from craft.runtime import weights as W

ACCURACY_LEVEL = (
    4  # MatMulNBits: int8 activations and integer dot products (0-3 dequantize to float per call: 50x slower)
)


class SchemeOps:
    """Writes one scheme's weights and nodes; `errors` collects each weight's quantization error."""

    scheme: W.Scheme

    def __init__(self, scales: dict[str, np.ndarray] | None = None):
        self.errors: dict[str, float] = {}
        self.scales = scales or {}  # name -> the grid a weight was already rounded to (craft.export.gptq)
        self.calibration: dict = {}  # what craft.export.calibration did before (its report)

    def store(self, g, name: str, w: np.ndarray) -> tuple[str, ...]:
        scheme = self.scheme.scheme_for(name)
        stored, self.errors[name] = scheme.quantize(w, self.scales.get(name))
        return tuple(g.weight(n, a) for n, a in zip(scheme.stored_names(name), stored, strict=True))

    def store_embedding(self, g, e: np.ndarray) -> tuple[str, ...]:
        scheme = self.scheme.scheme_for(W.EMBEDDING)
        stored, self.errors[W.EMBEDDING] = scheme.quantize_embedding(e, self.scales.get(W.EMBEDDING))
        return tuple(g.weight(n, a) for n, a in zip(scheme.stored_names(W.EMBEDDING), stored, strict=True))


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


class BlockOps(SchemeOps):
    """Blocks (q, scale) multiplied by com.microsoft MatMulNBits, accuracy_level 4; q4_1's (zero
    points and offsets too) with the offsets added as ReduceSum(x per block) @ offset."""

    def _matmul(
        self,
        g,
        x: str,
        q: str,
        scale: str,
        zero_point: str | None = None,  # None: the operator's default, 2^(bits - 1)
        *,
        shape: tuple[int, int],
        bits: int,
        out: list[str] | int = 1,
    ) -> str:
        K, N = shape
        return g.op(
            "MatMulNBits",
            x,
            q,
            scale,
            *([zero_point] if zero_point else []),
            domain="com.microsoft",
            outputs=out,
            K=K,
            N=N,
            bits=bits,
            block_size=self.scheme.block,
            accuracy_level=ACCURACY_LEVEL,
        )

    def linear(self, g, x: str, name: str, w: np.ndarray, out: list[str] | int = 1) -> str:
        scheme = self.scheme.scheme_for(name)
        if not isinstance(scheme, W.BlockQuantMinimum):
            return self._matmul(g, x, *self.store(g, name, w), shape=w.shape, bits=scheme.weight_bits, out=out)
        # x @ W = MatMulNBits(x) + ReduceSum(x per block) @ offset: the sums are of x itself, not of
        # MatMulNBits' int8 copy of it. Four nodes more per linear layer (five where in_features is
        # not a multiple of 32)
        q, scale, zero_point, offset = self.store(g, name, w)
        K, block = w.shape[0], scheme.block
        blocks = -(-K // block)
        if K % block:  # zero-pad the last block, as the stored weights are
            x_padded = g.op("Pad", x, g.const([0, 0, 0, 0, 0, blocks * block - K]))
        else:
            x_padded = x
        per_block = g.op("Reshape", x_padded, g.const([0, 0, blocks, block]))  # (B, T, blocks, block)
        sums = g.op("ReduceSum", per_block, g.const([-1]), keepdims=0)  # (B, T, blocks)
        centered = self._matmul(g, x, q, scale, zero_point, shape=w.shape, bits=scheme.weight_bits)  # (B, T, N)
        return g.op("Add", centered, g.op("MatMul", sums, offset), outputs=out)

    def embedding(self, g, weights: dict, ids: str) -> str:
        """Rows of the head's own blocks: com.microsoft GatherBlockQuantized reads the stored bytes
        (default zero point = the embedding scheme's zero) and scales in one node, so one stored tensor
        serves the lookup and the head (the seven standard ops it replaces took 2% of a 15M step)."""
        e = weights[W.EMBEDDING]  # (vocab, dim)
        scheme = self.scheme.scheme_for(W.EMBEDDING)
        q, scale = self.store_embedding(g, e)  # (vocab, blocks, bytes), (vocab, blocks)
        # (vocab, blocks, 1): the operator wants scales of the data's rank; ONNX Runtime folds this
        # Unsqueeze at load (a copy of the scales only, 1/8 of the int8 table)
        block_scale = g.op("Unsqueeze", scale, g.const([-1]))
        rows = g.op(
            "GatherBlockQuantized",
            q,
            ids,
            block_scale,
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=2,
            block_size=scheme.block,
            bits=scheme.weight_bits,
        )  # (B, T, blocks, block)
        full = g.op("Reshape", rows, g.const([0, 0, -1]))  # (B, T, blocks * block)
        if e.shape[1] % scheme.block:
            full = g.op("Slice", full, g.const([0]), g.const([e.shape[1]]), g.const([2]))
        return full

    def head(self, g, weights: dict, x: str, out: str, spec) -> None:
        if not spec.tie_embeddings:
            self.linear(g, x, W.HEAD, weights[W.HEAD], out=[out])
            return
        scheme = self.scheme.scheme_for(W.EMBEDDING)
        names = scheme.stored_names(W.EMBEDDING)
        self._matmul(g, x, *names, shape=(spec.dim, spec.vocab_size), bits=scheme.weight_bits, out=[out])


class Int8Ops(BlockOps):
    scheme = W.SCHEMES[W.INT8]


class Int4Ops(BlockOps):
    scheme = W.SCHEMES[W.INT4]


class Q41Ops(BlockOps):
    scheme = W.SCHEMES[W.Q4_1]


OPS: dict[str, type[SchemeOps]] = {
    ops.scheme.name: ops for ops in (Float32Ops, Int8Ops, Int4Ops, Q41Ops)
}  # one per weights.SCHEMES entry
