"""The runtime's Python API: load a Craft .onnx file, generate text with a KV-cache.

    from craft.runtime.generator import Generator
    from craft.runtime.sampling import SamplingParams
    gen = Generator("model.int8.onnx")                       # backend "ort" (default) or "numpy"
    for piece in gen.stream("Once upon a time", SamplingParams(max_new_tokens=64, seed=0)):
        print(piece, end="", flush=True)
    print(gen.last_stats)
    greedy = SamplingParams(temperature=0)
    gen.generate("def f(x):", greedy).text                  # all at once
    gen.generate_batch(["a", "bcd"], greedy)                 # left-padded batch, one Completion each
    for piece in gen.chat([{"role": "user", "content": "Hi"}], greedy):  # the model's chat template
        print(piece, end="")

The loop: encode (BOS where the tokenizer wants one + prompt), prefill the prompt (in chunks of
PREFILL_CHUNK tokens), then one token per step against the cache; sample (sampling.py); decode
incrementally (UTF-8 safe); stop at an end-of-turn id (Artifact.stop_ids: EOS where the file
names none), a stop string, max_new_tokens or the context length - one rule (Continuation) for a
single prompt and for every row of a batch. chat() renders the conversation (chat.py) and prefills only what the
cache does not already hold. craft-run is a thin layer over this.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from craft.runtime import chat as C
from craft.runtime.artifact import RECURRENT, Artifact, ArtifactError, position_ids
from craft.runtime.artifact_check import check_file, check_unchanged, file_identity
from craft.runtime.estimate import available_memory_mb, batch_prefill_bytes, fitting_context
from craft.runtime.sampling import LogitsError, SamplingParams, is_int, sample_next
from craft.runtime.tokenizer import TextStream, Tokenizer, tokenizer_from_bytes

BACKENDS = ("ort", "numpy")
MAX_THREADS = 1024  # more than any CPU this runs on has; ONNX Runtime would try to start them all
MAX_CHARS_PER_TOKEN = 64  # more than any real tokenizer's piece averages: a longer prompt cannot fit the context
PREFILL_CHUNK = 64  # prompt tokens per forward of a single prompt: bounds a prefill's memory (_prefill)
MIN_DEFAULT_CONTEXT = (
    256  # the memory cap never goes below this: a model that needs less cache to fit does not fit anyway
)
EOS, STOP_STRING, MAX_NEW_TOKENS, CONTEXT_LENGTH = "eos", "stop_string", "max_new_tokens", "context_length"
STOPPED = "stopped"  # the caller stopped reading, Ctrl-C or an error ended the stream first


class GenerationError(ValueError):
    """A request the model cannot serve (e.g. a prompt longer than its context); one line with the fix."""


class CacheReplaced(RuntimeError):
    """A paused generation whose KV-cache another call on the same Generator has since replaced."""


@dataclass
class Stats:
    backend: str
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens already in the cache from the previous chat turn: not prefilled again
    generated_tokens: int = 0
    load_s: float = 0.0  # reading the file and creating the backend
    time_to_first_token_s: float = 0.0  # from the call to the first sampled token (encode + prefill + sample)
    prefill_ms: float = 0.0
    decode_tokens_per_s: float = 0.0  # tokens after the first, per second of decoding
    stop_reason: str = ""  # eos | stop_string | max_new_tokens | context_length | stopped (ended early)
    peak_rss_mb: float = 0.0  # the process's peak resident memory so far

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    stats: Stats = field(repr=False)


def decode_rate(tokens: int, t_first: float | None) -> float:
    """Tokens (or batch steps) per second after the first, which the prefill made; 0.0 for fewer than two."""
    if t_first is None or tokens < 2:
        return 0.0
    return (tokens - 1) / max(time.perf_counter() - t_first, 1e-9)


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM, which exec() resets - unlike
    ru_maxrss, which keeps the peak of the process that forked us (a big test runner, say)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def check_model_path(path) -> None:
    """TypeError or ArtifactError (one line) for what is not a file name: os.stat's own errors for an
    int, bytes, None, a NUL byte or an unpaired surrogate named neither the argument nor the fix."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        hint = "; os.fsdecode(path) makes one of bytes" if isinstance(path, bytes) else ""
        raise TypeError(f"a model path is a str or os.PathLike, got {type(path).__name__}{hint}")
    name = os.fspath(path)
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        raise ArtifactError(f"{name!r:.200} is not a file name: it holds an unpaired surrogate") from None
    if "\0" in name:
        raise ArtifactError(f"{name!r:.200} is not a file name: it holds a NUL character") from None


def load_artifact(path: str | Path) -> Artifact:
    """The file's Craft metadata, checked against the file itself (craft.runtime.artifact_check);
    ArtifactError (one line) for anything else."""
    return check_file(path)


def load_tokenizer(artifact: Artifact, path: str | Path) -> Tokenizer:
    """The tokenizer in the file's metadata; ArtifactError (one line) where it does not load or
    does not fit the model."""
    try:
        tokenizer = tokenizer_from_bytes(artifact.tokenizer_kind, artifact.tokenizer_data)
    except (ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path}: the tokenizer in its metadata does not load ({e}); re-export it") from None
    if tokenizer.vocab_size > artifact.spec.vocab_size:
        raise ArtifactError(
            f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{artifact.spec.vocab_size}; re-export it from a consistent run directory"
        )
    return tokenizer


def check_sampling(sampling) -> None:
    if not isinstance(sampling, SamplingParams):
        got = type(sampling).__name__
        raise TypeError(f"sampling must be a SamplingParams, got {got} (SamplingParams(**it) makes one)")


class Continuation:
    """One prompt's continuation as its tokens arrive: the one stop rule of stream() and of every
    row of generate_batch().

    feed(token) returns the text that is final (possibly ""): decoded incrementally (UTF-8
    safe), holding back the last characters while they may begin a stop string. The row is
    done at an end-of-turn id / EOS (not kept) or when its text produces a stop string: the text is cut before it,
    token_ids keep the token that completed it. finish() returns the rest of the text.
    strip_space: the text is decoded as a text of its own (a chat reply): a sentencepiece-style
    tokenizer's leading space is dropped, as its decode() (and transformers') drops it.
    """

    def __init__(self, tokenizer: Tokenizer, stop_ids: Sequence[int], stop: Sequence[str], strip_space: bool = False):
        self.text_stream, self.stop_ids, self.stop = TextStream(tokenizer), frozenset(stop_ids), stop
        self.strip_space = strip_space and getattr(tokenizer, "strips_leading_space", False)
        self.hold = max((len(s) for s in stop), default=1) - 1  # chars kept back: they may begin a stop string
        self.pending = ""
        self.token_ids: list[int] = []
        self.stop_reason = ""  # set when done: eos | stop_string (or by finish)

    def feed(self, token: int) -> str:
        if token in self.stop_ids:
            self.stop_reason = EOS
            return ""
        self.token_ids.append(token)
        before = len(self.pending)
        piece = self.text_stream.feed(token)
        if self.strip_space and piece:  # the first text only
            piece, self.strip_space = piece.removeprefix(" "), False
        self.pending += piece
        # a stop string new here ends in the new text: searched from there (the whole held text per
        # token and stop string was quadratic with many or long stop strings)
        hits = [i for i in (self.pending.find(s, max(0, before - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            self.stop_reason = STOP_STRING
            self.pending = self.pending[: min(hits)]
            return ""
        if len(self.pending) <= self.hold:
            return ""
        final, self.pending = (
            self.pending[: len(self.pending) - self.hold],
            self.pending[len(self.pending) - self.hold :],
        )
        return final

    def finish(self, max_new_tokens: int) -> str:
        """The held-back text; a row not done by EOS or a stop string ran out of tokens or context.
        Bytes of an unfinished character are U+FFFD, as the tokenizer's decode gives them (at EOS too)."""
        if not self.stop_reason:
            self.stop_reason = MAX_NEW_TOKENS if len(self.token_ids) >= max_new_tokens else CONTEXT_LENGTH
        if self.stop_reason != STOP_STRING:  # a stop string cut the text before what follows it
            self.pending += self.text_stream.finish()
        rest, self.pending = self.pending, ""
        return rest


class Generator:
    """A loaded model. max_context caps the KV-cache at that many positions (at most the model's
    context); None: the model's context, cut to what fits this machine's available memory by
    estimate.py's arithmetic (self.memory_capped says it was cut)."""

    def __init__(self, path: str | Path, backend: str = "ort", threads: int = 0, max_context: int | None = None):
        t0 = time.perf_counter()
        if backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
        if not is_int(threads) or not 0 <= threads <= MAX_THREADS:
            raise ValueError(
                f"--threads must be in 0..{MAX_THREADS} (an integer; 0: the backend's default), got {threads!r}"
            )
        check_model_path(path)
        identity = file_identity(path)
        self.artifact = load_artifact(path)  # the path as given: Path("") would be "."
        self.path = Path(path)
        self.spec = self.artifact.spec
        self.tokenizer = load_tokenizer(self.artifact, path)
        self.context_length, self.memory_capped = self._context(backend, max_context)  # before the weights take memory
        try:
            self.backend = self._load_backend(backend, threads)
        except ArtifactError:
            check_unchanged(path, identity)  # the backend read another file than the one checked
            raise
        check_unchanged(path, identity)
        self.cached_ids: list[int] = []  # the tokens in the cache (batch 1); chat() reuses them
        self._generation = 0  # counts generations: the cache belongs to the latest (_token_steps)
        # The thread generating and its open generations (_claimed): one Generator, one thread. A count, not
        # a lock held for the generation: a stream may end in another thread than its first step (a thread
        # pool stepping it, the garbage collector), and only a lock's owner may release it. The lock below
        # only guards the two; re-entrant, as a stream's release may run in the garbage collector inside it.
        self._claim_lock = threading.RLock()
        self._owner: int | None = None
        self._claims = 0
        self._stepping = threading.Lock()  # held while a generation runs the backend (between its yields)
        self.load_s = time.perf_counter() - t0
        self.last_stats: Stats | None = None

    def _load_backend(self, backend: str, threads: int):
        if backend == "ort":
            from craft.runtime.ort_backend import OrtBackend

            return OrtBackend(str(self.path), self.spec, threads)
        if self.spec.arch == RECURRENT:
            from craft.runtime.numpy_recurrent import NumpyRecurrentBackend

            return NumpyRecurrentBackend(str(self.path), self.spec, self.artifact.quantization)
        from craft.runtime.numpy_backend import NumpyBackend

        return NumpyBackend(str(self.path), self.spec, self.artifact.quantization)

    def _context(self, backend: str, max_context: int | None) -> tuple[int, bool]:
        """The KV-cache length to use, and whether available memory cut it below the model's."""
        model = self.spec.context_length
        if max_context is not None:
            if not is_int(max_context) or not 1 <= max_context <= model:
                raise ValueError(
                    f"--max-context must be in 1..{model} (an integer; the model's context), got {max_context!r}"
                )
            return max_context, False
        available = available_memory_mb()
        if available is None:
            return model, False
        fits = max(
            fitting_context(self.artifact, self.path.stat().st_size, backend, available),
            min(model, MIN_DEFAULT_CONTEXT),
        )
        return min(model, fits), fits < model

    # prompt -----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, max_new_tokens: int, truncate: bool = False) -> list[int]:
        """(BOS +) the prompt's tokens, checked against the context length (or cut with truncate)."""
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt is text (str), got {type(prompt).__name__}")
        if not isinstance(truncate, (bool, np.bool_)):  # "no" would be true
            raise TypeError(f"truncate must be True or False, got {truncate!r}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: undecodable bytes smuggled in (surrogateescape)
            raise GenerationError(
                f"the prompt is not valid UTF-8 text (character {e.start} is a lone surrogate); pass UTF-8 text"
            ) from None
        limit = self.context_length * MAX_CHARS_PER_TOKEN
        if len(prompt) > limit:  # cannot fit: refuse (or cut) before tokenizing megabytes into gigabytes
            if not truncate:
                raise GenerationError(
                    f"the prompt is {len(prompt):,} characters, more than a context of {self.context_length} tokens "
                    f"can hold (at {MAX_CHARS_PER_TOKEN} characters a token); shorten it or pass --truncate "
                    "(keeps its end)"
                )
            prompt = prompt[-limit:]
        bos = [self.artifact.bos_id] if self.tokenizer.add_bos else []
        ids = bos + self.tokenizer.encode(prompt)
        if not ids:  # a tokenizer without BOS (most imports) and an empty prompt: nothing to continue
            what = "is empty" if not prompt else "encodes to no tokens"
            raise GenerationError(f"the prompt {what} and this model adds no BOS token; give it some text")
        ctx = self.context_length
        if len(ids) <= ctx:
            return ids
        if not truncate:
            raise GenerationError(
                f"the prompt is {len(ids)} tokens but {self._context_text()}; "
                f"shorten it or pass --truncate (keeps its end)"
            )
        # Room for the new tokens that are fed back (the last one never is), at most half the context;
        # at least one token of the prompt, after BOS where it fits (a context of 2 kept BOS alone).
        keep = ctx - min(max(max_new_tokens - 1, 0), ctx // 2)
        body = max(keep - len(bos), 1)
        return (bos if body + len(bos) <= ctx else []) + ids[len(ids) - body :]

    def _context_text(self) -> str:
        if self.context_length == self.spec.context_length:
            return f"the model's context is {self.context_length}"
        return f"the context is {self.context_length} (--max-context; the model's is {self.spec.context_length})"

    # generation -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _claimed(self) -> Iterator[None]:
        """This Generator for the calling thread until its generation ends (re-entrant: a second stream
        in the same thread replaces the first's cache, which then raises CacheReplaced). Another thread
        is refused: two threads in one ONNX Runtime IOBinding corrupted the heap (double free, abort),
        and a refused one must touch nothing - not the cache, not last_stats."""
        me = threading.get_ident()
        with self._claim_lock:
            if self._claims and self._owner != me:
                raise GenerationError(
                    "this Generator is generating in another thread; a Generator is not thread-safe - use one per "
                    "thread"
                )
            self._owner, self._claims = me, self._claims + 1
        try:
            yield
        finally:  # in whichever thread the generation ends
            with self._claim_lock:
                self._claims -= 1
                if not self._claims:
                    self._owner = None

    def _token_steps(
        self, batch: list[list[int]], params: SamplingParams, stats: Stats, t0: float, cached: int = 0
    ) -> Iterator[list[int]]:
        """Yield, per step, the next token of every row (left-padded batch, one RNG per row seeded alike).
        cached: a single row's first tokens that are already in the cache (self.cached_ids): not prefilled again.

        Each step runs holding self._stepping. A stream may be stepped in another thread than the one
        that started it (a thread pool's worker), so the claim's owner thread could start a second
        generation while that step ran: the two in one backend at once corrupted the heap (ONNX Runtime)
        or the text (numpy). Whichever comes second is refused before it touches anything."""
        steps = self._unguarded_steps(batch, params, stats, t0, cached)
        while True:
            if not self._stepping.acquire(blocking=False):
                raise GenerationError(
                    "another generation on this Generator is running a step in another thread; a Generator "
                    "is not thread-safe - finish one stream before the next, or use one Generator per thread"
                )
            try:
                tokens = next(steps, None)
            finally:
                self._stepping.release()
            if tokens is None:
                return
            yield tokens

    def _unguarded_steps(
        self, batch: list[list[int]], params: SamplingParams, stats: Stats, t0: float, cached: int
    ) -> Iterator[list[int]]:
        max_new_tokens = params.max_new_tokens
        if max_new_tokens == 0:
            return
        self._generation = generation = self._generation + 1  # the cache is this call's from here
        B, width = len(batch), max(len(ids) for ids in batch)
        if width == 0:  # e.g. a chat template that renders nothing: there is no position to continue from
            raise GenerationError("the prompt encodes to no tokens: there is nothing to continue")
        pad = self.artifact.pad_id
        input_ids = np.array([[pad] * (width - len(ids)) + ids for ids in batch], dtype=np.int64)  # (B, width)
        mask = np.array([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], dtype=np.int64)
        positions = position_ids(mask)  # left padding: the first real token is position 0
        rngs = [np.random.default_rng(params.seed) for _ in range(B)]
        history = [np.array(ids, dtype=np.int64) for ids in batch]
        if cached:
            assert B == 1 and 0 < cached < width and self.cached_ids[:cached] == batch[0][:cached]
            if cached < self.backend.cache_length:
                self.backend.rewind(cached)
        else:
            self.cached_ids = []  # first: a reset that fails (no memory for the cache) leaves nothing to reuse
            self.backend.reset(B, self.context_length)
        self.cached_ids = batch[0][:cached]  # follows the backend's cache at every step, whatever interrupts us
        t = time.perf_counter()
        logits = self._prefill(input_ids, mask, positions, cached)  # (B, vocab)
        if any(row.max() == row.min() for row in logits):  # NaN compares unequal: sample_next refuses it
            raise LogitsError("are all equal (every token as likely as the next)")
        self.cached_ids = list(batch[0]) if B == 1 else []
        stats.prefill_ms = (time.perf_counter() - t) * 1e3
        # Decode-step inputs, allocated once: the mask grows by a column of ones per step (a view
        # of full_mask), the new tokens and their positions are written in place. As wide as this
        # call can reach, not the context: a recurrent file may declare millions of positions.
        full_mask = np.ones((B, min(self.context_length, width + max_new_tokens)), np.int64)
        full_mask[:, :width] = mask
        step_ids = np.empty((B, 1), np.int64)
        step_pos = positions[:, -1:] + 1  # (B, 1)
        penalize = params.repetition_penalty != 1.0
        for step in range(max_new_tokens):
            tokens = [sample_next(logits[r], params, rngs[r], history[r] if penalize else None) for r in range(B)]
            if step == 0:
                stats.time_to_first_token_s = time.perf_counter() - t0
            yield tokens
            if self._generation != generation:  # another stream on this Generator reset the cache meanwhile
                raise CacheReplaced(
                    "another generation on this Generator started while this one was paused, and replaced its "
                    "KV-cache; finish (or close) one stream before starting the next, or use one Generator each"
                )
            length = self.backend.cache_length + 1
            if step == max_new_tokens - 1 or length > self.context_length:
                return
            if penalize:
                history = [np.append(h, tok) for h, tok in zip(history, tokens)]
            step_ids[:, 0] = tokens
            logits = self.backend.forward(step_ids, full_mask[:, :length], step_pos, last_only=True)[:, -1]
            if B == 1:
                self.cached_ids.append(tokens[0])
            step_pos += 1

    def _prefill(self, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, start: int) -> np.ndarray:
        """Feed input_ids (B, width) after their first `start` cached columns; the last position's
        logits (B, vocab). One row goes in chunks of PREFILL_CHUNK tokens: whatever a forward holds
        per fed token (activations, attention scores; vocab floats of logits each where the graph
        computes every position's: a file older than format version 3) then stays bounded for any
        prompt - unchunked, a 4,000-token prompt to a 49k-vocabulary version 2 file held 790 MB of
        logits. A left-padded batch goes in whole (an in-place file packs its rows in one call, and
        computes every position's logits then)."""
        width = input_ids.shape[1]
        chunk = PREFILL_CHUNK if input_ids.shape[0] == 1 else width
        for begin in range(start, width, chunk):
            end = min(begin + chunk, width)
            logits = self.backend.forward(
                input_ids[:, begin:end], mask[:, :end], positions[:, begin:end], last_only=True
            )
            if input_ids.shape[0] == 1:
                self.cached_ids = input_ids[0, :end].tolist()  # what the cache holds, should the next chunk fail
        return logits[:, -1]

    def stream(
        self, prompt: str, sampling: SamplingParams = SamplingParams(), *, truncate: bool = False
    ) -> Iterator[str]:
        """Yield the completion's text piece by piece as tokens are produced; stats in self.last_stats,
        its token ids in self.last_token_ids. truncate: keep the end of a prompt longer than the context."""
        t0 = time.perf_counter()
        check_sampling(sampling)
        ids = self.encode_prompt(prompt, sampling.max_new_tokens, truncate)
        yield from self._stream_ids(ids, sampling, t0)

    def _stream_ids(self, ids: list[int], sampling: SamplingParams, t0: float, chat: bool = False) -> Iterator[str]:
        """chat: reuse the cache's prefix of ids (decided under the claim: another thread's generation may
        have replaced the cache since ids were rendered) and treat the text as a reply (Continuation)."""
        with self._claimed():
            yield from self._stream_claimed(ids, sampling, t0, self._reusable(ids) if chat else 0, chat)

    def _complete(self, ids: list[int], sampling: SamplingParams, t0: float, chat: bool = False) -> Completion:
        """_stream_ids joined, with this generation's ids and stats: read under the same claim, as
        last_token_ids / last_stats may be another thread's once it is released."""
        with self._claimed():
            text = "".join(self._stream_ids(ids, sampling, t0, chat))
            return Completion(text, list(self.last_token_ids), self.last_stats)

    def _reusable(self, ids: list[int]) -> int:
        """How many of ids' first tokens the cache already holds (chat.reusable_prefix)."""
        rewinds = self.spec.arch != RECURRENT  # a recurrent state cannot forget its last tokens
        return C.reusable_prefix(self.cached_ids, ids, self.backend.cache_length, rewinds)

    def _stream_claimed(
        self, ids: list[int], sampling: SamplingParams, t0: float, cached: int, reply: bool
    ) -> Iterator[str]:
        stats = self.last_stats = Stats(
            self.backend.name, prompt_tokens=len(ids), reused_tokens=cached, load_s=self.load_s
        )
        row = Continuation(self.tokenizer, self.artifact.stop_ids, sampling.stop, strip_space=reply)
        self.last_token_ids = row.token_ids
        t_first = None
        try:
            for (token,) in self._token_steps([ids], sampling, stats, t0, cached):
                t_first = t_first or time.perf_counter()
                piece = row.feed(token)
                if piece:
                    yield piece
                if row.stop_reason:
                    break
            rest = row.finish(sampling.max_new_tokens)
            if rest:
                yield rest
        finally:  # stopped early too (closed, Ctrl-C, an error): the figures of what was generated
            stats.stop_reason, stats.generated_tokens = row.stop_reason or STOPPED, len(row.token_ids)
            stats.decode_tokens_per_s = decode_rate(stats.generated_tokens, t_first)
            stats.peak_rss_mb = peak_rss_mb()

    def generate(
        self, prompt: str, sampling: SamplingParams = SamplingParams(), *, truncate: bool = False
    ) -> Completion:
        """The whole completion at once (same arguments as stream)."""
        t0 = time.perf_counter()
        check_sampling(sampling)
        return self._complete(self.encode_prompt(prompt, sampling.max_new_tokens, truncate), sampling, t0)

    def generate_batch(
        self, prompts: Sequence[str], sampling: SamplingParams = SamplingParams(), *, truncate: bool = False
    ) -> list[Completion]:
        """Several prompts in one left-padded batch; row i equals generate(prompts[i], same arguments),
        except that the rows share one cache as wide as the longest prompt: every row stops (context_length)
        when that one reaches the context. A quantized file's rows may round differently than alone."""
        t0 = time.perf_counter()
        check_sampling(sampling)
        if isinstance(prompts, str):  # a str is a sequence too: of one-character prompts
            raise TypeError("generate_batch takes a list of prompts, got one str; generate() takes one prompt")
        if isinstance(prompts, (bytes, dict, set, frozenset)) or not isinstance(prompts, Iterable):  # no order
            raise TypeError(f"generate_batch takes a list of prompts, got {type(prompts).__name__}")
        prompts = list(prompts)  # an iterator, a numpy array of str
        if not prompts:
            return []
        batch = [self.encode_prompt(p, sampling.max_new_tokens, truncate) for p in prompts]
        self._check_batch_memory(batch)
        with self._claimed():
            return self._batch_claimed(batch, sampling, t0)

    def _check_batch_memory(self, batch: list[list[int]]) -> None:
        """GenerationError, before anything is allocated, where the batch's prefill would not fit in the
        memory left (1,000 prompts took 2.5 GB for a 1 MB model; the default context fits one row)."""
        available = available_memory_mb()
        width = max(map(len, batch))
        need = batch_prefill_bytes(self.artifact, len(batch), width, self.context_length) / 2**20
        if available is not None and need > available:
            raise GenerationError(
                f"a batch of {len(batch):,} prompts of up to {width:,} tokens needs about {need:,.0f} MB (KV-cache "
                f"and prefill), more than the {max(available, 0):,.0f} MB available; pass fewer or shorter prompts"
            )

    def _batch_claimed(self, batch: list[list[int]], sampling: SamplingParams, t0: float) -> list[Completion]:
        stats = Stats(self.backend.name, prompt_tokens=sum(map(len, batch)), load_s=self.load_s)
        rows = [Continuation(self.tokenizer, self.artifact.stop_ids, sampling.stop) for _ in batch]
        texts = [""] * len(batch)
        t_first, steps = None, 0
        for step_tokens in self._token_steps(batch, sampling, stats, t0):
            t_first, steps = t_first or time.perf_counter(), steps + 1
            for r, token in enumerate(step_tokens):
                if not rows[r].stop_reason:
                    texts[r] += rows[r].feed(token)
            if all(row.stop_reason for row in rows):
                break
        out = []
        for r, row in enumerate(rows):
            text = texts[r] + row.finish(sampling.max_new_tokens)
            row_stats = Stats(
                **{
                    **stats.to_dict(),
                    "prompt_tokens": len(batch[r]),
                    "generated_tokens": len(row.token_ids),
                    "stop_reason": row.stop_reason,
                    "decode_tokens_per_s": decode_rate(steps, t_first),  # steps per second, every row at once
                    "peak_rss_mb": peak_rss_mb(),
                }
            )
            out.append(Completion(text, row.token_ids, row_stats))
        self.last_stats = out[-1].stats
        return out

    # chat -------------------------------------------------------------------------------------
    def chat(self, messages: Sequence[dict], sampling: SamplingParams = SamplingParams(), **variables) -> Iterator[str]:
        """Yield the assistant's reply to `messages` (dicts with "role" and "content") piece by piece,
        as stream() does; the prompt is the model's chat template (chat.py). The tokens already in
        the cache from the previous call - the conversation so far - are not prefilled again: a turn
        costs only its new tokens. `variables` go to the template (tools, documents, ...)."""
        t0 = time.perf_counter()
        # the reply as a text of its own: Llama-2 / Mistral-style tokenizers' leading space dropped (as
        # transformers decodes it), so that the history re-renders to the tokens the model produced
        yield from self._stream_ids(self._chat_ids(messages, sampling, variables), sampling, t0, chat=True)

    def _chat_ids(self, messages: Sequence[dict], sampling: SamplingParams, variables: dict) -> list[int]:
        """The conversation's prompt ids through the chat template, checked against the context."""
        check_sampling(sampling)
        if not isinstance(messages, (list, tuple)):
            raise TypeError(f"messages must be a list of dicts ('role', 'content'), got {type(messages).__name__}")
        turns = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
        fix = "start a new conversation" if len(turns) > 1 else "shorten the message"
        chars = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
        if chars > self.context_length * MAX_CHARS_PER_TOKEN:  # cannot fit: refuse before rendering megabytes
            raise C.ContextFull(
                f"the conversation is {chars:,} characters, more than a context of {self.context_length} tokens "
                f"can hold (at {MAX_CHARS_PER_TOKEN} characters a token); {fix}"
            )
        ids = C.chat_ids(self.artifact, self.tokenizer, messages, **variables)
        if len(ids) >= self.context_length:
            raise C.ContextFull(f"the conversation is {len(ids)} tokens but {self._context_text()}; {fix}")
        return ids

    def generate_chat(
        self, messages: Sequence[dict], sampling: SamplingParams = SamplingParams(), **variables
    ) -> Completion:
        """The whole reply at once (same arguments as chat)."""
        t0 = time.perf_counter()
        return self._complete(self._chat_ids(messages, sampling, variables), sampling, t0, chat=True)
