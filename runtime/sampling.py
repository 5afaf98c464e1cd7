"""How to generate: the sampling settings (one object, their defaults in one place) and choosing
the next token from logits: greedy, temperature, top-k, top-p, min-p, repetition penalty.

Pure functions over numpy arrays; randomness comes only from the numpy Generator passed in,
so the same seed and logits give the same tokens on every backend and machine (a quantized
file's logits differ a little between backends: ONNX Runtime and numpy round its activations
differently). A new sampler is a field of SamplingParams (default: off), its check in
__post_init__, its cut in candidates() and sample_next(), and one line in cli.py to expose it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_STOP_STRINGS = 256  # each is searched for after every token: 10^5 of them took 0.1 s a token


class SamplingError(ValueError):
    """Invalid sampling settings; the message names the flag and the valid range."""


class LogitsError(ValueError):
    """The model gave logits that are NaN or infinite, or all equal: damaged weights, or values that
    overflow (an RMS norm of an infinite residual is 0 in numpy, and every logit with it)."""

    def __init__(self, what: str = "are not finite numbers (NaN or infinity)"):
        super().__init__(
            f"the model's logits {what}: its weights are damaged or overflow float32; re-export it from its source"
        )


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Everything that decides which tokens a prompt continues with, as vLLM's SamplingParams:
    the samplers, the seed and when to stop. craft-run's flags fill it field by field."""

    max_new_tokens: int = 256  # most tokens to generate; 0 generates none
    temperature: float = 0.8  # 0 is greedy (argmax); higher is more random
    top_k: int = 40  # sample among the k most likely tokens; 0 disables
    top_p: float = 0.95  # ...and among the fewest tokens whose probability sums to p; 1 disables
    min_p: float = (
        0.0  # ...and drop tokens less likely than min_p x the top token's probability (llama.cpp's rule); 0 disables
    )
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the text (CTRL's rule); 1 disables
    seed: int | None = None  # the same seed, model and settings give the same text; None: a fresh random seed
    stop: tuple[str, ...] = ()  # stop when the text produces one of these (not included in the text)

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):  # "0.5" would compare as a str
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise SamplingError(f"--{name.replace('_', '-')} must be a number, got {value!r}")
            try:  # a Python float from here: 10**30 broke np.isfinite, a longdouble 1e-4000 math.log, a float64
                object.__setattr__(self, name, float(value))  # 1e-320 overflowed in numpy's scalar division
            except OverflowError:
                raise SamplingError(f"--{name.replace('_', '-')} is out of range, got {value!r}") from None
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise SamplingError(
                f"--max-new-tokens must be >= 0 (an integer; 0 generates none), got {self.max_new_tokens!r}"
            )
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise SamplingError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise SamplingError(f"--top-k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise SamplingError(f"--top-p must be in (0, 1] (1 disables it), got {self.top_p}")
        if not (0 <= self.min_p <= 1):
            raise SamplingError(f"--min-p must be in [0, 1] (0 disables it), got {self.min_p}")
        if not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
            raise SamplingError(f"--repetition-penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise SamplingError(f"--seed must be an integer >= 0 (or omitted: random), got {self.seed!r}")
        for name in ("max_new_tokens", "top_k", "seed"):  # numpy's uint8(0) - 1 is 255: Python ints from here
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        try:
            stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        except TypeError:  # None, a number
            raise SamplingError(f"--stop takes a string or a list of strings, got {self.stop!r}") from None
        if not all(isinstance(s, str) for s in stop):
            raise SamplingError(f"--stop takes strings, got {stop!r}")
        if len(stop) > MAX_STOP_STRINGS:
            raise SamplingError(f"--stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop):,}")
        object.__setattr__(self, "stop", tuple(s for s in stop if s))  # an empty string would stop at once: ignored

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def is_int(value) -> bool:
    """An integer, not a bool (True is 1 to Python) and not a float (64.0 is no count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def apply_repetition_penalty(logits: np.ndarray, previous: np.ndarray, penalty: float) -> np.ndarray:
    """Logits (vocab,) with every token in `previous` made less likely: positive logits divided
    by `penalty`, negative ones multiplied (Keskar et al. 2019, as in llama.cpp / transformers)."""
    if penalty == 1.0 or len(previous) == 0:
        return logits
    out = logits.copy()
    seen = np.unique(previous)
    values = out[seen].astype(np.float64)  # an extreme penalty (1e-300) saturates below instead of overflowing
    with np.errstate(over="ignore"):  # past float64 too (1e-320, 1e308): inf, clipped to float32's range like the rest
        scaled = np.clip(np.where(values > 0, values / penalty, values * penalty), -FLOAT32_MAX, FLOAT32_MAX)
    out[seen] = np.where(np.isfinite(values), scaled, values)  # a NaN / inf logit stays one: sampling refuses it
    return out


def candidates(logits: np.ndarray, top_k: int, top_p: float, min_p: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, their logits as float64), most likely first, that survive top-k, top-p and min-p.

    Ties at the k-th value are broken by token id (lowest kept), so exactly k survive.
    The nucleus is the fewest tokens whose probability reaches top_p; it keeps at least one.
    Min-p keeps the tokens whose probability is at least min_p x the most likely token's; it
    cuts the same sorted list from the end, so its order among the three does not matter.
    Cost O(vocab) in two passes over the logits; only a few times k values are sorted (top-p
    alone first tries the top NUCLEUS_PREFILTER tokens and sorts everything only if they hold
    less than top_p).
    """
    ids, values = _top_k_top_p(logits, top_k, top_p)
    if min_p > 0:
        n = int(np.count_nonzero(values >= values[0] + math.log(min_p)))  # p_i >= min_p * p_max
        ids, values = ids[:n], values[:n]
    return ids, values


def _top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """candidates() before min-p."""
    vocab = logits.shape[-1]
    k = top_k if 0 < top_k < vocab else vocab
    if k == vocab and top_p < 1.0 and vocab > NUCLEUS_PREFILTER:
        ids, values = _sorted_top(logits, NUCLEUS_PREFILTER)
        probs = np.exp(values - values[0])
        mass = np.exp(logits.astype(np.float64) - values[0]).sum()  # of the whole vocabulary
        cumulative = np.cumsum(probs)
        if cumulative[-1] >= top_p * mass:
            n = int(np.count_nonzero(cumulative - probs < top_p * mass))
            return ids[: max(n, 1)], values[: max(n, 1)]
    ids, values = _sorted_top(logits, k)
    if top_p < 1.0:
        probs = np.exp(values - values[0])
        cumulative = np.cumsum(probs)
        n = int(np.count_nonzero(cumulative - probs < top_p * cumulative[-1]))  # mass before token i is < p
        ids, values = ids[: max(n, 1)], values[: max(n, 1)]
    return ids, values


def _sorted_top(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the k largest logits and the logits (float64), by logit descending then id ascending."""
    vocab = logits.shape[-1]
    if k >= vocab:
        near, sub = np.arange(vocab), logits
    else:
        # Without sorting the vocabulary: a threshold from a strided sample (its ~4k/stride-th
        # largest) keeps a few times k tokens, a superset of the top k whenever at least k pass
        # it; otherwise the whole vocabulary is the candidate set.
        stride = max(1, vocab // 1024)
        sample = logits[::stride]
        rank = min(len(sample) - 1, 4 * k // stride + 1)  # from the top
        threshold = np.partition(sample, len(sample) - 1 - rank)[len(sample) - 1 - rank]
        near = np.flatnonzero(logits >= threshold)
        if len(near) < k:
            near = np.arange(vocab)
        sub = logits[near]
        if len(sub) > 8 * k:  # a skewed sample or flat logits: narrow to the k-th value (ties kept)
            kth = sub[np.argpartition(sub, len(sub) - k)[len(sub) - k :]].min()
            keep = np.flatnonzero(sub >= kth)
            near, sub = near[keep], sub[keep]
    order = np.lexsort((near, -sub))[:k]  # logit descending, id ascending
    return near[order], sub[order].astype(np.float64)


NUCLEUS_PREFILTER = 1024


def sample_next(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, previous: np.ndarray | None = None
) -> int:
    """The next token id from one position's logits (vocab,).

    Top-p and min-p are applied to the (temperature 1) probabilities of the top-k survivors, as
    llama.cpp does, then one token is drawn from those, sharpened or flattened by the
    temperature. With top-k set, the few survivors are handled in plain Python: after a decode
    step has flushed the CPU caches, a dozen small numpy calls cost more than the arithmetic
    on 40 numbers.
    """
    if previous is not None:
        logits = apply_repetition_penalty(logits, previous, params.repetition_penalty)
    if params.greedy:
        token = int(np.argmax(logits))  # the first NaN, if any, or an infinity: checked in O(1)
        if not math.isfinite(logits[token]):
            raise LogitsError()
        return token
    if not math.isfinite(logits.max()):  # NaN wins max(); sorting would lose it and the candidates with it
        raise LogitsError()
    if not 0 < params.top_k < logits.shape[-1]:
        ids, values = candidates(logits, params.top_k, params.top_p, params.min_p)
        with np.errstate(over="ignore", under="ignore"):  # a tiny temperature: exp(-huge) is 0, as meant
            weights = np.exp((values - values[0]) / params.temperature)
        cdf = np.cumsum(weights)
        return int(ids[min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(ids) - 1)])
    ids, values = _sorted_top(logits, params.top_k)
    values = values.tolist()
    best = values[0]
    kept = len(values)
    if params.top_p < 1.0:  # the nucleus: keep token i while the mass before it is < top_p
        probs = [math.exp(v - best) for v in values]
        limit, mass, kept = params.top_p * sum(probs), 0.0, 0
        for p in probs:
            if kept and mass >= limit:
                break
            mass += p
            kept += 1
    if params.min_p > 0:  # keep token i while p_i >= min_p * p_max (values are sorted)
        floor = best + math.log(params.min_p)
        kept = min(kept, sum(1 for v in values if v >= floor))
    weights = [math.exp((v - best) / params.temperature) for v in values[:kept]]
    target, total = rng.random() * sum(weights), 0.0
    for i, w in enumerate(weights):
        total += w
        if target < total:
            return int(ids[i])
    return int(ids[kept - 1])
