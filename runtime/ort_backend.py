"""Backend `ort`: the .onnx graph on ONNX Runtime's CPU execution provider, with its KV-cache.

Each step binds the previous step's `present.*` OrtValues as this step's `past_key_values.*`
through IOBinding: the cache stays inside ONNX Runtime, never converted to numpy or copied by
Python; the only copy per step is the graph's own Concat (past + new token). Only the logits
come back to numpy.
"""

from __future__ import annotations

import numpy as np

from craft.runtime import artifact as A
from craft.runtime.artifact import ModelSpec


class OrtBackend:
    name = "ort"

    def __init__(self, path: str, spec: ModelSpec, threads: int = 0):
        import onnxruntime as ort

        self.spec = spec
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per physical core)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._ort = ort
        self.binding = self.session.io_binding()
        self._past_names = [n for i in range(spec.n_layer) for n in A.past_names(i)]
        self._present_names = [n for i in range(spec.n_layer) for n in A.present_names(i)]
        self.cache: list | None = None
        self.cache_length = 0

    def reset(self, batch: int) -> None:
        """Empty the cache for a new sequence batch of this size."""
        empty = np.zeros((batch, self.spec.n_kv_head, 0, self.spec.head_dim), np.float32)
        value = self._ort.OrtValue.ortvalue_from_numpy(empty)
        self.cache = [value] * (2 * self.spec.n_layer)
        self.cache_length = 0

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        """Logits (B, T, vocab) - or (B, 1, vocab) with last_only - for input_ids (B, T) after the
        cached positions; extends the cache by T. attention_mask is (B, cache_length + T) and
        position_ids (B, T), both int64.
        """
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        feeds = [np.ascontiguousarray(a, dtype=np.int64) for a in (input_ids, attention_mask, position_ids)]  # alive until run
        for name, array in zip((A.INPUT_IDS, A.ATTENTION_MASK, A.POSITION_IDS), feeds):
            b.bind_cpu_input(name, array)
        for name, value in zip(self._past_names, self.cache):
            b.bind_ortvalue_input(name, value)
        b.bind_output(A.LOGITS, "cpu")
        for name in self._present_names:
            b.bind_output(name, "cpu")
        self.session.run_with_iobinding(b)
        logits, *self.cache = b.get_outputs()
        self.cache_length += input_ids.shape[1]
        logits = logits.numpy()
        return logits[:, -1:] if last_only else logits
