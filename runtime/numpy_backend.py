"""Backend `numpy`: the same network in pure numpy, from the weights inside the .onnx file.

For devices where ONNX Runtime has no wheel (32-bit ARM). The file is read with
craft.runtime.onnx_file (no onnx, no protobuf package); the graph is not interpreted: the
weights are found by the names that craft.runtime.weights defines and the forward pass below
is the network itself. It keeps its own KV-cache in preallocated (B, n_kv_heads, context,
head_dim) buffers, written in place: no per-step copy of the cache at all.

Each linear layer, the embedding and the LM head multiply as the file's scheme says
(craft.runtime.weights): for int8 / int4 / q4_1 the blocks are expanded to float32 at load and every
linear layer quantizes its input per row and block of 32 exactly as ONNX Runtime's MatMulNBits
(accuracy_level 4) does, so greedy output matches the ort backend token for token rather than
drifting from it. Only float32 arithmetic around the integer products differs (~1e-6 relative; ~1e-5 on
ONNX Runtime's AVX2 kernel); where that moves an
activation across a rounding boundary, that one logit row differs by up to ~5e-3 relative.
"""

from __future__ import annotations

import numpy as np

from craft.runtime import weights as W
from craft.runtime.artifact import ArtifactError, ModelSpec
from craft.runtime.artifact_check import entry_budget, expected_weights
from craft.runtime.kv_cache import cache_buffer
from craft.runtime.onnx_file import OnnxFormatError, read_model

MASKED = np.float32(np.finfo(np.float32).min)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * weight


class StoredWeights:
    """The weights of a Craft file by their craft.runtime.weights names, each checked against the
    shape and dtype the format defines for this model, as the file's scheme multiplies them."""

    def __init__(self, path: str, spec: ModelSpec, quantization: str, initializers: dict | None = None):
        if quantization not in W.SCHEMES:
            raise ArtifactError(
                f"{path}: the numpy backend does not know quantization '{quantization}'; use --backend ort"
            )
        self.path, self.spec, self.scheme = path, spec, W.SCHEMES[quantization]
        self.floats, self.stored_shapes = W.float_weights(spec), W.scheme_weights(spec)
        if initializers is not None:  # the exporter's weights, in memory: checked below like a file's
            self.initializers = initializers
            return
        try:  # only the weights the spec names are decoded; the graph's nodes are not even parsed
            self.initializers = read_model(
                path,
                with_weights=expected_weights(spec, quantization),
                with_nodes=False,
                max_entries=entry_budget(spec),
                in_memory=True,  # weights kept for the process's life: a file rewritten in place would SIGBUS a mapping
            ).initializers
        except OnnxFormatError as e:
            raise ArtifactError(f"{e}; is it a Craft model exported with craft-export?") from None

    def tensors(self, names: tuple[str, ...], layout) -> tuple[np.ndarray, ...]:
        w = self.initializers
        for name, (shape, dtype) in zip(names, layout):
            if name not in w:
                raise ArtifactError(
                    f"{self.path} lacks weight '{name}' that the Craft format defines; re-export it with craft-export"
                )
            if w[name].shape != shape or w[name].dtype != dtype:
                raise ArtifactError(
                    f"{self.path}: weight '{name}' is {w[name].dtype} {w[name].shape}, the model config needs "
                    f"{dtype} {shape}; re-export it with craft-export"
                )
        return tuple(w[name] for name in names)

    def float32(self, name: str) -> np.ndarray:
        return self.tensors((name,), [(self.floats[name], np.dtype(np.float32))])[0]

    def linear(self, name: str) -> W.Linear:
        shape, scheme = self.stored_shapes[name], self.scheme.scheme_for(name)
        return scheme.linear(self.tensors(scheme.stored_names(name), scheme.layout(shape)), shape)

    def embedding_and_head(self) -> tuple:
        """(rows: ids (B, T) -> (B, T, dim), head: x (B, T, dim) -> logits), the head tied or not."""
        shape, scheme = self.stored_shapes[W.EMBEDDING], self.scheme.scheme_for(W.EMBEDDING)
        rows, tied_head = scheme.embedding(
            self.tensors(scheme.stored_names(W.EMBEDDING), scheme.embedding_layout(shape)), shape
        )
        return rows, tied_head if self.spec.tie_embeddings else self.linear(W.HEAD)


class NumpyBackend:
    name = "numpy"

    @np.errstate(all="ignore")  # dequantizing a damaged file's inf / NaN: reported once, by sampling
    def __init__(self, path: str, spec: ModelSpec, quantization: str, initializers: dict | None = None):
        """The file at `path`, or - given `initializers`, name -> array as the file would store
        them - those arrays (`path` then only names them in errors)."""
        self.spec = spec
        w = StoredWeights(path, spec, quantization, initializers)
        self.layers = []
        for i in range(spec.n_layer):
            n = W.layer(i)
            self.layers.append(
                {
                    "attention_norm": w.float32(n.attention_norm),
                    "wqkv": w.linear(n.wqkv),
                    "wqkv_bias": w.float32(n.wqkv_bias) if spec.qkv_bias else np.float32(0),
                    "wo": w.linear(n.wo),
                    "ffn_norm": w.float32(n.ffn_norm),
                    "w13": w.linear(n.w13),
                    "w2": w.linear(n.w2),
                }
            )
        self.norm = w.float32(W.NORM)
        self.rope_cos = w.float32(W.ROPE_COS)
        half = spec.head_dim // 2
        self.rope_sin_signed = w.float32(W.ROPE_SIN) * np.concatenate([-np.ones(half), np.ones(half)]).astype(
            np.float32
        )
        self.embedding_rows, self.head = w.embedding_and_head()
        self.head_rotation = w.float32(W.HEAD_ROTATION) if spec.head_rotation else None
        self.ffn_rotation = w.float32(W.FFN_ROTATION) if spec.ffn_rotation else None
        self.cache_k: list[np.ndarray] = []
        self.cache_v: list[np.ndarray] = []
        self.cache_length = 0

    def reset(self, batch: int, context_length: int | None = None) -> None:
        """Empty the cache for a new batch of this many sequences, with room for context_length
        positions (default: the model's context)."""
        shape = (batch, self.spec.n_kv_head, context_length or self.spec.context_length, self.spec.head_dim)
        self.cache_k, self.cache_v, self.cache_length = [], [], 0  # first: the new cache may not fit
        self.cache_k = [cache_buffer(shape) for _ in range(self.spec.n_layer)]
        self.cache_v = [cache_buffer(shape) for _ in range(self.spec.n_layer)]

    def rewind(self, length: int) -> None:
        """Forget the cached positions from `length` on: the next forward continues after them.
        The buffers stay; positions past the cache length are never read, only overwritten."""
        assert 0 <= length <= self.cache_length
        self.cache_length = length

    @np.errstate(all="ignore")  # NaN / inf from a damaged file: sampling names it in one line, not numpy
    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, last_only: bool = False
    ) -> np.ndarray:
        """Logits (B, T, vocab) - or (B, 1, vocab) with last_only - for input_ids (B, T); extends the cache by T."""
        s = self.spec
        B, T = input_ids.shape
        P, S = self.cache_length, self.cache_length + T
        H, KV, hd = s.n_head, s.n_kv_head, s.head_dim
        G = H // KV
        if S > self.cache_k[0].shape[2]:
            raise ValueError(f"sequence of {S} tokens exceeds the cache of {self.cache_k[0].shape[2]} positions")

        causal = np.arange(S)[None, :] <= np.arange(P, S)[:, None]  # (T, S)
        allowed = causal[None, None, None] & attention_mask[:, None, None, None, :].astype(bool)  # (B, 1, 1, T, S)
        bias = np.where(allowed, np.float32(0), MASKED)
        cos = self.rope_cos[position_ids][:, :, None, :]  # (B, T, 1, hd)
        sin = self.rope_sin_signed[position_ids][:, :, None, :]

        x = self.embedding_rows(input_ids)  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer["attention_norm"], s.norm_eps)
            qkv = (layer["wqkv"](h) + layer["wqkv_bias"]).reshape(B, T, H + 2 * KV, hd)  # (B, T, H + 2KV, hd)
            qk, v = qkv[:, :, : H + KV], qkv[:, :, H + KV :]
            qk = qk * cos + np.concatenate([qk[..., hd // 2 :], qk[..., : hd // 2]], axis=-1) * sin
            q = qk[:, :, :H].transpose(0, 2, 1, 3).reshape(B, KV, G * T, hd)  # (B, KV, G * T, hd); q is pre-scaled
            self.cache_k[i][:, :, P:S] = qk[:, :, H:].transpose(0, 2, 1, 3)  # (B, KV, T, hd) into the cache
            self.cache_v[i][:, :, P:S] = v.transpose(0, 2, 1, 3)
            # the G query heads of a kv head as rows of one matmul: (B, KV) stacked 2-D products,
            # not a broadcast over a size-1 axis (numpy's slow path)
            k = self.cache_k[i][:, :, :S]  # (B, KV, S, hd)
            vv = self.cache_v[i][:, :, :S]
            scores = (q @ k.swapaxes(-1, -2)).reshape(B, KV, G, T, S) + bias  # (B, KV, G, T, S)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = (scores / scores.sum(axis=-1, keepdims=True)).reshape(B, KV, G * T, S)
            y = (probs @ vv).reshape(B, H, T, hd).transpose(0, 2, 1, 3).reshape(B, T, H * hd)  # (B, T, H * hd)
            x = x + layer["wo"](y)
            h = rms_norm(x, layer["ffn_norm"], s.norm_eps)
            gate, up = np.split(layer["w13"](h), 2, axis=-1)
            act = gate / (1 + np.exp(-gate)) * up
            if self.ffn_rotation is not None:
                act = W.rotate_blocks(act, self.ffn_rotation)
            x = x + layer["w2"](act)
        self.cache_length = S
        h = rms_norm(x[:, -1:] if last_only else x, self.norm, s.norm_eps)
        if self.head_rotation is not None:
            h = W.matmul(h, self.head_rotation)
        return self.head(h)
