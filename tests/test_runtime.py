"""craft-run and its Python API: parity with PyTorch, numpy == ort, sampling, streaming, batching, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_cli
from craft.export.exporter import load_run
from craft.model import generate as torch_generate
from craft.runtime import artifact as A
from craft.runtime.artifact import ArtifactError
from craft.runtime.generator import GenerationError, Generator
from craft.runtime.sampling import SamplingError, SamplingParams, candidates, sample_next

PROMPTS = ["ROMEO:\n", "First Citizen:\nWe are", "", "Hark 🙂 日本"]


@pytest.fixture(scope="module")
def generators(char_fp32, char_int8, sp_fp32, sp_int8):
    return {(name, backend): Generator(path, backend=backend, threads=1)
            for name, path in {"char_fp32": char_fp32, "char_int8": char_int8, "sp_fp32": sp_fp32, "sp_int8": sp_int8}.items()
            for backend in ("ort", "numpy")}


@pytest.mark.parametrize("name, run_name", [("char_fp32", "char_run"), ("sp_fp32", "sp_run")])
@pytest.mark.parametrize("backend", ["ort", "numpy"])
def test_greedy_equals_pytorch_cached_greedy(request, generators, name, run_name, backend):
    run = load_run(request.getfixturevalue(run_name))
    gen = generators[(name, backend)]
    seen = set()
    for prompt in PROMPTS:
        ids = gen.encode_prompt(prompt, 40)
        expected = torch_generate(run.model, ids, 40, eos_id=run.tokenizer.eos_id)
        expected = expected[:-1] if expected and expected[-1] == run.tokenizer.eos_id else expected
        got = gen.generate(prompt, SamplingParams(max_new_tokens=40, temperature=0))
        assert got.token_ids == expected, prompt
        seen.update(got.token_ids)
    assert len(seen) > 5  # trained enough to say something, not one token repeated


@pytest.mark.parametrize("name", ["char_fp32", "char_int8", "sp_fp32", "sp_int8"])
def test_numpy_backend_equals_ort_backend(generators, name):
    for prompt in PROMPTS:
        ort_ids = generators[(name, "ort")].generate(prompt, SamplingParams(max_new_tokens=60, temperature=0)).token_ids
        np_ids = generators[(name, "numpy")].generate(prompt, SamplingParams(max_new_tokens=60, temperature=0)).token_ids
        assert np_ids == ort_ids, prompt


@pytest.mark.parametrize("name", ["char_int8", "sp_int8"])
def test_numpy_logits_close_to_ort(generators, name):
    ort, npb = generators[(name, "ort")], generators[(name, "numpy")]
    ids = np.array([ort.encode_prompt("KING HENRY:\nO", 1)])
    mask, pos = np.ones_like(ids), np.arange(ids.shape[1])[None]
    ort.backend.reset(1)
    npb.backend.reset(1)
    a = ort.backend.forward(ids, mask, pos)
    b = npb.backend.forward(ids, mask, pos)
    assert np.abs(a - b).max() < 1e-3


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_numpy_equals_ort_on_preset_shapes(tmp_path, preset):
    """The presets' real shapes (random weights, so logits are close together: a hard case)."""
    from craft.config import load_config
    from craft.export.exporter import build_model_proto, random_run

    cfg = load_config(preset).model
    cfg.vocab_size = load_config(preset).tokenizer.vocab_size
    run = random_run(cfg)
    for quantize in ("int8", "none"):
        path = tmp_path / f"{preset}.{quantize}.onnx"
        path.write_bytes(build_model_proto(run, quantize)[0].SerializeToString())
        ort_gen, np_gen = Generator(path, "ort", threads=1), Generator(path, "numpy")
        for prompt in ("The", "def main():"):
            expected = ort_gen.generate(prompt, SamplingParams(max_new_tokens=48, temperature=0)).token_ids
            assert np_gen.generate(prompt, SamplingParams(max_new_tokens=48, temperature=0)).token_ids == expected, (quantize, prompt)


def test_ort_backend_public_api_fallback_gives_the_same_tokens(char_int8, generators, monkeypatch):
    from craft.runtime.ort_backend import OrtBackend

    monkeypatch.setattr(OrtBackend, "use_pybind", False)
    fallback = Generator(char_int8, threads=1)
    import onnxruntime

    assert isinstance(fallback.backend.binding, onnxruntime.IOBinding)  # the public wrapper, not the pybind object
    for prompt in PROMPTS:
        expected = generators[("char_int8", "ort")].generate(prompt, SamplingParams(max_new_tokens=30, temperature=0)).token_ids
        assert fallback.generate(prompt, SamplingParams(max_new_tokens=30, temperature=0)).token_ids == expected


def test_temperature_zero_is_greedy_regardless_of_other_settings(generators):
    gen = generators[("sp_fp32", "ort")]
    greedy = gen.generate("ROMEO:", SamplingParams(max_new_tokens=30, temperature=0, top_k=0, top_p=1.0)).token_ids
    assert gen.generate("ROMEO:", SamplingParams(max_new_tokens=30, temperature=0, top_k=5, top_p=0.5, seed=3)).token_ids == greedy


def test_seed_reproduces_and_differs(generators):
    gen = generators[("char_int8", "ort")]
    a = gen.generate("ROMEO:", SamplingParams(max_new_tokens=50, temperature=1.0, seed=7)).token_ids
    assert gen.generate("ROMEO:", SamplingParams(max_new_tokens=50, temperature=1.0, seed=7)).token_ids == a
    assert gen.generate("ROMEO:", SamplingParams(max_new_tokens=50, temperature=1.0, seed=8)).token_ids != a
    assert generators[("char_int8", "numpy")].generate("ROMEO:", SamplingParams(max_new_tokens=50, temperature=1.0, seed=7)).token_ids == a


@pytest.mark.parametrize("name, backend", [("char_fp32", "ort"), ("sp_fp32", "ort"), ("sp_fp32", "numpy"), ("char_fp32", "numpy")])
def test_batch_equals_one_by_one(generators, name, backend):
    gen = generators[(name, backend)]
    prompts = ["ROMEO:\n", "First Citizen:\nBefore we proceed", "A", ""]
    batch = gen.generate_batch(prompts, SamplingParams(max_new_tokens=30, temperature=0))
    for prompt, completion in zip(prompts, batch):
        single = gen.generate(prompt, SamplingParams(max_new_tokens=30, temperature=0))
        assert completion.token_ids == single.token_ids, prompt
        assert completion.text == single.text
    sampled = gen.generate_batch(prompts[:2], SamplingParams(max_new_tokens=20, temperature=0.9, seed=5))
    assert sampled[1].token_ids == gen.generate(prompts[1], SamplingParams(max_new_tokens=20, temperature=0.9, seed=5)).token_ids


# --- sampling ------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(logits=st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=2, max_size=80),
       k=st.integers(1, 10), p=st.floats(0.05, 1.0), temperature=st.floats(0.1, 5.0), seed=st.integers(0, 2**32 - 1))
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
    counts = np.bincount([sample_next(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0), rng) for _ in range(4000)], minlength=3)
    assert np.allclose(counts / 4000, [0.6, 0.3, 0.1], atol=0.03)


@pytest.mark.parametrize("top_k, top_p, temperature, expected", [
    (3, 1.0, 1.0, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),  # top-k renormalizes
    (3, 0.7, 1.0, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),  # then the nucleus: 0.5 < 0.7 <= 0.8
    (2, 1.0, 0.5, [0.5**2 / (0.5**2 + 0.3**2), 0.3**2 / (0.5**2 + 0.3**2), 0.0, 0.0]),  # temperature sharpens
])
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


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(top_k=-1), "--top-k must be an integer >= 0"),
    (dict(top_p=0.0), r"--top-p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"--top-p must be in \(0, 1\]"),
    (dict(temperature=-1.0), "--temperature must be >= 0"),
    (dict(repetition_penalty=0.0), "--repetition-penalty must be > 0"),
])
def test_sampling_arguments_are_validated(kwargs, pattern):
    with pytest.raises(SamplingError, match=pattern):
        SamplingParams(**{**dict(temperature=0.8, top_k=40, top_p=0.95), **kwargs})


# --- the loop: stop reasons, streaming, edge cases --------------------------------------------------

class ScriptedBackend:
    """Stands in for a backend: the logits make `script` the greedy continuation, whatever the input."""

    name = "scripted"

    def __init__(self, spec, script):
        self.spec, self.script = spec, list(script)
        self.calls = []

    def reset(self, batch):
        self.cache_length, self.step = 0, 0

    def forward(self, ids, mask, positions, last_only=False):
        self.calls.append(ids.shape)
        assert mask.shape[1] == self.cache_length + ids.shape[1]
        self.cache_length += ids.shape[1]
        logits = np.zeros((ids.shape[0], 1, self.spec.vocab_size), np.float32)
        logits[:, -1, self.script[min(self.step, len(self.script) - 1)]] = 10.0
        self.step += 1
        return logits


def scripted(gen: Generator, text: str, then: list[int] = ()) -> ScriptedBackend:
    gen.backend = ScriptedBackend(gen.spec, gen.tokenizer.encode(text) + list(then))
    return gen.backend


@pytest.fixture
def char_gen(char_fp32):
    return Generator(char_fp32, threads=1)


def test_prefill_once_then_one_token_per_step(char_gen):
    backend = scripted(char_gen, "abcdef")
    char_gen.generate("ROMEO", SamplingParams(max_new_tokens=6, temperature=0))
    prompt_len = len(char_gen.encode_prompt("ROMEO", 6))
    assert backend.calls == [(1, prompt_len)] + [(1, 1)] * 5


def test_streaming_is_utf8_safe_with_byte_fallback(char_gen):
    scripted(char_gen, "ok 🙂 日本語 ✓ done")
    pieces = list(char_gen.stream("x", SamplingParams(max_new_tokens=len(char_gen.tokenizer.encode("ok 🙂 日本語 ✓ done")), temperature=0)))
    assert "".join(pieces) == "ok 🙂 日本語 ✓ done"
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 5


@pytest.mark.parametrize("text, kwargs, expected, reason", [
    ("hello world", dict(max_new_tokens=5), "hello", "max_new_tokens"),
    ("hello END more", dict(max_new_tokens=20, stop=["END"]), "hello ", "stop_string"),
    ("ab\n\ncd", dict(max_new_tokens=20, stop=["\n\n", "zz"]), "ab", "stop_string"),
])
def test_stop_reasons(char_gen, text, kwargs, expected, reason):
    scripted(char_gen, text)
    out = char_gen.generate("x", SamplingParams(temperature=0, **kwargs))
    assert out.text == expected and out.stats.stop_reason == reason


def test_stop_at_eos(char_gen):
    scripted(char_gen, "hi", then=[char_gen.artifact.eos_id])
    out = char_gen.generate("x", SamplingParams(max_new_tokens=20, temperature=0))
    assert out.text == "hi" and out.stats.stop_reason == "eos" and out.stats.generated_tokens == 2


def test_stop_at_context_length(char_gen):
    ctx = char_gen.spec.context_length
    scripted(char_gen, "a" * 200)
    prompt = "b" * (ctx - 11)  # BOS + prompt = ctx - 10 tokens
    out = char_gen.generate(prompt, SamplingParams(max_new_tokens=100, temperature=0))
    assert out.stats.stop_reason == "context_length" and out.stats.generated_tokens == 11


def test_stats_are_filled(generators):
    gen = generators[("sp_int8", "ort")]
    out = gen.generate("ROMEO:", SamplingParams(max_new_tokens=20, temperature=0))
    s = out.stats
    assert s.prompt_tokens == len(gen.encode_prompt("ROMEO:", 20)) and s.generated_tokens == len(out.token_ids)
    assert s.prefill_ms > 0 and s.time_to_first_token_s > 0 and s.decode_tokens_per_s > 0 and s.peak_rss_mb > 10


def test_edge_cases_empty_prompt_zero_tokens_long_prompt(generators):
    gen = generators[("char_fp32", "ort")]
    assert gen.encode_prompt("", 5) == [gen.artifact.bos_id]
    assert len(gen.generate("", SamplingParams(max_new_tokens=5, temperature=0)).token_ids) == 5
    zero = gen.generate("ROMEO", SamplingParams(max_new_tokens=0))
    assert zero.text == "" and zero.token_ids == [] and zero.stats.stop_reason == "max_new_tokens"
    long_prompt = "word " * 100
    with pytest.raises(GenerationError, match=r"the prompt is \d+ tokens but the model's context is 64; shorten it or pass --truncate"):
        gen.generate(long_prompt, SamplingParams(max_new_tokens=5))
    out = gen.generate(long_prompt, SamplingParams(max_new_tokens=5, temperature=0), truncate=True)
    assert len(out.token_ids) == 5


# --- bad files -------------------------------------------------------------------------------------

def test_refuses_files_that_are_not_craft_models(tmp_path, char_fp32):
    plain = onnx.load(str(char_fp32))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(ArtifactError, match="is not a Craft model"):
        Generator(tmp_path / "plain.onnx")
    versioned = onnx.load(str(char_fp32))
    for prop in versioned.metadata_props:
        if prop.key == A.META_FORMAT:
            prop.value = "99"
    onnx.save(versioned, str(tmp_path / "future.onnx"))
    with pytest.raises(ArtifactError, match="format version 99, this runtime reads version 1"):
        Generator(tmp_path / "future.onnx")
    (tmp_path / "text.onnx").write_text("hello")
    with pytest.raises(ArtifactError, match="is it a Craft model"):
        Generator(tmp_path / "text.onnx")
    with pytest.raises(ArtifactError, match="does not exist"):
        Generator(tmp_path / "missing.onnx")


@pytest.mark.parametrize("args, pattern", [
    (["--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 0"),
    (["--backend", "tflite"], "'tflite' is not one of 'ort', 'numpy'"),
])
def test_cli_bad_arguments_one_line_exit_2(char_int8, args, pattern):
    result = run_cli("craft.runtime.cli", str(char_int8), "hi", *args)
    assert result.returncode == 2 and pattern in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_cli_refuses_non_craft_file(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"\x08\x07garbage")
    result = run_cli("craft.runtime.cli", str(tmp_path / "x.onnx"), "hi")
    assert result.returncode == 2 and result.stderr.startswith("craft-run: error:") and "Traceback" not in result.stderr


def test_cli_streams_reads_stdin_and_reports(char_int8):
    result = run_cli("craft.runtime.cli", str(char_int8), "-n", "20", "-t", "0", "--stats", input="ROMEO:\n")
    assert result.returncode == 0, result.stderr
    gen = Generator(char_int8)
    assert result.stdout == gen.generate("ROMEO:\n", SamplingParams(max_new_tokens=20, temperature=0)).text + "\n"
    for word in ("prompt", "generated", "time to first token", "prefill", "tokens/s", "peak RSS", "max_new_tokens"):
        assert word in result.stderr


def test_cli_stop_understands_escapes(char_fp32):
    gen = Generator(char_fp32)
    text = gen.generate("ROMEO:", SamplingParams(max_new_tokens=60, temperature=0)).text
    assert "\n" in text  # Shakespeare's lines end
    result = run_cli("craft.runtime.cli", str(char_fp32), "ROMEO:", "-n", "60", "-t", "0", "--stop", "\\n")
    assert result.returncode == 0 and result.stdout == text[: text.index("\n")] + "\n"


def test_cli_json(char_int8):
    result = run_cli("craft.runtime.cli", str(char_int8), "ROMEO", "-n", "10", "--seed", "1", "--json", "--backend", "numpy")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["token_ids"]) == 10 and out["stats"]["backend"] == "numpy" and out["stats"]["stop_reason"] == "max_new_tokens"


def test_runtime_never_imports_torch_or_onnx(char_int8, sp_int8):
    code = textwrap.dedent(f"""
        import sys
        from craft.runtime.generator import Generator
        from craft.runtime.sampling import SamplingParams
        for path in ({str(char_int8)!r}, {str(sp_int8)!r}):
            for backend in ("ort", "numpy"):
                text = Generator(path, backend=backend).generate("ROMEO", SamplingParams(max_new_tokens=5, temperature=0)).text
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx"))
        print("LOADED", loaded)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout
    blocked = "import sys\nsys.modules['torch'] = None\nsys.modules['onnx'] = None\n" + code
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    cli = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; "
                          "sys.argv = ['craft-run', sys.argv[1], 'hi', '-n', '3']; from craft.runtime.cli import main; main()", str(char_int8)],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr

