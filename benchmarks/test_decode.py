"""The table: decode, prefill and baselines, 1 thread.

Speed rows use the small preset at its 15M-class size (vocab 32000, random weights); the peer
rows use llama2.c's stories15M shape (the same with 6 key-value heads), so those figures sit
beside published llama.cpp / ORT GenAI ones; one row uses the briefly trained small preset. Each decode round times
DECODE_STEPS cached greedy steps whose cache lengths average the named context (the prefill
before them is setup, not timed); extra_info carries tokens/s.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import (
    DECODE_STEPS,
    PEER_NEW_TOKENS,
    PEER_PROMPT,
    THREADS,
    compare,
    context_ids,
    decode_steps,
    generator,
    prefill,
    prefill_around,
    seconds_per_token_generating,
    uncached_step,
)

CONTEXTS = [16, 128, 240]


def record(benchmark, tokens: int) -> None:
    benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.median


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("backend", ["ort", "numpy"])
@pytest.mark.parametrize("quantize", ["int8", "none"])
def test_decode_cached(benchmark, small15m_models, quantize, backend, context):
    benchmark.group = f"small 15M decode, cached: {quantize} {backend}"
    gen = generator(small15m_models[quantize], backend)
    benchmark.pedantic(decode_steps, setup=lambda: ((gen, prefill_around(gen, context)), {}), rounds=5)
    record(benchmark, DECODE_STEPS)


@pytest.mark.parametrize("context", [16, 256, 2040])  # 2040: the 16 timed steps end at the 2048 limit
@pytest.mark.parametrize("arch", ["llama", "recurrent"])
@pytest.mark.parametrize("backend", ["ort", "numpy"])
def test_decode_long_context(benchmark, long_context_models, arch, backend, context):
    """Transformer (KV-cache) vs recurrent (fixed state) at equal parameters, int8: the
    recurrent per-token time stays flat as the context grows (gated in test_gates.py)."""
    benchmark.group = f"shakespeare_char shape, context 2048, int8 {backend}: {arch}"
    gen = generator(long_context_models[arch]["int8"], backend)
    benchmark.pedantic(decode_steps, setup=lambda: ((gen, prefill_around(gen, context)), {}), rounds=3)
    record(benchmark, DECODE_STEPS)


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("backend", ["ort", "numpy"])
def test_decode_uncached(benchmark, small15m_models, backend, context):
    benchmark.group = f"small 15M decode, no cache (full recompute): int8 {backend}"
    gen = generator(small15m_models["int8"], backend)
    benchmark.pedantic(uncached_step, args=(gen, context), rounds=3)
    record(benchmark, 1)


@pytest.mark.parametrize("backend", ["ort", "numpy"])
@pytest.mark.parametrize("quantize", ["int8", "none"])
def test_prefill_128(benchmark, small15m_models, quantize, backend):
    benchmark.group = "small 15M prefill, 128-token prompt"
    gen = generator(small15m_models[quantize], backend)
    benchmark.pedantic(prefill, args=(gen, 128), rounds=5)
    record(benchmark, 128)


@pytest.mark.parametrize("quantize", ["int8", "none"])
def test_bare_session_run_decode_step(benchmark, small15m_models, quantize):
    """The floor: one decode step through session.run() with numpy feeds, nothing else."""
    import onnxruntime as ort

    from craft.export.verify import ort_forward

    path = small15m_models[quantize]
    spec = generator(path).spec
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    _, past = ort_forward(session, spec, context_ids(generator(path), 128), None)
    feeds = {
        "input_ids": np.array([[5]]),
        "attention_mask": np.ones((1, 129), np.int64),
        "position_ids": np.array([[128]]),
    }
    for i in range(spec.n_layer):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
    benchmark.group = "small 15M decode step floor: bare session.run at context 128"
    benchmark.pedantic(session.run, args=(None, feeds), rounds=50, warmup_rounds=5)
    record(benchmark, 1)


@pytest.mark.parametrize("context", [16, 240])
def test_pytorch_eager_cached_decode(benchmark, small15m_models, context):
    """The training stack as a baseline: the same weights in PyTorch eager, cached, 1 thread."""
    import torch

    torch.set_num_threads(THREADS)
    model = small15m_models["torch"]
    ids = torch.from_numpy(context_ids(generator(small15m_models["int8"]), context - DECODE_STEPS // 2))

    def setup():
        with torch.no_grad():
            logits, past = model(ids, past=model.empty_cache())
        return (logits[:, -1:].argmax(-1), past), {}

    @torch.no_grad()
    def run(token, past):
        for _ in range(DECODE_STEPS):
            logits, past = model(token, past=past)
            token = logits[:, -1:].argmax(-1)

    benchmark.group = "small 15M decode, PyTorch eager fp32 (baseline)"
    benchmark.pedantic(run, setup=setup, rounds=5)
    record(benchmark, DECODE_STEPS)


@pytest.mark.parametrize("context", [16, 240])
@pytest.mark.parametrize(
    "backend, quantize", [("ort", "int8"), ("ort", "int8 inplace"), ("ort", "none"), ("numpy", "int8")]
)
def test_peer_shape_decode(benchmark, peer_models, backend, quantize, context):
    """stories15M's shape (multi-head attention, vocab 32000): comparable with published figures."""
    benchmark.group = f"peer shape (stories15M) decode: {quantize} {backend}"
    gen = generator(peer_models[quantize], backend)
    benchmark.pedantic(decode_steps, setup=lambda: ((gen, prefill_around(gen, context)), {}), rounds=5)
    record(benchmark, DECODE_STEPS)


@pytest.mark.parametrize("backend", ["ort", "numpy"])
def test_process_start_to_first_token(benchmark, small15m_models, installed_env, backend):
    """`craft-run MODEL PROMPT` as a new process until its first streamed byte: imports, reading
    the file, creating the session, prefill and one sampled token."""
    import subprocess
    import sys

    def first_token():
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "craft.runtime.cli",
                str(small15m_models["int8"]),
                "Once upon a time",
                "-n",
                "4",
                "--threads",
                str(THREADS),
                "--backend",
                backend,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=installed_env,
        )
        assert proc.stdout.read(1)
        proc.stdout.read()
        assert proc.wait(timeout=60) == 0

    benchmark.group = "small 15M int8: process start to first token (craft-run)"
    benchmark.pedantic(first_token, rounds=5, warmup_rounds=1)  # the warm-up fills installed_env's cache


@pytest.mark.parametrize("backend", ["ort", "numpy"])
def test_trained_small_decode(benchmark, small_models, backend):
    """The small preset as craft-train ships it (vocab 4096, trained briefly), int8."""
    benchmark.group = "small preset (vocab 4096, trained) decode at context 128: int8"
    gen = generator(small_models["int8"], backend)
    benchmark.pedantic(decode_steps, setup=lambda: ((gen, prefill_around(gen, 128)), {}), rounds=5)
    record(benchmark, DECODE_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int8", "none"])
def test_110m_shape_decode(benchmark, base_models, quantize):
    benchmark.group = "110M-class shape (dim 768, 12 layers) decode: ort"
    gen = generator(base_models[quantize], "ort")
    benchmark.pedantic(decode_steps, setup=lambda: ((gen, prefill_around(gen, 16)), {}), rounds=3)
    record(benchmark, DECODE_STEPS)


@pytest.mark.slow
def test_110m_shape_vs_genai(benchmark, figures, base_models, genai_base_models):
    """The 110M-class shape, int8, 1 thread: Craft's in-place file against GenAI's own build, the
    peer protocol (16-token prompt, 128 greedy tokens), interleaved. A figure, not a gate."""
    from genai_peer import GenAIDecoder

    benchmark.group = "110M-class shape, 16 + 128 tokens: Craft vs ORT GenAI int8"
    peer = GenAIDecoder(genai_base_models["int8"], threads=1)
    craft = generator(base_models["int8 inplace"], threads=1)
    prompt = context_ids(craft, PEER_PROMPT)[0]
    r = benchmark.pedantic(
        compare,
        args=(
            ("genai_s_per_token", lambda: peer.seconds_per_token(prompt, PEER_NEW_TOKENS)),
            ("craft_s_per_token", lambda: seconds_per_token_generating(craft)),
        ),
        kwargs={"rounds": 5},
        rounds=1,
        iterations=1,
    )
    benchmark.extra_info.update(
        {k[: -len("_s_per_token")] + "_tokens_per_s": 1 / v for k, v in r.items() if k != "ratio"}
    )
    figures["110M-class: Craft int8 vs GenAI int8 decode speed, 1 thread"] = r["ratio"]
    figures["110M-class: Craft int8 tokens/s, 1 thread"] = 1 / r["craft_s_per_token"]
    figures["110M-class: GenAI int8 tokens/s, 1 thread"] = 1 / r["genai_s_per_token"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_genai_peer_decode(benchmark, figures, peer_models, genai_models, precision, threads):
    """ONNX Runtime GenAI (its own model builder, the peer shape) beside Craft's in-place file, the
    issue's protocol (16-token prompt, 128 greedy tokens), interleaved; 1 thread is gated in
    test_gates.py, 2 threads is a figure. extra_info: both sides' tokens/s and the ratio."""
    from craft.runtime.weights import SCHEMES
    from genai_peer import GenAIDecoder

    benchmark.group = f"peer shape (stories15M), 16 + 128 tokens: Craft vs ORT GenAI {precision}"
    peer = GenAIDecoder(genai_models[precision], threads=threads)
    craft = generator(peer_models[f"{precision} inplace"], threads=threads) if precision in SCHEMES else None
    prompt = context_ids(generator(peer_models["int8"]), PEER_PROMPT)[0]
    if craft is None:
        r = benchmark.pedantic(
            lambda: {"genai_s_per_token": min(peer.seconds_per_token(prompt, PEER_NEW_TOKENS) for _ in range(5))},
            rounds=1,
            iterations=1,
        )
    else:
        r = benchmark.pedantic(
            compare,
            args=(
                ("genai_s_per_token", lambda: peer.seconds_per_token(prompt, PEER_NEW_TOKENS)),
                ("craft_s_per_token", lambda: seconds_per_token_generating(craft)),
            ),
            rounds=1,
            iterations=1,
        )
        figures[f"Craft {precision} vs GenAI {precision} decode speed, {threads} threads"] = r["ratio"]
    benchmark.extra_info.update(
        {f"{k[: -len('_s_per_token')]}_tokens_per_s": 1 / v for k, v in r.items() if k.endswith("_s_per_token")}
    )
    figures[f"GenAI {precision} {threads} threads tokens/s"] = 1 / r["genai_s_per_token"]
