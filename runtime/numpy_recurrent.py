"""Backend `numpy` for recurrent files (ModelSpec.arch "recurrent"): craft/recurrent.py in numpy.

The same interface as numpy_backend.NumpyBackend (reset, forward, cache_length), the weights read
and multiplied by the same StoredWeights, so int8 files reproduce ONNX Runtime's arithmetic.
In place of a KV-cache it keeps one state (B, dim) per layer: memory and time per token do not
grow with the context. A prefill of T tokens runs the recurrence T times, as the graph's Scan does.
"""

from __future__ import annotations

import numpy as np

from craft.runtime import weights as W
from craft.runtime.artifact import ModelSpec
from craft.runtime.numpy_backend import StoredWeights, rms_norm


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


class NumpyRecurrentBackend:
    name = "numpy"

    @np.errstate(all="ignore")  # dequantizing a damaged file's inf / NaN: reported once, by sampling
    def __init__(self, path: str, spec: ModelSpec, quantization: str):
        self.spec = spec
        w = StoredWeights(path, spec, quantization)
        self.layers = []
        for i in range(spec.n_layer):
            n = W.recurrent_layer(i)
            self.layers.append(
                {
                    "recurrence_norm": w.float32(n.recurrence_norm),
                    "win": w.linear(n.win),
                    "decay": w.float32(n.decay),
                    "wo": w.linear(n.wo),
                    "ffn_norm": w.float32(n.ffn_norm),
                    "w13": w.linear(n.w13),
                    "w2": w.linear(n.w2),
                }
            )
        self.norm = w.float32(W.NORM)
        self.embedding_rows, self.head = w.embedding_and_head()
        self.state: list[np.ndarray] = []
        self.cache_length = 0  # tokens consumed (the generator's clock; the state does not grow with it)

    def reset(self, batch: int, context_length: int | None = None) -> None:
        """A zero state per layer for this many sequences; it does not grow, whatever context_length."""
        self.state = [np.zeros((batch, self.spec.dim), np.float32) for _ in range(self.spec.n_layer)]
        self.cache_length = 0

    @np.errstate(all="ignore")  # NaN / inf from a damaged file: sampling names it in one line, not numpy
    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, last_only: bool = False
    ) -> np.ndarray:
        """Logits (B, T, vocab) - or (B, 1, vocab) with last_only - for input_ids (B, T); advances the state
        by T tokens. The last T columns of attention_mask gate it (a pad leaves a row's state as it was);
        position_ids are not used: a recurrence knows order from the state."""
        s = self.spec
        T = input_ids.shape[1]
        if self.cache_length + T > s.context_length:
            raise ValueError(
                f"sequence of {self.cache_length + T} tokens exceeds the model's context of {s.context_length}"
            )
        mask = attention_mask[:, -T:, None].astype(np.float32)  # (B, T, 1)
        x = self.embedding_rows(input_ids)  # (B, T, dim)
        new_state = []  # set with cache_length at the end: a forward interrupted (Ctrl-C) changes neither
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer["recurrence_norm"], s.norm_eps)
            a_in, v, gate = np.split(layer["win"](h), 3, axis=-1)  # (B, T, dim) each
            a = 1 / (1 + np.exp(-(a_in + layer["decay"]))) * mask + (1 - mask)  # pads: a = 1
            u = (1 - a) * v  # pads: 0
            states = np.empty_like(u)  # (B, T, dim)
            state = self.state[i]
            for t in range(T):
                state = a[:, t] * state + u[:, t]
                states[:, t] = state
            new_state.append(state)
            x = x + layer["wo"](states * silu(gate))
            h = rms_norm(x, layer["ffn_norm"], s.norm_eps)
            up_gate, up = np.split(layer["w13"](h), 2, axis=-1)
            x = x + layer["w2"](silu(up_gate) * up)
        logits = self.head(rms_norm(x, self.norm, s.norm_eps), last_only)
        self.state, self.cache_length = new_state, self.cache_length + T
        return logits
