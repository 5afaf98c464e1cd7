"""Prepare a transformer's float weights for a block-quantized scheme, before its graph is built:
rotate the residual stream of an imported model (rotation.py), then round each linear weight and
the head with GPTQ (gptq.py) against the inputs it sees on ~1,000 calibration tokens.

Both are measured choices (README "Quantization"). The rotation spreads a pretrained model's
outlier activation channels so MatMulNBits' int8 activation blocks lose less (SmolLM2-135M int8:
perplexity ratio 1.0121 -> 1.0016, top-1 96.0% -> 96.5%; turning w2's input as well, 97.4%);
craft-trained models have no such channels (tiny and small presets: the same or 0.1-0.5 points
better without it), and a tied head pays one float32 (dim x dim) MatMul per token for it (2% of
a 15M-class decode step), so only imports are rotated. GPTQ cancels weight rounding errors
against each other. Deterministic for a given calibration text: a fixed rotation seed, windows
at fixed places (an imported model's text is this Python's pydoc_data, which may differ between
Python releases).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np

from craft.export import rotation
from craft.export.gptq import gptq
from craft.runtime import weights as W
from craft.runtime.artifact import LLAMA, ModelSpec


class CalibrationError(ValueError):
    """The source cannot be calibrated: its float network overflows on the calibration text, or the
    working set would not fit in memory. One line (craft-export exits 2)."""


CALIBRATION_TOKENS = 1024  # GPTQ's inputs; 4,096 moved SmolLM2-135M's perplexity ratio by +-0.002, no better (README)
WINDOW = 256  # tokens per calibration window (or the context, if shorter)


def calibration_text() -> str:
    """English text to calibrate an imported model on (its own training data is not at hand):
    Python's documentation, which every CPython carries (pydoc_data), a few topics of it; not
    the text the export measures perplexity on (export/perplexity_text.txt). "" where a stripped
    Python lacks it: the weights are then rounded without calibration."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return ""

    return "\n\n".join(topics[name] for name in CALIBRATION_TOPICS if name in topics)


CALIBRATION_TOPICS = ("class", "function", "try", "import", "exceptions", "typesseq")  # ~4,000 tokens


@dataclass
class Prepared:
    """Weights ready for the scheme's quantizer: `scales` fixes the grid of the GPTQ-rounded ones."""

    weights: dict[str, np.ndarray]
    spec: ModelSpec
    scales: dict[str, np.ndarray] = field(default_factory=dict)
    report: dict = field(default_factory=dict)


def working_set_bytes(spec: ModelSpec, rotate: bool) -> int:
    """The largest float64 arrays calibration holds at once, in bytes: GPTQ's (K, K) Hessian, its
    inverse and factor with the (K, N) weight being rounded, for the widest linear weight (w2's K is
    the hidden width; the head's N the vocabulary); rotation's (dim, dim) matrices. A source of a
    few MB can claim a shape whose Hessian needs gigabytes (hidden width 32,768: 8.6 GB each)."""
    qkv = (spec.n_head + 2 * spec.n_kv_head) * spec.head_dim
    shapes = [(spec.dim, qkv), (spec.n_head * spec.head_dim, spec.dim), (spec.dim, 2 * spec.hidden_dim)]
    shapes += [(spec.hidden_dim, spec.dim), (spec.dim, spec.vocab_size)]
    gptq_bytes = max(8 * (4 * k * k + 3 * k * n) for k, n in shapes)
    return max(gptq_bytes, 8 * 4 * spec.dim * spec.dim if rotate else 0)


def check_memory(spec: ModelSpec, rotate: bool) -> None:
    """Refuse, in one line, a calibration whose working set exceeds the memory available now."""
    from craft.runtime.estimate import available_memory_mb

    need, free = working_set_bytes(spec, rotate) / 2**20, available_memory_mb()
    if free is not None and need > free:
        raise CalibrationError(
            f"calibrating this model for int8 / int4 needs ~{need:,.0f} MB at once (GPTQ's float64 matrices for its "
            f"widest weight; dim {spec.dim}, hidden {spec.hidden_dim}, vocab {spec.vocab_size}) and {free:,.0f} MB "
            "is available; export on a machine with more memory, or with --quantize none"
        )


def calibration_windows(tokens: np.ndarray | None, context_length: int) -> list[np.ndarray]:
    """Up to CALIBRATION_TOKENS tokens as windows of WINDOW (or context_length) tokens, spread
    evenly over `tokens`; [] when there are none."""
    if tokens is None or len(tokens) < 2:
        return []
    width = min(WINDOW, context_length, len(tokens))
    count = max(1, min(CALIBRATION_TOKENS // width, len(tokens) // width))
    starts = np.linspace(0, len(tokens) - width, count).astype(np.int64)
    return [np.asarray(tokens[s : s + width], dtype=np.int64) for s in starts]


def round_in_order(weights: dict[str, np.ndarray], spec: ModelSpec, scheme, windows: list[np.ndarray]) -> tuple:
    """(weights, scales, GPTQ error ratios, max |W_q - W| each) with every linear weight and the head GPTQ-rounded
    in the order the network multiplies them. The windows run once, as one batch, through the
    float network, and each weight is replaced by its rounded self (multiplying as the scheme
    does, int8 activation blocks included) as soon as its inputs are known: every weight is
    rounded against the inputs the quantized layers before it give it (sequential GPTQ; the
    embedding rows stay float here, and a tied table is rounded for the head's use)."""
    from craft.runtime.numpy_backend import NumpyBackend

    backend = NumpyBackend("<calibration>", spec, W.NONE, initializers=weights)
    out, scales, ratios, changes = dict(weights), {}, {}, {}
    head = W.EMBEDDING if spec.tie_embeddings else W.HEAD

    def rounding(name: str, linear: W.FloatLinear):
        def call(x: np.ndarray, last_only: bool = False) -> np.ndarray:
            rows = x.reshape(-1, x.shape[-1]).astype(np.float64)  # (B * T, in)
            with np.errstate(all="ignore"):  # an overflowing network: refused below, in one line
                hessian = rows.T @ rows
            if not np.isfinite(hessian).all():
                raise CalibrationError(
                    f"the source's float32 network overflows on the calibration text (the inputs of '{name}' are "
                    "not finite numbers: a weight so large that float32 overflows); check the source's weights"
                )
            w_q, scales[name], ratios[name] = gptq(linear.w, hessian, scheme)
            changes[name] = float(np.abs(w_q - linear.w).max())
            out[name] = np.ascontiguousarray(w_q.T if name == W.EMBEDDING else w_q)  # the tied head is E^T
            if name == head:  # nothing reads the logits: skip them (windows x tokens x vocab floats)
                return np.zeros((*x.shape[:-1], 0), np.float32)
            return W.BlockLinear(w_q, scheme.block)(x, last_only)

        return call

    for i, layer in enumerate(backend.layers):
        n = W.layer(i)
        for key, name in (("wqkv", n.wqkv), ("wo", n.wo), ("w13", n.w13), ("w2", n.w2)):
            layer[key] = rounding(name, layer[key])
    backend.head = rounding(head, backend.head)
    ids = np.stack(windows)  # (windows, width): calibration_windows gives them one width
    backend.reset(len(windows), ids.shape[1])
    backend.forward(ids, np.ones_like(ids), np.broadcast_to(np.arange(ids.shape[1]), ids.shape))
    return out, scales, ratios, changes


def prepare(
    weights: dict[str, np.ndarray], spec: ModelSpec, scheme, tokens: np.ndarray | None, rotate: bool
) -> Prepared:
    """A transformer's weights rotated (when `rotate`) and, with calibration tokens, its linear
    weights and head GPTQ-rounded with their scales; a recurrent model's weights as they are."""
    if spec.arch != LLAMA:
        return Prepared(weights, spec)
    check_memory(spec, rotate)
    t0 = time.perf_counter()
    if rotate:
        assert scheme.block == W.FFN_ROTATION_BLOCK  # ffn_rotation turns w2's input in the scheme's activation blocks
        weights, spec = rotation.rotate(weights, spec)
    windows = calibration_windows(tokens, spec.context_length)
    if not windows:
        return Prepared(weights, spec, report={"rotated": rotate, "calibration_tokens": 0})
    weights, scales, ratios, changes = round_in_order(weights, spec, scheme, windows)
    return Prepared(
        weights,
        spec,
        scales,
        {
            "rotated": rotate,
            "calibration_tokens": int(sum(len(w) for w in windows)),
            # which tokens: an import's text is this Python's pydoc_data, which differs between releases
            "calibration_sha256": hashlib.sha256(np.concatenate(windows).astype("<i8").tobytes()).hexdigest(),
            "gptq_error_ratio": float(np.mean(list(ratios.values()))),  # output error vs rounding's, mean
            "max_weight_change": max(changes.values()),  # the largest |W_q - W|: the weights' quantization error
            "calibration_s": time.perf_counter() - t0,
        },
    )
