"""craft-run and its Python API: parity with PyTorch, numpy == ort, sampling, streaming, batching, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

from conftest import run_cli
from craft.export.exporter import load_run
from craft.model import generate as torch_generate
from craft.runtime import artifact as A
from craft.runtime.artifact import ArtifactError
from craft.runtime.generator import CacheReplaced, GenerationError, Generator, Stats, load_artifact
from craft.runtime.sampling import SamplingError, SamplingParams

PROMPTS = ["ROMEO:\n", "First Citizen:\nWe are", "", "Hark 🙂 日本"]


@pytest.fixture(scope="module")
def generators(char_fp32, char_int8, sp_fp32, sp_int8):
    return {
        (name, backend): Generator(path, backend=backend, threads=1)
        for name, path in {
            "char_fp32": char_fp32,
            "char_int8": char_int8,
            "sp_fp32": sp_fp32,
            "sp_int8": sp_int8,
        }.items()
        for backend in ("ort", "numpy")
    }


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
        np_ids = (
            generators[(name, "numpy")].generate(prompt, SamplingParams(max_new_tokens=60, temperature=0)).token_ids
        )
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
    # ~1e-7 apart (float32 summation order), except after an int8 activation that sat on a rounding
    # midpoint was rounded apart by the two: one step of one activation, ~2e-3 of the logits' scale
    assert np.abs(a - b).max() < 5e-3 * np.abs(a).max()


@pytest.mark.parametrize("preset, source", [("tiny", "run"), ("small", "run"), ("tiny", "hf")])
def test_numpy_equals_ort_on_preset_shapes(tmp_path, preset, source):
    """The presets' real shapes (random weights, so logits are close together: a hard case); posing as
    an import, the int8 file has a rotated residual stream and w2's input turned at run time."""
    import dataclasses

    from craft.config import load_config
    from craft.export.exporter import build_model_proto, random_run

    cfg = load_config(preset).model
    cfg.vocab_size = load_config(preset).tokenizer.vocab_size
    run = dataclasses.replace(random_run(cfg), source_kind=source)
    for quantize in ("int8", "none"):
        path = tmp_path / f"{preset}.{quantize}.onnx"
        path.write_bytes(build_model_proto(run, quantize)[0].SerializeToString())
        assert load_artifact(path).spec.ffn_rotation == (source != "run" and quantize == "int8")
        ort_gen, np_gen = Generator(path, "ort", threads=1), Generator(path, "numpy")
        for prompt in ("The", "def main():"):
            expected = ort_gen.generate(prompt, SamplingParams(max_new_tokens=48, temperature=0)).token_ids
            assert np_gen.generate(prompt, SamplingParams(max_new_tokens=48, temperature=0)).token_ids == expected, (
                quantize,
                prompt,
            )


def test_ort_backend_public_api_fallback_gives_the_same_tokens(char_int8, generators, monkeypatch):
    from craft.runtime.ort_backend import OrtBackend

    monkeypatch.setattr(OrtBackend, "use_pybind", False)
    fallback = Generator(char_int8, threads=1)
    import onnxruntime

    assert isinstance(fallback.backend.binding, onnxruntime.IOBinding)  # the public wrapper, not the pybind object
    for prompt in PROMPTS:
        expected = (
            generators[("char_int8", "ort")]
            .generate(prompt, SamplingParams(max_new_tokens=30, temperature=0))
            .token_ids
        )
        assert fallback.generate(prompt, SamplingParams(max_new_tokens=30, temperature=0)).token_ids == expected


def test_temperature_zero_is_greedy_regardless_of_other_settings(generators):
    gen = generators[("sp_fp32", "ort")]
    greedy = gen.generate("ROMEO:", SamplingParams(max_new_tokens=30, temperature=0, top_k=0, top_p=1.0)).token_ids
    assert (
        gen.generate("ROMEO:", SamplingParams(max_new_tokens=30, temperature=0, top_k=5, top_p=0.5, seed=3)).token_ids
        == greedy
    )


def test_seed_reproduces_and_differs(generators):
    gen = generators[("char_int8", "ort")]
    a = gen.generate("ROMEO:", SamplingParams(max_new_tokens=50, temperature=1.0, seed=7)).token_ids
    assert gen.generate("ROMEO:", SamplingParams(max_new_tokens=50, temperature=1.0, seed=7)).token_ids == a
    assert gen.generate("ROMEO:", SamplingParams(max_new_tokens=50, temperature=1.0, seed=8)).token_ids != a
    assert (
        generators[("char_int8", "numpy")]
        .generate("ROMEO:", SamplingParams(max_new_tokens=50, temperature=1.0, seed=7))
        .token_ids
        == a
    )


@pytest.mark.parametrize(
    "name, backend", [("char_fp32", "ort"), ("sp_fp32", "ort"), ("sp_fp32", "numpy"), ("char_fp32", "numpy")]
)
def test_batch_equals_one_by_one(generators, name, backend):
    gen = generators[(name, backend)]
    prompts = ["ROMEO:\n", "First Citizen:\nBefore we proceed", "A", ""]
    batch = gen.generate_batch(prompts, SamplingParams(max_new_tokens=30, temperature=0))
    for prompt, completion in zip(prompts, batch):
        single = gen.generate(prompt, SamplingParams(max_new_tokens=30, temperature=0))
        assert completion.token_ids == single.token_ids, prompt
        assert completion.text == single.text
    sampled = gen.generate_batch(prompts[:2], SamplingParams(max_new_tokens=20, temperature=0.9, seed=5))
    assert (
        sampled[1].token_ids
        == gen.generate(prompts[1], SamplingParams(max_new_tokens=20, temperature=0.9, seed=5)).token_ids
    )


# --- the loop: stop reasons, streaming, edge cases --------------------------------------------------


class ScriptedBackend:
    """Stands in for a backend: the logits make scripts[r] row r's greedy continuation, whatever the input."""

    name = "scripted"

    def __init__(self, spec, scripts):
        self.spec, self.scripts = spec, [list(script) for script in scripts]
        self.calls = []

    def reset(self, batch, context_length=None):
        self.cache_length, self.step = 0, 0

    def forward(self, ids, mask, positions, last_only=False):
        self.calls.append(ids.shape)
        assert mask.shape[1] == self.cache_length + ids.shape[1]
        self.cache_length += ids.shape[1]
        logits = np.zeros((ids.shape[0], 1, self.spec.vocab_size), np.float32)
        for r in range(ids.shape[0]):
            script = self.scripts[r % len(self.scripts)]
            logits[r, -1, script[min(self.step, len(script) - 1)]] = 10.0
        self.step += 1
        return logits


def scripted(gen: Generator, *texts: str, then: list[int] = ()) -> ScriptedBackend:
    gen.backend = ScriptedBackend(gen.spec, [gen.tokenizer.encode(text) + list(then) for text in texts])
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
    pieces = list(
        char_gen.stream(
            "x", SamplingParams(max_new_tokens=len(char_gen.tokenizer.encode("ok 🙂 日本語 ✓ done")), temperature=0)
        )
    )
    assert "".join(pieces) == "ok 🙂 日本語 ✓ done"
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 5


@pytest.mark.parametrize(
    "text, kwargs, expected, reason",
    [
        ("hello world", dict(max_new_tokens=5), "hello", "max_new_tokens"),
        ("hello END more", dict(max_new_tokens=20, stop=["END"]), "hello ", "stop_string"),
        ("ab\n\ncd", dict(max_new_tokens=20, stop=["\n\n", "zz"]), "ab", "stop_string"),
    ],
)
def test_stop_reasons(char_gen, text, kwargs, expected, reason):
    scripted(char_gen, text)
    out = char_gen.generate("x", SamplingParams(temperature=0, **kwargs))
    assert out.text == expected and out.stats.stop_reason == reason


def test_a_batch_row_stops_exactly_as_a_single_prompt_does(char_gen):
    """One stop rule: each row's text is cut before its stop string, its token_ids end with the
    token that completed it, and it generates nothing after (EOS, max_new_tokens alike)."""
    eos = char_gen.artifact.eos_id
    encode = char_gen.tokenizer.encode
    rows = [  # script, text, token_ids, stop reason
        ("hello END more", "hello ", encode("hello END"), "stop_string"),
        ("ab\n\ncd END", "ab", encode("ab\n\n"), "stop_string"),
        ("no stop string here at all", "no stop string here ", encode("no stop string here "), "max_new_tokens"),
        ("ok", "ok", encode("ok"), "eos"),
    ]
    params = SamplingParams(max_new_tokens=20, temperature=0, stop=("END", "\n\n"))
    scripted(char_gen, *(row[0] for row in rows), then=[eos])
    batch = char_gen.generate_batch(["x", "a longer prompt", "", "y"], params)
    for (script, text, token_ids, reason), got in zip(rows, batch):
        assert (got.text, got.token_ids, got.stats.stop_reason, got.stats.generated_tokens) == (
            text,
            token_ids,
            reason,
            len(token_ids),
        ), script
        scripted(char_gen, script, then=[eos])
        single = char_gen.generate("x", params)
        assert (single.text, single.token_ids, single.stats.stop_reason) == (text, token_ids, reason), script


def test_stream_never_yields_the_start_of_a_stop_string(char_gen):
    scripted(char_gen, "one, two, thr three")
    pieces = list(char_gen.stream("x", SamplingParams(max_new_tokens=30, temperature=0, stop=("three",))))
    assert "".join(pieces) == "one, two, thr " and len(pieces) > 3  # "thr" was held back, then released


def test_stream_and_batch_validate_alike(char_gen):
    with pytest.raises(SamplingError, match="--max-new-tokens must be >= 0"):
        char_gen.generate_batch(["a"], SamplingParams(max_new_tokens=-1))  # the settings refuse it, for both
    with pytest.raises(GenerationError, match="not valid UTF-8 text"):
        char_gen.generate("caf\udce9", SamplingParams(max_new_tokens=2))  # argv's undecodable byte, smuggled in
    with pytest.raises(GenerationError, match="not valid UTF-8 text"):
        char_gen.generate_batch(["ok", "caf\udce9"], SamplingParams(max_new_tokens=2))


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
    with pytest.raises(
        GenerationError, match=r"the prompt is \d+ tokens but the model's context is 64; shorten it or pass --truncate"
    ):
        gen.generate(long_prompt, SamplingParams(max_new_tokens=5))
    out = gen.generate(long_prompt, SamplingParams(max_new_tokens=5, temperature=0), truncate=True)
    assert len(out.token_ids) == 5


def test_empty_prompt_without_bos_is_a_one_line_error(char_gen, monkeypatch):
    """Most imported tokenizers add no BOS: an empty prompt is then no tokens at all."""
    monkeypatch.setattr(char_gen.tokenizer, "add_bos", False)
    for call in (
        lambda: char_gen.generate("", SamplingParams(max_new_tokens=3)),
        lambda: char_gen.generate_batch(["", ""], SamplingParams(max_new_tokens=3)),
    ):
        with pytest.raises(GenerationError, match="the prompt is empty and this model adds no BOS token"):
            call()
    with pytest.raises(GenerationError, match="encodes to no tokens"):  # past encode_prompt (a chat template)
        list(char_gen._token_steps([[]], SamplingParams(max_new_tokens=3), Stats("ort"), 0.0))


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
    with pytest.raises(ArtifactError, match=f"format version 99, this runtime reads versions 1 to {A.FORMAT_VERSION}"):
        Generator(tmp_path / "future.onnx")
    (tmp_path / "text.onnx").write_text("hello")
    with pytest.raises(ArtifactError, match="is it a Craft model"):
        Generator(tmp_path / "text.onnx")
    with pytest.raises(ArtifactError, match="does not exist"):
        Generator(tmp_path / "missing.onnx")


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--top-k", "-1"], "--top-k must be an integer >= 0"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--temperature", "-0.5"], "--temperature must be >= 0"),
        (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 0"),
        (["--backend", "tflite"], "'tflite' is not one of 'ort', 'numpy'"),
    ],
)
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
    result = run_cli(
        "craft.runtime.cli", str(char_int8), "ROMEO", "-n", "10", "--seed", "1", "--json", "--backend", "numpy"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (
        len(out["token_ids"]) == 10
        and out["stats"]["backend"] == "numpy"
        and out["stats"]["stop_reason"] == "max_new_tokens"
    )


def test_runtime_never_imports_torch_or_onnx(char_int8, sp_int8):
    code = textwrap.dedent(f"""
        import sys
        from craft.runtime.generator import Generator
        from craft.runtime.sampling import SamplingError, SamplingParams
        for path in ({str(char_int8)!r}, {str(sp_int8)!r}):
            for backend in ("ort", "numpy"):
                text = Generator(path, backend=backend).generate(
                    "ROMEO", SamplingParams(max_new_tokens=5, temperature=0)
                ).text
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx"))
        print("LOADED", loaded)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout
    blocked = "import sys\nsys.modules['torch'] = None\nsys.modules['onnx'] = None\n" + code
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    cli = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; "
            "sys.argv = ['craft-run', sys.argv[1], 'hi', '-n', '3']; from craft.runtime.cli import main; main()",
            str(char_int8),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr


@pytest.mark.parametrize("backend", ["ort", "numpy"])
@pytest.mark.parametrize("name", ["char_fp32", "char_int8"])
def test_long_prompt_is_prefilled_in_chunks_with_the_same_tokens(request, name, backend, monkeypatch):
    """A prompt longer than PREFILL_CHUNK goes in chunks (bounded memory), and the continuation is
    the one a single whole-prompt forward gives."""
    import craft.runtime.generator as G

    gen = Generator(request.getfixturevalue(name), backend=backend, threads=1)
    prompt = "KING HENRY:\nO God of battles! steel my soldiers' hearts"
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    ids = gen.encode_prompt(prompt, 8)
    sizes, forward = [], gen.backend.forward
    monkeypatch.setattr(gen.backend, "forward", lambda x, *a, **k: sizes.append(x.shape[1]) or forward(x, *a, **k))
    monkeypatch.setattr(G, "PREFILL_CHUNK", 16)  # the char model's context is 64
    chunked = gen.generate(prompt, greedy).token_ids
    whole, rest = divmod(len(ids), 16)
    assert whole >= 2 and sizes == [16] * whole + [rest] * (rest > 0) + [1] * 7  # then one token per step
    assert gen.cached_ids[: len(ids)] == ids
    monkeypatch.setattr(G, "PREFILL_CHUNK", 10_000)
    sizes.clear()
    assert gen.generate(prompt, greedy).token_ids == chunked and sizes[0] == len(ids)


def test_a_prefill_stopped_between_chunks_leaves_the_cache_accounted_for(char_fp32, monkeypatch):
    """cached_ids follows the backend's cache chunk by chunk: after a failure in the second chunk
    it names the first chunk's tokens, and the next generation still gives the right tokens."""
    import craft.runtime.generator as G

    gen = Generator(char_fp32, threads=1)
    prompt = "KING HENRY:\nO God of battles! steel my soldiers' hearts"
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    expected = gen.generate(prompt, greedy).token_ids
    monkeypatch.setattr(G, "PREFILL_CHUNK", 16)
    forward, calls = gen.backend.forward, []

    def failing(ids, *args, **kwargs):
        calls.append(ids.shape[1])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a prefill
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(gen.backend, "forward", failing)
    with pytest.raises(KeyboardInterrupt):
        gen.generate(prompt, greedy)
    assert gen.cached_ids == gen.encode_prompt(prompt, 8)[:16] and gen.backend.cache_length == 16
    monkeypatch.setattr(gen.backend, "forward", forward)
    assert gen.generate(prompt, greedy).token_ids == expected


@pytest.mark.parametrize("backend", ["ort", "numpy"])
def test_two_streams_on_one_generator_refuse_rather_than_mix(char_int8, backend):
    """The second stream reset the KV-cache under the first, and both produced wrong text in silence."""
    gen = Generator(char_int8, backend=backend, threads=1)
    greedy = SamplingParams(temperature=0, max_new_tokens=20)
    alone = gen.generate("ROMEO:", greedy).text
    first, second = gen.stream("ROMEO:", greedy), gen.stream("JULIET:", greedy)
    next(first)
    next(second)
    with pytest.raises(CacheReplaced, match="another generation on this Generator started"):
        list(first)
    assert gen.generate("ROMEO:", greedy).text == alone  # and the Generator is usable afterwards


def test_api_misuse_is_one_clear_error(char_int8):
    """Wrong types through the Python API: AttributeErrors from deep inside, a str taken as a batch
    of one-character prompts, a float context that failed at the first generation."""
    gen = Generator(char_int8, threads=1)
    for prompt in (None, 123, b"abc", ["a"]):
        with pytest.raises(TypeError, match="a prompt is text"):
            gen.generate(prompt)
    with pytest.raises(TypeError, match="sampling must be a SamplingParams, got dict"):
        gen.generate("a", {"max_new_tokens": 3})
    with pytest.raises(TypeError, match="generate_batch takes a list of prompts, got one str"):
        gen.generate_batch("abc")
    with pytest.raises(TypeError, match="messages must be a list"):
        gen.generate_chat(None)
    for value in (64.0, 1.5, True, "64"):
        with pytest.raises(ValueError, match=r"--max-context must be in 1..\d+ .an integer"):
            Generator(char_int8, max_context=value)
        with pytest.raises(ValueError, match="--threads must be in 0..1024 .an integer"):
            Generator(char_int8, threads=value)
    with pytest.raises(SamplingError, match="--max-new-tokens must be >= 0 .* got '5'"):
        SamplingParams(max_new_tokens="5")
    with pytest.raises(SamplingError, match="--temperature must be a number, got '0.5'"):
        SamplingParams(temperature="0.5")


def test_model_paths_batches_and_truncate_of_the_wrong_kind_are_one_clear_error(char_int8):
    """Generator(123) / (None) / (b"...") were os.stat's TypeErrors, a NUL byte its ValueError, an unpaired
    surrogate a UnicodeEncodeError; generate_batch(None) "'NoneType' object is not iterable", a dict or
    set ran their keys in no order the caller gave; truncate="no" truncated."""
    for path in (123, None, 1.5, [str(char_int8)], str(char_int8).encode()):
        with pytest.raises(TypeError, match="a model path is a str or os.PathLike, got"):
            Generator(path)
    for path in ("model\ud800.onnx", "a\0b.onnx"):
        with pytest.raises(ArtifactError, match="is not a file name: it holds an? (unpaired surrogate|NUL)"):
            Generator(path)
    gen = Generator(char_int8, threads=1)
    for prompts in (None, 5, {"ROMEO:": 1}, {"ROMEO:", "JULIET:"}, b"ROMEO:"):
        with pytest.raises(TypeError, match="generate_batch takes a list of prompts, got"):
            gen.generate_batch(prompts)
    for call in (gen.generate, gen.stream, lambda p, s, truncate: gen.generate_batch([p], s, truncate=truncate)):
        with pytest.raises(TypeError, match="truncate must be True or False, got 'no'"):
            list(call("ROMEO:" * 100, SamplingParams(max_new_tokens=2), truncate="no"))
    assert len(gen.generate_batch(iter(["ROMEO:", "JULIET:"]), SamplingParams(max_new_tokens=2))) == 2


@pytest.mark.parametrize("backend", ["ort", "numpy"])
def test_a_batch_that_cannot_fit_in_memory_is_refused_before_it_allocates(char_int8, backend, monkeypatch):
    """1,000 prompts to a 1 MB model took 2.5 GB at their one-call prefill, whatever memory was left."""
    import craft.runtime.generator as G
    from craft.runtime.estimate import batch_prefill_bytes

    gen = Generator(char_int8, backend=backend, threads=1)
    params = SamplingParams(max_new_tokens=2, temperature=0)
    prompts = ["ROMEO: " * 8] * 1000
    width = len(gen.encode_prompt(prompts[0], 2))
    half = batch_prefill_bytes(gen.artifact, 500, width, gen.context_length) / 2**20  # memory for 500 rows
    monkeypatch.setattr(G, "available_memory_mb", lambda: half)
    resets = []
    monkeypatch.setattr(gen.backend, "reset", lambda *a, **k: resets.append(a))
    with pytest.raises(GenerationError, match=r"a batch of 1,000 prompts of up to \d+ tokens needs about [\d,]+ MB"):
        gen.generate_batch(prompts, params)
    assert resets == []  # refused before the cache was sized
    monkeypatch.undo()
    monkeypatch.setattr(G, "available_memory_mb", lambda: half)
    assert [c.text for c in gen.generate_batch(prompts[:20], params)] == [gen.generate(prompts[0], params).text] * 20


def test_numpy_backend_survives_its_file_rewritten_in_place(char_int8, tmp_path):
    """`cp other.onnx model.onnx` while the numpy backend ran: its weights were views of a mapping of
    the file, and the truncation killed the process with SIGBUS (exit 135, half an answer). In a
    child process, so that the old behaviour fails this test instead of killing pytest."""
    live = tmp_path / "live.onnx"
    live.write_bytes(char_int8.read_bytes())
    code = textwrap.dedent(
        f"""
        from craft.runtime.generator import Generator
        from craft.runtime.sampling import SamplingParams
        gen = Generator({str(live)!r}, backend="numpy", threads=1)
        greedy = SamplingParams(temperature=0, max_new_tokens=30)
        before = gen.generate("ROMEO:", greedy).text
        with open({str(live)!r}, "r+b") as f:  # rewritten in place, as cp does: truncated, then other bytes
            f.truncate(0)
            f.write(bytes(100))
        assert gen.generate("ROMEO:", greedy).text == before
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])


def test_eos_after_half_a_character_gives_the_text_decode_gives():
    """EOS right after an unfinished UTF-8 character: the text dropped its bytes while
    decode(token_ids) gives U+FFFD, so the Completion's text and ids disagreed."""
    from craft.runtime.generator import Continuation
    from craft.runtime.tokenizer import CharTokenizer

    tok = CharTokenizer("a")
    row = Continuation(tok, stop_ids=(tok.eos_id,), stop=())
    ids = tok.encode("a\u20ac")[:-1]  # 'a' and two of the euro sign's three byte-fallback tokens
    text = "".join(row.feed(t) for t in (*ids, tok.eos_id)) + row.finish(100)
    assert row.stop_reason == "eos" and text == tok.decode(row.token_ids)


def test_truncate_keeps_the_prompt_end_at_any_context(char_gen):
    """--truncate at a context of 2 kept BOS alone (none of the prompt); a prompt that fills the
    context exactly was cut by one though the last new token is never fed back."""
    prompt = "ROMEO: hello"
    full = char_gen.encode_prompt(prompt, 1)
    bos = full[:1]
    for ctx, new, expected in ((2, 1, bos + full[-1:]), (2, 9, bos + full[-1:]), (4, 1, bos + full[-3:])):
        char_gen.context_length = ctx
        assert char_gen.encode_prompt(prompt, new, truncate=True) == expected
    char_gen.context_length = 1
    assert char_gen.encode_prompt(prompt, 1, truncate=True) == full[-1:]  # no room for BOS: the last token


@pytest.mark.parametrize("replacement", ["another model", "garbage"])
@pytest.mark.parametrize("backend", ["ort", "numpy"])
def test_a_file_replaced_while_loading_is_named_as_such(
    char_int8, char_fp32, tmp_path, monkeypatch, backend, replacement
):
    """The file was checked, then replaced before the backend read it: the backend loaded another
    file than the one checked (silently, for a valid one), or failed with 'ONNX Runtime cannot load
    it; re-export it', blaming the export."""
    import craft.runtime.generator as G

    live = tmp_path / "live.onnx"
    live.write_bytes(char_int8.read_bytes())
    load = G.Generator._load_backend

    def replaced_first(self, *args):
        fresh = tmp_path / "fresh.onnx"
        fresh.write_bytes(char_fp32.read_bytes() if replacement == "another model" else bytes(100))
        fresh.replace(live)  # as an export's atomic rename does
        return load(self, *args)

    monkeypatch.setattr(G.Generator, "_load_backend", replaced_first)
    with pytest.raises(ArtifactError, match=r"live.onnx changed while it was loading \(rewritten or replaced\)"):
        Generator(live, backend=backend)


@pytest.mark.parametrize("use_pybind", [True, False])
def test_a_dropped_ort_generator_frees_its_session_at_once(char_int8, monkeypatch, use_pybind):
    """The backend's closures held self: a reference cycle kept the session (weights, threads, KV-cache)
    alive after `del` until the cyclic garbage collector ran - a server's reload held two models."""
    import gc
    import weakref

    from craft.runtime.ort_backend import OrtBackend

    monkeypatch.setattr(OrtBackend, "use_pybind", use_pybind)
    gen = Generator(char_int8, threads=1)
    gen.generate("ROMEO:", SamplingParams(max_new_tokens=4, temperature=0))
    backend = weakref.ref(gen.backend)
    gc.disable()
    try:
        del gen
        assert backend() is None
    finally:
        gc.enable()


def test_a_model_path_that_is_not_utf8_loads_on_both_backends(char_int8, generators, tmp_path):
    """onnxruntime takes only paths it can encode as UTF-8: a name with an undecodable byte was a
    TypeError traceback from InferenceSession; the numpy backend read it all along."""
    import os
    import shutil

    path = os.fsdecode(os.fsencode(tmp_path) + b"/model\xff.onnx")
    shutil.copyfile(char_int8, path)
    expected = generators[("char_int8", "ort")].generate("ROMEO:", SamplingParams(max_new_tokens=20, temperature=0))
    for backend in ("ort", "numpy"):
        got = Generator(path, backend=backend, threads=1).generate(
            "ROMEO:", SamplingParams(max_new_tokens=20, temperature=0)
        )
        assert got.token_ids == expected.token_ids, backend


@pytest.mark.parametrize("backend", ["ort", "numpy"])
def test_a_stream_stepped_in_another_thread_refuses_a_concurrent_generation(char_int8, backend):
    """The claim belongs to the thread that started a stream; a worker stepping it while that thread
    began another generation ran two in one backend at once: heap corruption (ort) or wrong text (numpy)."""
    import threading

    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    expected = Generator(char_int8, backend=backend, threads=1).generate("ROMEO:", greedy).text
    gen = Generator(char_int8, backend=backend, threads=1)
    stream = gen.stream("ROMEO:", greedy)
    pieces = [next(stream)]  # started (and claimed) in this thread
    inside, release = threading.Event(), threading.Event()
    forward = gen.backend.forward

    def slow_forward(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            inside.set()
            release.wait(30)
        return forward(*args, **kwargs)

    gen.backend.forward = slow_forward
    worker = threading.Thread(target=lambda: pieces.extend(stream))
    worker.start()
    assert inside.wait(30)  # the worker is in the middle of a step
    with pytest.raises(GenerationError, match="running a step in another thread"):
        gen.generate("JULIET:", greedy)
    release.set()
    worker.join(30)
    assert "".join(pieces) == expected  # the refused call touched nothing
    gen.backend.forward = forward
    assert gen.generate("ROMEO:", greedy).text == expected
