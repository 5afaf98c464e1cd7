"""Import of Hugging Face model directories (craft.export.source_hf): Craft's model with the
imported weights computes transformers' logits; bad directories are one line each.

Random-init models of each supported shape are saved with save_pretrained in tmp dirs (transformers
is a dev-only dependency: skipped without it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from craft.export.sources import HF, SourceError, detect_kind, load_source

transformers = pytest.importorskip("transformers", reason="transformers not installed (a dev-only dependency)")

# below the importorskip, as before: these helpers serve only runs that have transformers
from conftest import run_cli  # noqa: E402
from import_models import (  # noqa: E402
    CHAT_TEMPLATE,
    TORCH_TOLERANCE,
    VOCAB,
    craft_logits,
    max_diff,
    numpy_logits,
    ort_logits,
    random_hf_model,
    reference_logits,
    save_tokenizer,
)

PROMPT = [5, 17, 3, 88, 42, 9, 61, 27, 70, 1, 33, 14, 96, 50, 8, 21]
FILE_TOLERANCE = 1e-4  # the exported float32 file (ONNX Runtime, numpy backend) vs transformers

CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "qwen2-biases": ("qwen2", {}),
    "mistral-head-dim": ("mistral", dict(head_dim=32, sliding_window=None)),  # 4 heads x 32 != hidden 64
    "llama3-rope-scaling": (
        "llama",
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """name -> (transformers model, its save_pretrained directory)."""
    out = {}
    for name, (architecture, overrides) in CASES.items():
        model = random_hf_model(architecture, **overrides)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        save_tokenizer(directory)
        out[name] = (model, directory)
    return out


@pytest.mark.parametrize("name", CASES)
def test_craft_model_matches_transformers(saved, name):
    hf_model, directory = saved[name]
    assert detect_kind(directory) == HF
    source = load_source(directory)
    fed, reference = reference_logits(hf_model, PROMPT)
    assert max_diff(reference, craft_logits(source.model(), fed, len(PROMPT))) < TORCH_TOLERANCE


def test_config_carries_what_the_architectures_need(saved):
    cfg = {name: load_source(directory).config for name, (_, directory) in saved.items()}
    assert (cfg["llama-gqa-untied"].n_kv_head, cfg["llama-gqa-untied"].tie_embeddings) == (2, False)
    assert cfg["llama-tied"].tie_embeddings and not cfg["llama-tied"].qkv_bias
    assert cfg["qwen2-biases"].qkv_bias
    assert (cfg["mistral-head-dim"].head_dim, cfg["mistral-head-dim"].dim) == (32, 64)
    assert (cfg["llama3-rope-scaling"].rope_scaling_factor, cfg["llama3-rope-scaling"].rope_original_context) == (
        8.0,
        16,
    )
    assert cfg["llama3-rope-scaling"].rope_theta == 500000.0


def test_rope_scaling_changes_the_logits(saved):
    """The Llama-3 case would fail without the scaling: the parity above is not vacuous."""
    import dataclasses

    from craft.model import Transformer

    hf_model, directory = saved["llama3-rope-scaling"]
    source = load_source(directory)
    unscaled = Transformer.from_state_dict(
        dataclasses.replace(source.config, rope_scaling_factor=0.0), source.state_dict
    )
    fed, reference = reference_logits(hf_model, PROMPT, steps=0)
    assert max_diff(reference, craft_logits(unscaled, fed, len(PROMPT))) > 0.1


def test_sharded_safetensors_and_pytorch_bin(saved, tmp_path):
    hf_model, _ = saved["qwen2-biases"]
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    as_bin = tmp_path / "bin"
    as_bin.mkdir()
    (as_bin / "config.json").write_text((sharded / "config.json").read_text())
    torch.save(hf_model.state_dict(), as_bin / "pytorch_model.bin")
    fed, reference = reference_logits(hf_model, PROMPT, steps=2)
    for directory in (sharded, as_bin):
        source = load_source(directory)
        assert max_diff(reference, craft_logits(source.model(), fed, len(PROMPT))) < TORCH_TOLERANCE


def test_bfloat16_checkpoint(saved, tmp_path):
    hf_model, _ = saved["llama-gqa-untied"]
    bf16 = random_hf_model("llama").to(torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()})
    bf16.save_pretrained(tmp_path)
    source = load_source(tmp_path)
    for name, tensor in bf16.state_dict().items():
        if name == "model.embed_tokens.weight":
            assert torch.equal(source.state_dict["tok_embeddings.weight"], tensor.float())


# --- bad input: one line each ----------------------------------------------------------------


def copy_model(directory: Path, tmp_path: Path, edit_config=None) -> Path:
    out = tmp_path / "model"
    out.mkdir()
    config = json.loads((directory / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    return out


def refusal(directory: Path) -> str:
    with pytest.raises(SourceError) as e:
        load_source(directory)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_unsupported_architecture_is_named(saved, tmp_path):
    directory = copy_model(saved["llama-tied"][1], tmp_path, lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    message = refusal(directory)
    assert "GPT2LMHeadModel" in message and "LlamaForCausalLM" in message and "Qwen2ForCausalLM" in message


def test_unsupported_rope_scaling_is_named(saved, tmp_path):
    directory = copy_model(
        saved["llama-tied"][1],
        tmp_path,
        lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
    )
    assert "yarn" in refusal(directory)


def test_rope_scaling_beside_rope_parameters_is_not_ignored(saved, tmp_path):
    """transformers 5 merges a rope_scaling into rope_parameters; Craft read rope_parameters alone
    and exported a linear-scaled model unscaled (logits 0.19 off), exit 0."""
    directory = copy_model(
        saved["llama-tied"][1],
        tmp_path,
        lambda c: c.update(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rope_scaling={"rope_type": "linear", "factor": 4.0},
        ),
    )
    assert 'type "linear" is not supported' in refusal(directory)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    llama3["original_max_position_embeddings"] = 16
    (tmp_path / "both").mkdir()
    directory = copy_model(  # rope_scaling replaces rope_parameters, theta and all, as in transformers 5
        saved["llama-tied"][1],
        tmp_path / "both",
        lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rope_scaling=llama3),
    )
    expected = transformers.AutoConfig.from_pretrained(directory).rope_parameters
    cfg = load_source(directory).config
    assert (cfg.rope_theta, cfg.rope_scaling_factor) == (expected["rope_theta"], expected["factor"])


def test_mistral_without_a_sliding_window_key_has_transformers_default_window(saved, tmp_path):
    """MistralConfig's sliding_window defaults to 4096 when config.json has none: beyond it the
    export's full attention differs from transformers. null means no window."""
    for window, context in (("absent", 4096), (None, 8192), (1024, 1024)):

        def edit(c, window=window):
            c.update(max_position_embeddings=8192)
            c.pop("sliding_window", None)
            if window != "absent":
                c["sliding_window"] = window

        (tmp_path / str(window)).mkdir()
        directory = copy_model(saved["mistral-head-dim"][1], tmp_path / str(window), edit)
        assert load_source(directory).config.context_length == context


def test_model_safetensors_wins_over_a_shard_index(saved, tmp_path):
    """transformers loads model.safetensors when both it and an index are there; Craft took the shards."""
    from craft.export.source_hf import weight_headers

    hf_model, _ = saved["qwen2-biases"]
    both = tmp_path / "both"
    hf_model.save_pretrained(both, max_shard_size="40KB")
    (both / "model.safetensors").write_bytes((saved["qwen2-biases"][1] / "model.safetensors").read_bytes())
    assert weight_headers(both)[0] == [both / "model.safetensors"]


def test_llama3_rope_scaling_with_a_missing_field_is_named(saved, tmp_path):
    def drop_factor(c):
        del c["rope_parameters"]["high_freq_factor"]

    directory = copy_model(saved["llama3-rope-scaling"][1], tmp_path, drop_factor)
    assert "high_freq_factor" in refusal(directory)


def test_truncated_safetensors(saved, tmp_path):
    directory = copy_model(saved["llama-gqa-untied"][1], tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert "truncated" in refusal(directory)


def test_a_safetensors_header_that_names_a_tensor_twice(saved, tmp_path):
    """json.loads keeps the last of two entries with one name; the safetensors library refuses the file,
    and Craft exported whichever came last."""
    import struct

    directory = copy_model(saved["llama-gqa-untied"][1], tmp_path)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    entry = json.dumps({"model.norm.weight": header["model.norm.weight"]})[1:-1]
    text = json.dumps(header)[:-1] + ", " + entry + "}"  # the same name once more, at the end
    text += " " * (-len(text) % 8)
    weights.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data[8 + length :])
    assert "names 'model.norm.weight' twice" in refusal(directory)


def test_a_tensor_named_as_craft_names_another_is_refused(saved, tmp_path):
    """An extra tensor called 'norm.weight' beside 'model.norm.weight': both became Craft's norm.weight,
    the last read won, and the export computed another model than transformers loads (which ignores it)."""
    from safetensors.torch import load_file, save_file

    directory = copy_model(saved["llama-gqa-untied"][1], tmp_path)
    weights = load_file(directory / "model.safetensors")
    save_file({**weights, "norm.weight": weights["model.norm.weight"] * 1000}, directory / "model.safetensors")
    message = refusal(directory)
    assert "'model.norm.weight' and 'norm.weight', which are one tensor (norm.weight)" in message


def test_shapes_that_disagree_with_the_config(saved, tmp_path):
    directory = copy_model(saved["llama-gqa-untied"][1], tmp_path, lambda c: c.update(intermediate_size=128))
    message = refusal(directory)
    assert "mlp.gate_proj.weight" in message and "[128, 64]" in message


def test_tensor_the_architecture_does_not_have(saved, tmp_path):
    """A Qwen2 checkpoint relabelled as Llama: its q/k/v biases are refused, not dropped."""
    directory = copy_model(saved["qwen2-biases"][1], tmp_path, lambda c: c.update(architectures=["LlamaForCausalLM"]))
    assert "_proj.bias" in refusal(directory)


def test_missing_weights_and_bad_config(saved, tmp_path):
    directory = copy_model(saved["llama-tied"][1], tmp_path)
    (directory / "model.safetensors").unlink()
    assert "model.safetensors" in refusal(directory)
    (directory / "config.json").write_text("{not json")
    assert "config.json" in refusal(directory)
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    assert "num_attention_heads" in refusal(directory)


def test_vocabulary_in_fixture_is_what_the_tests_assume(saved):
    assert load_source(saved["llama-tied"][1]).config.vocab_size == VOCAB


# --- export: the .onnx file computes what transformers does ----------------------------------


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory) -> dict[str, Path]:
    """name -> float32 .onnx exported from the saved directory."""
    from craft.export.exporter import export

    out = {}
    for name, (_, directory) in saved.items():
        out[name] = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
        report = export(directory, out[name], quantize="none", log=lambda *a: None)
        assert max(report["prefill_max_abs_diff"], report["decode_max_abs_diff"]) < FILE_TOLERANCE
    return out


@pytest.mark.parametrize("name", CASES)
def test_exported_file_matches_transformers(saved, exported, name):
    hf_model, _ = saved[name]
    fed, reference = reference_logits(hf_model, PROMPT)
    assert max_diff(reference, ort_logits(exported[name], fed, len(PROMPT))) < FILE_TOLERANCE


@pytest.mark.parametrize("name", ["qwen2-biases", "mistral-head-dim", "llama-gqa-untied"])
def test_numpy_backend_runs_imported_shapes(saved, exported, name):
    hf_model, _ = saved[name]
    fed, reference = reference_logits(hf_model, PROMPT, steps=3)
    assert max_diff(reference, numpy_logits(exported[name], fed, len(PROMPT))) < FILE_TOLERANCE


def test_metadata_names_the_source(saved, exported):
    from craft.export.sources import load_source as read_source
    from craft.runtime import artifact as A
    from craft.runtime.onnx_file import read_metadata

    meta = read_metadata(exported["qwen2-biases"])
    art = A.Artifact.from_metadata(meta)
    assert art.source_kind == "hf" and art.spec.qkv_bias and not art.spec.tie_embeddings
    assert art.tokenizer_kind == "tokenizer.json" and art.chat_template == CHAT_TEMPLATE and art.eos_id == 1
    assert art.checkpoint_sha256 == read_source(saved["qwen2-biases"][1]).sha256
    assert A.Artifact.from_metadata(read_metadata(exported["mistral-head-dim"])).spec.head_dim == 32


def test_int8_export_of_an_imported_model(saved, tmp_path):
    from craft.export.exporter import export

    report = export(saved["qwen2-biases"][1], tmp_path / "q.onnx", quantize="int8", log=lambda *a: None)
    assert report["perplexity_tokens"] > 500  # the bundled English text stands in for a val split
    assert report["perplexity_ratio"] < 1.01 and report["size_ratio"] < 0.45


def test_cli_refuses_bad_sources_in_one_line(saved, tmp_path):
    bad = copy_model(saved["llama-tied"][1], tmp_path, lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    out = tmp_path / "out.onnx"
    cases = [
        ([str(bad)], "GPT2LMHeadModel"),
        ([str(saved["llama-tied"][1]), "--from", "gguf"], "GGUF"),
        ([str(saved["llama-tied"][1]), "--checkpoint", "best.pt"], "--checkpoint"),
        ([str(tmp_path / "absent.gguf")], "does not exist"),
    ]
    for args, expected in cases:
        result = run_cli("craft.export.cli", *args, "-o", str(out))
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists()


def test_missing_or_unreadable_tokenizer(saved, tmp_path):
    from craft.export.exporter import ExportError, export

    directory = copy_model(saved["llama-tied"][1], tmp_path)  # weights and config, no tokenizer
    with pytest.raises(ExportError, match="tokenizer.json"):
        export(directory, tmp_path / "m.onnx", quantize="none", log=lambda *a: None)
    (directory / "tokenizer.json").write_text("{not json")
    with pytest.raises(ExportError) as e:
        export(directory, tmp_path / "m.onnx", quantize="none", log=lambda *a: None)
    assert "tokenizer.json" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_exports_a_hugging_face_directory_that_craft_run_chats_with(saved, tmp_path):
    out = tmp_path / "m.onnx"
    result = run_cli("craft.export.cli", str(saved["llama-gqa-untied"][1]), "--quantize", "none", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "LlamaForCausalLM, hf" in result.stdout and out.is_file()
    result = run_cli("craft.runtime.cli", str(out), "The light", "-n", "5", "--temperature", "0", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) == 5


def test_a_tied_config_beside_a_different_stored_head_is_refused(saved, tmp_path):
    """tie_word_embeddings=true with an lm_head that differs from the embedding: Craft tied and
    dropped the head, transformers 5 unties and uses it (logits 6.3 apart), exit 0."""
    directory = copy_model(saved["llama-gqa-untied"][1], tmp_path, lambda c: c.update(tie_word_embeddings=True))
    assert "differs from the embedding; set tie_word_embeddings to false" in refusal(directory)


def test_a_weight_that_zeroes_every_logit_fails_verification(tmp_path):
    """up_proj[3, 5] = 1e30 (finite): the residual's square overflows in RMSNorm, every logit is 0
    in PyTorch, ONNX Runtime and numpy alike, so parity passed and the file wrote token 0 forever."""
    model = random_hf_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = 1e30
    model.save_pretrained(tmp_path / "huge")
    save_tokenizer(tmp_path / "huge")
    result = run_cli("craft.export.cli", str(tmp_path / "huge"), "--quantize", "none", "-o", str(tmp_path / "m.onnx"))
    assert result.returncode == 3 and "gives every token the same logit at every position" in result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_weights_that_overflow_the_logits_fail_verification_in_one_line(tmp_path):
    """Norm weights of 3e38 (finite): the logits are inf in PyTorch, so every difference was NaN - the
    report said "differ by nan" after two numpy RuntimeWarning lines on stderr."""
    model = random_hf_model("llama")
    with torch.no_grad():
        model.model.norm.weight[:] = 3e38
    model.save_pretrained(tmp_path / "huge")
    save_tokenizer(tmp_path / "huge")
    result = run_cli("craft.export.cli", str(tmp_path / "huge"), "--quantize", "none", "-o", str(tmp_path / "m.onnx"))
    assert result.returncode == 3 and "logits are not finite (a weight so large" in result.stderr
    assert "Warning" not in result.stderr and "by nan" not in result.stderr, result.stderr
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_weights_that_overflow_calibration_are_refused_in_one_line(tmp_path, quantize):
    """q_proj weights of 1e38 (finite, so the source's check passes): the calibration activations
    are inf, and GPTQ's Cholesky of an inf Hessian was a 53-line LinAlgError traceback (exit 1)."""
    model = random_hf_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:] = 1e38
    model.save_pretrained(tmp_path / "huge")
    save_tokenizer(tmp_path / "huge")
    out = tmp_path / "m.onnx"
    result = run_cli("craft.export.cli", str(tmp_path / "huge"), "--quantize", quantize, "-o", str(out))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "overflows on the calibration text" in result.stderr and "Warning" not in result.stderr
    assert not out.exists()


def test_calibration_that_cannot_fit_in_memory_is_refused_before_it_allocates(monkeypatch):
    """A hidden width of 32,768 needs 8.6 GB per GPTQ Hessian (a 6 MB source claimed it and the
    export took gigabytes): refused in one line against the memory available, before any array."""
    import dataclasses

    import numpy as np

    import craft.runtime.estimate as estimate
    from craft.config import ModelConfig
    from craft.export.calibration import CalibrationError, prepare, working_set_bytes
    from craft.export.exporter import model_spec
    from craft.runtime import weights as W

    spec = dataclasses.replace(model_spec(ModelConfig()), hidden_dim=32768, vocab_size=1024)
    assert working_set_bytes(spec, rotate=False) > 4 * 8 * 32768**2
    monkeypatch.setattr(estimate, "available_memory_mb", lambda: 1000.0)
    with pytest.raises(CalibrationError, match=r"needs ~3\d,\d{3} MB at once .* hidden 32768.* 1,000 MB"):
        prepare({}, spec, W.SCHEMES["int8"], np.zeros(4096, np.int64), rotate=False)


def test_special_tokens_from_older_files_and_config_json(tmp_path):
    """An older save names its specials in special_tokens_map.json only (refused: 'names no EOS
    token'), and without generation_config.json transformers takes the stop ids from config.json's
    eos_token_id list (Craft stopped at one of them only)."""
    from craft.export.source_tokenizer import read_hf_tokenizer

    save_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}})
    )
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [ids["</s>"], 5, 6], "bos_token_id": ids["<s>"]}))
    source = read_hf_tokenizer(tmp_path)
    assert (source.bos_id, source.eos_id) == (ids["<s>"], ids["</s>"])
    assert set(source.end_of_turn_ids) == {ids["</s>"], 5, 6}


def test_a_config_without_architectures_is_read_by_its_model_type(saved, tmp_path):
    """transformers' AutoModelForCausalLM picks the class from model_type; Craft said "architecture
    'llama' is not supported" though it imports Llama."""
    directory = copy_model(saved["llama-tied"][1], tmp_path, lambda c: c.pop("architectures"))
    save_tokenizer(directory)
    assert load_source(directory).config == load_source(saved["llama-tied"][1]).config
