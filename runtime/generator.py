"""The runtime's Python API: load a Craft .onnx file, generate text with a KV-cache.

    from craft.runtime.generator import Generator
    gen = Generator("model.int8.onnx")                       # backend "ort" (default) or "numpy"
    for piece in gen.stream("Once upon a time", max_new_tokens=64, seed=0):
        print(piece, end="", flush=True)
    print(gen.last_stats)
    gen.generate("def f(x):", temperature=0).text            # greedy
    gen.generate_batch(["a", "bcd"], temperature=0)          # left-padded batch, one Completion each

The loop: encode (BOS + prompt), prefill the whole prompt once, then one token per step
against the cache; sample (sampling.py); decode incrementally (UTF-8 safe); stop at EOS, a
stop string, max_new_tokens or the model's context length. craft-run is a thin layer over this.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from craft.runtime.artifact import Artifact, ArtifactError, position_ids
from craft.runtime.onnx_file import OnnxFormatError, read_metadata
from craft.runtime.sampling import SamplingParams, sample_next
from craft.runtime.tokenizer import TextStream, tokenizer_from_bytes

BACKENDS = ("ort", "numpy")
EOS, STOP_STRING, MAX_NEW_TOKENS, CONTEXT_LENGTH = "eos", "stop_string", "max_new_tokens", "context_length"


class GenerationError(ValueError):
    """A request the model cannot serve (e.g. a prompt longer than its context); one line with the fix."""


@dataclass
class Stats:
    backend: str
    prompt_tokens: int = 0
    generated_tokens: int = 0
    load_s: float = 0.0  # reading the file and creating the backend
    time_to_first_token_s: float = 0.0  # from the call to the first sampled token (encode + prefill + sample)
    prefill_ms: float = 0.0
    decode_tokens_per_s: float = 0.0  # tokens after the first, per second of decoding
    stop_reason: str = ""  # eos | stop_string | max_new_tokens | context_length
    peak_rss_mb: float = 0.0  # the process's peak resident memory so far

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    stats: Stats = field(repr=False)


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


def load_artifact(path: str | Path) -> Artifact:
    """The file's Craft metadata, checked; ArtifactError (one line) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"model file {path} does not exist; export one with craft-export RUN_DIR -o {path}")
    try:
        metadata = read_metadata(path)
    except OnnxFormatError as e:
        raise ArtifactError(f"{e}; is it a Craft model exported with craft-export?") from None
    return Artifact.from_metadata(metadata, source=str(path))


class Generator:
    def __init__(self, path: str | Path, backend: str = "ort", threads: int = 0):
        t0 = time.perf_counter()
        if backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
        if threads < 0:
            raise ValueError(f"--threads must be >= 0 (0: the backend's default), got {threads}")
        self.path = Path(path)
        self.artifact = load_artifact(self.path)
        self.spec = self.artifact.spec
        try:
            self.tokenizer = tokenizer_from_bytes(self.artifact.tokenizer_kind, self.artifact.tokenizer_data)
        except (ValueError, RuntimeError) as e:
            raise ArtifactError(f"{path}: the tokenizer in its metadata does not load ({e}); re-export it") from None
        if self.tokenizer.vocab_size > self.spec.vocab_size:
            raise ArtifactError(f"{path}: its tokenizer has {self.tokenizer.vocab_size} tokens but the model only {self.spec.vocab_size}; "
                                f"re-export it from a consistent run directory")
        if backend == "ort":
            from craft.runtime.ort_backend import OrtBackend

            self.backend = OrtBackend(str(self.path), self.spec, threads)
        else:
            from craft.runtime.numpy_backend import NumpyBackend

            self.backend = NumpyBackend(str(self.path), self.spec, self.artifact.quantization)
        self.load_s = time.perf_counter() - t0
        self.last_stats: Stats | None = None

    # prompt -----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, max_new_tokens: int, truncate: bool = False) -> list[int]:
        """BOS + the prompt's tokens, checked against the context length (or cut with truncate)."""
        ids = [self.artifact.bos_id] + self.tokenizer.encode(prompt)
        ctx = self.spec.context_length
        if len(ids) <= ctx:
            return ids
        if not truncate:
            raise GenerationError(f"the prompt is {len(ids)} tokens but the model's context is {ctx}; "
                                  f"shorten it or pass --truncate (keeps its end)")
        keep = ctx - min(max(max_new_tokens, 1), ctx // 2)  # leave room to generate
        return [self.artifact.bos_id] + ids[len(ids) - keep + 1:]

    # generation -------------------------------------------------------------------------------
    def _token_steps(self, batch: list[list[int]], max_new_tokens: int, params: SamplingParams, seed: int | None, stats: Stats, t0: float) -> Iterator[list[int]]:
        """Yield, per step, the next token of every row (left-padded batch, one RNG per row seeded alike)."""
        B, width = len(batch), max(len(ids) for ids in batch)
        pad = self.artifact.pad_id
        input_ids = np.array([[pad] * (width - len(ids)) + ids for ids in batch], dtype=np.int64)  # (B, width)
        mask = np.array([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], dtype=np.int64)
        positions = position_ids(mask)  # left padding: the first real token is position 0
        rngs = [np.random.default_rng(seed) for _ in range(B)]
        history = [np.array(ids, dtype=np.int64) for ids in batch]
        self.backend.reset(B)
        t = time.perf_counter()
        logits = self.backend.forward(input_ids, mask, positions, last_only=True)[:, -1]  # (B, vocab)
        stats.prefill_ms = (time.perf_counter() - t) * 1e3
        # Decode-step inputs, allocated once: the mask grows by a column of ones per step (a view
        # of full_mask), the new tokens and their positions are written in place.
        full_mask = np.ones((B, self.spec.context_length), np.int64)
        full_mask[:, :width] = mask
        step_ids = np.empty((B, 1), np.int64)
        step_pos = positions[:, -1:] + 1  # (B, 1)
        penalize = params.repetition_penalty != 1.0
        for step in range(max_new_tokens):
            tokens = [sample_next(logits[r], params, rngs[r], history[r] if penalize else None) for r in range(B)]
            if step == 0:
                stats.time_to_first_token_s = time.perf_counter() - t0
            yield tokens
            length = self.backend.cache_length + 1
            if step == max_new_tokens - 1 or length > self.spec.context_length:
                return
            if penalize:
                history = [np.append(h, tok) for h, tok in zip(history, tokens)]
            step_ids[:, 0] = tokens
            logits = self.backend.forward(step_ids, full_mask[:, :length], step_pos, last_only=True)[:, -1]
            step_pos += 1

    def stream(self, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.8, top_k: int = 40,
               top_p: float = 0.95, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: Sequence[str] = (), truncate: bool = False) -> Iterator[str]:
        """Yield the completion's text piece by piece as tokens are produced; stats in self.last_stats."""
        t0 = time.perf_counter()
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        if max_new_tokens < 0:
            raise GenerationError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
        stop = [s for s in stop if s]
        ids = self.encode_prompt(prompt, max_new_tokens, truncate)
        stats = self.last_stats = Stats(self.backend.name, prompt_tokens=len(ids), load_s=self.load_s, stop_reason=MAX_NEW_TOKENS)
        self.last_token_ids: list[int] = []
        text_stream, pending = TextStream(self.tokenizer), ""
        hold = max((len(s) for s in stop), default=1) - 1  # chars kept back: they may begin a stop string
        t_first = None
        stats.stop_reason = CONTEXT_LENGTH
        for (token,) in self._token_steps([ids], max_new_tokens, params, seed, stats, t0) if max_new_tokens else ():
            t_first = t_first or time.perf_counter()
            if token == self.artifact.eos_id:
                stats.stop_reason = EOS
                break
            self.last_token_ids.append(token)
            pending += text_stream.feed(token)
            hits = [i for i in (pending.find(s) for s in stop) if i >= 0]
            if hits:
                stats.stop_reason = STOP_STRING
                pending = pending[: min(hits)]
                break
            if len(pending) > hold:
                yield pending[: len(pending) - hold]
                pending = pending[len(pending) - hold:]
        else:
            if len(self.last_token_ids) >= max_new_tokens:
                stats.stop_reason = MAX_NEW_TOKENS
        if stats.stop_reason != STOP_STRING:
            pending += text_stream.finish()
        if pending:
            yield pending
        stats.generated_tokens = len(self.last_token_ids)
        if t_first is not None and stats.generated_tokens > 1:
            stats.decode_tokens_per_s = (stats.generated_tokens - 1) / max(time.perf_counter() - t_first, 1e-9)
        stats.peak_rss_mb = peak_rss_mb()

    def generate(self, prompt: str, **kwargs) -> Completion:
        """The whole completion at once (same arguments as stream)."""
        text = "".join(self.stream(prompt, **kwargs))
        return Completion(text, list(self.last_token_ids), self.last_stats)

    def generate_batch(self, prompts: Sequence[str], *, max_new_tokens: int = 256, temperature: float = 0.8, top_k: int = 40,
                       top_p: float = 0.95, repetition_penalty: float = 1.0, seed: int | None = None,
                       stop: Sequence[str] = (), truncate: bool = False) -> list[Completion]:
        """Several prompts in one left-padded batch; row i equals generate(prompts[i], same arguments)."""
        t0 = time.perf_counter()
        if not prompts:
            return []
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        batch = [self.encode_prompt(p, max_new_tokens, truncate) for p in prompts]
        stats = Stats(self.backend.name, prompt_tokens=sum(map(len, batch)), load_s=self.load_s, stop_reason=CONTEXT_LENGTH)
        tokens: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        for step_tokens in self._token_steps(batch, max_new_tokens, params, seed, stats, t0) if max_new_tokens else ():
            for r, token in enumerate(step_tokens):
                if not done[r]:
                    if token == self.artifact.eos_id:
                        done[r] = True
                    else:
                        tokens[r].append(token)
            if all(done):
                break
        out = []
        for r, ids in enumerate(tokens):
            text = self.tokenizer.decode(ids)
            reason = EOS if done[r] else (MAX_NEW_TOKENS if len(ids) >= max_new_tokens else CONTEXT_LENGTH)
            cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], STOP_STRING
            row = Stats(**{**stats.to_dict(), "prompt_tokens": len(batch[r]), "generated_tokens": len(ids), "stop_reason": reason, "peak_rss_mb": peak_rss_mb()})
            out.append(Completion(text, ids, row))
        self.last_stats = out[-1].stats
        return out
