"""craft-run: generate text from a Craft .onnx file - a thin map of flags onto the Python API.

Each sampling flag fills the SamplingParams field of its name and shows that field's default
(sampling.py is the one place they live); the CLI builds the object once and hands it to
Generator.stream / generate. A new sampling flag is one `Field` option below plus its field.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from typing import NoReturn

import click

from craft import __version__
from craft.runtime.command import OneLineErrors

EXIT_OUTPUT, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class Field(click.Option):
    """A flag that fills the SamplingParams field of the same name, with that field's default.

    The default is read when craft-run parses its flags, not when this module is imported:
    sampling.py imports numpy, which must load after --threads has set the BLAS thread count.
    """

    def get_default(self, ctx: click.Context, call: bool = True):
        from craft.runtime.sampling import SamplingParams

        return getattr(SamplingParams(), self.name)


def set_blas_threads(ctx: click.Context, param: click.Parameter, threads: int) -> int:
    """BLAS (the numpy backend's matmuls) reads its thread count once, when numpy is first imported:
    this runs first (an eager option), before any default or backend loads numpy."""
    if threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
    return threads


def unescape(text: str) -> str:
    """--stop "\\n\\n" from a shell means two newlines: expand \\n, \\t and \\\\."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}.get(m.group(1), m.group(0)), text)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"craft-run: error: {message}", err=True)
    sys.exit(code)


def read_prompt(prompt: str | None) -> str:
    """PROMPT, or stdin when it is omitted, as text. Bytes that are not UTF-8 are refused rather
    than replaced: a prompt silently changed would give a surprising continuation."""
    if prompt is None:
        if sys.stdin.isatty():
            click.echo("reading the prompt from stdin (end with Ctrl-D)...", err=True)
        data = sys.stdin.buffer.read()
    else:
        data = os.fsencode(prompt)  # argv's undecodable bytes come back as they were (surrogateescape)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"the prompt is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
             f"convert it first, e.g. iconv -f LATIN1 -t UTF-8")


def write(text: str) -> None:
    """Text to stdout, now. A reader that went away (`| head -1`) ends craft-run quietly; a full
    disk ends it with one line. Either way stdout is pointed at /dev/null so that Python's own
    flush at exit does not print a second error."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file descriptor (embedded)
            pass
        if e.errno == errno.EPIPE:
            sys.exit(EXIT_OUTPUT)
        fail(f"cannot write the output to stdout: {e.strerror or e}", EXIT_OUTPUT)


@click.command(name="craft-run", cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("prompt", required=False)
@click.option("-n", "--max-new-tokens", cls=Field, type=int, help="Most tokens to generate (0: none).")
@click.option("-t", "--temperature", cls=Field, type=float, help="Sampling temperature; 0 is greedy (always the most likely token).")
@click.option("--top-k", cls=Field, type=int, help="Sample among the k most likely tokens; 0 disables.")
@click.option("--top-p", cls=Field, type=float, help="Sample among the fewest tokens holding probability p; 1 disables.")
@click.option("--min-p", cls=Field, type=float, help="Drop tokens less likely than min-p x the most likely one's probability (llama.cpp's min-p); 0 disables.")
@click.option("--repetition-penalty", cls=Field, type=float, help="> 1 makes tokens already in the text less likely; 1 disables.")
@click.option("--seed", cls=Field, type=int, help="Random seed: the same seed, model and flags give the same text.  [default: random]")
@click.option("--stop", cls=Field, multiple=True, metavar="STR", help="Stop when the text produces STR (not printed); repeatable; \\n and \\t mean newline and tab.")
@click.option("--backend", type=click.Choice(["ort", "numpy"]), default="ort", help="ONNX Runtime, or pure numpy for devices without an onnxruntime wheel.")
@click.option("--threads", type=click.IntRange(min=0), default=0, is_eager=True, callback=set_blas_threads, help="CPU threads; 0: the backend's default (one per core).")
@click.option("--truncate", is_flag=True, help="Cut a prompt longer than the context to its end instead of refusing it.")
@click.option("--stats", is_flag=True, help="Print prompt/generated tokens, time to first token, prefill ms, decode tokens/s, stop reason and peak memory to stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, token ids, stats) instead of streaming text.")
@click.option("--estimate", is_flag=True, help="Do not generate: predict peak memory and decode tokens/s of MODEL on the device profiles in configs/devices/ (Raspberry Pi 4, 5, Zero 2 W).")
@click.version_option(__version__, prog_name="craft-run")
def main(model: str, prompt: str | None, backend: str, threads: int, truncate: bool, stats: bool, as_json: bool, estimate: bool, **sampling) -> None:
    """Generate text from MODEL (a .onnx file from craft-export), continuing PROMPT.

    With no PROMPT the prompt is read from stdin (UTF-8). Text streams to stdout as it is
    generated. Everything the model needs (config, tokenizer) is inside the file. Exit codes:
    0 done, 1 stdout failed (a full disk), 2 bad input, 130 interrupted.

    \b
    Examples:
      craft-run model.int8.onnx "def fibonacci(n):" -n 100
      craft-run model.int8.onnx "The" --temperature 0 --stats
      echo "Once upon a time" | craft-run model.int8.onnx --seed 1 --stop "\\n\\n"
    """
    from craft.runtime.artifact import ArtifactError
    from craft.runtime.generator import GenerationError, Generator, load_artifact
    from craft.runtime.sampling import SamplingError, SamplingParams

    if estimate:
        from craft.runtime.estimate import DeviceError, estimate as predict, format_estimates, load_profiles

        try:
            artifact = load_artifact(model)
            size = os.path.getsize(model)
            chosen = backend if click.get_current_context().get_parameter_source("backend").name != "DEFAULT" else None
            report = format_estimates([predict(artifact, size, device, chosen) for device in load_profiles()])
        except (ArtifactError, DeviceError) as e:
            fail(str(e))
        write(report + "\n")
        return
    try:
        params = SamplingParams(**{**sampling, "stop": tuple(unescape(s) for s in sampling["stop"])})
    except SamplingError as e:
        fail(str(e))
    prompt = read_prompt(prompt)
    try:
        generator = Generator(model, backend=backend, threads=threads)
        if as_json:
            completion = generator.generate(prompt, params, truncate=truncate)
            write(json.dumps({"text": completion.text, "token_ids": completion.token_ids, "stats": completion.stats.to_dict()}, ensure_ascii=False) + "\n")
        else:
            if hasattr(sys.stdout, "reconfigure"):
                sys.stdout.reconfigure(errors="replace")
            for piece in generator.stream(prompt, params, truncate=truncate):
                write(piece)
            write("\n")
    except (ArtifactError, GenerationError, ValueError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if stats:
        s = generator.last_stats
        click.echo(f"[{s.backend}] prompt {s.prompt_tokens} tokens, generated {s.generated_tokens} ({s.stop_reason}) | "
                   f"load {s.load_s * 1e3:.0f} ms, time to first token {s.time_to_first_token_s * 1e3:.0f} ms, prefill {s.prefill_ms:.1f} ms, "
                   f"decode {s.decode_tokens_per_s:.1f} tokens/s | peak RSS {s.peak_rss_mb:.0f} MB", err=True)


if __name__ == "__main__":
    main()
