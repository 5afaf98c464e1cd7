"""craft-run against the operating system: undecodable prompts, absurd --threads, a full disk,
a reader that goes away, model paths that are not files. Each gets one line (or silence for a
closed pipe) and an exit code, never a traceback."""

from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys

import pytest

from conftest import run_cli
from craft.runtime.artifact import ArtifactError
from craft.runtime.generator import load_artifact

CRAFT_RUN = [sys.executable, "-m", "craft.runtime.cli"]


def one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    stderr = result.stderr.decode() if isinstance(result.stderr, bytes) else result.stderr
    assert result.returncode == code, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("craft-run: error:"), stderr
    for word in words:
        assert word in stderr, stderr


def test_prompt_that_is_not_utf8_is_refused(char_int8):
    argv = subprocess.run([*CRAFT_RUN, str(char_int8), b"caf\xe9", "-n", "3"], capture_output=True, timeout=120)
    one_line_error(argv, 2, "not UTF-8", "0xe9 at offset 3")
    assert argv.stdout == b""
    stdin = subprocess.run(
        [*CRAFT_RUN, str(char_int8), "-n", "3"], input=b"ok\n\xff\xfe", capture_output=True, timeout=120
    )
    one_line_error(stdin, 2, "not UTF-8", "0xff at offset 3")


def test_prompt_dash_reads_stdin(char_int8):
    """PROMPT '-' is stdin, as for cat and most tools (it was the one-character prompt "-")."""
    flags = ["-n", "8", "--temperature", "0", "--json"]
    dash = subprocess.run([*CRAFT_RUN, str(char_int8), "-", *flags], input=b"ROMEO:", capture_output=True, timeout=120)
    typed = subprocess.run([*CRAFT_RUN, str(char_int8), "ROMEO:", *flags], capture_output=True, timeout=120)
    assert dash.returncode == 0 and json.loads(dash.stdout)["stats"]["prompt_tokens"] > 2, dash.stderr
    assert json.loads(dash.stdout)["token_ids"] == json.loads(typed.stdout)["token_ids"]


def test_estimate_refuses_what_only_generation_reads(char_int8):
    """PROMPT, --chat, --json or a sampling flag with --estimate were ignored in silence."""
    result = run_cli("craft.runtime.cli", str(char_int8), "hi", "--estimate", "--json", "--temperature", "-5")
    one_line_error(result, 2, "--estimate generates nothing, so PROMPT, --temperature, --json would do nothing")


def test_endless_stdin_is_refused_before_it_is_read_whole(char_int8):
    """`< /dev/zero` was read to the end: gigabytes, then a MemoryError traceback."""
    with open("/dev/zero", "rb") as zero:
        result = subprocess.run([*CRAFT_RUN, str(char_int8), "-n", "3"], stdin=zero, capture_output=True, timeout=120)
    one_line_error(result, 2, "stdin holds more than 16 MiB")


@pytest.mark.parametrize("threads", ["4294967296", "1025"])
def test_threads_beyond_any_cpu_are_refused(char_int8, threads):
    result = run_cli("craft.runtime.cli", str(char_int8), "hi", "-n", "3", "--threads", threads)
    one_line_error(result, 2, "Invalid value for '--threads'", "not in the range 0<=x<=1024", threads)


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_full_disk_is_one_line_exit_1(char_int8, flags):
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [*CRAFT_RUN, str(char_int8), "ROMEO:", "-n", "5", *flags],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    one_line_error(result, 1, "cannot write the output to stdout: No space left on device")


def test_output_cut_by_a_file_size_limit_is_an_error(char_int8, tmp_path):
    """A short write (a disk that fills mid-write, `ulimit -f`): Python's buffered stdout dropped
    the rest of the --json line without an error, leaving cut JSON and exit 0."""
    import resource

    out = tmp_path / "out.json"
    with open(out, "w") as file:
        result = subprocess.run(
            [*CRAFT_RUN, str(char_int8), "ROMEO:", "-n", "64", "--seed", "1", "--json"],
            stdout=file,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256)),
        )
    assert out.stat().st_size == 256  # the JSON line is longer: it was cut
    one_line_error(result, 1, "cannot write the output to stdout: File too large")


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_closed_pipe_ends_quietly(char_int8, flags):
    """`craft-run ... | head -1` after head has gone: the reader is closed before the first write."""
    proc = subprocess.Popen(
        [*CRAFT_RUN, str(char_int8), "ROMEO:", "-n", "50", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=120)
    assert stderr == "" and proc.returncode == 1


def test_head_in_a_shell_pipeline_is_quiet(char_int8):
    command = f"{sys.executable} -m craft.runtime.cli {char_int8} 'ROMEO:' -n 200 -t 0 --stop zzz | head -c 1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120)
    assert len(result.stdout) == 1 and result.stderr == ""


def test_model_paths_that_are_not_files(tmp_path):
    os.mkfifo(tmp_path / "pipe.onnx")
    cases = {
        tmp_path: "is a directory",
        tmp_path / "pipe.onnx": "is not a regular file",
        "/dev/zero": "is not a regular file",
        tmp_path / "missing.onnx": "does not exist",
        "": "path is empty",  # Path("") is ".", which was named as a directory
        "-": "read from a file, not from stdin",
    }
    for path, message in cases.items():
        with pytest.raises(ArtifactError, match=message):
            load_artifact(path)  # the API, without opening a FIFO (which would block)
        for flags in (["hi"], ["--estimate"]):
            result = run_cli("craft.runtime.cli", str(path), *flags, timeout=60)
            assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert message in result.stderr, result.stderr


@pytest.mark.parametrize("value", ["junk", "-5", "0"])
def test_a_junk_omp_num_threads_is_ignored_without_a_library_warning(sp_int8, value):
    """libgomp (loaded with sentencepiece) printed 'Invalid value for environment variable
    OMP_NUM_THREADS' before the text; it ignores the value, and so does craft-run, in silence."""
    result = run_cli(
        "craft.runtime.cli", str(sp_int8), "a", "-n", "3", "--backend", "numpy", env={"OMP_NUM_THREADS": value}
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_threads_reach_blas_before_numpy_loads(tmp_path):
    """BLAS reads its thread count once, when numpy loads: the sampling flags' defaults (from
    sampling.py, which imports numpy) must be read after --threads has set it."""
    code = (
        "import builtins, os, sys\n"
        "real = builtins.__import__\n"
        "def spy(name, *args, **kwargs):\n"
        "    if name == 'numpy' and 'numpy' not in sys.modules:\n"
        "        print('BLAS threads at numpy import:', os.environ.get('OPENBLAS_NUM_THREADS'))\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = spy\n"
        "sys.argv = ['craft-run', sys.argv[1], 'hi', '--threads', '3', '--backend', 'numpy']\n"
        "from craft.runtime.cli import main\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "missing.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")},
    )
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert result.stdout.splitlines()[0] == "BLAS threads at numpy import: 3", result.stdout


@pytest.mark.parametrize(
    "redirect, flags, words",
    [
        (">&-", ["hi"], "stdout is closed"),
        (">&-", ["hi", "--json"], "stdout is closed"),
        (">&-", ["--estimate"], "stdout is closed"),
        ("<&-", [], "stdin is closed"),
    ],
)
def test_closed_stdout_or_stdin_is_one_line(char_int8, redirect, flags, words):
    """Started with a standard stream closed, Python has None for it: one line, not an AttributeError."""
    estimate = "--estimate" in flags
    result = subprocess.run(
        ["bash", "-c", f'exec "$@" {redirect}', "_", *CRAFT_RUN, str(char_int8), *flags, *["-n", "3"] * (not estimate)],
        capture_output=True,
        timeout=120,
    )
    one_line_error(result, 1 if redirect == ">&-" else 2, words)


@pytest.mark.parametrize("module", ["craft.runtime.cli", "craft.export.cli", "craft.train"])
@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_or_version_into_a_closed_stdout_is_an_error(module, flag):
    """click printed them into the closed stream silently and exited 0, as if shown."""
    result = subprocess.run(
        ["bash", "-c", 'exec "$@" >&-', "_", sys.executable, "-m", module, flag], capture_output=True, timeout=120
    )
    stderr = result.stderr.decode()
    assert result.returncode == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("craft-") and "error: stdout is closed" in stderr, stderr


def test_flags_that_are_not_utf8_are_refused(char_int8):
    result = subprocess.run([*CRAFT_RUN, str(char_int8), "hi", "--stop", b"\xff", "-n", "3"], capture_output=True)
    one_line_error(result, 2, "--stop is not UTF-8")


def test_prompt_too_long_for_any_context_is_refused_before_tokenizing(char_int8):
    """A 24 MB prompt once took 1.3 GB (96 MB: 3.3 GB and a MemoryError) to be tokenized and then
    refused; more characters than the context can hold at 64 a token are refused (or cut) first."""
    prompt = b"the cat sat on the mat. " * 500_000
    result = subprocess.run([*CRAFT_RUN, str(char_int8), "-n", "2"], input=prompt, capture_output=True, timeout=120)
    one_line_error(result, 2, "12,000,000 characters, more than a context of", "--truncate")
    past_stdin = "\u00e9".encode() * 12_000_000  # 24 MB of 2-byte characters: read to the end, the last 16 MiB kept
    refused = subprocess.run(
        [*CRAFT_RUN, str(char_int8), "-n", "2"], input=past_stdin, capture_output=True, timeout=120
    )
    one_line_error(refused, 2, "stdin holds more than 16 MiB", "--truncate")
    for text in (prompt, past_stdin):
        cut = subprocess.run(
            [*CRAFT_RUN, str(char_int8), "-n", "2", "--truncate", "-t", "0"],
            input=text,
            capture_output=True,
            timeout=120,
        )
        assert cut.returncode == 0 and cut.stdout, cut.stderr


def test_a_newline_in_a_path_keeps_the_error_on_one_line(tmp_path):
    model = tmp_path / "a\nb" / "m.onnx"
    result = subprocess.run([*CRAFT_RUN, str(model), "hi"], capture_output=True, timeout=120)
    one_line_error(result, 2, "a\\nb/m.onnx does not exist")


def test_json_on_a_stdout_that_is_not_utf8_is_lossless(char_int8, monkeypatch):
    """PYTHONIOENCODING=ascii: the JSON's text came out with '?' for U+FFFD and 'é', so it no longer
    matched its token_ids; it is now \\u-escaped there."""
    import io
    import json

    from craft.runtime import generator as G
    from craft.runtime.cli import main

    text = "caf\xe9 \ufffd"
    monkeypatch.setattr(G.Generator, "generate", lambda *a, **k: G.Completion(text, [1, 2], G.Stats("ort")))
    out = io.BytesIO()
    monkeypatch.setenv("PYTHONIOENCODING", "ascii")  # asked for: a pipe is otherwise given UTF-8
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding="ascii", errors="replace"))
    with pytest.raises(SystemExit) as done:
        main([str(char_int8), "hi", "--json"], prog_name="craft-run")
    sys.stdout.flush()
    assert done.value.code == 0
    assert json.loads(out.getvalue().decode("ascii"))["text"] == text


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_a_stream_in_an_encoding_with_a_byte_order_mark_has_one(char_int8, encoding):
    """Each streamed piece was encoded on its own: PYTHONIOENCODING=utf-16 put a byte-order mark
    before every piece, so the output did not decode to the text."""
    command = [*CRAFT_RUN, str(char_int8), "ROMEO:", "-n", "12", "--temperature", "0"]
    plain = subprocess.run(command, capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    marked = subprocess.run(command, capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": encoding})
    assert plain.returncode == marked.returncode == 0, marked.stderr
    assert marked.stdout.decode(encoding) == plain.stdout.decode("utf-8") and len(plain.stdout) > 12
    assert marked.stdout.count(codecs.BOM_UTF16_LE if encoding == "utf-16" else codecs.BOM_UTF8) == 1


def test_generated_control_characters_are_escaped_on_a_terminal_only():
    """A token piece holding ESC]0;...BEL retitled the terminal and ESC[2J cleared it: a hostile
    tokenizer drove the user's terminal. In a pipe or file the text stays as generated."""
    from craft.runtime.cli import shown

    piece = "a\x1b]0;PWNED\x07\x1b[2J\rb\n\tc \u202e \x9b"
    assert shown(piece, terminal=False) == piece
    assert shown(piece, terminal=True) == "a\\x1b]0;PWNED\\x07\\x1b[2J\rb\n\tc \u202e \\x9b"


def shadowing(tmp_path, package: str) -> dict:
    """An environment in which `package` cannot be imported, as on a platform without its wheel."""
    (tmp_path / "sitecustomize.py").write_text(f"import sys; sys.modules[{package!r}] = None\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}


def test_without_onnxruntime_the_numpy_backend_runs_by_default(char_int8, tmp_path):
    """32-bit ARM has no onnxruntime wheel (setup.py leaves it out there), yet --backend defaulted to
    ort: craft-run with no flags died with a ModuleNotFoundError traceback."""
    env = shadowing(tmp_path, "onnxruntime")
    default = subprocess.run(
        [*CRAFT_RUN, str(char_int8), "ROMEO:", "-n", "4", "--json"], capture_output=True, env=env, timeout=120
    )
    assert default.returncode == 0 and json.loads(default.stdout)["stats"]["backend"] == "numpy", default.stderr
    asked = subprocess.run(
        [*CRAFT_RUN, str(char_int8), "hi", "--backend", "ort"], capture_output=True, env=env, timeout=120
    )
    one_line_error(asked, 2, "onnxruntime is not installed", "--backend numpy")


def test_a_failing_stderr_keeps_the_exit_code_of_the_error(char_int8, tmp_path):
    """2>/dev/full: the error line could not be written, and that second failure was reported as
    'stdout: No space left on device', exit 1 instead of the bad input's 2."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([*CRAFT_RUN, str(tmp_path / "nope.onnx"), "hi"], stderr=full, timeout=120)
    assert result.returncode == 2


def test_a_pipe_gets_utf8_whatever_the_locale(char_int8):
    """Prompts are read as UTF-8 whatever the locale, but the output was encoded in it: in a C locale
    without UTF-8 mode, every character beyond ASCII in the generated text became '?' (exit 0)."""
    flags = [str(char_int8), "ROMEO:", "-n", "60", "--temperature", "3", "--top-k", "0", "--top-p", "1", "--seed", "2"]
    expected = json.loads(subprocess.run([*CRAFT_RUN, *flags, "--json"], capture_output=True, timeout=120).stdout)
    assert any(ord(c) > 127 for c in expected["text"])  # the seed draws non-ASCII characters
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "LANG", "LANGUAGE")}
    env.update(LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    result = subprocess.run([*CRAFT_RUN, *flags], capture_output=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.decode("utf-8") == expected["text"] + "\n"


def test_threads_bound_is_the_generators():
    """--help shows the bound the Generator enforces (an integer past it: click's one line, exit 2)."""
    from craft.runtime.cli import main
    from craft.runtime.generator import MAX_THREADS

    assert next(p for p in main.params if p.name == "threads").type.max == MAX_THREADS
