"""Benchmark fixtures: the small preset at its 15M-class size (vocab 32000, random weights) for
speed and the gates, the peer shape (stories15M: the same with plain multi-head attention) for
comparison with published figures, the small preset briefly trained (vocab 4096) for quality and
size, a 110M-class shape (slow), and the measuring helpers the gates share.

Everything is built once per session under pytest's tmp directory. Results (JSON) go to
benchmarks/results/ (git-ignored): pass --benchmark-json or --benchmark-autosave.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy backend's BLAS: one thread, read when numpy loads
os.environ.setdefault("OMP_NUM_THREADS", "1")

import time
from pathlib import Path

import numpy as np
import pytest

from craft.runtime.generator import Generator

RESULTS = Path(__file__).resolve().parent / "results"
DECODE_STEPS = 16  # tokens timed per round of a decode benchmark, centred on the named context
# Untimed decode steps between a prefill and the timed ones. The first steps after a prefill run
# slow whatever the context (15M int8, in-place: 1.6 ms falling to 0.87 ms over ~10 steps after a
# 225-token prefill, 0.8 -> 0.7 ms after a 1-token one; a pause or a chunked prefill does not
# change it): timed from the prefill on, that transient made "token time at 240 vs 16" read
# 1.45-1.6 where the steps themselves differ by 1.25-1.35.
WARMUP_STEPS = 7
THREADS = 1  # one ORT / BLAS thread: the Pi-class setting, and the least noisy on a shared machine


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run benchmarks marked slow (the 110M-class shape)")
    parser.addoption(
        "--pin-core",
        type=int,
        default=None,
        metavar="N",
        help="pin the whole run to CPU core N (a Pi-class single-core profile)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if getattr(config.option, "benchmark_storage", None) == "file://./.benchmarks":
        config.option.benchmark_storage = f"file://{RESULTS}"
    core = config.getoption("--pin-core")
    if core is not None:
        os.sched_setaffinity(0, {core})


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--runslow"):
        skip = pytest.mark.skip(reason="slow; run with --runslow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["craft"] = {"pinned_core": config.getoption("--pin-core"), "threads": THREADS, "figures": FIGURES}


# --- models --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """The small preset (dim 288, 6 layers, 6 heads, context 256, vocab 4096) trained briefly on
    the bundled corpus: enough structure for a meaningful int8 perplexity comparison."""
    from craft.config import load_config
    from craft.train import train

    out = tmp_path_factory.mktemp("bench") / "small"
    cfg = load_config(
        "small",
        [
            f"out_dir={out}",
            "train.max_steps=40",
            "train.batch_size=8",
            "train.warmup_steps=5",
            "train.lr=3e-3",
            "train.eval_interval=40",
            "train.eval_iters=4",
            "train.checkpoint_interval=40",
        ],
    )
    train(cfg, log=lambda *a, **k: None)
    return out


@pytest.fixture(scope="session")
def small_exports(small_run) -> dict:
    """{"none": report, "int8": report}: the trained small preset exported and verified by
    craft-export (the report holds the perplexities), files beside it in the run directory; both
    with standard attention, so that int8 vs fp32 compares the weights alone."""
    from craft.export.exporter import export

    return {
        q: export(small_run, small_run / f"small.{q}.onnx", quantize=q, log=lambda *a, **k: None, attention="standard")
        for q in ("none", "int8")
    }


@pytest.fixture(scope="session")
def small_models(small_run, small_exports) -> dict:
    """{"none": path, "int8": path} of the trained small preset."""
    return {q: small_run / f"small.{q}.onnx" for q in small_exports}


def random_weight_models(folder: Path, name: str, schemes=("none", "int8"), **shape) -> dict:
    """Exports of a random-weight model of the given shape (speed only, no quality) in each of
    `schemes`, under "none" / "int8" (standard attention) and "none inplace" / "int8 inplace",
    plus the PyTorch model itself under "torch"."""
    from craft.config import ModelConfig
    from craft.export.exporter import build_model_proto, random_run
    from craft.runtime.artifact import ATTENTION_INPLACE, ATTENTION_STANDARD

    run = random_run(ModelConfig(**shape))
    paths: dict = {"torch": run.model}
    for quantize in schemes:
        for attention in (ATTENTION_STANDARD, ATTENTION_INPLACE):
            key = quantize if attention == ATTENTION_STANDARD else f"{quantize} {attention}"
            paths[key] = folder / f"{name}.{quantize}.{attention}.onnx"
            paths[key].write_bytes(build_model_proto(run, quantize, attention=attention)[0].SerializeToString())
    return paths


@pytest.fixture(scope="session")
def small15m_models(tmp_path_factory) -> dict:
    """The small preset (configs/small.yaml: dim 288, 6 layers, 6 query / 2 key-value heads, FFN
    768, context 256) at its 15M-class size, vocab 32000, random weights: the speed rows and the
    gates run on it."""
    from craft.config import load_config

    cfg = load_config("small").model
    return random_weight_models(
        tmp_path_factory.mktemp("small15m"), "small15m", **{**dataclasses.asdict(cfg), "vocab_size": 32000}
    )


PEER_SHAPE = {
    "vocab_size": 32000,
    "dim": 288,
    "n_layer": 6,
    "n_head": 6,
    "ffn_dim": 768,
    "context_length": 256,
}  # stories15M


@pytest.fixture(scope="session")
def peer_models(tmp_path_factory) -> dict:
    """The shape that published llama.cpp / llama2.c / ORT GenAI figures use (stories15M): as the
    small preset but with 6 key-value heads (plain multi-head attention), random weights."""
    return random_weight_models(tmp_path_factory.mktemp("peer"), "peer", ("none", "int8", "int4"), **PEER_SHAPE)


def build_genai_models(folder: Path, shape: dict, precisions=("int8", "int4")) -> dict:
    """{precision: folder}: ONNX Runtime GenAI models of `shape` (plain multi-head attention, as the
    published stories models have), built by its own model builder from a random Hugging Face
    Llama (genai_peer.py); the test is skipped when GenAI or transformers is missing."""
    pytest.importorskip(
        "onnxruntime_genai", reason="onnxruntime-genai not installed (pip install -e '.[dev]'): no peer to compare with"
    )
    pytest.importorskip(
        "transformers", reason="transformers not installed (pip install -e '.[train]'): cannot build the peer model"
    )
    from genai_peer import build_genai_model

    shape = {**shape, "n_kv_head": shape["n_head"]}
    return {precision: build_genai_model(folder, precision, **shape) for precision in precisions}


@pytest.fixture(scope="session")
def genai_models(tmp_path_factory) -> dict:
    """{"int8": folder, "int4": folder}: GenAI models of the peer shape (stories15M)."""
    return build_genai_models(tmp_path_factory.mktemp("genai"), PEER_SHAPE)


@pytest.fixture(scope="session")
def recurrent15m_models(tmp_path_factory) -> dict:
    """configs/recurrent_small.yaml (small's recurrent sibling) at the 15M-class size, vocab 32000,
    with a context of 2048, random weights: the flat-token-time gate runs on it (a step of a few
    milliseconds, long enough to time through a shared machine's noise)."""
    from craft.config import load_config

    cfg = load_config("recurrent_small").model
    return random_weight_models(
        tmp_path_factory.mktemp("recurrent15m"),
        "recurrent15m",
        **{**dataclasses.asdict(cfg), "vocab_size": 32000, "context_length": 2048},
    )


@pytest.fixture(scope="session")
def long_context_models(tmp_path_factory) -> dict:
    """{"llama": models, "recurrent": models}: the Tiny Shakespeare recipe's shape (configs/
    shakespeare_char.yaml and its recurrent sibling: dim 128, 4 layers, vocab 65, equal parameter
    counts) with a context of 2048, random weights: decode at 16, 256 and 2048 tokens of context."""
    from craft.config import load_config

    folder = tmp_path_factory.mktemp("long_context")
    return {
        arch: random_weight_models(
            folder, arch, **{**dataclasses.asdict(load_config(preset).model), "vocab_size": 323, "context_length": 2048}
        )
        for arch, preset in (("llama", "shakespeare_char"), ("recurrent", "shakespeare_char_recurrent"))
    }


BASE_SHAPE = {
    "vocab_size": 32000,
    "dim": 768,
    "n_layer": 12,
    "n_head": 12,
    "ffn_dim": 2048,
    "context_length": 1024,
}  # stories110M, the base preset's class


@pytest.fixture(scope="session")
def base_models(tmp_path_factory) -> dict:
    """A 110M-class shape (stories110M: dim 768, 12 layers, 12 heads, vocab 32000)."""
    return random_weight_models(tmp_path_factory.mktemp("base"), "base110m", **BASE_SHAPE)


@pytest.fixture(scope="session")
def genai_base_models(tmp_path_factory) -> dict:
    """{"int8": folder}: a GenAI model of the 110M-class shape."""
    return build_genai_models(tmp_path_factory.mktemp("genai_base"), BASE_SHAPE, ("int8",))


@pytest.fixture(scope="session")
def installed_env(tmp_path_factory) -> dict:
    """The environment for a craft-run process timed from its start: byte code cached, as after
    `pip install` (which compiles it). Where PYTHONDONTWRITEBYTECODE is set (this machine sets it)
    every process would otherwise compile Craft's modules again (~20 ms). The cache lives in a temp
    dir; the first process started with this environment fills it, so time the ones after it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path_factory.mktemp("pycache"))
    return env


_GENERATORS: dict = {}


def generator(path: Path, backend: str = "ort", threads: int = THREADS) -> Generator:
    key = (str(path), backend, threads)
    if key not in _GENERATORS:
        _GENERATORS[key] = Generator(path, backend=backend, threads=threads)
    return _GENERATORS[key]


# --- measuring -------------------------------------------------------------------------------------


def context_ids(gen: Generator, length: int) -> np.ndarray:
    rng = np.random.default_rng(length)
    return rng.integers(3, min(gen.spec.vocab_size, 250), size=(1, length))


def prefill(gen: Generator, length: int) -> int:
    """Fill the backend's cache with `length` tokens; returns the greedy next token."""
    ids = context_ids(gen, length)
    gen.backend.reset(1)
    logits = gen.backend.forward(ids, np.ones_like(ids), np.arange(length)[None], last_only=True)
    return int(logits[0, -1].argmax())


def decode_steps(gen: Generator, token: int, steps: int = DECODE_STEPS) -> int:
    """`steps` cached greedy decode steps: what the runtime does per generated token, minus text;
    returns the next token."""
    backend = gen.backend
    for _ in range(steps):
        n = backend.cache_length
        mask = np.ones((1, n + 1), np.int64)
        logits = backend.forward(np.array([[token]]), mask, np.array([[n]]), last_only=True)
        token = int(logits[0, -1].argmax())
    return token


def uncached_step(gen: Generator, length: int) -> None:
    """One token the way a runtime without a KV-cache makes it: the whole context again."""
    ids = context_ids(gen, length)
    gen.backend.reset(1)
    gen.backend.forward(ids, np.ones_like(ids), np.arange(length)[None], last_only=True)


def prefill_around(gen: Generator, context: int) -> int:
    """Prefill, then WARMUP_STEPS untimed steps, so that the DECODE_STEPS timed steps that follow
    average `context` tokens of cache; returns the next token."""
    return decode_steps(gen, prefill(gen, max(1, context - DECODE_STEPS // 2 - WARMUP_STEPS)), WARMUP_STEPS)


def seconds_per_token_cached(gen: Generator, context: int) -> float:
    token = prefill_around(gen, context)
    t = time.perf_counter()
    decode_steps(gen, token)
    return (time.perf_counter() - t) / DECODE_STEPS


def seconds_per_token_uncached(gen: Generator, context: int) -> float:
    t = time.perf_counter()
    uncached_step(gen, context)
    return time.perf_counter() - t


PEER_PROMPT, PEER_NEW_TOKENS = 16, 128  # the protocol: a 16-token prompt, 128 greedy tokens


def seconds_per_token_generating(gen: Generator, prompt: int = PEER_PROMPT, new_tokens: int = PEER_NEW_TOKENS) -> float:
    """Prefill `prompt` tokens (untimed), then `new_tokens` greedy steps through the backend; seconds
    per step - the same protocol as genai_peer.GenAIDecoder.seconds_per_token."""
    token = prefill(gen, prompt)
    t = time.perf_counter()
    decode_steps(gen, token, new_tokens)
    return (time.perf_counter() - t) / new_tokens


def compare(numerator: tuple, denominator: tuple, rounds: int = 9) -> dict:
    """Time two measurements in turn, round after round; {name: fastest run, ..., "ratio": ...}.

    numerator / denominator are (name, fn) with fn() -> seconds. The ratio is the median over
    rounds of numerator / denominator, each pair taken back to back: slow drift and bursts of
    noise on a shared machine hit both sides of a pair alike. The fastest run of each side is
    reported as its figure (noise only ever adds time).
    """
    (num_name, num_fn), (den_name, den_fn) = numerator, denominator
    pairs = [(num_fn(), den_fn()) for _ in range(rounds)]
    ratios = sorted(n / d for n, d in pairs)
    return {num_name: min(n for n, _ in pairs), den_name: min(d for _, d in pairs), "ratio": ratios[len(ratios) // 2]}


FIGURES: dict = {}


@pytest.fixture(scope="session")
def figures() -> dict:
    """Ratios and figures the gates measured; printed at the end and saved in the JSON."""
    return FIGURES


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("Craft figures (ratios measured in this run)")
        for key, value in FIGURES.items():
            if key.endswith("_s_per_token"):
                terminalreporter.write_line(f"{key[: -len('_s_per_token')] + ' ms/token':58s} {value * 1e3:10.3f}")
            else:
                terminalreporter.write_line(
                    f"{key:58s} {value:10.3f}" if isinstance(value, float) else f"{key:58s} {value}"
                )
