"""Error-compensating rounding of block-quantized weights (GPTQ, Frantar et al. 2022).

Rounding every weight to its nearest grid point (round-to-nearest, RTN) minimises the error
of W itself. What matters is the error of X @ W for the inputs X the layer sees, and the errors
of different rows of W cancel or add up depending on how their inputs correlate. GPTQ rounds
one input row k at a time and spreads that row's rounding error over the rows not yet rounded,
weighted by H = X^T X from ~1,000 calibration tokens, so that X @ W_q stays close to
X @ W. The grid is the scheme's own (symmetric blocks along in_features, one scale per block
and output column): the result is stored and multiplied exactly like a rounded one.
"""

from __future__ import annotations

import numpy as np

from craft.runtime.weights import BlockQuant

# Added to H's diagonal, as a share of its mean: keeps the inverse stable. The paper's 1% fitted an
# import's calibration text (Python's docs) so closely that SmolLM2-135M int8 lost more perplexity
# on other English text (ratio 1.0027 vs 1.0006 at 10%, 18k tokens); the tiny preset's int8 is the
# same at either, its int4 better at 10% (README "Quantization").
DAMP = 0.1
LAZY = 128  # rows whose error updates are batched into one matrix product (the paper's lazy batch)


def gptq(w: np.ndarray, hessian: np.ndarray, scheme: BlockQuant) -> tuple[np.ndarray, np.ndarray, float]:
    """(W_q (K, N) float32 on the scheme's grid, scale (N, ceil(K / block)) float32, error ratio)
    for W (K, N) and H = X^T X (K, K) of its calibration inputs.

    Grid: q * scale, q in [-qmax - 1, qmax], scale = amax / qmax of the block's (error-updated)
    weights when the block is reached. Error ratio: tr(E^T H E) of this rounding over that of
    the scheme's own round-to-nearest, E = W - W_q (below 1 is better)."""
    K, N = w.shape
    qmax, block = scheme.qmax, scheme.block
    blocks = -(-K // block)
    Kp = blocks * block
    assert LAZY % block == 0
    work = np.zeros((Kp, N))
    work[:K] = w
    h = np.zeros((Kp, Kp))
    h[:K, :K] = hessian
    dead = np.diag(h) == 0  # inputs that never fire (and padding): any value will do, keep them 0
    h[dead, dead] = 1.0
    work[dead] = 0.0
    h[np.diag_indices(Kp)] += DAMP * np.mean(np.diag(h))
    # U upper triangular with H^-1 = U^T U: row k of U carries the error of row k to rows > k
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    quantized = np.zeros((Kp, N))
    scale = np.zeros((blocks, N))
    for start in range(0, Kp, LAZY):
        end = min(start + LAZY, Kp)
        part, errors = work[start:end].copy(), np.zeros((end - start, N))
        for j in range(end - start):
            k = start + j
            if k % block == 0:  # a new block: its scale from the weights as updated so far
                amax = np.abs(part[j : j + block]).max(axis=0)
                scale[k // block] = np.where(amax > 0, amax / qmax, 1.0)
            s = scale[k // block]
            quantized[k] = np.clip(np.rint(part[j] / s), -qmax - 1, qmax) * s
            errors[j] = (part[j] - quantized[k]) / u[k, k]
            part[j:] -= np.outer(u[k, k:end], errors[j])
        work[end:] -= u[start:end, end:].T @ errors
    scale32 = scale.T.astype(np.float32)  # (N, blocks), the scheme's layout
    q = np.clip(np.rint(quantized / np.repeat(scale, block, axis=0)), -qmax - 1, qmax)
    w_q = (q.reshape(blocks, block, N) * scale32.T[:, None, :]).reshape(Kp, N)[:K].astype(np.float32)
    rounded = scheme.dequantize(scheme.quantize(w)[0], w.shape)
    return w_q, scale32, output_error(w, w_q, hessian) / max(output_error(w, rounded, hessian), 1e-30)


def output_error(w: np.ndarray, w_q: np.ndarray, hessian: np.ndarray) -> float:
    """sum over calibration rows of |X @ (W - W_q)|^2, from H = X^T X."""
    e = w.astype(np.float64) - w_q
    return float(np.einsum("kn,kn->", e, hessian @ e))
