"""Import of GGUF files (craft.export.source_gguf): llama.cpp's q/k row permutation undone, the
package's dequantization, Craft's logits equal to transformers' GGUF loader; bad files one line.

GGUF files are written from random transformers models with gguf.GGUFWriter, as llama.cpp's
converter does; the real SmolLM2-135M-Instruct Q4_1 file is used where it is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from craft.export.source_gguf import permute_rope_rows, unpermute_rope_rows
from craft.export.sources import GGUF, SourceError, detect_kind, load_source

gguf = pytest.importorskip(
    "gguf", reason="gguf not installed (a dev dependency here; craft-export needs it for .gguf sources)"
)
transformers = pytest.importorskip("transformers", reason="transformers not installed (a dev-only dependency)")

# below the importorskips, as before: these helpers serve only runs that have gguf and transformers
from import_models import (  # noqa: E402
    CHAT_TEMPLATE,
    TORCH_TOLERANCE,
    craft_logits,
    max_diff,
    ort_logits,
    random_hf_model,
    reference_logits,
    write_gguf,
)

PROMPT = [5, 17, 3, 88, 42, 9, 61, 27, 70, 1, 33, 14, 96, 50, 8, 21]


def transformers_gguf_model(path: Path):
    """transformers' own GGUF loader (the reference): dequantizes and un-permutes by itself."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


# --- the permutation ---------------------------------------------------------------------------


def rope_rotate_half(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Hugging Face layout: element i pairs with i + hd/2."""
    half = x.shape[0] // 2
    a, b = x[:half], x[half:]
    return np.concatenate([a * np.cos(angles) - b * np.sin(angles), b * np.cos(angles) + a * np.sin(angles)])


def rope_interleaved(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """llama.cpp's layout: element 2i pairs with 2i + 1."""
    a, b = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2], out[1::2] = a * np.cos(angles) - b * np.sin(angles), b * np.cos(angles) + a * np.sin(angles)
    return out


def test_permutation_maps_rotate_half_onto_llama_cpp_rope():
    """RoPE of llama.cpp on the permuted rows == the permuted Hugging Face RoPE: the permutation
    is the one that makes a GGUF compute what the Hugging Face model computes."""
    rng = np.random.default_rng(0)
    n_head, hd, dim = 3, 8, 12
    w = rng.standard_normal((n_head * hd, dim))
    x = rng.standard_normal(dim)
    angles = 7 * 10000.0 ** (-np.arange(0, hd, 2) / hd)  # position 7
    hf = np.concatenate([rope_rotate_half(h, angles) for h in np.split(w @ x, n_head)])
    llama_cpp = np.concatenate(
        [rope_interleaved(h, angles) for h in np.split(permute_rope_rows(w, n_head) @ x, n_head)]
    )
    np.testing.assert_allclose(llama_cpp, permute_rope_rows(hf[:, None], n_head)[:, 0], atol=1e-12)
    assert not np.allclose(permute_rope_rows(w, n_head), w)
    assert np.array_equal(unpermute_rope_rows(permute_rope_rows(w, n_head), n_head), w)


# --- files written from random models --------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A GQA, untied Llama and its GGUF files in F32 and Q8_0."""
    model = random_hf_model("llama")
    directory = tmp_path_factory.mktemp("gguf")
    return model, {q: write_gguf(model, directory / f"llama.{q}.gguf", q) for q in ("F32", "Q8_0")}


def test_f32_gguf_matches_the_transformers_model(llama):
    model, files = llama
    assert detect_kind(files["F32"]) == GGUF
    source = load_source(files["F32"])
    assert (source.config.n_kv_head, source.config.tie_embeddings) == (2, False)
    fed, reference = reference_logits(model, PROMPT)
    assert max_diff(reference, craft_logits(source.model(), fed, len(PROMPT))) < TORCH_TOLERANCE


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_matches_transformers_gguf_loader(llama, qtype):
    path = llama[1][qtype]
    fed, reference = reference_logits(transformers_gguf_model(path), PROMPT)
    assert max_diff(reference, craft_logits(load_source(path).model(), fed, len(PROMPT))) < TORCH_TOLERANCE


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_exported_gguf_matches_transformers_gguf_loader(llama, qtype, tmp_path):
    """The float32 .onnx of a GGUF file: prefill and 8 cached steps within 1e-4 of transformers."""
    from craft.export.exporter import export
    from craft.runtime.artifact import Artifact
    from craft.runtime.onnx_file import read_metadata

    path, onnx_path = llama[1][qtype], tmp_path / f"{qtype}.onnx"
    export(path, onnx_path, quantize="none", log=lambda *a: None)
    art = Artifact.from_metadata(read_metadata(onnx_path))
    assert art.source_kind == "gguf" and art.tokenizer_kind == "tokenizer.json" and art.chat_template == CHAT_TEMPLATE
    fed, reference = reference_logits(transformers_gguf_model(path), PROMPT)
    assert max_diff(reference, ort_logits(onnx_path, fed, len(PROMPT))) < 1e-4


def test_q8_0_is_dequantized_not_reinterpreted(llama):
    """Q8_0 weights are within Q8_0's step of the originals, and not equal to them."""
    model, files = llama
    got = load_source(files["Q8_0"]).state_dict["layers.0.feed_forward.w1.weight"]
    want = model.state_dict()["model.layers.0.mlp.gate_proj.weight"]
    error = float((got - want).abs().max())
    assert 0 < error < float(want.abs().max()) / 127


def test_tied_gguf(tmp_path):
    model = random_hf_model("llama", tie_word_embeddings=True)
    source = load_source(write_gguf(model, tmp_path / "tied.gguf"))
    assert source.config.tie_embeddings
    fed, reference = reference_logits(model, PROMPT, steps=2)
    assert max_diff(reference, craft_logits(source.model(), fed, len(PROMPT))) < TORCH_TOLERANCE


LLAMA3_SCALING = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A Llama with Llama-3 rope scaling, and its GGUF as llama.cpp's converter writes it (rope_freqs.weight)."""
    model = random_hf_model("llama", rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    return model, write_gguf(model, tmp_path_factory.mktemp("llama3") / "llama3.gguf")


def test_llama3_rope_freqs_are_applied(llama3):
    """The GGUF computes what the Hugging Face model with its rope_scaling computes (transformers'
    GGUF loader ignores rope_freqs.weight, so the reference is the original model); without the
    factors the logits would differ."""
    from craft.model import Transformer

    model, path = llama3
    source = load_source(path)
    assert source.rope_divisors is not None and source.config.rope_scaling_factor == 0
    fed, reference = reference_logits(model, PROMPT)
    assert max_diff(reference, craft_logits(source.model(), fed, len(PROMPT))) < TORCH_TOLERANCE
    unscaled = Transformer.from_state_dict(source.config, source.state_dict)
    assert max_diff(reference, craft_logits(unscaled, fed, len(PROMPT))) > 0.1


def test_exported_llama3_gguf_matches_transformers(llama3, tmp_path):
    from craft.export.exporter import export

    model, path = llama3
    export(path, tmp_path / "llama3.onnx", quantize="none", log=lambda *a: None)
    fed, reference = reference_logits(model, PROMPT)
    assert max_diff(reference, ort_logits(tmp_path / "llama3.onnx", fed, len(PROMPT))) < 1e-4


@pytest.mark.parametrize(
    "factors, said",
    [
        (np.ones(3, np.float32), "is F32 (3,), expected F32, F16 or BF16 (8,)"),
        (np.array([1, 2, 0, 4, 8, 8, 8, 8], np.float32), "holds 0.0, expected finite factors above 0"),
        (np.array([1, 2, np.nan, 4, 8, 8, 8, 8], np.float32), "holds nan, expected finite factors above 0"),
    ],
)
def test_bad_rope_freqs_are_refused(tmp_path, monkeypatch, factors, said):
    import import_models

    monkeypatch.setattr(import_models, "llama3_rope_factors", lambda scaling, head_dim: factors)
    model = random_hf_model("llama", rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    with pytest.raises(SourceError, match="rope_freqs.weight") as e:
        load_source(write_gguf(model, tmp_path / "bad.gguf"))
    assert said in str(e.value)


def test_smollm2_q4_1_matches_transformers_gguf_loader(smollm2_gguf):
    """The real SmolLM2-135M-Instruct (Q4_1 and Q8_0 tensors): Craft's model within 1e-3 of
    transformers on 64 ids (measured: 4.4e-5 with logits up to ~34)."""
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    source = load_source(smollm2_gguf)
    assert (source.config.n_layer, source.config.dim, source.config.tie_embeddings) == (30, 576, True)
    with torch.no_grad():
        ours = source.model()(ids)
        reference = transformers_gguf_model(smollm2_gguf)(ids).logits
    assert float((ours - reference).abs().max()) < 1e-3


# --- bad files: one line each ---------------------------------------------------------------


def refusal(path: Path) -> str:
    with pytest.raises(SourceError) as e:
        load_source(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def minimal_gguf(
    path: Path, architecture: str = "llama", tensor_type=None, floats: dict | None = None, embedding=(4, 8), **kvs
) -> Path:
    """A GGUF of one block that holds only the embedding (of shape `embedding`, numpy's order); kvs: more
    keys (a__b for a.b), strings or uint32."""
    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in (floats or {}).items():
        writer.add_float32(key, value)
    for key, value in kvs.items():
        (writer.add_string if isinstance(value, str) else writer.add_uint32)(key.replace("__", "."), value)
    for key, value in dict(
        context_length=16, embedding_length=8, block_count=1, feed_forward_length=16, vocab_size=4
    ).items():
        getattr(writer, f"add_{key}")(value)
    writer.add_head_count(2)
    data = np.ones(embedding, np.float64 if tensor_type == "F64" else np.float32)
    writer.add_tensor("token_embd.weight", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_gguf_architecture(tmp_path):
    message = refusal(minimal_gguf(tmp_path / "m.gguf", "gpt2"))
    assert "'gpt2'" in message and "llama" in message


@pytest.mark.parametrize("key", ["llama.rope.scaling.factor", "llama.rope.scale_linear"])
def test_rope_scaling_factor_without_a_type_is_refused(tmp_path, key):
    """llama.cpp scales linearly by the factor when the type key is absent (and reads the old
    scale_linear key): exported unscaled, the model computed something else, exit 0."""
    message = refusal(minimal_gguf(tmp_path / "m.gguf", floats={key: 4.0}))
    assert f"rope scaling ({key} = 4.0) is not supported" in message


def test_llama3_pre_tokenizer_adds_bos_as_llama_cpp_does(tmp_path):
    """llama.cpp starts a prompt with BOS for the llama3 / llama-bpe pre-tokenizers when the file has
    no add_bos_token; Craft did not, so every prompt lost its BOS."""
    from craft.export.source_tokenizer import read_gguf_tokenizer

    model = random_hf_model("llama")
    for pre, add_bos in (("llama-bpe", True), ("default", False)):
        path = write_gguf(model, tmp_path / f"{pre}.gguf", pre=pre)
        assert read_gguf_tokenizer(path).add_bos is add_bos


def test_default_pre_tokenizer_splits_as_llama_cpp_does(tmp_path):
    """llama.cpp's "default" (a file without tokenizer.ggml.pre too) chains four regexes:
    punctuation runs, GPT-2's, digit runs, then threes. Craft used GPT-2's alone: "don't" split
    as "don" + "'t" and "12345" stayed whole. Both tokenizer paths."""
    import json

    import tokenizers

    from craft.export.source_tokenizer import read_gguf_tokenizer
    from craft.runtime.bpe_pretokenizer import BYTE_CHAR, pre_tokenizer

    spec = json.loads(read_gguf_tokenizer(write_gguf(random_hf_model("llama"), tmp_path / "d.gguf")).tokenizer_json)
    text = "don't 12345 a+b"
    expected = ["don", "'", "t", " ", "123", "45", " a", "+", "b"]  # by llama.cpp's four regexes, in turn
    expected = ["".join(BYTE_CHAR[b] for b in piece.encode()) for piece in expected]
    library = tokenizers.Tokenizer.from_str(json.dumps(spec)).pre_tokenizer.pre_tokenize_str(text)
    assert [piece for piece, _ in library] == expected
    assert [piece for piece, _ in pre_tokenizer(spec["pre_tokenizer"])([(text, True)])] == expected


def test_unsupported_tensor_type(llama, tmp_path):
    """A model whose embedding is F64: named, with the supported types listed."""
    model, _ = llama
    path = write_gguf(model, tmp_path / "f64.gguf")
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(tmp_path / "mixed.gguf"), "llama")
    for name, field in reader.fields.items():
        if name.startswith("llama.") or name == "tokenizer.ggml.tokens":
            value_type = field.types[0]
            if value_type == gguf.GGUFValueType.ARRAY:
                writer.add_array(name, field.contents())
            else:
                writer.add_key_value(name, field.contents(), value_type)
    for t in reader.tensors:
        data = np.asarray(t.data, np.float64 if t.name == "token_embd.weight" else np.float32)
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = refusal(tmp_path / "mixed.gguf")
    assert "token_embd.weight" in message and "F64" in message and "Q8_0" in message


def test_truncated_gguf(llama, tmp_path):
    data = llama[1]["Q8_0"].read_bytes()
    for keep in (len(data) - 100, 200):  # inside the tensor data, inside the metadata
        path = tmp_path / f"cut{keep}.gguf"
        path.write_bytes(data[:keep])
        assert "truncated" in refusal(path)


@pytest.mark.parametrize("embedding", [(), (8,)])
def test_an_embedding_not_of_two_dims_is_refused(tmp_path, embedding):
    """A token_embd.weight of no dims: the vocabulary was read from its last (an IndexError traceback)."""
    message = refusal(minimal_gguf(tmp_path / "m.gguf", embedding=embedding))
    assert "token_embd.weight" in message


def test_tokens_that_are_not_a_list_are_refused(tmp_path):
    """tokenizer.ggml.tokens as one number: len() of it was a TypeError traceback."""
    from craft.export.source_tokenizer import TokenizerSourceError, read_gguf_tokenizer

    path = minimal_gguf(tmp_path / "m.gguf", tokenizer__ggml__model="gpt2", tokenizer__ggml__tokens=5)
    with pytest.raises(TokenizerSourceError, match="tokenizer.ggml.tokens is not a list of strings"):
        read_gguf_tokenizer(path)


def test_gguf_shapes_that_disagree_with_its_metadata(tmp_path):
    message = refusal(minimal_gguf(tmp_path / "m.gguf"))  # says 1 block, holds only the embedding
    assert "blk.0." in message


def test_cli_refuses_a_truncated_gguf_in_one_line(llama, tmp_path):
    from conftest import run_cli

    path = tmp_path / "cut.gguf"
    path.write_bytes(llama[1]["F32"].read_bytes()[:-4096])
    result = run_cli("craft.export.cli", str(path))
    assert result.returncode == 2 and "truncated" in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
        result.stderr
    )
    assert not path.with_suffix(".int8.onnx").exists()


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a model")
    with pytest.raises(SourceError, match="not a GGUF file"):
        detect_kind(path)


def test_smollm2_int8_keeps_float32s_next_tokens(smollm2_gguf, tmp_path):
    """craft-export's own verification of int8 against float32 on the bundled English text:
    measured 97.5% top-1 and +0.06% perplexity (rotations + GPTQ; blocks of 32 gave 95.6% /
    +0.9% before them; the import issue asks 98% top-1: README "Quantization"). The numpy
    backend greedy-decodes what the ort backend does, or parts from it at a near tie alone."""
    from conftest import greedy_on_both_backends
    from craft.export.exporter import export

    path = tmp_path / "smollm2.int8.onnx"
    report = export(smollm2_gguf, path, quantize="int8", log=lambda *a, **k: None)
    assert report["perplexity_tokens"] >= 2000 and report["calibration_tokens"] >= 1000
    # measured 97.4-97.5% / 1.0006-1.0009 +- 0.0009 on three CPUs (the numpy backend: 97.2%); without the
    # residual rotation 96.0%
    assert report["top1_agreement"] >= 0.965 and report["perplexity_ratio"] <= 1.004
    assert len(greedy_on_both_backends(path, "The old lighthouse keeper climbed the stairs and")) > 20
