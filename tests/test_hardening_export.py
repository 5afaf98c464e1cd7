"""craft-export under hostile conditions: an output that is not a regular file is refused (never
replaced), a damaged or foreign run directory is one line (exit 2), stale temp files of killed
exports are swept, and the tokenizer verified is the one that goes into the file."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli
from craft import run_dir as rd
from craft.data import DATA_INFO, TOKENS
from craft.export.exporter import ExportError, check_output_path


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
        "data_json_garbage",
        "tokens_truncated",
        "tokenizer_garbage",
        "tokenizer_swapped",
        "checkpoint_pickle",
        "tokens_unreadable",
    ],
)
def test_damaged_run_directory_is_one_line(run_copy, damage):
    from craft import checkpoint as ckpt
    from craft.runtime.tokenizer import CharTokenizer

    expected = {
        "config_binary": "not a UTF-8 text file",
        "config_directory": "has no config.yaml",
        "data_json_garbage": "is damaged",
        "tokens_truncated": "truncated or replaced",
        "tokenizer_garbage": "is not a valid tokenizer",
        "tokenizer_swapped": "is not the tokenizer this run was trained with",
        "checkpoint_pickle": "data only",
        "tokens_unreadable": "Permission denied",
    }[damage]
    code = 1 if damage == "tokens_unreadable" else 2
    if damage == "config_binary":
        (run_copy / rd.CONFIG).write_bytes(b"\x00\xff\xfebinary\x89")
    elif damage == "config_directory":
        (run_copy / rd.CONFIG).unlink()
        (run_copy / rd.CONFIG).mkdir()
    elif damage == "data_json_garbage":
        (run_copy / DATA_INFO).write_bytes(b"\x00\x01")
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
    elif damage == "tokens_unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads any file: no unreadable tokens.bin")
        (run_copy / TOKENS).chmod(0)
    args = ["--checkpoint", "evil.pt"] if damage == "checkpoint_pickle" else []
    output = run_copy / "out.onnx"
    line = assert_one_line(run_cli("craft.export.cli", str(run_copy), "-o", str(output), *args), code, expected)
    assert "weights_only" not in line
    assert not output.exists() and not [p for p in run_copy.iterdir() if p.name.endswith(".tmp")]


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
