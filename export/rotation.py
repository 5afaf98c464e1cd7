"""Rotate a transformer's residual stream before quantizing it (QuaRot-style): an exact change
of basis that spreads the few huge activation channels of a pretrained model over all of them,
so that quantizing activations per block of 32 (MatMulNBits accuracy_level 4) loses far less.

For an orthogonal Q (Q Q^T = I) and RMSNorm(x) = x / rms(x) * g, rms(x Q) = rms(x). So the
network can carry its residual stream as x Q instead of x, exactly, once
- every norm weight g is folded into the matrices that read the norm's output (weight-free norms
  then remain: g = 1);
- the matrices that write to the stream get Q on their output side and those that read it Q^T
  on their input side: E -> E Q; wqkv, w13 -> Q^T diag(g) W; wo, w2 -> W Q;
- values are rotated per head by R (head_dim x head_dim): v -> v R (its bias too), and the rows
  of wo that read query head h -> R^T wo_h. Attention mixes positions, never channels, so the
  attention output of every head is simply rotated by R.
The head reads norm(x Q) with the final norm's g: untied, its weight becomes Q^T diag(g) W_head.
Tied, E Q is the table the lookup needs, so the head multiplies by M = Q^T diag(g) Q
(dim x dim, float32: the file's `head_rotation` weight, ModelSpec.head_rotation) first.

w2's input, silu(gate) * up, is made channel by channel, so no rotation folds into the matrices
before it: the graph turns it at run time, each block of 32 by the Hadamard matrix H (the file's
`ffn_rotation` weight, ModelSpec.ffn_rotation; QuaRot's online Hadamard), and w2 -> diag(H, H,
...) w2. Its outliers are the largest any quantized activation has; measured on SmolLM2-135M int8
(README "Quantization"), this halves the KL divergence from float32 that w2 contributes.

Q is a Hadamard matrix where the size is a power of two, otherwise a random orthogonal matrix
Kronecker a Hadamard one, with random signs: seeded, so an export is reproducible.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from craft.runtime import weights as W
from craft.runtime.artifact import ModelSpec

SEED = 0  # the rotation is part of the file's weights, not a runtime choice: any fixed seed will do


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester-Hadamard matrix (n x n); n a power of two."""
    assert n > 0 and n & (n - 1) == 0, n
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal (n x n) float64 matrix that mixes every channel with every other:
    diag(random signs) (O_m kron H_p), n = m * p, p the largest power of two dividing n."""
    p = n & -n
    m = n // p
    a, r = np.linalg.qr(rng.standard_normal((m, m)))
    o = a * np.sign(np.diag(r))  # (m, m), Haar-distributed
    signs = rng.choice([-1.0, 1.0], n)
    return signs[:, None] * np.kron(o, hadamard(p))


def rotate(weights: dict[str, np.ndarray], spec: ModelSpec, seed: int = SEED) -> tuple[dict, ModelSpec]:
    """(weights with the residual stream rotated as the module docstring says, the spec that says
    whether the file carries `head_rotation` and `ffn_rotation` (where hidden_dim is a multiple of
    its block)); the network computes the same logits up to float32 rounding. Only transformer
    (llama) weights in craft.runtime.weights' layout."""
    rng = np.random.default_rng(seed)
    q = orthogonal(spec.dim, rng)  # (dim, dim)
    r = orthogonal(spec.head_dim, rng)  # (hd, hd)
    H, KV, hd = spec.n_head, spec.n_kv_head, spec.head_dim
    out = dict(weights)
    turn_ffn = spec.hidden_dim % W.FFN_ROTATION_BLOCK == 0
    hb = hadamard(W.FFN_ROTATION_BLOCK)  # (32, 32), symmetric

    def f64(name: str) -> np.ndarray:  # one tensor at a time in float64: no second copy of the model
        return weights[name].astype(np.float64)

    def f32(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32)

    out[W.EMBEDDING] = f32(f64(W.EMBEDDING) @ q)  # (vocab, dim)
    if turn_ffn:
        out[W.FFN_ROTATION] = f32(hb)
    for i in range(spec.n_layer):
        n = W.layer(i)
        wqkv = q.T @ (f64(n.attention_norm)[:, None] * f64(n.wqkv))  # (dim, (H + 2KV) * hd)
        v = wqkv[:, (H + KV) * hd :].reshape(spec.dim, KV, hd)
        wqkv[:, (H + KV) * hd :] = (v @ r).reshape(spec.dim, KV * hd)
        out[n.wqkv] = f32(wqkv)
        if spec.qkv_bias:
            bias = f64(n.wqkv_bias)
            bias[(H + KV) * hd :] = (bias[(H + KV) * hd :].reshape(KV, hd) @ r).reshape(-1)
            out[n.wqkv_bias] = f32(bias)
        wo = f64(n.wo).reshape(H, hd, spec.dim)  # rows of each query head
        out[n.wo] = f32((r.T @ wo).reshape(H * hd, spec.dim) @ q)
        out[n.w13] = f32(q.T @ (f64(n.ffn_norm)[:, None] * f64(n.w13)))
        w2 = f64(n.w2) @ q  # (hidden, dim)
        out[n.w2] = f32(W.rotate_blocks(w2.T, hb).T if turn_ffn else w2)  # diag(H, H, ...) w2
        out[n.attention_norm] = out[n.ffn_norm] = np.ones(spec.dim, np.float32)
    g = f64(W.NORM)
    out[W.NORM] = np.ones(spec.dim, np.float32)
    if spec.tie_embeddings:
        out[W.HEAD_ROTATION] = f32(q.T @ (g[:, None] * q))
    else:
        out[W.HEAD] = f32(q.T @ (g[:, None] * f64(W.HEAD)))
    rotated = out
    return rotated, dataclasses.replace(spec, head_rotation=spec.tie_embeddings, ffn_rotation=turn_ffn)
