"""craft-export under hostile conditions: an output that is not a regular file is refused (never
replaced), a damaged or foreign run directory is one line (exit 2), stale temp files of killed
exports are swept, and the tokenizer verified is the one that goes into the file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from craft import run_dir as rd
from craft.data import DATA_INFO, TOKENS
from craft.export.exporter import ExportError, check_output_path
from craft.runtime.generator import load_artifact


def assert_one_line(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and lines[0].startswith("craft-export: error:"), (
        result.returncode,
        result.stderr[-3000:],
    )
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def run_copy(tmp_path, char_run) -> Path:
    """A copy of the session's char run (tests damage it), without its exports."""
    copy = tmp_path / "run"
    shutil.copytree(char_run, copy, ignore=shutil.ignore_patterns("*.onnx"))
    return copy


@pytest.mark.parametrize("target", ["/dev/null", "/dev/full", "fifo"])
def test_output_that_is_not_a_regular_file_is_refused(tmp_path, target):
    """As root, renaming over /dev/null would replace the device with a file: refused before any work."""
    if target == "fifo":
        output = tmp_path / "pipe.onnx"
        os.mkfifo(output)
    else:
        output = Path(target)
        if not output.exists():
            pytest.skip(f"no {target} on this system")
    before = os.stat(output)
    with pytest.raises(ExportError, match="not a regular file"):
        check_output_path(output)
    after = os.stat(output)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)
    assert not stat.S_ISREG(after.st_mode)


def test_symlink_loops_are_one_line(char_run, tmp_path):
    """As -o, or under it, a loop was a RuntimeError traceback (Path.resolve); as the source it was
    named as an output under it."""
    loop = tmp_path / "loop.onnx"
    loop.symlink_to(loop.name)
    for output in (loop, loop / "x.onnx"):  # a bad output path, as one through a file: exit 2, not 1
        assert_one_line(run_cli("craft.export.cli", str(char_run), "-o", str(output)), 2, "symbolic links")
    through_a_file = tmp_path / "file.onnx"
    through_a_file.write_bytes(b"")
    result = run_cli("craft.export.cli", str(char_run), "-o", str(through_a_file / "m.onnx"))
    assert_one_line(result, 2, "(Not a directory); choose another -o")
    source = tmp_path / "model.gguf"
    source.symlink_to(source.name)
    assert_one_line(run_cli("craft.export.cli", str(source)), 2, f"cannot read {source}", "symbolic links")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_after_the_file_is_written_exits_0(char_run, tmp_path, signum):
    """SIGTERM as 'wrote ...' appeared exited 143 ('nothing written') or died of the signal in the
    interpreter's teardown; SIGINT printed a KeyboardInterrupt traceback from an atexit callback. The
    file was complete either way: once it is renamed into place the export exits 0."""
    output = tmp_path / "m.onnx"
    export = subprocess.Popen(
        [sys.executable, "-m", "craft.export.cli", str(char_run), "--quantize", "none", "-o", str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in export.stdout:
        if line.startswith("wrote "):
            export.send_signal(signum)
            break
    _, err = export.communicate(timeout=120)
    assert export.returncode == 0 and "Traceback" not in err, (export.returncode, err)
    assert load_artifact(output).quantization == "none"


def test_empty_checkpoint_name_is_one_line(char_run, tmp_path):
    """--checkpoint "" named the run directory itself: "RUN does not exist; training has not saved"."""
    output = tmp_path / "m.onnx"
    result = run_cli("craft.export.cli", str(char_run), "--checkpoint", "", "-o", str(output))
    assert_one_line(result, 2, "--checkpoint is empty")
    assert not output.exists()


def test_output_device_through_the_command_is_one_line(char_run):
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null on this system")
    assert_one_line(run_cli("craft.export.cli", str(char_run), "-o", "/dev/null"), 2, "/dev/null", "not a regular file")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize(
    "damage",
    [
        "config_binary",
        "config_directory",
        "config_symlink_loop",
        "data_json_garbage",
        "data_json_dtype",
        "data_json_val_fraction",
        "data_json_no_dtype",
        "tokens_empty",
        "tokens_truncated",
        "tokenizer_garbage",
        "tokenizer_swapped",
        "checkpoint_pickle",
        "tokens_unreadable",
        "tokens_past_the_vocabulary",  # from here: each a traceback, or (complex) exported without its imaginary part
        "checkpoint_float8",
        "checkpoint_complex",
        "checkpoint_config_list",
    ],
)
def test_damaged_run_directory_is_one_line(run_copy, damage):
    from craft import checkpoint as ckpt
    from craft.runtime.tokenizer import CharTokenizer

    expected = {
        "config_binary": "not a UTF-8 text file",
        "config_directory": "config.yaml is not a regular file (a directory, or a broken or looping symlink)",
        "config_symlink_loop": "config.yaml (Too many levels of symbolic links)",  # no '--overwrite' advice
        "data_json_garbage": "is damaged",
        "data_json_dtype": 'is damaged (dtype "bogus", expected "uint16" or "uint32")',  # each of these 4: a traceback
        "data_json_val_fraction": 'is damaged (val_fraction "x", expected a number in [0, 1))',
        "data_json_no_dtype": "is damaged (dtype null",
        "tokens_empty": "truncated or replaced",
        "tokens_truncated": "truncated or replaced",
        "tokenizer_garbage": "is not a valid tokenizer",
        "tokenizer_swapped": "is not the tokenizer this run was trained with",
        "checkpoint_pickle": "data only",
        "tokens_unreadable": "Permission denied",
        "tokens_past_the_vocabulary": "does not match data.json (its length, its SHA-256 or an id past the vocabulary)",
        "checkpoint_float8": "weight 'tok_embeddings.weight' is float8_e4m3fn, not a float32/16 tensor",
        "checkpoint_complex": "weight 'tok_embeddings.weight' is complex64, not a float32/16 tensor",
        "checkpoint_config_list": "was trained with a different model config",
    }[damage]
    code = 1 if damage == "tokens_unreadable" else 2
    if damage == "config_binary":
        (run_copy / rd.CONFIG).write_bytes(b"\x00\xff\xfebinary\x89")
    elif damage == "config_symlink_loop":
        (run_copy / rd.CONFIG).unlink()
        (run_copy / rd.CONFIG).symlink_to(rd.CONFIG)
    elif damage == "config_directory":
        (run_copy / rd.CONFIG).unlink()
        (run_copy / rd.CONFIG).mkdir()
    elif damage == "data_json_garbage":
        (run_copy / DATA_INFO).write_bytes(b"\x00\x01")
    elif damage.startswith("data_json_"):
        info = json.loads((run_copy / DATA_INFO).read_text())
        edit = {"data_json_dtype": {"dtype": "bogus"}, "data_json_val_fraction": {"val_fraction": "x"}}.get(damage, {})
        info = {k: v for k, v in {**info, **edit}.items() if not (damage == "data_json_no_dtype" and k == "dtype")}
        (run_copy / DATA_INFO).write_text(json.dumps(info))
    elif damage == "tokens_empty":
        info = json.loads((run_copy / DATA_INFO).read_text())  # no length or hash to check the file against
        info = {k: v for k, v in info.items() if not k.startswith(("n_", "tok"))}
        (run_copy / DATA_INFO).write_text(json.dumps(info))
        (run_copy / TOKENS).write_bytes(b"")
    elif damage == "tokens_truncated":
        with open(run_copy / TOKENS, "r+b") as f:
            f.truncate(os.path.getsize(run_copy / TOKENS) - 3)
    elif damage == "tokenizer_garbage":
        (run_copy / rd.CHAR_TOKENIZER).write_text('{"kind": "char", "chars": "aa"}')  # a repeated character
    elif damage == "tokenizer_swapped":
        (run_copy / rd.CHAR_TOKENIZER).write_bytes(CharTokenizer.train(["the quick brown fox\n"]).to_bytes())
    elif damage == "checkpoint_pickle":
        import pickle

        data = pickle.dumps({"format": ckpt.FORMAT, "step": 1, "evil": Path("/etc")})
        (run_copy / "evil.pt").write_bytes(ckpt.MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)
    elif damage == "tokens_past_the_vocabulary":  # the hash recomputed: the file is what data.json says
        info = json.loads((run_copy / DATA_INFO).read_text())
        tokens = np.fromfile(run_copy / TOKENS, info["dtype"])
        tokens[-1] = 60000
        tokens.tofile(run_copy / TOKENS)
        info["tokens_sha256"] = hashlib.sha256(tokens.tobytes()).hexdigest()
        (run_copy / DATA_INFO).write_text(json.dumps(info))
    elif damage.startswith("checkpoint_"):
        import torch

        payload, _ = ckpt.read(run_copy / rd.CHECKPOINT)
        weight = payload["model"]["tok_embeddings.weight"]
        if damage == "checkpoint_config_list":
            payload["config"]["model"] = [1]
        else:
            payload["model"]["tok_embeddings.weight"] = weight.to(
                torch.float8_e4m3fn if damage == "checkpoint_float8" else torch.complex64
            )
        (run_copy / rd.CHECKPOINT).unlink()  # a hard link to the newest step file
        ckpt.write(payload, run_copy / rd.CHECKPOINT)
    elif damage == "tokens_unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads any file: no unreadable tokens.bin")
        (run_copy / TOKENS).chmod(0)
    args = ["--checkpoint", "evil.pt"] if damage == "checkpoint_pickle" else []
    output = run_copy / "out.onnx"
    line = assert_one_line(run_cli("craft.export.cli", str(run_copy), "-o", str(output), *args), code, expected)
    assert "weights_only" not in line
    assert not output.exists() and not [p for p in run_copy.iterdir() if p.name.endswith(".tmp")]


def test_a_run_whose_config_claims_a_larger_model_is_refused_before_it_is_built(run_copy):
    """config.yaml and the checkpoint's saved config agree on dim 1024 x 24 layers, and the checkpoint
    holds no weights: the model (1.2 GB here; 24 GB for a larger claim, OOM-killed) was built
    before load_state_dict said so. The checkpoint's names and shapes are checked first now, as an
    import's are (sources.check_shapes)."""
    import yaml

    from craft import checkpoint as ckpt

    payload, _ = ckpt.read(run_copy / rd.CHECKPOINT)
    payload["config"]["model"].update(dim=1024, n_layer=24, n_head=16, n_kv_head=16)
    payload["model"] = {}
    (run_copy / rd.CHECKPOINT).unlink()  # a hard link to the newest step file
    ckpt.write(payload, run_copy / rd.CHECKPOINT)
    config = yaml.safe_load((run_copy / rd.CONFIG).read_text())
    config["model"].update(dim=1024, n_layer=24, n_head=16, n_kv_head=16)
    (run_copy / rd.CONFIG).write_text(yaml.safe_dump(config))
    output = run_copy / "out.onnx"
    result = run_cli("craft.export.cli", str(run_copy), "-o", str(output))
    said = "does not fit the model of config.yaml: the checkpoint lacks layer 0 (layers.0.attention_norm"
    assert_one_line(result, 2, said)
    assert not output.exists()


def test_stray_tokenizer_of_another_kind_is_ignored_and_stale_temps_swept(run_copy, sp_run):
    """A sentencepiece tokenizer.model left in a char run: export packs (and verifies) the char
    tokenizer the run was trained with, which craft-run then loads; a temp file of a killed export
    is swept, one of a live writer is not."""
    from craft.runtime.generator import Generator

    shutil.copy(sp_run / rd.SP_TOKENIZER, run_copy / rd.SP_TOKENIZER)
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        stale, live = run_copy / f".model.onnx.{gone.pid}.x1.tmp", run_copy / f".model.onnx.{alive.pid}.x2.tmp"
        stale.write_bytes(b"partial")
        live.write_bytes(b"partial")
        output = run_copy / "model.onnx"
        result = run_cli("craft.export.cli", str(run_copy), "-o", str(output), "--quantize", "none")
        assert result.returncode == 0, result.stderr
        assert not stale.exists() and live.exists()
    finally:
        alive.kill()
        alive.wait()
    generator = Generator(output, backend="numpy")
    assert generator.artifact.tokenizer_kind == "char"
    assert generator.artifact.tokenizer_data == (run_copy / rd.CHAR_TOKENIZER).read_bytes()


# --- hostile imported sources: each refused in one line (exit 2), nothing written ---------------------
#
# A small Llama as a Hugging Face directory (config.json, model.safetensors written here, tokenizer.json
# from import_models.save_tokenizer) and as a GGUF file; each test copies one and damages the copy.

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 300,  # import_models.VOCAB: the tokenizer's size
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def small_weights(table: dict[str, str]) -> dict[str, np.ndarray]:
    """Random weights of HF_CONFIG's model under a source's names (`table`: source -> Craft, with {i})."""
    from craft.config import ModelConfig
    from craft.export.sources import expected_shapes, rename

    cfg = ModelConfig(vocab_size=300, dim=16, n_layer=2, n_head=2, n_kv_head=1, ffn_dim=32, context_length=32)
    cfg.tie_embeddings = False
    back = {craft: name for name, craft in table.items()}
    rng = np.random.default_rng(0)
    return {
        rename(name, back): (rng.standard_normal(shape) * 0.2 + ("norm" in name)).astype(np.float32)
        for name, shape in expected_shapes(cfg).items()
    }


def write_safetensors(path: Path, tensors: dict, edit_header=None) -> None:
    """A .safetensors file of float32 `tensors`; edit_header(header) may return another header (any JSON)."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = array.tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if edit_header is not None:
        header = edit_header(header)
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory) -> Path:
    """A Hugging Face directory that exports (test_pristine_sources_export); tests damage copies."""
    pytest.importorskip("tokenizers", reason="save_tokenizer trains with the tokenizers library")
    from craft.export.source_hf import TENSOR_NAMES
    from import_models import save_tokenizer

    directory = tmp_path_factory.mktemp("hf")
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    write_safetensors(directory / "model.safetensors", small_weights(TENSOR_NAMES))
    save_tokenizer(directory)
    return directory


def gguf_value_type(value):
    import gguf

    T = gguf.GGUFValueType
    if isinstance(value, bool):
        return T.BOOL
    if isinstance(value, int):
        return T.UINT64 if value >= 1 << 32 else T.UINT32
    return {float: T.FLOAT32, str: T.STRING, list: T.ARRAY}[type(value)]


def write_small_gguf(path: Path, directory: Path, tensors: dict | None = None, **edits) -> Path:
    """HF_CONFIG's model as a llama GGUF with the tokenizer of `directory`; `edits` replace metadata
    (key with "." as "__": llama__block_count=...) and None drops a key; `tensors` (by GGUF name)
    replace weights."""
    import gguf

    from craft.export.source_gguf import TENSOR_NAMES

    spec = json.loads((directory / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in spec["added_tokens"]}
    meta = {
        "llama.context_length": 32,
        "llama.embedding_length": 16,
        "llama.block_count": 2,
        "llama.feed_forward_length": 32,
        "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 1,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in specials else 1 for t in tokens],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": vocab["<s>"],
        "tokenizer.ggml.eos_token_id": vocab["</s>"],
    }
    for key, value in edits.items():
        meta[key.replace("__", ".")] = value
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in meta.items():
        if value is None:
            continue
        sub = gguf_value_type(value[0]) if isinstance(value, list) else None
        writer.add_key_value(key, value, gguf_value_type(value), sub_type=sub)
    for name, array in {**small_weights(TENSOR_NAMES), **(tensors or {})}.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_copy(hf_source: Path, tmp_path: Path, **config_edits) -> Path:
    """A copy of hf_source with config.json's keys replaced (None deletes one)."""
    directory = tmp_path / "model"
    shutil.copytree(hf_source, directory)
    config = {**HF_CONFIG, **config_edits}
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return directory


def refused(source: Path, *needles: str, kind: str | None = None) -> str:
    """export() refuses `source` with one line (ExportError: exit 2 in craft-export) holding every
    needle, and writes nothing."""
    from craft.export.exporter import export

    output = source.parent / "out.onnx"
    with pytest.raises(ExportError) as e:
        export(source, output, quantize="none", log=lambda *a: None, kind=kind)
    message = str(e.value)
    assert "\n" not in message and len(message) < 600, message
    for needle in needles:
        assert needle in message, message
    assert not output.exists()
    return message


def test_pristine_sources_export(hf_source, tmp_path):
    """The fixtures themselves export: each refusal below is the damage's doing."""
    from craft.export.exporter import export

    export(hf_source, tmp_path / "hf.onnx", quantize="none", log=lambda *a: None)
    gguf_path = write_small_gguf(tmp_path / "m.gguf", hf_source)
    export(gguf_path, tmp_path / "gguf.onnx", quantize="none", log=lambda *a: None)


def test_heads_that_groupqueryattention_cannot_take_export_standard(hf_source, tmp_path):
    """Heads 8 wide: the default int8 export (in-place attention) was ONNX Runtime's traceback "head_size
    shall be a multiple of 16"; it now picks standard attention, and asking for inplace is one line."""
    from craft.export.exporter import export
    from craft.runtime.generator import Generator

    output = tmp_path / "m.int8.onnx"
    export(hf_source, output, quantize="int8", log=lambda *a: None)
    generator = Generator(output)
    assert generator.backend.inplace is False and generator.spec.head_dim == 8
    with pytest.raises(ExportError, match="head width that is a multiple of 16.*is 8 - use --attention standard"):
        export(hf_source, tmp_path / "x.onnx", quantize="int8", log=lambda *a: None, attention="inplace")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("context", [1, 2, 4])
def test_a_context_shorter_than_the_verification_prompt_exports(hf_source, tmp_path, context):
    """Verification prefilled 16 tokens whatever the context: an IndexError traceback for a model
    of context 1, 2 or 4 (which craft-train's bounds and Hugging Face configs allow)."""
    from craft.export.exporter import export

    directory = hf_copy(hf_source, tmp_path)
    edit_json(directory / "config.json", max_position_embeddings=context)
    lines = []
    export(directory, tmp_path / "m.onnx", quantize="int8", log=lines.append)
    parity = next(line for line in lines if "parity" in line)
    assert f"{max(0, context - max(1, context - 1))} cached decode steps" in parity, parity


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize(
    "edits, needle",
    [
        (dict(num_hidden_layers=10**6), "'num_hidden_layers' is 1000000"),  # was minutes and GBs
        (dict(num_hidden_layers=3), "claims 3 layers (num_hidden_layers"),  # in range; the weights hold 2
        (dict(max_position_embeddings=10**7), "'max_position_embeddings' is 10000000"),  # GBs of RoPE table
        (dict(max_position_embeddings=2**20, head_dim=256, hidden_size=512), "RoPE tables"),
        (dict(num_attention_heads=0), "'num_attention_heads' is 0"),  # ZeroDivisionError
        (dict(head_dim=0), "'head_dim' is 0"),  # was silently dim / heads
        (dict(rope_theta=10**400), "'rope_theta' is 1000"),  # OverflowError
        (dict(rope_theta=[1]), "'rope_theta' is [1]"),  # TypeError
        (dict(rope_theta="abc"), "'rope_theta' is \"abc\""),  # a bare "could not convert" line
        (dict(rope_theta=float("nan")), "'rope_theta' is NaN"),  # exit 3 (verification) before
        (dict(rope_theta=-5.0), "'rope_theta' is -5.0"),
        (dict(rms_norm_eps=float("nan")), "'rms_norm_eps' is NaN"),
        (dict(rms_norm_eps=-1.0), "'rms_norm_eps' is -1.0"),
        (dict(vocab_size=True), "'vocab_size' is true"),  # a bool is not a number
        (dict(rope_scaling={**LLAMA3, "original_max_position_embeddings": 16, "low_freq_factor": 0}), "low_freq"),
        (dict(rope_scaling={**LLAMA3, "original_max_position_embeddings": 16, "factor": True}), "factor' is true"),
        (dict(rope_scaling={**LLAMA3, "original_max_position_embeddings": 16, "high_freq_factor": 1e999}), "Inf"),
    ],
)
def test_hf_config_numbers_are_checked(hf_source, tmp_path, edits, needle):
    refused(hf_copy(hf_source, tmp_path, **edits), "config.json", needle)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda h: list(h.values()), "header is a JSON list"),  # TypeError
        (lambda h: "text", "header is a JSON str"),  # AttributeError
        (lambda h: b"[" * 100_000 + b"]" * 100_000, "unreadable safetensors header"),  # RecursionError
        (lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "dtype": ["F32"]}}, "malformed"),
        (lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "data_offsets": ["0", "64"]}}, "malformed"),
        (lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "shape": [16.0]}}, "malformed"),
        (lambda h: {**h, "__metadata__": [1, 2]}, "__metadata__"),
        (lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "data_offsets": [0, 64]}}, "overlap"),
    ],
)
def test_safetensors_header_of_the_wrong_shape(hf_source, tmp_path, edit, needle):
    from craft.export.source_hf import TENSOR_NAMES

    directory = hf_copy(hf_source, tmp_path)
    write_safetensors(directory / "model.safetensors", small_weights(TENSOR_NAMES), edit)
    refused(directory, "model.safetensors", needle)


def test_a_shape_of_100000_dims_is_named_in_a_short_line(hf_source, tmp_path):
    """The whole shape went into the message: a 300 KB 'one line'."""
    from craft.export.source_hf import TENSOR_NAMES

    directory = hf_copy(hf_source, tmp_path)
    norm = small_weights(TENSOR_NAMES)["model.norm.weight"]  # (16,): 100,000 more dims of 1 hold the same bytes
    write_safetensors(
        directory / "model.safetensors",
        small_weights(TENSOR_NAMES),
        lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "shape": [1] * 100_000 + list(norm.shape)}},
    )
    refused(directory, "model.norm.weight has shape [1, 1,", "... (100,001 dims), its config implies [16]")


def test_layer_index_that_is_a_unicode_digit_is_an_extra_tensor(hf_source, tmp_path):
    """'²'.isdigit() is True but int('²') raises: the message was the bare ValueError."""
    from craft.export.source_hf import TENSOR_NAMES

    directory = hf_copy(hf_source, tmp_path)
    extra = {"model.layers.\u00b2.input_layernorm.weight": np.ones(16, np.float32)}
    write_safetensors(directory / "model.safetensors", {**small_weights(TENSOR_NAMES), **extra})
    refused(directory, "model.layers.\u00b2.input_layernorm.weight that its config does not call for")


@pytest.mark.parametrize(
    "edits, needle",
    [
        (dict(llama__block_count=10**6), "'llama.block_count' is 1000000"),
        (dict(llama__block_count=3), "claims 3 layers (llama.block_count)"),
        (dict(llama__context_length=2**31), "'llama.context_length' is 2147483648"),
        (dict(llama__rope__freq_base=float("nan")), "'llama.rope.freq_base' is NaN"),
        (dict(llama__attention__head_count=0), "'llama.attention.head_count' is 0"),  # said "partial rotary"
        (dict(tokenizer__ggml__bos_token_id=10**9), "tokenizer.ggml.bos_token_id' is 1000000000"),
        (dict(tokenizer__ggml__eos_token_id=4 * 10**9), "tokenizer.ggml.eos_token_id' is 4000000000"),
        (dict(tokenizer__ggml__merges=["t zzz"]), "its tokenizer is unusable"),
        (dict(tokenizer__chat_template="{% for %}"), "tokenizer.chat_template"),
        # said 'lacks layer 0 ... incomplete' (eleventh audit)
        (dict(split__count=2), "is part of a split GGUF (2 files); merge them first"),
        (dict(llama__expert_count=8), "mixture-of-experts model (8 experts"),
        # the wrong shapes: TypeError tracebacks, or (scores short) a tokenizer that splits differently
        (dict(tokenizer__ggml__merges=7), "tokenizer.ggml.merges is not a list of strings"),
        (dict(tokenizer__ggml__model="llama", tokenizer__ggml__scores=7), "tokenizer.ggml.scores is not 300 finite"),
        (dict(tokenizer__ggml__model="llama", tokenizer__ggml__scores=[0.5]), "tokenizer.ggml.scores is not 300"),
    ],
)
def test_gguf_metadata_is_checked(hf_source, tmp_path, edits, needle):
    refused(write_small_gguf(tmp_path / "m.gguf", hf_source, **edits), "m.gguf", needle)


def test_sentencepiece_vocabulary_of_huge_tokens_is_refused_before_splitting_them():
    """merges_from_scores tries every split of every token: one 400,000-character token took minutes."""
    from craft.export.source_tokenizer import TokenizerSourceError, sentencepiece_json

    with pytest.raises(TokenizerSourceError, match="tokens of up to 8,000 characters"):
        sentencepiece_json(["a", "x" * 8000], [1, 1], [0.0, 0.0], None, None, True)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_bad_input(hf_source, tmp_path, value):
    """A damaged checkpoint is refused as input (exit 2), naming the tensor as the source does; it
    used to export for minutes and fail verification (exit 3)."""
    from craft.export.source_gguf import TENSOR_NAMES as GGUF_NAMES
    from craft.export.source_hf import TENSOR_NAMES as HF_NAMES

    directory = hf_copy(hf_source, tmp_path)
    weights = small_weights(HF_NAMES)
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    write_safetensors(directory / "model.safetensors", weights)
    refused(directory, "model.layers.1.mlp.down_proj.weight holds NaN or infinite values")
    damaged = small_weights(GGUF_NAMES)["blk.1.ffn_down.weight"]
    damaged[0, 0] = value
    path = write_small_gguf(tmp_path / "m.gguf", hf_source, tensors={"blk.1.ffn_down.weight": damaged})
    refused(path, "blk.1.ffn_down.weight holds NaN or infinite values")


def edit_json(path: Path, **changes) -> None:
    value = json.loads(path.read_text()) if path.exists() else {}
    value.update(changes)
    path.write_text(json.dumps(value))


@pytest.mark.parametrize(
    "file, changes, needle",
    [
        ("tokenizer.json", dict(model="BPE"), "'model' object"),  # AttributeError
        ("tokenizer.json", dict(added_tokens=[{"id": 1}]), "added_tokens"),  # KeyError
        ("tokenizer.json", dict(merges_bad=True), "its tokenizer is unusable"),  # the library refuses a merge
        # every character deleted: the quality checks were skipped and calibration ran on nothing
        (
            "tokenizer.json",
            dict(normalizer={"type": "Replace", "pattern": {"Regex": "[\\s\\S]"}, "content": ""}),
            "characters of English into 0 tokens",
        ),
        ("tokenizer_config.json", dict(eos_token=["</s>"]), 'eos_token is ["</s>"]'),  # unhashable
        ("tokenizer_config.json", dict(add_bos_token="false"), "add_bos_token"),  # was bool("false")
        ("tokenizer_config.json", dict(chat_template="{% for %}"), "chat template does not parse"),
        ("generation_config.json", dict(eos_token_id="x"), "'eos_token_id' is \"x\""),  # TypeError
        ("generation_config.json", dict(eos_token_id=[1, 10**9]), "'eos_token_id' is 1000000000"),  # exported
        ("generation_config.json", dict(bos_token_id=10**9), "'bos_token_id' is 1000000000"),  # IndexError
    ],
)
def test_tokenizer_files_are_checked(hf_source, tmp_path, file, changes, needle):
    directory = hf_copy(hf_source, tmp_path)
    changes = dict(changes)  # the parameter is shared between runs
    if changes.pop("merges_bad", False):
        spec = json.loads((directory / file).read_text())
        spec["model"]["merges"] = ["zzzq zzzq"]  # a token not in the vocabulary
        (directory / file).write_text(json.dumps(spec))
    if file == "generation_config.json" and "bos_token_id" in changes:
        edit_json(directory / "tokenizer_config.json", bos_token=None)  # so that the generation config's counts
    edit_json(directory / file, **changes)
    refused(directory, file, needle)


def test_fifo_in_place_of_a_source_file_is_refused_not_read(hf_source, tmp_path):
    """Each of these hung forever (reading a FIFO blocks until a writer comes); run as a command with a
    timeout, so that a regression fails instead of hanging the suite."""
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        directory = hf_copy(hf_source, tmp_path / name)
        (directory / name).unlink()
        os.mkfifo(directory / name)
        output = tmp_path / "out.onnx"
        result = run_cli("craft.export.cli", str(directory), "--from", "hf", "-o", str(output), timeout=60)
        assert_one_line(result, 2, name, "FIFO")
        assert not output.exists()
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    for args in (["--from", "gguf"], []):  # without --from, detection says what it found
        result = run_cli("craft.export.cli", str(fifo), *args, "-o", str(tmp_path / "out.onnx"), timeout=60)
        assert_one_line(result, 2, "model.gguf is a FIFO")


def test_fifo_in_a_run_directory_is_refused_not_read(run_copy):
    (run_copy / rd.CONFIG).unlink()
    os.mkfifo(run_copy / rd.CONFIG)
    result = run_cli("craft.export.cli", str(run_copy), "-o", str(run_copy / "out.onnx"), timeout=60)
    assert_one_line(result, 2, rd.CONFIG, "FIFO")


def test_output_that_is_the_source_is_refused(hf_source, tmp_path):
    """-o naming the .gguf being exported replaced it (exit 0, the model gone); so would a file of a
    source directory, or a hard link to either."""
    gguf_path = write_small_gguf(tmp_path / "m.gguf", hf_source)
    before = gguf_path.read_bytes()
    result = run_cli("craft.export.cli", str(gguf_path), "--quantize", "none", "-o", str(gguf_path), timeout=120)
    assert_one_line(result, 2, "a file of the source")
    assert gguf_path.read_bytes() == before
    os.link(gguf_path, tmp_path / "link.onnx")
    refused_output(gguf_path, tmp_path / "link.onnx")
    directory = hf_copy(hf_source, tmp_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        refused_output(directory, directory / name)
    os.symlink(directory / "model.safetensors", tmp_path / "weights.onnx")
    refused_output(directory, tmp_path / "weights.onnx")


def refused_output(source: Path, output: Path) -> None:
    from craft.export.exporter import export

    before = output.read_bytes()
    with pytest.raises(ExportError, match="a file of the source being exported"):
        export(source, output, quantize="none", log=lambda *a: None)
    assert output.read_bytes() == before


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
def test_a_side_file_larger_than_any_real_one_is_not_read(hf_source, tmp_path, name):
    """A 3 GB config.json (sparse: no disk) took 6.5 GB to be called "not readable JSON"; configs,
    tokenizers and templates are refused unread past 64 MB (craft.run_dir.MAX_SMALL_FILE_BYTES)."""
    directory = hf_copy(hf_source, tmp_path)
    with open(directory / name, "ab") as f:
        f.truncate(100 << 20)
    refused(directory, str(directory / name), "104,857,600 bytes, more than the 64 MB such a file ever is")


@pytest.mark.parametrize("name", [rd.CHAR_TOKENIZER, DATA_INFO])
def test_a_run_file_larger_than_any_real_one_is_not_read(run_copy, name):
    """A run's 12 GB tokenizer file (sparse) was read whole: 'out of memory', exit 1, for bad input."""
    with open(run_copy / name, "ab") as f:
        f.truncate(100 << 20)
    result = run_cli("craft.export.cli", str(run_copy), "-o", str(run_copy / "out.onnx"))
    assert_one_line(result, 2, "more than the 64 MB such a file ever is")


def test_paths_in_the_log_are_printed_escaped(hf_source, tmp_path):
    """A source directory named with ESC [31m and BEL, and an output name with a newline, reached the
    terminal raw in 'exporting ...' and 'wrote ...' (error lines were escaped already)."""
    source = tmp_path / "esc\x1b[31mred\x07"
    shutil.copytree(hf_source, source)
    output = tmp_path / "new\nline.onnx"
    result = run_cli("craft.export.cli", str(source), "--quantize", "none", "-o", str(output))
    assert result.returncode == 0 and output.exists(), result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "esc\\x1b[31mred\\x07" in result.stdout and f"wrote {tmp_path}/new\\nline.onnx in" in result.stdout


def test_a_tokenizer_the_pure_python_path_cannot_load_is_noted_at_export(hf_source, tmp_path):
    """A BPE with dropout exported in silence (the tokenizers library takes it) and then failed on
    armv6l, whose only tokenizer is Craft's pure-Python one ('re-export it', which cannot help)."""
    from craft.export.exporter import export

    directory = hf_copy(hf_source, tmp_path)
    spec = json.loads((directory / "tokenizer.json").read_text())
    spec["model"]["dropout"] = 0.1
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    lines = []
    export(directory, tmp_path / "m.onnx", quantize="none", log=lines.append)
    assert any("without the tokenizers library (armv6l) craft-run cannot load" in line and "dropout" in line
               for line in lines), lines  # fmt: skip
    lines.clear()
    export(hf_source, tmp_path / "ok.onnx", quantize="none", log=lines.append)
    assert not any("tokenizers library" in line for line in lines), lines


def hf_bin_copy(hf_source: Path, tmp_path: Path, state) -> Path:
    """A copy of hf_source whose weights are a pytorch_model.bin of `state` (anything torch.save takes)."""
    import torch

    directory = hf_copy(hf_source, tmp_path)
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    return directory


@pytest.mark.parametrize("kind", ["sparse", "complex", "int"])
def test_pytorch_bin_tensor_that_is_not_dense_float_is_refused(hf_source, tmp_path, kind):
    """A sparse tensor was a TypeError traceback; complex and integer tensors were exported (complex with
    torch's warning printed)."""
    import torch

    from craft.export.source_hf import TENSOR_NAMES

    state = {name: torch.from_numpy(array) for name, array in small_weights(TENSOR_NAMES).items()}
    weight = state["lm_head.weight"]
    state["lm_head.weight"] = {
        "sparse": weight.to_sparse(),
        "complex": weight.to(torch.complex64),
        "int": weight.to(torch.int64),
    }[kind]
    directory = hf_bin_copy(hf_source, tmp_path, state)
    refused(directory, "pytorch_model.bin", "lm_head.weight", "expected a dense floating-point tensor")


@pytest.mark.parametrize("kind", ["int key", "meta"])
def test_pytorch_bin_keys_and_devices_are_checked(hf_source, tmp_path, kind):
    """An int key was AttributeError ('int' object has no attribute 'endswith'); a meta tensor
    RuntimeError (Tensor.item() cannot be called on meta tensors)."""
    import torch

    from craft.export.source_hf import TENSOR_NAMES

    state = {name: torch.from_numpy(array) for name, array in small_weights(TENSOR_NAMES).items()}
    if kind == "int key":
        state[7] = state["model.norm.weight"]
        needle = "its keys must be tensor names"
    else:
        state["model.norm.weight"] = torch.empty(state["model.norm.weight"].shape, device="meta")
        needle = "model.norm.weight is on device 'meta'"
    refused(hf_bin_copy(hf_source, tmp_path, state), "pytorch_model.bin", needle)


def deflated(path: Path) -> None:
    """Rewrite the torch.save zip at `path` with every record compressed (torch.load still reads it)."""
    import zipfile

    with zipfile.ZipFile(path) as old:
        records = [(info, old.read(info)) for info in old.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as new:
        for info, data in records:
            new.writestr(info.filename, data)


def test_pytorch_bin_views_and_compressed_records_are_refused(hf_source, tmp_path):
    """Claims a file does not pay for: a weight saved as an expand()ed view (stride 0) of one float
    (a 3 KB file claimed 64 GB of tensors: a traceback, or gigabytes, when materialized), and records
    compressed, which torch.save never writes (a 3.5 MB file inflated to 6.5 GB)."""
    import torch

    from craft.export.source_hf import TENSOR_NAMES

    state = {name: torch.from_numpy(array) for name, array in small_weights(TENSOR_NAMES).items()}
    shape = state["lm_head.weight"].shape
    view = hf_bin_copy(hf_source, tmp_path / "view", {**state, "lm_head.weight": torch.ones(1).expand(shape)})
    refused(view, "tensor lm_head.weight of shape", "fewer than its shape needs")
    packed = hf_bin_copy(hf_source, tmp_path / "packed", state)
    deflated(packed / "pytorch_model.bin")
    refused(packed, "is compressed, which torch.save never does")


def test_pytorch_bin_with_code_is_refused_without_torch_advice(hf_source, tmp_path):
    """torch's refusal advises weights_only=False (running the file's code): that advice is not passed on."""

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    directory = hf_bin_copy(hf_source, tmp_path, {"model.norm.weight": Evil()})
    message = refused(directory, "pytorch_model.bin", "holds Python objects", "safetensors")
    assert "weights_only` set to `False" not in message and "Re-running" not in message, message


@pytest.mark.parametrize(
    "offset, needle",
    [
        (1, "expected a multiple of the file's alignment 32"),
        (0, "overlap"),
        (2**64 - 32, "starts at data offset -32, before the data section"),  # wraps in the reader's uint64 sum
    ],
)
def test_gguf_tensor_offsets_misaligned_overlapping_or_before_the_data_are_refused(hf_source, tmp_path, offset, needle):
    """All were exported (the wrapped one, which read 32 bytes of header as weights, with numpy's overflow
    warning on stderr): the reader checks none."""
    import warnings

    from gguf import GGUFReader

    path = write_small_gguf(tmp_path / "m.gguf", hf_source)
    field = next(t for t in GGUFReader(path).tensors if t.name == "output_norm.weight").field
    at = field.offset + sum(part.nbytes for part in field.parts) - 8  # the tensor's data offset: the field's last u64
    data = bytearray(path.read_bytes())
    assert struct.unpack_from("<Q", data, at)[0] > 0
    struct.pack_into("<Q", data, at, offset)
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one line: no RuntimeWarning beside it
        refused(path, "m.gguf", "output_norm.weight", needle)


def test_chat_template_longer_than_craft_run_renders_is_refused(hf_source, tmp_path):
    """A 50 MB template was exported, though craft-run caps what a template renders at MAX_CHARS."""
    from craft.runtime.chat_template import MAX_CHARS

    directory = hf_copy(hf_source, tmp_path)
    edit_json(directory / "tokenizer_config.json", chat_template="x" * (MAX_CHARS + 1))
    refused(directory, "tokenizer_config.json", f"{MAX_CHARS + 1:,} characters", f"at most {MAX_CHARS:,}")


def test_chat_template_that_is_not_unicode_is_refused(hf_source, tmp_path):
    """JSON's "\\ud800" is a lone surrogate, which no UTF-8 metadata can hold: a traceback at the end of
    the export."""
    directory = hf_copy(hf_source, tmp_path)
    edit_json(directory / "tokenizer_config.json", chat_template="{{ messages }}\ud800")
    refused(directory, "tokenizer_config.json", "not valid Unicode (a lone surrogate at character 14)")


def test_named_chat_templates_without_a_default(hf_source, tmp_path):
    """Several were dropped in silence (the file then had no template); one alone is the template."""
    from craft.export.exporter import export
    from craft.runtime.artifact import Artifact
    from craft.runtime.onnx_file import read_metadata

    directory = hf_copy(hf_source, tmp_path)
    named = [{"name": "tool_use", "template": "{{ messages[0]['content'] }}"}, {"name": "rag", "template": "x"}]
    edit_json(directory / "tokenizer_config.json", chat_template=named)
    refused(directory, "named templates (rag, tool_use) but none is 'default'")
    edit_json(directory / "tokenizer_config.json", chat_template=named[:1])
    export(directory, tmp_path / "one.onnx", quantize="none", log=lambda *a: None)
    assert Artifact.from_metadata(read_metadata(tmp_path / "one.onnx")).chat_template == named[0]["template"]


@pytest.mark.parametrize("where", ["probe", "write"])
def test_output_that_cannot_be_written_exits_1(hf_source, tmp_path, monkeypatch, where):
    """A full disk, a read-only mount or a denied permission is an OS failure (exit 1, as the help says),
    not bad input (it was exit 2); still one line, and nothing written."""
    import errno
    import tempfile

    from click.testing import CliRunner

    from craft.export import exporter
    from craft.export.cli import main

    def fail(*args, **kwargs):
        if where == "write" or kwargs.get("suffix") == ".probe":
            code = errno.ENOSPC if where == "write" else errno.EROFS
            raise OSError(code, os.strerror(code))
        return mkstemp(*args, **kwargs)

    mkstemp = tempfile.mkstemp
    if where == "write":
        monkeypatch.setattr(exporter.rd, "atomic_write_bytes", fail)
    else:
        monkeypatch.setattr(exporter.tempfile, "mkstemp", fail)
    output = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, [str(hf_source), "-o", str(output), "--quantize", "none"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, (result.exit_code, result.stderr, result.exception)
    assert lines[0].startswith("craft-export: error: cannot write") and str(output) in lines[0], lines[0]
    assert not output.exists()


@pytest.mark.parametrize("text, needle", [(b"llama", "general.architecture"), (b"default", "tokenizer.ggml.pre")])
def test_gguf_text_that_is_not_utf8_names_the_file_and_field(hf_source, tmp_path, text, needle):
    """It was "'utf-8' codec can't decode byte 0xff ..." alone."""
    path = write_small_gguf(tmp_path / "m.gguf", hf_source)
    data = path.read_bytes()
    value = struct.pack("<Q", len(text)) + text  # the string value, length first
    assert data.count(value) == 1
    path.write_bytes(data.replace(value, value[:8] + b"\xff" + text[1:]))
    refused(path, "m.gguf", needle, "not UTF-8")


def test_shard_name_with_a_null_byte_names_the_index(hf_source, tmp_path):
    """It was "embedded null byte" alone."""
    directory = hf_copy(hf_source, tmp_path)
    (directory / "model.safetensors").rename(directory / "s1.safetensors")
    from craft.export.source_hf import TENSOR_NAMES

    weight_map = {name: "s1.safetensors" for name in small_weights(TENSOR_NAMES)}
    weight_map["model.norm.weight"] = "s1.safetensors\0x"
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(directory, "model.safetensors.index.json", "s1.safetensors")


def test_tensor_in_two_shards_is_refused(hf_source, tmp_path):
    """A stale second copy of model.norm.weight in another shard was read last and kept in silence."""
    from craft.export.source_hf import TENSOR_NAMES

    directory = hf_copy(hf_source, tmp_path)
    (directory / "model.safetensors").unlink()
    weights = small_weights(TENSOR_NAMES)
    first = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    second = {"lm_head.weight": weights["lm_head.weight"], "model.norm.weight": np.zeros(16, np.float32)}
    write_safetensors(directory / "s1.safetensors", first)
    write_safetensors(directory / "s2.safetensors", second)
    weight_map = {**dict.fromkeys(first, "s1.safetensors"), "lm_head.weight": "s2.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(directory, "'model.norm.weight' is in two weight files, s1.safetensors and s2.safetensors")


def gguf_header(*fields: bytes, tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, len(fields)) + b"".join(fields)


def gguf_text(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize(
    "data",
    [
        gguf_header(gguf_text(b"a") + struct.pack("<IIQ", 9, 0, 2**40)),  # an array of 2^40 uint8
        gguf_header(gguf_text(b"a") + struct.pack("<IIQ", 9, 8, 2**40)),  # of 2^40 strings
        gguf_header(gguf_text(b"a") + struct.pack("<IQ", 8, 2**60)),  # a string of 2^60 bytes
        gguf_header(tensors=2**60),  # 2^60 tensor infos
        gguf_header(gguf_text(b"a") + struct.pack("<I", 99)),  # an unknown value type
        b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + struct.pack(">Q", 1) + b"a" + struct.pack(">IIQ", 9, 0, 2**40),
        b"GGUF" + struct.pack("<IQQ", 7, 0, 0),  # a version the walk does not know
    ],
    ids=["uint8-array", "string-array", "string", "tensor-count", "value-type", "big-endian", "version"],
)
def test_gguf_header_claims_are_checked_before_the_reader_runs(tmp_path, data):
    """gguf.GGUFReader walked a claimed count past the end of the file: a 70-byte file claiming
    2^40 values grew its memory until it died."""
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    refused(path, "m.gguf is truncated or not a valid GGUF file")


def test_path_with_a_null_byte_is_a_source_error():
    from craft.export.sources import SourceError, regular_file

    with pytest.raises(SourceError, match="null byte"):
        regular_file(Path("model\0.safetensors"))


def test_a_missing_run_or_checkpoint_is_named(char_run, tmp_path):
    """Without -o the output defaults under the source: a missing run directory was reported as
    'output directory ... does not exist'; a mistyped --checkpoint as 'training has not saved one yet'."""
    missing = run_cli("craft.export.cli", str(tmp_path / "nope"))
    assert_one_line(missing, 2, "run directory", "nope does not exist; train one with")
    typo = run_cli("craft.export.cli", str(char_run), "--checkpoint", "best", "-o", str(tmp_path / "m.onnx"))
    assert_one_line(typo, 2, "has no checkpoint 'best'; it has best.pt, checkpoint.pt")


def test_an_empty_source_is_refused(tmp_path):
    """craft-export "" exported the current directory (click makes "" the path '.')."""
    result = run_cli("craft.export.cli", "")
    assert_one_line(result, 2, "SOURCE is empty")


@pytest.mark.parametrize("fault", ["reader gone", "full"])
def test_a_log_nobody_can_read_costs_no_export(char_run, tmp_path, fault):
    """craft-export | head -1 read the first line and left; the next log line's EPIPE ended the
    export with exit 1, no message and no file, after it had been verified (>/dev/full alike)."""
    import sys

    output = tmp_path / "m.onnx"
    if fault == "full":
        target = os.open("/dev/full", os.O_WRONLY)
    else:
        reader, target = os.pipe()
        os.close(reader)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "craft.export.cli", str(char_run), "-o", str(output)],
            stdout=target,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(target)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert output.is_file()


def test_output_dash_and_an_overlong_source_are_bad_input(char_run, tmp_path):
    """-o - wrote a file named '-'; a SOURCE name past the system's limit was exit 1 (an OS error)
    without -o and 2 with it."""
    assert_one_line(run_cli("craft.export.cli", str(char_run), "-o", "-"), 2, "writes a file, not stdout")
    assert_one_line(run_cli("craft.export.cli", str(tmp_path / ("a" * 300))), 2, "File name too long")


def test_a_run_directory_whose_name_is_not_utf8_exports(char_run, tmp_path):
    """Its name goes into the file's doc_string, a protobuf string: UTF-8 only (was a UnicodeEncodeError
    traceback). Output paths may be any bytes too."""
    from craft.export.exporter import export

    source = os.fsdecode(os.fsencode(tmp_path) + b"/run\xfd")
    shutil.copytree(char_run, source)
    output = os.fsdecode(os.fsencode(tmp_path) + b"/out\xfe.onnx")
    export(Path(source), Path(output), quantize="int8", log=lambda *a: None)
    assert load_artifact(output).quantization == "int8"
