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
    use_pybind = True  # False forces the public-API path (tests compare the two)

    def __init__(self, path: str, spec: ModelSpec, threads: int = 0):
        import onnxruntime as ort

        self.spec = spec
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per physical core)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._outputs = [A.LOGITS] + [n for i in range(spec.n_layer) for n in A.present_names(i)]
        self._inputs = [n for i in range(spec.n_layer) for n in A.past_names(i)]
        # Drive IOBinding through onnxruntime's pybind objects (session._sess, binding._iobinding)
        # when they exist, else through the public wrappers; the three calls that differ:
        binding = self.session.io_binding()
        try:
            if not self.use_pybind:
                raise AttributeError("public API requested")
            from onnxruntime.capi import _pybind_state as C

            device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
            sess, self.binding = self.session._sess, binding._iobinding
            self._bind_array = self.binding.bind_input
            self._bind_output = lambda name: self.binding.bind_output(name, device)
            self._run = lambda: sess.run_with_iobinding(self.binding, None)
            self._ortvalue = lambda array: ort.OrtValue.ortvalue_from_numpy(array)._get_c_value()
        except (ImportError, AttributeError):
            self.binding = binding
            self._bind_array = binding.bind_cpu_input
            self._bind_output = lambda name: binding.bind_output(name, "cpu")
            self._run = lambda: self.session.run_with_iobinding(binding)
            self._ortvalue = ort.OrtValue.ortvalue_from_numpy
        self.cache: list = []
        self.cache_length = 0

    def reset(self, batch: int) -> None:
        """Empty the cache for a new batch of this many sequences."""
        self._empty = np.zeros((batch, self.spec.n_kv_head, 0, self.spec.head_dim), np.float32)  # kept alive: the OrtValue wraps it
        self.cache = [self._ortvalue(self._empty)] * (2 * self.spec.n_layer)
        self.cache_length = 0

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        """Logits (B, T, vocab) - or (B, 1, vocab) with last_only - for input_ids (B, T) after the
        cached positions; extends the cache by T. attention_mask is (B, cache_length + T) and
        position_ids (B, T), both int64.
        """
        feeds = [np.ascontiguousarray(a, dtype=np.int64) for a in (input_ids, attention_mask, position_ids)]  # alive until run
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for name, array in zip((A.INPUT_IDS, A.ATTENTION_MASK, A.POSITION_IDS), feeds):
            self._bind_array(name, array)
        for name, value in zip(self._inputs, self.cache):
            b.bind_ortvalue_input(name, value)
        for name in self._outputs:
            self._bind_output(name)
        self._run()
        outputs = b.get_outputs()
        logits = outputs[0].numpy()
        self.cache = [outputs[i] for i in range(1, len(self._outputs))]
        self.cache_length += input_ids.shape[1]
        return logits[:, -1:] if last_only else logits
