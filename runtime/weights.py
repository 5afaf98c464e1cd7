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

Norms, rope tables and biases are float32 in every file. The embedding and the linear weights are
stored as the file's scheme (metadata `craft.quantization`, a key of SCHEMES) says: a float
weight NAME becomes the tensors NAME + suffix for each of the scheme's suffixes.

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
    return LayerNames(p + "attention_norm.weight", p + "attention.wqkv.weight", p + "attention.wqkv.bias", p + "attention.wo.weight",
                      p + "ffn_norm.weight", p + "feed_forward.w13.weight", p + "feed_forward.w2.weight")


def float_weights(spec: ModelSpec) -> dict[str, Shape]:
    """Name -> shape of the weights stored as float32 whatever the scheme: norms, rope tables, biases."""
    out = {NORM: (spec.dim,), ROPE_COS: (spec.context_length, spec.head_dim), ROPE_SIN: (spec.context_length, spec.head_dim)}
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
    qkv = (spec.n_head + 2 * spec.n_kv_head) * spec.head_dim
    for i in range(spec.n_layer):
        n = layer(i)
        out.update({n.wqkv: (spec.dim, qkv), n.wo: (spec.n_head * spec.head_dim, spec.dim),
                    n.w13: (spec.dim, 2 * spec.hidden_dim), n.w2: (spec.hidden_dim, spec.dim)})
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

    def stored_names(self, name: str) -> tuple[str, ...]:
        return tuple(name + suffix for suffix in self.suffixes)

    def layout(self, shape: Shape) -> tuple[tuple[Shape, np.dtype], ...]:
        """(shape, dtype) of each stored tensor, in suffix order, for a weight of this float shape."""
        raise NotImplementedError

    def quantize(self, w: np.ndarray) -> tuple[tuple[np.ndarray, ...], float]:
        """Stored tensors for W (in, out), and the max |dequantize(stored) - W| they incur."""
        raise NotImplementedError

    def dequantize(self, stored: tuple[np.ndarray, ...], shape: Shape) -> np.ndarray:
        """W (in, out) float32 as the stored tensors represent it."""
        raise NotImplementedError

    def linear(self, stored: tuple[np.ndarray, ...], shape: Shape) -> Linear:
        """x @ W in numpy with the arithmetic of this scheme's graph ops."""
        raise NotImplementedError

    def embedding(self, stored: tuple[np.ndarray, ...], shape: Shape) -> tuple[Callable[[np.ndarray], np.ndarray], Linear]:
        """(rows: ids (B, T) -> (B, T, dim) float32, tied head: x @ E^T) from the stored table."""
        raise NotImplementedError

    # the embedding table, in terms of the above --------------------------------------------------
    def _embedding_view(self, shape: Shape) -> Shape:
        return shape[::-1] if self.embedding_transposed else shape

    def embedding_layout(self, shape: Shape) -> tuple[tuple[Shape, np.dtype], ...]:
        return self.layout(self._embedding_view(shape))

    def quantize_embedding(self, e: np.ndarray) -> tuple[tuple[np.ndarray, ...], float]:
        return self.quantize(e.T if self.embedding_transposed else e)

    def dequantize_embedding(self, stored: tuple[np.ndarray, ...], shape: Shape) -> np.ndarray:
        e = self.dequantize(stored, self._embedding_view(shape))
        return e.T if self.embedding_transposed else e


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

    def layout(self, shape):
        return ((shape, np.dtype(np.float32)),)

    def quantize(self, w):
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


# int8 ---------------------------------------------------------------------------------------------
class Int8(Scheme):
    """Symmetric int8 with one float32 scale per output column: NAME.q int8 (in, out), NAME.scale
    float32 (out,). The embedding is stored as E^T, so its scales are per token. The graph
    quantizes activations per tensor to uint8 on the fly (DynamicQuantizeLinear -> MatMulInteger),
    which Int8Linear reproduces exactly."""

    name = "int8"
    description = "per-channel, about 4x smaller and faster on CPUs"
    weight_bits = 8
    suffixes = (".q", ".scale")
    embedding_transposed = True

    def layout(self, shape):
        return ((shape, np.dtype(np.int8)), ((shape[1],), np.dtype(np.float32)))

    def quantize(self, w):
        """q is in [-127, 127] (never -128, so negation cannot overflow); an all-zero column gets scale 1."""
        w = np.asarray(w, dtype=np.float32)
        amax = np.abs(w).max(axis=0)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        error = float(np.abs(q.astype(np.float32) * scale - w).max()) if w.size else 0.0
        return (q, scale), error

    def dequantize(self, stored, shape):
        q, scale = stored
        return q.astype(np.float32) * scale

    def linear(self, stored, shape):
        return Int8Linear(*stored)

    def embedding(self, stored, shape):
        q, scale = stored  # (dim, vocab), (vocab,)
        scale = scale.astype(np.float32)

        def rows(ids: np.ndarray) -> np.ndarray:  # (B, T) -> (dim, B, T) -> (B, T, dim), scaled per token
            return q[:, ids].transpose(1, 2, 0).astype(np.float32) * scale[ids][..., None]

        return rows, Int8Linear(q, scale)


def dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.float32]:
    """ONNX DynamicQuantizeLinear: (x as uint8 values held in float32, scale, zero point).

    scale = (max(x, 0) - min(x, 0)) / 255 over the whole tensor; zero point and values are
    rounded half to even and saturated to [0, 255], as the operator specifies.
    """
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(255))
    if scale == 0:
        return np.zeros_like(x), np.float32(0), np.float32(0)
    zero = np.float32(np.clip(np.rint(np.float32(-lo) / scale), 0, 255))
    q = np.clip(np.rint(x / scale) + zero, 0, 255)
    return q, scale, zero


class Int8Linear:
    def __init__(self, q: np.ndarray, scale: np.ndarray):
        self.w = q.astype(np.float32)  # exact small integers
        self.scale = scale.astype(np.float32)

    def __call__(self, x: np.ndarray, last_only: bool = False) -> np.ndarray:
        """The activation scale spans all of x even with last_only, as ONNX Runtime's per-tensor quantization does."""
        q, scale, zero = dynamic_quantize(x)
        if last_only:
            q = q[:, -1:]
        acc = matmul(q - zero, self.w)  # integer-valued; float32 holds these sums exactly at these widths
        return acc * (scale * self.scale)


SCHEMES: dict[str, Scheme] = {s.name: s for s in (Float32(), Int8())}
NONE, INT8 = Float32.name, Int8.name
