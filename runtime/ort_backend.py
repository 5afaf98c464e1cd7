"""Backend `ort`: the .onnx graph on ONNX Runtime's CPU execution provider, with its KV-cache.

A `standard` file (craft.runtime.artifact.ATTENTIONS): each step binds the previous step's
`present.*` OrtValues as this step's `past_key_values.*` through IOBinding: the cache stays
inside ONNX Runtime, never converted to numpy or copied by Python (session.run() would copy
every output into a new numpy array); the only copy per step is the graph's own Concat (past +
new token). An `inplace` file: one (B, kv, context, hd) buffer per cache tensor, bound once as
both past and present; GroupQueryAttention writes each step's keys into it, nothing is copied.
A decode step copies its tokens and positions into buffers bound once, next to a bound logits
buffer, and binds only the attention mask. Only the logits come back to numpy.

The binding is driven through onnxruntime's pybind objects (session._sess, binding._iobinding)
when they exist: the public wrappers re-create an OrtDevice and re-validate every value on
every call, about 80 us per token here - a tenth of a decode step. The public API is the
fallback.

The file must have passed craft.runtime.artifact_check (Generator does that first): ONNX
Runtime then gets a graph whose inputs, outputs, weights and size are what the metadata says.
Whatever it still refuses - a damaged op, a bad attribute, a shape that fails at run time - is
one ArtifactError line, never ONNX Runtime's own exception; the logits it returns are checked
against the spec before anyone indexes them. The checks cover the operators, not how they are
wired, so every session allocates from one CPU arena capped at the memory available when the
first one loaded (share_capped_arena): what a crafted graph asks for beyond it is refused.
"""

from __future__ import annotations

import contextlib
import io
import os
import re

import numpy as np

from craft.runtime import artifact as A
from craft.runtime.artifact import ArtifactError, ModelSpec
from craft.runtime.estimate import available_memory_mb, usable_cpus
from craft.runtime.kv_cache import cache_buffer


def version_tuple(version: str) -> tuple[int, ...]:
    """'1.20.1' -> (1, 20, 1); a suffix such as 'dev' ends the numbers."""
    numbers = []
    for part in version.split("."):
        digits = re.match(r"[0-9]*", part).group()  # '²' is a digit to isdigit(), not to int()
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


class OnnxRuntimeMissing(ImportError, ValueError):
    """The ort backend asked for where onnxruntime is not installed (a ValueError: one line in craft-run)."""


def ort_installed() -> bool:
    """Whether onnxruntime can be imported, without importing it (which takes ~0.1 s)."""
    import importlib.util

    try:
        return importlib.util.find_spec("onnxruntime") is not None
    except (ImportError, ValueError):  # a None placeholder in sys.modules, a broken parent package
        return False


def session_source(path: str | os.PathLike) -> str | bytes:
    """What InferenceSession loads: the path, or the file's bytes where the path is not valid UTF-8
    (a name with undecodable bytes, or any non-ASCII one under LC_ALL=C): onnxruntime takes only
    paths it can encode, and raised a TypeError traceback for the rest."""
    try:
        str(path).encode("utf-8")
        return str(path)
    except UnicodeEncodeError:
        with open(path, "rb") as f:
            return f.read()


class OrtBackend:
    name = "ort"
    use_pybind = True  # False forces the public-API path (tests compare the two)

    def __init__(self, path: str, spec: ModelSpec, threads: int = 0):
        if not ort_installed():
            raise OnnxRuntimeMissing(
                "onnxruntime is not installed; pip install onnxruntime, or use --backend numpy "
                "(on 32-bit ARM, which has no onnxruntime wheel, numpy is the backend)"
            )
        import onnxruntime as ort

        self.spec, self.path = spec, path
        self._errors = ort_errors()
        opts = ort.SessionOptions()
        # 0: ONNX Runtime's default (one per physical core). More threads than this process may run on
        # only slow it down, and one it cannot start (a memory or process limit) hangs its constructor.
        opts.intra_op_num_threads = min(threads, usable_cpus())
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 4  # fatal only: a damaged file's problem is our one line, not ORT's log
        share_capped_arena(ort, opts)
        try:
            # A load that fails with ValueError / RuntimeError makes onnxruntime print an "EP Error"
            # banner to stdout (into the generated text or --json) and load the file again: kept off stdout.
            # (sys.stdout is swapped process-wide while the session builds: another thread's prints
            # in that time are lost too - there is no narrower switch for onnxruntime's own print.)
            with contextlib.redirect_stdout(io.StringIO()):
                self.session = ort.InferenceSession(session_source(path), opts, providers=["CPUExecutionProvider"])
        except self._errors as e:
            out_of_memory(e, f"to load {path}")
            if "GroupQueryAttention" in str(e) and version_tuple(ort.__version__) < version_tuple(A.ORT_INPLACE_MIN):
                raise ArtifactError(
                    f"{path} uses in-place attention (GroupQueryAttention), which this onnxruntime {ort.__version__} "
                    f"cannot run; install onnxruntime>={A.ORT_INPLACE_MIN}, use --backend numpy, or re-export with "
                    f"--attention standard"
                ) from None
            raise ArtifactError(
                f"{path}: ONNX Runtime cannot load it ({one_line(e)}); re-export it with craft-export"
            ) from None
        self.inplace = self.session.get_modelmeta().custom_metadata_map.get(A.META_ATTENTION) == A.ATTENTION_INPLACE
        if self.inplace and version_tuple(ort.__version__) < version_tuple(
            A.ORT_INPLACE_MIN
        ):  # older GQA miscomputes a chat turn's prefill
            raise ArtifactError(
                f"{path} uses in-place attention, which needs onnxruntime>={A.ORT_INPLACE_MIN} "
                f"(this is {ort.__version__}); upgrade onnxruntime, use --backend numpy, "
                "or re-export with --attention standard"
            )
        self._outputs = [A.LOGITS] + A.present_outputs(spec)  # a recurrent file's state in place of the cache
        self._inputs = list(A.empty_past(spec, 1))
        # Drive IOBinding through onnxruntime's pybind objects (session._sess, binding._iobinding)
        # when they exist, else through the public wrappers; the three calls that differ:
        binding = self.session.io_binding()
        try:
            if not self.use_pybind:
                raise AttributeError("public API requested")
            from onnxruntime.capi import _pybind_state as C

            device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
            # the closures hold the objects they call, never self: a cycle through self kept a dropped
            # Generator's session (weights, threads, cache) alive until the cyclic garbage collector ran
            sess, raw = self.session._sess, binding._iobinding
            self.binding = raw
            self._bind_array = raw.bind_input
            self._bind_output = lambda name: raw.bind_output(name, device)
            self._run = lambda: sess.run_with_iobinding(raw, None)
            self._ortvalue = lambda array: ort.OrtValue.ortvalue_from_numpy(array)._get_c_value()
        except (ImportError, AttributeError):
            self.binding = binding
            self._bind_array = binding.bind_cpu_input
            self._bind_output = lambda name: binding.bind_output(name, "cpu")
            session = self.session
            self._run = lambda: session.run_with_iobinding(binding)
            self._ortvalue = ort.OrtValue.ortvalue_from_numpy
        # logits_to_keep (format version 3 on): [1] runs the head on a step's last position alone,
        # [0] on all of them; None for an older file, whose logits always cover every position. An
        # input with a default is an "overridable initializer", which binds as an OrtValue only.
        fed = self.session.get_inputs() + self.session.get_overridable_initializers()
        self._keep = None
        if A.LOGITS_TO_KEEP in {value.name for value in fed}:
            self._keep_arrays = {last: np.array([int(last)], np.int64) for last in (False, True)}  # alive: wrapped
            self._keep = {last: self._ortvalue(array) for last, array in self._keep_arrays.items()}
        self.cache: list = []
        self.cache_length = 0

    def reset(self, batch: int, context_length: int | None = None) -> None:
        """Empty the cache for a new batch of this many sequences. An `inplace` file's buffers hold
        context_length positions (default: the model's context); a `standard` file's cache grows
        with each step (the graph's Concat) up to where the caller stops."""
        s = self.spec
        # Forget the old cache first: should the new one not fit in memory, nothing still points into it.
        self.cache_length, self.cache, self._step_bound = 0, [], False
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        if not self.inplace:  # an empty cache, or a recurrent file's zero state: every past input has this shape
            self._buffers = [
                np.zeros(next(iter(A.empty_past(s, batch).values())), np.float32)
            ]  # kept alive: the OrtValue wraps it
            self.cache = [self._ortvalue(self._buffers[0])] * len(self._inputs)
        else:  # bound here once as both past and present: every step writes into these buffers
            shape = (batch, s.n_kv_head, context_length or s.context_length, s.head_dim)
            self._buffers = []  # the old buffers unmapped before the new ones are mapped
            self._buffers = [cache_buffer(shape) for _ in range(2 * s.n_layer)]
            self.cache = [self._ortvalue(buffer) for buffer in self._buffers]
            self._bind_output(A.LOGITS)  # first, so that it stays output 0 when each step re-binds it
            for past, present, value in zip(self._inputs, self._outputs[1:], self.cache):
                self.binding.bind_ortvalue_input(past, value)
                self.binding.bind_ortvalue_output(present, value)
            # A decode step's token, position and logits live in buffers bound once (_decode_step):
            # binding fresh arrays and letting ONNX Runtime allocate the logits cost 5-7% of a 15M step.
            self._step_ids, self._step_positions = np.zeros((batch, 1), np.int64), np.zeros((batch, 1), np.int64)
            self._step_logits = np.zeros((batch, 1, s.vocab_size), np.float32)

    def rewind(self, length: int) -> None:
        """Forget the cached positions from `length` on: the next forward continues after them. An
        `inplace` file's buffers keep them (the attention mask hides them, later steps overwrite
        them); a `standard` file's cache tensors are cut, the kept part copied once."""
        assert 0 <= length <= self.cache_length and self.spec.arch != A.RECURRENT, "a state cannot be rewound"
        if not self.inplace:
            buffers = [np.ascontiguousarray(value.numpy()[:, :, :length]) for value in self.cache]
            cache = [self._ortvalue(array) for array in buffers]
            # together (no interrupt lands between two stores): the OrtValues do not keep their arrays
            # alive, so a cache must never be left wrapping buffers already let go (Ctrl-C mid-rewind)
            self._buffers, self.cache = buffers, cache
        self.cache_length = length

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, last_only: bool = False
    ) -> np.ndarray:
        """Logits (B, T, vocab) - or (B, 1, vocab) with last_only - for input_ids (B, T) after the
        cached positions; extends the cache by T. attention_mask is (B, cache_length + T) and
        position_ids (B, T), both int64. With last_only the graph computes the last position's
        logits alone (logits_to_keep) - unless the file is older than format version 3, or is an
        `inplace` file given a left-padded batch, whose rows it packs to end in different columns.
        """
        if self.inplace:
            return self._forward_inplace(input_ids, attention_mask, position_ids, last_only)
        feeds = [
            np.ascontiguousarray(a, dtype=np.int64) for a in (input_ids, attention_mask, position_ids)
        ]  # alive until run
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for name, array in zip((A.INPUT_IDS, A.ATTENTION_MASK, A.POSITION_IDS), feeds):
            self._bind_array(name, array)
        kept = self._bind_keep(last_only, input_ids.shape[1])  # left-padded: the last column is each row's last
        for name, value in zip(self._inputs, self.cache):
            b.bind_ortvalue_input(name, value)
        for name in self._outputs:
            self._bind_output(name)
        outputs, logits = self._run_checked()
        self._check_logits(logits, (input_ids.shape[0], kept), len(outputs))
        self.cache = [outputs[i] for i in range(1, len(self._outputs))]
        self.cache_length += input_ids.shape[1]
        return logits[:, -1:] if last_only else logits

    def _forward_inplace(self, input_ids, attention_mask, position_ids, last_only):
        """forward() for an `inplace` file: the cache holds each row's tokens from its start, so a
        left-padded prefill is fed packed to the left (right-padded) and its logits moved back."""
        T = input_ids.shape[1]
        if T == 1 and self.cache_length > 0 and input_ids.shape == self._step_ids.shape:
            return self._decode_step(input_ids, attention_mask, position_ids)
        self._step_bound = False  # this call binds its own token, position and logits
        lengths = attention_mask.sum(axis=1)  # (B,) valid tokens per row, cache included
        padded = self.cache_length == 0 and T > 1 and bool((lengths < T).any())
        assert padded or self.cache_length == 0 or attention_mask[:, self.cache_length :].all(), (
            "new tokens must all be real"
        )
        if padded:  # row r's tokens are its last lengths[r] columns: move them to the front
            shift = (np.arange(T)[None, :] + (T - lengths)[:, None]) % T  # (B, T)
            input_ids = np.take_along_axis(input_ids, shift, axis=1)
            attention_mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
        feeds = [
            np.ascontiguousarray(a, dtype=np.int64) for a in (input_ids, attention_mask, position_ids)
        ]  # alive until run
        for name, array in zip((A.INPUT_IDS, A.ATTENTION_MASK, A.POSITION_IDS), feeds):
            self._bind_array(name, array)
        kept = self._bind_keep(last_only and not padded, T)  # packed rows end at different columns
        self._bind_output(A.LOGITS)
        outputs, logits = self._run_checked()  # logits (B, kept, vocab)
        self._check_logits(logits, (input_ids.shape[0], kept), len(outputs))
        self.cache_length += T
        if padded:  # back to the caller's left-padded layout
            logits = np.take_along_axis(
                logits, ((np.arange(T)[None, :] - (T - lengths)[:, None]) % T)[:, :, None], axis=1
            )
        return logits[:, -1:] if last_only else logits

    def _decode_step(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        """One token per row after the cache (an `inplace` file): copied into the step buffers, which
        stay bound from one step to the next; only the attention mask, whose length is the step's
        total, is bound anew. ONNX Runtime checks the logits' shape against the bound buffer."""
        np.copyto(self._step_ids, input_ids)
        np.copyto(self._step_positions, position_ids)
        if not self._step_bound:
            self._bind_array(A.INPUT_IDS, self._step_ids)
            self._bind_array(A.POSITION_IDS, self._step_positions)
            self._bind_keep(True, 1)
            self._logits_value = self._ortvalue(self._step_logits)  # alive while bound
            self.binding.bind_ortvalue_output(A.LOGITS, self._logits_value)
            self._step_bound = True
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)  # alive until run
        self._bind_array(A.ATTENTION_MASK, mask)
        self._run_checked(fetch=False)  # into the bound buffers
        self.cache_length += 1
        return self._step_logits.copy()  # the buffer is the next step's

    def _bind_keep(self, last: bool, T: int) -> int:
        """Bind logits_to_keep where the file has it: [1] for `last`, else [0]; the positions the
        logits of a T-token step then cover per row."""
        if self._keep is None:
            return T
        self.binding.bind_ortvalue_input(A.LOGITS_TO_KEEP, self._keep[last])
        return 1 if last else T

    def _run_checked(self, fetch: bool = True) -> tuple[list, np.ndarray] | None:
        """Run the bound step; with fetch, (its outputs, the logits as numpy). Whatever ONNX Runtime
        refuses at run time (a shape that fails, a damaged op) is one ArtifactError line."""
        try:
            self._run()
            if not fetch:
                return None
            outputs = self.binding.get_outputs()
            return outputs, outputs[0].numpy()
        except self._errors as e:
            out_of_memory(e, "for this step")
            raise ArtifactError(
                f"{self.path}: ONNX Runtime cannot run it ({one_line(e)}); re-export it with craft-export"
            ) from None

    def _check_logits(self, logits: np.ndarray, rows_positions: tuple[int, int], n_outputs: int) -> None:
        B, T = rows_positions  # the batch, and the positions the logits cover
        if (
            logits.shape != (B, T, self.spec.vocab_size)
            or logits.dtype != np.float32
            or n_outputs != len(self._outputs)
        ):
            raise ArtifactError(
                f"{self.path}: its graph returned logits {logits.dtype} {logits.shape}, the model config needs "
                f"float32 {(B, T, self.spec.vocab_size)}; re-export it with craft-export"
            )


def ort_errors() -> tuple[type[BaseException], ...]:
    """What ONNX Runtime raises for a model it cannot load or run: its own exception classes
    (Fail, InvalidGraph, InvalidArgument, RuntimeException, ...: plain Exceptions), C++ errors
    pybind11 maps to RuntimeError, MemoryError for an allocation it could not make (out_of_memory), and
    UnicodeDecodeError when its message quotes a damaged name that is not UTF-8."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C
    except ImportError:
        own = ()
    else:
        own = tuple(c for c in vars(C).values() if isinstance(c, type) and issubclass(c, Exception))
    return own + (RuntimeError, MemoryError, UnicodeDecodeError)


ARENA_CAP: list[int] = []  # bytes: the cap of the arena this process registered (share_capped_arena), once


def share_capped_arena(ort, opts) -> None:
    """Make the session allocate from the process's one CPU arena, which refuses to grow past the
    memory available when the first session loaded. A crafted file of allowed operators - a Range
    whose limit a constant raised to 3e9 - asked ONNX Runtime for 24 GB at its first step, and it
    took the machine's memory for a minute; the arena refuses such a request outright (one line).
    Where the memory available is unknown, or the arena cannot be registered, sessions keep their own."""
    if not ARENA_CAP:
        available = available_memory_mb()
        if available is None:
            return
        cap = max(int(available * 2**20), 1 << 28)
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:  # max_mem; the arena's other settings at their defaults
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(cap, -1, -1, -1))
        except (AttributeError, TypeError, *ort_errors()):
            return
        ARENA_CAP.append(cap)
    opts.add_session_config_entry("session.use_env_allocators", "1")


ARENA_REFUSAL = re.compile(r"Available memory of (\d+) is smaller than requested bytes of (\d+)")


def out_of_memory(error: BaseException, doing: str) -> None:
    """Raise MemoryError where ONNX Runtime failed for want of memory (its std::bad_alloc, which
    pybind11 turns into MemoryError or quotes in its own exception, or the capped arena's refusal),
    not for a damaged file."""
    from craft.runtime.command import memory_failure  # on the error path only: the API need not load click

    refused = ARENA_REFUSAL.search(str(error))
    if refused:
        left, asked = (int(n) / 2**30 for n in refused.groups())
        raise MemoryError(
            f"ONNX Runtime was asked for {asked:,.1f} GB {doing}, more than the {left:,.1f} GB left of the memory "
            "available when the model loaded (a model or context larger than this machine holds, or a damaged file)"
        ) from None
    if memory_failure(error) or "Failed to allocate memory for requested buffer" in str(error):  # the arena's
        raise MemoryError(f"ONNX Runtime could not allocate the memory {doing}") from None


def one_line(error: BaseException, limit: int = 300) -> str:
    """ONNX Runtime's message on one line, its '[ONNXRuntimeError] : 1 : FAIL :' prefix dropped."""
    text = " ".join(str(error).split())
    text = text.split(" : ", 3)[-1] if text.startswith("[ONNXRuntimeError]") else text
    return text if len(text) <= limit else text[: limit - 3] + "..."
