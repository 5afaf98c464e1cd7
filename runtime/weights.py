"""Stored weights: their names and shapes, and the quantization schemes that store them. Defined only here.

The exporter writes weights with these names and layouts (craft.export.quantize adds each
scheme's graph ops); the numpy backend reads them back and multiplies them exactly as the
graph does. Linear weights are in the (in_features, out_features) layout, y = x @ W:

    tok_embeddings.weight                   (vocab, dim); also the LM head when tied
    output.weight                           (dim, vocab); only when not tied
    norm.weight, layers.{i}.attention_norm.weight, layers.{i}.ffn_norm.weight      (dim,)
    layers.{i}.attention.wqkv.weight        (dim, (n_heads + 2 * n_kv_heads) * head_dim): columns are
                                            [q | k | v]; q is pre-multiplied by 1 / sqrt(head_dim)
    layers.{i}.attention.wqkv.bias          ((n_heads + 2 * n_kv_heads) * head_dim,) the same way;
                                            only when the spec says qkv_bias (imported Qwen2 models)
    layers.{i}.attention.wo.weight          (n_heads * head_dim, dim)
    layers.{i}.feed_forward.w13.weight      (dim, 2 * hidden): [gate | up]
    layers.{i}.feed_forward.w2.weight       (hidden, dim)
    rope.cos, rope.sin                      (context_length, head_dim), "rotate half" layout
    head_rotation                           (dim, dim): multiplies the final norm's output before a
                                            tied head; only when the spec says head_rotation (a
                                            rotated residual stream, craft/export/rotation.py)
    ffn_rotation                            (32, 32): turns w2's input per block of 32 (rotate_blocks)
                                            in every layer; only when the spec says ffn_rotation

A recurrent file (ModelSpec.arch "recurrent", craft/recurrent.py) has no attention and no rope
tables; its blocks hold instead:

    layers.{i}.recurrence_norm.weight       (dim,)
    layers.{i}.recurrence.win.weight        (dim, 3 * dim): [a | v | g] (decay gate, input, output gate)
    layers.{i}.recurrence.decay             (dim,) float32: added to the decay gate's input
    layers.{i}.recurrence.wo.weight         (dim, dim)

Norms, rope tables, biases and decays are float32 in every file. The embedding and the linear weights are
stored as the file's scheme (metadata `craft.quantization`, a key of SCHEMES) says - its
scheme_for(NAME), which for q4_1's embedding and head is int8: a float weight NAME becomes the
tensors NAME + suffix for each suffix of that scheme.

Adding a scheme: a Scheme subclass and its SCHEMES entry here, and its graph ops in
craft.export.quantize. The command-line choices, the estimate and the numpy backend follow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from craft.runtime.artifact import ModelSpec

Shape = tuple[int, ...]
Linear = Callable[..., np.ndarray]  # (x (B, T, in), last_only=False) -> (B, T, out), or (B, 1, out)

EMBEDDING = "tok_embeddings.weight"
HEAD = "output.weight"
NORM = "norm.weight"
ROPE_COS, ROPE_SIN = "rope.cos", "rope.sin"
HEAD_ROTATION = "head_rotation"
FFN_ROTATION = "ffn_rotation"
FFN_ROTATION_BLOCK = 32  # the activation blocks MatMulNBits quantizes w2's input in


@dataclass(frozen=True)
class LayerNames:
    """The weight names of block i (shapes in the module docstring)."""

    attention_norm: str
    wqkv: str
    wqkv_bias: str
    wo: str
    ffn_norm: str
    w13: str
    w2: str


def layer(i: int) -> LayerNames:
    p = f"layers.{i}."
    return LayerNames(
        p + "attention_norm.weight",
        p + "attention.wqkv.weight",
        p + "attention.wqkv.bias",
        p + "attention.wo.weight",
        p + "ffn_norm.weight",
        p + "feed_forward.w13.weight",
        p + "feed_forward.w2.weight",
    )


@dataclass(frozen=True)
class RecurrentLayerNames:
    """The weight names of recurrent block i (shapes in the module docstring)."""

    recurrence_norm: str
    win: str
    decay: str
    wo: str
    ffn_norm: str
    w13: str
    w2: str


def recurrent_layer(i: int) -> RecurrentLayerNames:
    p = f"layers.{i}."
    return RecurrentLayerNames(
        p + "recurrence_norm.weight",
        p + "recurrence.win.weight",
        p + "recurrence.decay",
        p + "recurrence.wo.weight",
        p + "ffn_norm.weight",
        p + "feed_forward.w13.weight",
        p + "feed_forward.w2.weight",
    )


def float_weights(spec: ModelSpec) -> dict[str, Shape]:
    """Name -> shape of the weights stored as float32 whatever the scheme: norms, rope tables, biases,
    the head and ffn rotations (a recurrent file: norms and decays)."""
    if spec.arch == "recurrent":
        out = {NORM: (spec.dim,)}
        for i in range(spec.n_layer):
            n = recurrent_layer(i)
            out[n.recurrence_norm] = out[n.decay] = out[n.ffn_norm] = (spec.dim,)
        return out
    out = {
        NORM: (spec.dim,),
        ROPE_COS: (spec.context_length, spec.head_dim),
        ROPE_SIN: (spec.context_length, spec.head_dim),
    }
    if spec.head_rotation:
        out[HEAD_ROTATION] = (spec.dim, spec.dim)
    if spec.ffn_rotation:
        out[FFN_ROTATION] = (FFN_ROTATION_BLOCK, FFN_ROTATION_BLOCK)
    for i in range(spec.n_layer):
        out[layer(i).attention_norm] = out[layer(i).ffn_norm] = (spec.dim,)
        if spec.qkv_bias:
            out[layer(i).wqkv_bias] = ((spec.n_head + 2 * spec.n_kv_head) * spec.head_dim,)
    return out


def scheme_weights(spec: ModelSpec) -> dict[str, Shape]:
    """Name -> float shape of the weights the scheme stores: the embedding and every linear weight."""
    out = {EMBEDDING: (spec.vocab_size, spec.dim)}
    if not spec.tie_embeddings:
        out[HEAD] = (spec.dim, spec.vocab_size)
    if spec.arch == "recurrent":
        for i in range(spec.n_layer):
            n = recurrent_layer(i)
            out.update(
                {
                    n.win: (spec.dim, 3 * spec.dim),
                    n.wo: (spec.dim, spec.dim),
                    n.w13: (spec.dim, 2 * spec.hidden_dim),
                    n.w2: (spec.hidden_dim, spec.dim),
                }
            )
        return out
    qkv = (spec.n_head + 2 * spec.n_kv_head) * spec.head_dim
    for i in range(spec.n_layer):
        n = layer(i)
        out.update(
            {
                n.wqkv: (spec.dim, qkv),
                n.wo: (spec.n_head * spec.head_dim, spec.dim),
                n.w13: (spec.dim, 2 * spec.hidden_dim),
                n.w2: (spec.hidden_dim, spec.dim),
            }
        )
    return out


class Scheme:
    """How a linear weight W (in_features, out_features) and the embedding table E (vocab, dim)
    are stored, and how the numpy backend multiplies them exactly as the scheme's graph ops do.

    `shape` arguments are the float weight's shape, (in, out) for W and (vocab, dim) for E: a
    block layout cannot always recover it from the stored tensors (in_features padded to whole
    blocks). Every method may be overridden, the embedding's too (a scheme may store the table
    in another layout than its linear weights).
    """

    name: str
    description: str  # for craft-export --help
    weight_bits: int  # bits per stored weight value, scales aside (craft-run --estimate)
    suffixes: tuple[str, ...]  # a weight NAME is stored as NAME + suffix, in this order
    # True: E is stored as the linear weight E^T (dim, vocab), one tensor for both the lookup and a tied head
    embedding_transposed: bool
    calibrated = True  # the exporter may rotate an import's weights and GPTQ-round them (craft.export.calibration)

    def scheme_for(self, name: str) -> Scheme:
        """The scheme that stores weight `name` in a file of this one: itself, unless a scheme keeps
        some weights (q4_1: the embedding and the head) in another."""
        return self

    def stored_names(self, name: str) -> tuple[str, ...]:
        return tuple(name + suffix for suffix in self.suffixes)

    def layout(self, shape: Shape) -> tuple[tuple[Shape, np.dtype], ...]:
        """(shape, dtype) of each stored tensor, in suffix order, for a weight of this float shape."""
        raise NotImplementedError

    def quantize(self, w: np.ndarray, scale: np.ndarray | None = None) -> tuple[tuple[np.ndarray, ...], float]:
        """Stored tensors for W (in, out), and the max |dequantize(stored) - W| they incur. `scale`:
        the grid W was already rounded to (craft.export.gptq), where the scheme has one."""
        raise NotImplementedError

    def dequantize(self, stored: tuple[np.ndarray, ...], shape: Shape) -> np.ndarray:
        """W (in, out) float32 as the stored tensors represent it."""
        raise NotImplementedError

    def linear(self, stored: tuple[np.ndarray, ...], shape: Shape) -> Linear:
        """x @ W in numpy with the arithmetic of this scheme's graph ops."""
        raise NotImplementedError

    def embedding(
        self, stored: tuple[np.ndarray, ...], shape: Shape
    ) -> tuple[Callable[[np.ndarray], np.ndarray], Linear]:
        """(rows: ids (B, T) -> (B, T, dim) float32, tied head: x @ E^T) from the stored table."""
        raise NotImplementedError

    # the embedding table, in terms of the above --------------------------------------------------
    def _embedding_view(self, shape: Shape) -> Shape:
        return shape[::-1] if self.embedding_transposed else shape

    def embedding_layout(self, shape: Shape) -> tuple[tuple[Shape, np.dtype], ...]:
        return self.layout(self._embedding_view(shape))

    def quantize_embedding(
        self, e: np.ndarray, scale: np.ndarray | None = None
    ) -> tuple[tuple[np.ndarray, ...], float]:
        return self.quantize(e.T if self.embedding_transposed else e, scale)

    def dequantize_embedding(self, stored: tuple[np.ndarray, ...], shape: Shape) -> np.ndarray:
        e = self.dequantize(stored, self._embedding_view(shape))
        return e.T if self.embedding_transposed else e


def rotate_blocks(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """x (..., K) with each block of r.shape[0] consecutive values multiplied by r: x @ diag(r, r, ...),
    as the graph computes it (Reshape, MatMul, Reshape); K a multiple of the block."""
    return (x.reshape(-1, r.shape[0]) @ r).reshape(x.shape)  # (... * K / b, b) @ (b, b): one 2-D BLAS call


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B, T, K) @ (K, N) as one 2-D BLAS call: numpy's stacked 3-D matmul is ~10x slower."""
    B, T, K = x.shape
    return (x.reshape(B * T, K) @ w).reshape(B, T, w.shape[1])


# float32 ------------------------------------------------------------------------------------------
class Float32(Scheme):
    """Weights as they are; the embedding as (vocab, dim)."""

    name = "none"
    description = "float32"
    weight_bits = 32
    suffixes = ("",)
    embedding_transposed = False
    calibrated = False  # the float32 file is the reference the others are measured against

    def layout(self, shape):
        return ((shape, np.dtype(np.float32)),)

    def quantize(self, w, scale=None):
        return (np.asarray(w, dtype=np.float32),), 0.0

    def dequantize(self, stored, shape):
        return np.asarray(stored[0], dtype=np.float32)

    def linear(self, stored, shape):
        return FloatLinear(stored[0])

    def embedding(self, stored, shape):
        e = np.asarray(stored[0], np.float32)  # (vocab, dim)
        return (lambda ids: e[ids]), FloatLinear(e.T)  # a (dim, vocab) view: x @ E^T without a copy


class FloatLinear:
    def __init__(self, w: np.ndarray):
        self.w = np.asarray(w, dtype=np.float32)

    def __call__(self, x: np.ndarray, last_only: bool = False) -> np.ndarray:
        return matmul(x[:, -1:] if last_only else x, self.w)


# block-quantized: int8, int4 and q4_1 -------------------------------------------------------------


def blocks_of(x: np.ndarray, block: int, fill: str = "zero") -> np.ndarray:
    """x (..., K) as (..., ceil(K / block), block) float32, the last block padded: with zeros, or
    with fill="repeat" with the last block's first value (so that its min and max are of real
    values only)."""
    K = x.shape[-1]
    blocks = -(-K // block)
    out = np.zeros((*x.shape[:-1], blocks * block), np.float32)
    out[..., :K] = x
    if fill == "repeat" and K % block:
        out[..., K:] = out[..., K - K % block : K - K % block + 1]
    return out.reshape(*x.shape[:-1], blocks, block)


def pack_nibbles(u: np.ndarray) -> np.ndarray:
    """(..., 2n) values in [0, 16) -> (..., n) bytes, two per byte: even index in the low nibble, as
    MatMulNBits stores 4-bit weights and zero points."""
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """pack_nibbles undone: (..., n) bytes -> (..., 2n) values."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


class BlockQuant(Scheme):
    """Symmetric blocks of `block` (32 for both schemes) along in_features, in com.microsoft MatMulNBits'
    layout: for W (in=K, out=N), NAME.q uint8 (N, ceil(K / block), block * bits / 8) holds
    q + 2^(bits-1) (the operator's default zero point; 4 bits: two per byte, even k in the low
    nibble) and NAME.scale float32 (N, ceil(K / block)) one scale per block. The embedding is
    stored as the linear weight E^T, so the table is (vocab, blocks, bytes): one tensor for the
    lookup and a tied head. The graph multiplies with MatMulNBits accuracy_level 4, which
    quantizes the activations per row and block to int8 (quantize_activation_blocks) and runs
    integer dot products."""

    embedding_transposed = True
    suffixes = (".q", ".scale")

    def __init__(self, bits: int, block: int, name: str, description: str):
        self.weight_bits, self.block, self.name, self.description = bits, block, name, description
        self.qmax = 2 ** (bits - 1) - 1  # symmetric: q in [-qmax - 1, qmax], scale = amax / qmax
        self.zero = 2 ** (bits - 1)  # stored value = q + zero (MatMulNBits' default zero point)

    def layout(self, shape):
        K, N = shape
        blocks = -(-K // self.block)
        return (
            ((N, blocks, self.block * self.weight_bits // 8), np.dtype(np.uint8)),
            ((N, blocks), np.dtype(np.float32)),
        )

    def quantize(self, w, scale=None):
        """q = rint(w / scale) clipped to [-qmax - 1, qmax], scale = amax / qmax per block (an all-zero
        block gets scale 1) unless given, (N, blocks)."""
        w = np.asarray(w, dtype=np.float32)
        K, N = w.shape
        wb = blocks_of(w.T, self.block)  # (N, blocks, block)
        blocks = wb.shape[1]
        if scale is None:
            amax = np.abs(wb).max(axis=-1)
            scale = np.where(amax > 0, amax / np.float32(self.qmax), 1.0).astype(np.float32)  # (N, blocks)
        assert scale.shape == (N, blocks) and scale.dtype == np.float32, (scale.shape, scale.dtype)
        q = np.clip(np.rint(wb / scale[..., None]), -self.qmax - 1, self.qmax).astype(np.int16) + self.zero
        stored = (self.pack(q.astype(np.uint8)), scale)
        error = float(np.abs(self.dequantize(stored, w.shape) - w).max()) if w.size else 0.0
        return stored, error

    def pack(self, u: np.ndarray) -> np.ndarray:
        """(N, blocks, block) values in [0, 2^bits) -> the stored bytes."""
        return u if self.weight_bits == 8 else pack_nibbles(u)

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """Stored bytes (..., bytes) -> signed q (..., block) as float32 (exact small integers)."""
        u = packed if self.weight_bits == 8 else unpack_nibbles(packed)
        return u.astype(np.float32) - np.float32(self.zero)

    def dequantize(self, stored, shape):
        packed, scale = stored
        K, N = shape
        w = self.unpack(packed) * scale[..., None]  # (N, blocks, block)
        return np.ascontiguousarray(w.reshape(N, -1)[:, :K].T)

    def linear(self, stored, shape):
        return BlockLinear(self.dequantize(stored, shape), self.block)

    def embedding(self, stored, shape):
        packed, scale = stored  # (vocab, blocks, bytes), (vocab, blocks)
        dim = shape[1]

        def rows(ids: np.ndarray) -> np.ndarray:  # (B, T) -> (B, T, dim), as the graph's GatherBlockQuantized
            return (self.unpack(packed[ids]) * scale[ids][..., None]).reshape(*ids.shape, -1)[..., :dim]

        return rows, BlockLinear(self.dequantize(stored, shape[::-1]), self.block)


def quantize_activation_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """x (M, K) as MatMulNBits accuracy_level 4 sees it: per row and block along K,
    scale = amax / 127, q = round_half_even(x * (127 / amax)) (both divisions in float32, as
    MLAS QuantizeARow_CompInt8 computes them); returns q * scale, float32.

    Its integer dot products with the weight's q are exact in ONNX Runtime and here; only the
    float32 arithmetic around them differs, so results agree to ~1e-6 of the largest output with
    AVX-512 VNNI, ~1e-5 with ONNX Runtime's AVX2 kernel (it subtracts the zero point times each
    block's sum in float32), not bit for bit."""
    M, K = x.shape
    xb = blocks_of(x, block)  # (M, blocks, block)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", over="ignore"):
        inverse = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    # amax below ~3.7e-37: 127 / amax overflows; MLAS's q is then garbage times a scale that makes the
    # product ~0 (ONNX Runtime returns 0 with AVX-512 VNNI, ~1e-36 with AVX2), where inf * 0 here was NaN
    inverse[~np.isfinite(inverse)] = 0
    scale = (amax / np.float32(127)).astype(np.float32)
    q = np.rint(xb * inverse)  # numpy rounds half to even, as _MM_ROUND_NEAREST
    return (q * scale).reshape(M, -1)[:, :K]


class BlockLinear:
    """x @ W with W the dequantized blocks (exact: q * scale) and x quantized per row and block."""

    def __init__(self, w: np.ndarray, block: int):
        self.w = np.asarray(w, dtype=np.float32)  # (K, N)
        self.block = block

    def __call__(self, x: np.ndarray, last_only: bool = False) -> np.ndarray:
        x = x[:, -1:] if last_only else x  # per-row quantization: the last row alone is exact
        B, T, K = x.shape
        return matmul(quantize_activation_blocks(x.reshape(B * T, K), self.block).reshape(B, T, K), self.w)


class BlockQuantMinimum(BlockQuant):
    """GGUF Q4_1's layout: each block of 32 along in_features holds w = scale * u + minimum, u in
    [0, 15], so a Q4_1 GGUF's weights are stored exactly (to float32 rounding), not rounded again
    as symmetric blocks. For W (in=K, out=N): NAME.q and NAME.scale as 4-bit BlockQuant (the stored
    u), NAME.zero_point uint8 (N, ceil(blocks / 2)) - each block's zero point z, two blocks per
    byte, the first in the low nibble, as MatMulNBits takes them - and NAME.offset float32
    (blocks, N), the rest of the minimum: w = scale * (u - z) + (minimum + z * scale). z is the u
    nearest to w = 0, so the part MatMulNBits multiplies (with int8 activations) is w itself up to
    half a step, and the offset, which the graph adds as blocksum(x) @ offset (craft.export.quantize)
    with x unquantized, is at most half a step: a block that does not straddle 0 puts the rest in it.
    MatMulNBits' own float zero points would hold minimum / scale whole but run 40x slower (README
    "Quantization"). The embedding and an untied head are int8 blocks (scheme_for): a Q4_1 GGUF
    keeps them at Q8_0 or finer, and 4 bits there cost SmolLM2-135M a 10% perplexity rise on their
    own. Rounded to nearest, never calibrated: rotation or GPTQ would move a GGUF's weights off
    the grid they came on."""

    suffixes = (".q", ".scale", ".zero_point", ".offset")
    calibrated = False

    def __init__(self, name: str, description: str, embedding: BlockQuant):
        super().__init__(4, 32, name, description)
        self.levels = 2**self.weight_bits - 1  # u in [0, levels]
        self.embedding = embedding  # the scheme of the embedding and an untied head

    def scheme_for(self, name):
        return self.embedding if name in (EMBEDDING, HEAD) else self

    def layout(self, shape):
        K, N = shape
        blocks = -(-K // self.block)
        q, scale = super().layout(shape)
        return q, scale, ((N, -(-blocks // 2)), np.dtype(np.uint8)), ((blocks, N), np.dtype(np.float32))

    def quantize(self, w, scale=None):
        """u = rint((w - minimum) / scale) in [0, 15], scale = (max - min) / 15 per block (a constant
        block: scale 1; a last block of padding: of its real values only), z = rint(-minimum / scale)
        clipped to [0, 15]. A block of a Q4_1 GGUF comes back as it was."""
        assert scale is None, "q4_1 is rounded to nearest: it takes no calibrated scales"
        w = np.asarray(w, dtype=np.float32)
        K, N = w.shape
        wb = blocks_of(w.T, self.block, fill="repeat")  # (N, blocks, block)
        blocks = wb.shape[1]
        low, high = wb.min(axis=-1), wb.max(axis=-1)  # (N, blocks)
        step = (high.astype(np.float64) - low) / self.levels
        scale = np.where(step > 0, step, 1.0).astype(np.float32)
        u = np.clip(np.rint((wb - low[..., None]) / scale[..., None]), 0, self.levels).astype(np.uint8)
        zero = np.clip(np.rint(-low / scale), 0, self.levels).astype(np.uint8)  # (N, blocks)
        offset = np.ascontiguousarray((low + zero * scale).T)  # (blocks, N) float32
        paired = np.zeros((N, -(-blocks // 2) * 2), np.uint8)  # an odd block count: the last byte half used
        paired[:, :blocks] = zero
        stored = (self.pack(u), scale, pack_nibbles(paired), offset)
        error = float(np.abs(self.dequantize(stored, w.shape) - w).max()) if w.size else 0.0
        return stored, error

    def centered(self, stored, shape) -> np.ndarray:
        """scale * (u - z) as W (in, out) float32: what MatMulNBits multiplies."""
        packed, scale, zero_point, _ = stored
        K, N = shape
        zero = unpack_nibbles(zero_point)[:, : scale.shape[1]]  # (N, blocks)
        u = self.unpack(packed) + np.float32(self.zero)  # (N, blocks, block): the stored u, exact small integers
        w = (u - zero[..., None].astype(np.float32)) * scale[..., None]
        return np.ascontiguousarray(w.reshape(N, -1)[:, :K].T)

    def dequantize(self, stored, shape):
        K, _ = shape
        return self.centered(stored, shape) + np.repeat(stored[3], self.block, axis=0)[:K]

    def linear(self, stored, shape):
        return OffsetBlockLinear(self.centered(stored, shape), stored[3], self.block)


def block_sums(x: np.ndarray, block: int) -> np.ndarray:
    """x (..., K) -> (..., ceil(K / block)): the sum of each block along K (the last one zero-padded)."""
    return blocks_of(x, block).sum(axis=-1, dtype=np.float32)


class OffsetBlockLinear(BlockLinear):
    """BlockLinear plus the blocks' offsets: x @ W = quantized(x) @ centered + block_sums(x) @ offset,
    the sums of x unquantized, as the graph's ReduceSum and MatMul compute them."""

    def __init__(self, centered: np.ndarray, offset: np.ndarray, block: int):
        super().__init__(centered, block)
        self.offset = np.asarray(offset, dtype=np.float32)  # (blocks, N)

    def __call__(self, x: np.ndarray, last_only: bool = False) -> np.ndarray:
        x = x[:, -1:] if last_only else x
        return super().__call__(x) + matmul(block_sums(x, self.block), self.offset)


INT8_BLOCKS = BlockQuant(8, 32, "int8", "blocks of 32, about 4x smaller and faster on CPUs")
SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Float32(),
        # blocks of 16 would halve int8's activation rounding (SmolLM2-135M perplexity rise 0.42% -> 0.07%)
        # but cost 20% of decode speed and 10% more bytes (README "Quantization"): 32, as GGUF's Q8_0 / Q4_0
        INT8_BLOCKS,
        BlockQuant(4, 32, "int4", "blocks of 32, about 7x smaller"),
        BlockQuantMinimum(
            "q4_1",
            "GGUF Q4_1's blocks of 32 with a scale and a minimum (a Q4_1 GGUF's blocks are stored exactly), "
            "int8 embedding and head; about 5x smaller",
            embedding=INT8_BLOCKS,
        ),
    )
}
NONE, INT8, INT4, Q4_1 = "none", "int8", "int4", "q4_1"
