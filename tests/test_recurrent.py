"""The recurrent model (model.arch: recurrent) end to end: scan == recurrence, parallel forward ==
step-by-step decode, pads leave the state untouched, training resumes bitwise, export verifies
(fp32 and int8), both runtime backends agree with PyTorch and with each other."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from conftest import export_run, torchrun, train_run
from craft.config import ConfigError, ModelConfig, load_config
from craft.export.exporter import load_run
from craft.model import generate as torch_generate
from craft.recurrent import Recurrent, linear_scan
from craft.runtime import artifact as A
from craft.runtime.generator import Generator
from craft.runtime.sampling import SamplingParams
from test_hostile_files import rewrite  # a copy of a file with its config changed

RECURRENT = {"model.arch": "recurrent", "tokenizer.kind": "char"}
PROMPTS = ["ROMEO:\n", "First Citizen:\nWe are", "", "Hark 🙂 日本"]


def loop_scan(a: torch.Tensor, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    out = []
    for t in range(u.shape[1]):
        h = a[:, t] * h + u[:, t]
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("T", [1, 2, 63, 64, 150])
def test_linear_scan_equals_the_recurrence(T):
    g = torch.Generator().manual_seed(T)
    a = torch.rand(2, T, 8, generator=g, dtype=torch.float64)
    a[:, ::7] = 1e-30  # a gate that forgets all at once: a closed form dividing by cumprod(a) would overflow here
    u, h0 = torch.randn(2, T, 8, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64)
    got = linear_scan(a, u, h0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, loop_scan(a, u, h0), rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def model() -> Recurrent:
    torch.manual_seed(0)
    return Recurrent(ModelConfig(arch="recurrent", vocab_size=50, dim=32, n_layer=2, context_length=200)).eval()


def test_parallel_forward_equals_token_by_token_decode(model):
    ids = torch.randint(0, 50, (3, 150))  # more than one scan chunk
    with torch.no_grad():
        full = model(ids)
        state, steps = model.empty_cache(3), []
        for t in range(0, 150, 50):  # prefill in pieces, then one token at a time
            logits, state = model(ids[:, t : t + 50] if t < 100 else ids[:, t : t + 1], past=state)
            steps.append(logits)
        for t in range(101, 150):
            logits, state = model(ids[:, t : t + 1], past=state)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert [s.shape for s in state] == [(3, 32)] * 2  # the state does not grow with the tokens read


def test_left_padding_leaves_the_state_untouched(model):
    ids = torch.randint(1, 50, (1, 20))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], 1)
    with torch.no_grad():
        plain, plain_state = model(ids, past=model.empty_cache())
        got, got_state = model(padded, past=model.empty_cache(), attention_mask=mask)
    torch.testing.assert_close(got[:, 5:], plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_state, plain_state):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_arch_is_checked():
    with pytest.raises(ConfigError, match="model.arch must be one of llama, recurrent"):
        load_config("tiny", ["model.arch=rwkv"])
    assert load_config("recurrent_small").model.arch == "recurrent"
    assert load_config("shakespeare_char_recurrent").model.arch == "recurrent"


def test_equal_parameter_count_to_the_transformer_recipe():
    from craft.model import build_model

    def count(name):
        cfg = load_config(name).model
        cfg.vocab_size = 65
        return build_model(cfg).num_parameters()

    transformer, recurrent = count("shakespeare_char"), count("shakespeare_char_recurrent")
    assert transformer < recurrent < transformer * 1.005


def test_training_resumes_bitwise(tmp_path, small_corpus):
    """Stopped at step 15 and resumed to 30: the losses of an uninterrupted 30-step run, bit for bit."""
    from craft.callbacks import read_metrics
    from craft.config import resumed_config
    from craft.train import train

    extra = {
        **RECURRENT,
        "train.max_steps": 30,
        "train.lr_decay_steps": 30,
        "train.warmup_steps": 5,
        "train.checkpoint_interval": 15,
        "train.eval_interval": 15,
        "train.log_interval": 1,
        "train.eval_iters": 2,
    }
    whole = train_run(tmp_path / "whole", small_corpus, **extra)
    half = train_run(tmp_path / "half", small_corpus, **{**extra, "train.max_steps": 15})
    train(resumed_config(half, ["train.max_steps=30"]), resume=True, log=lambda *a, **k: None)

    def losses(run):
        return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r["event"] == "train"]

    assert [s for s, _ in losses(half)] == list(range(1, 31))
    assert losses(half) == losses(whole)


def test_ddp_trains_it_and_samples_are_written(tmp_path, small_corpus):
    """torchrun, 2 processes (gloo): the recurrent model goes through DDP like the transformer."""

    from conftest import tiny_overrides
    from craft import checkpoint as ckpt
    from craft.callbacks import read_metrics

    run = tmp_path / "ddp"
    args = tiny_overrides(
        run,
        small_corpus,
        **{
            **RECURRENT,
            "train.batch_size": 8,
            "train.max_steps": 30,
            "train.warmup_steps": 5,
            "train.eval_interval": 30,
            "train.eval_iters": 2,
            "train.log_interval": 5,
            "train.checkpoint_interval": 30,
            "train.threads": 0,
        },
    )
    result = torchrun(*args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed: 2 processes (gloo)" in result.stdout and "recurrent" in result.stdout
    train = [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0, (train[0], train[-1])
    assert (run / "samples.txt").read_text().count("--- step") == 1
    model = Recurrent(load_config(str(run / "config.yaml")).model)
    model.load_state_dict(ckpt.read(run / "checkpoint.pt")[0]["model"])  # plain keys, the recurrent ones


# export and runtime ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recurrent_run(tmp_path_factory, small_corpus):
    return train_run(tmp_path_factory.mktemp("runs") / "recurrent", small_corpus, **RECURRENT)


@pytest.fixture(scope="module")
def files(recurrent_run):
    return {q: export_run(recurrent_run, q) for q in ("none", "int8")}


def test_export_has_state_io_and_says_recurrent(files):
    proto = onnx.load(str(files["int8"]))
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    outputs = [o.name for o in proto.graph.output]
    assert inputs[A.past_state_name(1)] == ["batch", 64]
    assert not any(name.startswith("past_key_values") for name in inputs)
    assert outputs == [A.LOGITS, A.present_state_name(0), A.present_state_name(1)]
    artifact = A.Artifact.from_metadata({p.key: p.value for p in proto.metadata_props})
    assert artifact.spec.arch == A.RECURRENT
    report = __import__("json").loads({p.key: p.value for p in proto.metadata_props}[A.META_EXPORT_REPORT])
    assert report["decode_max_abs_diff"] < 1e-4 and report["perplexity_ratio"] < 1.01 and report["top1_agreement"] > 0.9
    assert files["int8"].stat().st_size < 0.3 * files["none"].stat().st_size


@pytest.fixture(scope="module")
def generators(files):
    return {
        (q, backend): Generator(path, backend=backend, threads=1)
        for q, path in files.items()
        for backend in ("ort", "numpy")
    }


@pytest.mark.parametrize("backend", ["ort", "numpy"])
def test_greedy_equals_pytorch_greedy(recurrent_run, generators, backend):
    run = load_run(recurrent_run)
    gen, seen = generators[("none", backend)], set()
    for prompt in PROMPTS:
        ids = gen.encode_prompt(prompt, 40)
        expected = torch_generate(run.model, ids, 40, eos_id=run.tokenizer.eos_id)
        expected = expected[:-1] if expected and expected[-1] == run.tokenizer.eos_id else expected
        got = gen.generate(prompt, SamplingParams(max_new_tokens=40, temperature=0))
        assert got.token_ids == expected, prompt
        seen.update(got.token_ids)
    assert len(seen) > 5


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_numpy_backend_equals_ort_backend(generators, quantize):
    for prompt in PROMPTS:
        params = SamplingParams(max_new_tokens=60, temperature=0)
        assert (
            generators[(quantize, "numpy")].generate(prompt, params).token_ids
            == generators[(quantize, "ort")].generate(prompt, params).token_ids
        )
    ort, npb = generators[(quantize, "ort")], generators[(quantize, "numpy")]
    ids = np.array([ort.encode_prompt("KING HENRY:\nO", 1)])
    mask, pos = np.ones_like(ids), np.arange(ids.shape[1])[None]
    ort.backend.reset(1)
    npb.backend.reset(1)
    # float32: rounding only. int8: an activation a rounding step away from a quantization boundary
    # (sums taken in another order) may land one int8 step apart: ~0.1 on a logit, the size of
    # int8's own error against PyTorch (export report), and greedy tokens agree above.
    limit = 1e-4 if quantize == "none" else 0.25
    assert np.abs(ort.backend.forward(ids, mask, pos) - npb.backend.forward(ids, mask, pos)).max() < limit


@pytest.mark.parametrize("backend", ["ort", "numpy"])
def test_left_padded_batch_rows_equal_single_prompts(generators, backend):
    """float32: int8 quantizes activations per tensor, so a batch's rows share a scale (as with attention)."""
    gen = generators[("none", backend)]
    for params in (
        SamplingParams(max_new_tokens=30, temperature=0),
        SamplingParams(max_new_tokens=30, temperature=0.8, seed=7),
    ):
        for prompt, row in zip(PROMPTS, gen.generate_batch(PROMPTS, params)):
            assert row.token_ids == gen.generate(prompt, params).token_ids, (prompt, params.temperature)


@pytest.mark.parametrize("backend", ["ort", "numpy"])
def test_stream_equals_generate(generators, backend):
    gen = generators[("int8", backend)]
    params = SamplingParams(max_new_tokens=40, temperature=0.8, seed=3)
    for prompt in PROMPTS:
        assert "".join(gen.stream(prompt, params)) == gen.generate(prompt, params).text


def test_an_interrupted_numpy_forward_leaves_the_state_as_it_was(generators):
    """Ctrl-C in a prefill: the state and the token count change together or not at all, so the
    next chat turn does not reuse a half-advanced state."""
    backend = generators[("int8", "numpy")].backend
    ids = np.array([generators[("int8", "numpy")].encode_prompt("KING HENRY:\nO", 1)])
    T = ids.shape[1]
    backend.reset(1)
    backend.forward(ids, np.ones_like(ids), np.arange(T)[None])
    before = [state.copy() for state in backend.state]
    layer = backend.layers[1]
    w13 = layer["w13"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    layer["w13"] = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            backend.forward(ids, np.ones((1, 2 * T), np.int64), np.arange(T, 2 * T)[None])
    finally:
        layer["w13"] = w13
    assert backend.cache_length == T
    assert all(np.array_equal(a, b) for a, b in zip(before, backend.state))


def test_head_fields_are_not_held_against_a_recurrent_file(files, tmp_path):
    """A recurrent model of any width trains (craft.config); its file carries the config's unused
    n_head / head_dim, which the runtime once refused as an odd RoPE head width."""
    path = rewrite(files["int8"], tmp_path / "odd.onnx", spec={"n_head": 4, "n_kv_head": 4, "head_dim": 25})
    params = SamplingParams(max_new_tokens=8, temperature=0)
    for backend in ("ort", "numpy"):
        assert Generator(path, backend=backend).generate("KING", params).token_ids == (
            Generator(files["int8"], backend=backend).generate("KING", params).token_ids
        )


@pytest.mark.parametrize("backend", ["ort", "numpy"])
def test_a_long_declared_context_costs_no_memory(files, tmp_path, backend):
    """A recurrent file may declare millions of positions: generating a few tokens allocates no
    buffer as wide as the context (the decode mask was 8 bytes per position: 128 MiB here)."""
    import tracemalloc

    gen = Generator(rewrite(files["int8"], tmp_path / "long.onnx", spec={"context_length": 1 << 24}), backend=backend)
    assert gen.context_length == 1 << 24
    tracemalloc.start()
    try:
        assert gen.generate("KING", SamplingParams(max_new_tokens=4, temperature=0)).stats.generated_tokens == 4
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def test_estimate_counts_the_state_not_a_kv_cache(files, char_int8):
    from craft.runtime.estimate import estimate, format_estimates, load_profiles
    from craft.runtime.onnx_file import read_metadata

    pi4 = next(p for p in load_profiles() if p.name == "pi4")
    recurrent = estimate(A.Artifact.from_metadata(read_metadata(files["int8"])), files["int8"].stat().st_size, pi4)
    transformer = estimate(A.Artifact.from_metadata(read_metadata(char_int8)), char_int8.stat().st_size, pi4)
    assert recurrent.recurrent and recurrent.cache_bytes == 2 * 64 * 4  # n_layer * dim float32, whatever the context
    assert (
        transformer.cache_bytes == 2 * 2 * 2 * 16 * 64 * 4
    )  # key + value, 2 layers, 2 kv heads, head_dim 16, context 64
    assert "state 0.5kB" in format_estimates([recurrent]) and "KV 32.0kB" in format_estimates([transformer])


def test_a_state_input_of_the_wrong_shape_is_one_line_exit_2(files, tmp_path):
    from conftest import run_cli

    proto = onnx.load(str(files["int8"]))
    state = next(i for i in proto.graph.input if i.name == A.past_state_name(1))
    state.type.tensor_type.shape.dim[1].dim_value = 65  # the model's dim is 64
    bad = tmp_path / "bad_state.onnx"
    onnx.save(proto, str(bad))
    result = run_cli("craft.runtime.cli", str(bad), "hello", "-n", "4")
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.count("\n") == 1
        and "graph input 'past_state.1' is type 1 ('batch', 65), the model config needs type 1 ('?', 64)"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_transformer_only_export_flag_is_one_line_exit_2(recurrent_run, tmp_path):
    from conftest import run_cli

    result = run_cli("craft.export.cli", str(recurrent_run), "--attention", "inplace", "-o", str(tmp_path / "m.onnx"))
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.count("\n") == 1
        and "is a recurrent model (a fixed-size state, no cache) - drop --attention" in result.stderr
    )
    assert not (tmp_path / "m.onnx").exists()
