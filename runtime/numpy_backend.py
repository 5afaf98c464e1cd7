"""Backend `numpy`: the same network in pure numpy, from the weights inside the .onnx file.

For devices where ONNX Runtime has no wheel (32-bit ARM). The file is read with
craft.runtime.onnx_file (no onnx, no protobuf package); the graph is not interpreted: the
weights are found by the names that craft.runtime.artifact defines and the forward pass below
is the network itself. It keeps its own KV-cache in preallocated (B, n_kv_heads, context,
head_dim) buffers, written in place: no per-step copy of the cache at all.

int8 files: the weights are expanded to float32 at load and every linear layer reproduces
ONNX Runtime's DynamicQuantizeLinear -> MatMulInteger arithmetic (uint8 activations per
tensor, integer products summed exactly, then scaled), so greedy output matches the ort backend
token for token rather than drifting from it.
"""

from __future__ import annotations

import numpy as np

from craft.runtime import artifact as A
from craft.runtime.artifact import ArtifactError, ModelSpec
from craft.runtime.onnx_file import read_model

MASKED = np.float32(np.finfo(np.float32).min)


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


class Linear:
    """y = x @ W for a float32 weight, or the int8 dynamic-quantization arithmetic of the graph."""

    def __init__(self, weights: dict[str, np.ndarray], name: str, int8: bool):
        self.int8 = int8
        if int8:
            self.w = weights[name + ".q"].astype(np.float32)  # exact small integers
            self.scale = weights[name + ".scale"].astype(np.float32)
        else:
            self.w = np.ascontiguousarray(weights[name], dtype=np.float32)

    def __call__(self, x: np.ndarray, last_only: bool = False) -> np.ndarray:
        """x (B, T, in) -> (B, T, out), or (B, 1, out) for the last position only. The int8
        activation scale still spans all of x, as ONNX Runtime's per-tensor quantization does."""
        if not self.int8:
            return matmul(x[:, -1:] if last_only else x, self.w)
        q, scale, zero = dynamic_quantize(x)
        if last_only:
            q = q[:, -1:]
        acc = matmul(q - zero, self.w)  # integer-valued; float32 holds these sums exactly at these widths
        return acc * (scale * self.scale)


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B, T, K) @ (K, N) as one 2-D BLAS call: numpy's stacked 3-D matmul is ~10x slower."""
    B, T, K = x.shape
    return (x.reshape(B * T, K) @ w).reshape(B, T, w.shape[1])


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * weight


class NumpyBackend:
    name = "numpy"

    def __init__(self, path: str, spec: ModelSpec, quantization: str):
        if quantization not in (A.QUANT_NONE, A.QUANT_INT8):
            raise ArtifactError(f"{path}: the numpy backend does not know quantization '{quantization}'; use --backend ort")
        self.spec = spec
        int8 = quantization == A.QUANT_INT8
        w = read_model(path).initializers
        try:
            self.layers = []
            for i in range(spec.n_layer):
                p = f"layers.{i}."
                self.layers.append({
                    "attention_norm": np.asarray(w[p + "attention_norm.weight"], np.float32),
                    "wqkv": Linear(w, p + "attention.wqkv.weight", int8),
                    "wo": Linear(w, p + "attention.wo.weight", int8),
                    "ffn_norm": np.asarray(w[p + "ffn_norm.weight"], np.float32),
                    "w13": Linear(w, p + "feed_forward.w13.weight", int8),
                    "w2": Linear(w, p + "feed_forward.w2.weight", int8),
                })
            self.norm = np.asarray(w["norm.weight"], np.float32)
            self.rope_cos = np.asarray(w["rope.cos"], np.float32)
            half = spec.head_dim // 2
            self.rope_sin_signed = np.asarray(w["rope.sin"], np.float32) * np.concatenate([-np.ones(half), np.ones(half)]).astype(np.float32)
            if int8:  # stored (dim, vocab) with a scale per token; see export/quantize.py
                emb_q = w["tok_embeddings.weight.q"]
                emb_scale = w["tok_embeddings.weight.scale"].astype(np.float32)
                self.embedding_rows = lambda ids: emb_q[:, ids].transpose(1, 2, 0).astype(np.float32) * emb_scale[ids][..., None]
                self.head = Linear(w, "tok_embeddings.weight", True) if spec.tie_embeddings else Linear(w, "output.weight", True)
            else:
                emb = np.asarray(w["tok_embeddings.weight"], np.float32)  # (vocab, dim)
                self.embedding_rows = lambda ids: emb[ids]
                self.head = _TiedHead(emb) if spec.tie_embeddings else Linear(w, "output.weight", False)
        except KeyError as e:
            raise ArtifactError(f"{path} lacks weight {e} that the Craft format defines; re-export it with craft-export") from None
        self.cache_k: list[np.ndarray] = []
        self.cache_v: list[np.ndarray] = []
        self.cache_length = 0

    def reset(self, batch: int) -> None:
        shape = (batch, self.spec.n_kv_head, self.spec.context_length, self.spec.head_dim)
        self.cache_k = [np.zeros(shape, np.float32) for _ in range(self.spec.n_layer)]
        self.cache_v = [np.zeros(shape, np.float32) for _ in range(self.spec.n_layer)]
        self.cache_length = 0

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        """Logits (B, T, vocab) - or (B, 1, vocab) with last_only - for input_ids (B, T); extends the cache by T."""
        s = self.spec
        B, T = input_ids.shape
        P, S = self.cache_length, self.cache_length + T
        H, KV, hd = s.n_head, s.n_kv_head, s.head_dim
        G = H // KV
        if S > s.context_length:
            raise ValueError(f"sequence of {S} tokens exceeds the model's context of {s.context_length}")

        causal = np.arange(S)[None, :] <= np.arange(P, S)[:, None]  # (T, S)
        allowed = causal[None, None, None] & attention_mask[:, None, None, None, :].astype(bool)  # (B, 1, 1, T, S)
        bias = np.where(allowed, np.float32(0), MASKED)
        cos = self.rope_cos[position_ids][:, :, None, :]  # (B, T, 1, hd)
        sin = self.rope_sin_signed[position_ids][:, :, None, :]

        x = self.embedding_rows(input_ids)  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer["attention_norm"], s.norm_eps)
            qkv = layer["wqkv"](h).reshape(B, T, H + 2 * KV, hd)  # (B, T, H + 2KV, hd)
            qk, v = qkv[:, :, : H + KV], qkv[:, :, H + KV:]
            qk = qk * cos + np.concatenate([qk[..., hd // 2:], qk[..., : hd // 2]], axis=-1) * sin
            q = qk[:, :, :H].transpose(0, 2, 1, 3).reshape(B, KV, G, T, hd)  # (B, KV, G, T, hd); q is pre-scaled
            self.cache_k[i][:, :, P:S] = qk[:, :, H:].transpose(0, 2, 1, 3)  # (B, KV, T, hd) into the cache
            self.cache_v[i][:, :, P:S] = v.transpose(0, 2, 1, 3)
            k = self.cache_k[i][:, :, None, :S]  # (B, KV, 1, S, hd)
            vv = self.cache_v[i][:, :, None, :S]
            scores = q @ k.swapaxes(-1, -2) + bias  # (B, KV, G, T, S)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            y = (probs @ vv).reshape(B, H, T, hd).transpose(0, 2, 1, 3).reshape(B, T, H * hd)  # (B, T, H * hd)
            x = x + layer["wo"](y)
            h = rms_norm(x, layer["ffn_norm"], s.norm_eps)
            gate, up = np.split(layer["w13"](h), 2, axis=-1)
            x = x + layer["w2"](gate / (1 + np.exp(-gate)) * up)
        self.cache_length = S
        return self.head(rms_norm(x, self.norm, s.norm_eps), last_only)


class _TiedHead:
    def __init__(self, embedding: np.ndarray):
        self.weight_t = embedding.T  # (dim, vocab) view: x @ E^T

    def __call__(self, x: np.ndarray, last_only: bool = False) -> np.ndarray:
        return matmul(x[:, -1:] if last_only else x, self.weight_t)
