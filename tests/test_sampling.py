"""sampling.py: SamplingParams (defaults, validation) and the samplers - top-k, top-p, min-p,
temperature, repetition penalty - on hand-made logits whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from craft.runtime.sampling import (
    LogitsError,
    SamplingError,
    SamplingParams,
    apply_repetition_penalty,
    candidates,
    sample_next,
)


@settings(max_examples=200, deadline=None)
@given(
    logits=st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=2, max_size=80),
    k=st.integers(1, 10),
    p=st.floats(0.05, 1.0),
    temperature=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_top_k_never_emits_outside_the_top_k(logits, k, p, temperature, seed):
    logits = np.array(logits, np.float32)
    token = sample_next(logits, SamplingParams(temperature=temperature, top_k=k, top_p=p), np.random.default_rng(seed))
    kth_largest = np.sort(logits)[::-1][min(k, len(logits)) - 1]
    assert logits[token] >= kth_largest
    ids, _ = candidates(logits, k, p)
    assert token in ids and len(ids) <= k


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert list(candidates(logits, 0, 0.7)[0]) == [0, 1]  # 0.5 < 0.7 <= 0.8
    assert list(candidates(logits, 0, 0.5)[0]) == [0]
    assert list(candidates(logits, 0, 1.0)[0]) == [0, 1, 2, 3]
    big = np.full(5000, -20.0)
    big[:3] = [5.0, 4.0, 3.0]
    assert list(candidates(big, 0, 0.9)[0]) == [0, 1]  # prefilter path agrees


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    rng = np.random.default_rng(0)
    counts = np.bincount(
        [sample_next(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0), rng) for _ in range(4000)],
        minlength=3,
    )
    assert np.allclose(counts / 4000, [0.6, 0.3, 0.1], atol=0.03)


@pytest.mark.parametrize(
    "top_k, top_p, temperature, expected",
    [
        (3, 1.0, 1.0, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),  # top-k renormalizes
        (3, 0.7, 1.0, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),  # then the nucleus: 0.5 < 0.7 <= 0.8
        (2, 1.0, 0.5, [0.5**2 / (0.5**2 + 0.3**2), 0.3**2 / (0.5**2 + 0.3**2), 0.0, 0.0]),  # temperature sharpens
    ],
)
def test_top_k_path_follows_the_distribution(top_k, top_p, temperature, expected):
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    rng = np.random.default_rng(1)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    counts = np.bincount([sample_next(logits, params, rng) for _ in range(6000)], minlength=4)
    assert np.allclose(counts / 6000, expected, atol=0.025)


def test_repetition_penalty_discourages_repeats():
    logits = np.array([2.0, 1.9, -1.0])
    params = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.5)
    assert sample_next(logits, params, np.random.default_rng(0), previous=np.array([0])) == 1


# --- min-p ---------------------------------------------------------------------------------------

PROBS = np.array([0.5, 0.3, 0.15, 0.05])  # min_p 0.35: the floor is 0.175, so tokens 2 and 3 go


def test_min_p_drops_the_tokens_below_its_floor():
    logits = np.log(PROBS)
    assert list(candidates(logits, 0, 1.0, 0.35)[0]) == [0, 1]
    assert list(candidates(logits, 0, 1.0, 0.29)[0]) == [0, 1, 2]  # floor 0.145 < 0.15
    assert list(candidates(logits, 0, 1.0, 0.0)[0]) == [0, 1, 2, 3]  # 0 disables it
    assert list(candidates(logits, 0, 0.7, 0.29)[0]) == [0, 1]  # with top-p: the shorter of the two lists
    big = np.full(5000, -20.0)
    big[:4] = np.log(PROBS)
    assert list(candidates(big, 0, 0.99, 0.35)[0]) == [0, 1]  # the top-p prefilter path agrees


@pytest.mark.parametrize("top_k", [0, 3])  # the numpy path and the plain-Python top-k path
def test_min_p_sampling_follows_the_renormalized_distribution(top_k):
    rng = np.random.default_rng(2)
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=1.0, min_p=0.35)
    counts = np.bincount([sample_next(np.log(PROBS), params, rng) for _ in range(6000)], minlength=4)
    assert counts[2] == counts[3] == 0
    assert np.allclose(counts[:2] / 6000, [0.5 / 0.8, 0.3 / 0.8], atol=0.025)


@settings(max_examples=200, deadline=None)
@given(
    logits=st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=2, max_size=80),
    k=st.integers(0, 10),
    min_p=st.floats(0.01, 1.0),
    temperature=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_min_p_never_emits_a_token_below_its_floor(logits, k, min_p, temperature, seed):
    logits = np.array(logits, np.float32)
    token = sample_next(
        logits, SamplingParams(temperature=temperature, top_k=k, top_p=1.0, min_p=min_p), np.random.default_rng(seed)
    )
    assert logits[token] >= logits.max() + math.log(min_p) - 1e-9  # p(token) >= min_p * p(max)


# --- the settings object ---------------------------------------------------------------------------


def test_defaults_are_llama_cpp_like_with_min_p_off():
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.seed, p.stop) == (
        256,
        0.8,
        40,
        0.95,
        0.0,
        1.0,
        None,
        (),
    )


def test_settings_are_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        SamplingParams(0.8, 40)
    with pytest.raises(AttributeError):
        SamplingParams().top_k = 3


def test_stop_is_a_tuple_of_non_empty_strings():
    assert SamplingParams(stop=["a", "", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop="END").stop == ("END",)  # one string is one stop string, not its characters


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(top_k=-1), "--top-k must be an integer >= 0"),
        (dict(top_k=2.5), "--top-k must be an integer >= 0"),
        (dict(top_p=0.0), r"--top-p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"--top-p must be in \(0, 1\]"),
        (dict(top_p=float("nan")), r"--top-p must be in \(0, 1\]"),
        (dict(min_p=-0.1), r"--min-p must be in \[0, 1\]"),
        (dict(min_p=1.5), r"--min-p must be in \[0, 1\]"),
        (dict(temperature=-1.0), "--temperature must be >= 0"),
        (dict(temperature=float("inf")), "--temperature must be >= 0"),
        (dict(repetition_penalty=0.0), "--repetition-penalty must be > 0"),
        (dict(max_new_tokens=-1), "--max-new-tokens must be >= 0"),
        (dict(max_new_tokens=True), "--max-new-tokens must be >= 0"),
        (dict(seed=-1), "--seed must be an integer >= 0"),
        (dict(stop=["ok", 3]), "--stop takes strings"),
        (dict(temperature=10**400), "--temperature is out of range"),
        (dict(repetition_penalty=-(10**400)), "--repetition-penalty is out of range"),
        (dict(temperature=10**30, top_p=2**70), r"--top-p must be in \(0, 1\]"),  # 10**30 is a temperature
        (dict(stop=[f"s{i}" for i in range(257)]), "--stop takes at most 256 strings, got 257"),
    ],
)
def test_sampling_arguments_are_validated(kwargs, pattern):
    with pytest.raises(SamplingError, match=pattern) as e:
        SamplingParams(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0),
        SamplingParams(top_k=5),
        SamplingParams(top_k=0, top_p=0.9, min_p=0.1),
        SamplingParams(temperature=0.7, repetition_penalty=1.3),
    ],
    ids=["greedy", "top-k", "numpy path", "penalty"],
)
def test_logits_that_are_not_finite_are_one_error(params, bad):
    """A damaged file's NaN / inf logits: LogitsError (a ValueError craft-run prints in one line), not
    an IndexError from an empty candidate list; all -inf counts too (nothing can be chosen). The
    repetition penalty clipped a seen token's -inf to a finite value, and token 0 was sampled."""
    logits = np.linspace(-1, 1, 100).astype(np.float32)
    logits[np.arange(100) if bad == -np.inf else 37] = bad
    with pytest.raises(LogitsError, match="not finite"):
        sample_next(logits, params, np.random.default_rng(0), previous=np.arange(100))


@pytest.mark.filterwarnings("error")  # numpy's overflow warnings became errors: none may be raised
@pytest.mark.parametrize("penalty", [1e-300, 1e300, 1e-320, 1e308])
def test_extreme_repetition_penalty_saturates_quietly(penalty):
    logits = np.array([3.0, -2.0, 1.0, 0.5], np.float32)
    out = apply_repetition_penalty(logits, np.array([0, 1]), penalty)
    assert np.isfinite(out).all() and out[2] == 1.0
    assert sample_next(out, SamplingParams(top_k=0, top_p=0.5, temperature=1e-300), np.random.default_rng(0)) in (0, 2)


def test_stop_that_is_not_strings_and_unsigned_counts():
    """stop=None was a bare TypeError naming no flag; a numpy uint8 max_new_tokens wrapped to 255 in
    --truncate's arithmetic (uint8(0) - 1)."""
    for bad in (None, 5):
        with pytest.raises(SamplingError, match="--stop takes a string or a list of strings"):
            SamplingParams(stop=bad)
    p = SamplingParams(max_new_tokens=np.uint8(0), top_k=np.uint16(3), seed=np.uint32(7))
    assert (type(p.max_new_tokens), type(p.top_k), type(p.seed)) == (int, int, int) and p.max_new_tokens - 1 == -1


@pytest.mark.filterwarnings("error")  # numpy's overflow warnings became errors: none may be raised
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=np.float64(1e-320)),  # numpy's scalar division overflowed (a warning)
        dict(temperature=np.float32(1e-45)),
        dict(min_p=np.longdouble("1e-4000")),  # passed the check as > 0, then math.log(0): "math domain error"
        dict(temperature=10**30, repetition_penalty=10**30),  # np.isfinite(int) raised a numpy TypeError
    ],
)
def test_numpy_and_huge_numbers_are_python_floats(kwargs):
    params = SamplingParams(top_k=0, top_p=1.0, **kwargs)
    assert all(type(getattr(params, name)) is float for name in kwargs)
    logits = np.array([3.0, -2.0, 1.0, 0.5], np.float32)
    assert sample_next(logits, params, np.random.default_rng(0), previous=np.array([1])) in range(4)
