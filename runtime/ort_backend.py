"""Backend `ort`: the .onnx graph on ONNX Runtime's CPU execution provider, with its KV-cache.

Each step binds the previous step's `present.*` OrtValues as this step's `past_key_values.*`
through IOBinding: the cache stays inside ONNX Runtime, never converted to numpy or copied by
Python (session.run() would copy every output into a new numpy array); the only copy per step
is the graph's own Concat (past + new token). Only the logits come back to numpy.

The binding is driven through onnxruntime's pybind objects (session._sess, binding._iobinding)
when they exist: the public wrappers re-create an OrtDevice and re-validate every value on
every call, about 80 us per token here - a tenth of a decode step. The public API is the
fallback.
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
        self._outputs = [A.LOGITS] + [n for i in range(spec.n_layer) for n in A.present_names(i)]
        self._inputs = [n for i in range(spec.n_layer) for n in A.past_names(i)]
        binding = self.session.io_binding()
        try:  # the pybind layer under the public wrappers (see module docstring)
            from onnxruntime.capi import _pybind_state as C

            self._fast = (self.session._sess, binding._iobinding, C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0))
            self._empty = lambda a: self._ort.OrtValue.ortvalue_from_numpy(a)._get_c_value()
        except (ImportError, AttributeError):
            self._fast = None
            self._empty = self._ort.OrtValue.ortvalue_from_numpy
        self.binding = binding
        self.cache: list = []
        self.cache_length = 0

    def reset(self, batch: int) -> None:
        """Empty the cache for a new batch of this many sequences."""
        self._keep = np.zeros((batch, self.spec.n_kv_head, 0, self.spec.head_dim), np.float32)
        self.cache = [self._empty(self._keep)] * (2 * self.spec.n_layer)
        self.cache_length = 0

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        """Logits (B, T, vocab) - or (B, 1, vocab) with last_only - for input_ids (B, T) after the
        cached positions; extends the cache by T. attention_mask is (B, cache_length + T) and
        position_ids (B, T), both int64.
        """
        feeds = [np.ascontiguousarray(a, dtype=np.int64) for a in (input_ids, attention_mask, position_ids)]  # alive until run
        if self._fast is not None:
            sess, b, device = self._fast
            b.clear_binding_inputs()
            b.clear_binding_outputs()
            for name, array in zip((A.INPUT_IDS, A.ATTENTION_MASK, A.POSITION_IDS), feeds):
                b.bind_input(name, array)
            for name, value in zip(self._inputs, self.cache):
                b.bind_ortvalue_input(name, value)
            for name in self._outputs:
                b.bind_output(name, device)
            sess.run_with_iobinding(b, None)
            outputs = b.get_outputs()
            logits = outputs[0].numpy()
            self.cache = [outputs[i] for i in range(1, len(self._outputs))]
        else:
            b = self.binding
            b.clear_binding_inputs()
            b.clear_binding_outputs()
            for name, array in zip((A.INPUT_IDS, A.ATTENTION_MASK, A.POSITION_IDS), feeds):
                b.bind_cpu_input(name, array)
            for name, value in zip(self._inputs, self.cache):
                b.bind_ortvalue_input(name, value)
            for name in self._outputs:
                b.bind_output(name, "cpu")
            self.session.run_with_iobinding(b)
            logits, *self.cache = b.get_outputs()
            logits = logits.numpy()
        self.cache_length += input_ids.shape[1]
        return logits[:, -1:] if last_only else logits
