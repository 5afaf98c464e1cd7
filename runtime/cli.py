"""craft-run: generate text from a Craft .onnx file (a thin layer over generator.Generator)."""

from __future__ import annotations

import json
import os
import re
import sys

import click

from craft import __version__
from craft.runtime.command import OneLineErrors

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def unescape(text: str) -> str:
    """--stop "\\n\\n" from a shell means two newlines: expand \\n, \\t and \\\\."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}.get(m.group(1), m.group(0)), text)


def fail(message: str) -> None:
    click.echo(f"craft-run: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


@click.command(name="craft-run", cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("prompt", required=False)
@click.option("-n", "--max-new-tokens", type=int, default=256, help="Most tokens to generate (0: none).")
@click.option("-t", "--temperature", type=float, default=0.8, help="Sampling temperature; 0 is greedy (always the most likely token).")
@click.option("--top-k", type=int, default=40, help="Sample among the k most likely tokens; 0 disables.")
@click.option("--top-p", type=float, default=0.95, help="Sample among the fewest tokens holding probability p; 1 disables.")
@click.option("--repetition-penalty", type=float, default=1.0, help="> 1 makes tokens already in the text less likely; 1 disables.")
@click.option("--seed", type=int, default=None, help="Random seed: the same seed, model and flags give the same text.  [default: random]")
@click.option("--stop", multiple=True, metavar="STR", help="Stop when the text produces STR (not printed); repeatable; \\n and \\t mean newline and tab.")
@click.option("--backend", type=click.Choice(["ort", "numpy"]), default="ort", help="ONNX Runtime, or pure numpy for devices without an onnxruntime wheel.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="CPU threads; 0: the backend's default (one per core).")
@click.option("--truncate", is_flag=True, help="Cut a prompt longer than the context to its end instead of refusing it.")
@click.option("--stats", is_flag=True, help="Print prompt/generated tokens, time to first token, prefill ms, decode tokens/s, stop reason and peak memory to stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, token ids, stats) instead of streaming text.")
@click.option("--estimate", is_flag=True, help="Do not generate: predict peak memory and decode tokens/s of MODEL on the device profiles in configs/devices/ (Raspberry Pi 4, 5, Zero 2 W).")
@click.version_option(__version__, prog_name="craft-run")
def main(model, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, backend, threads, truncate, stats, as_json, estimate):
    """Generate text from MODEL (a .onnx file from craft-export), continuing PROMPT.

    With no PROMPT the prompt is read from stdin. Text streams to stdout as it is generated.
    Everything the model needs (config, tokenizer) is inside the file. Exit codes: 0 done,
    2 bad input, 130 interrupted.

    \b
    Examples:
      craft-run model.int8.onnx "def fibonacci(n):" -n 100
      craft-run model.int8.onnx "The" --temperature 0 --stats
      echo "Once upon a time" | craft-run model.int8.onnx --seed 1 --stop "\\n\\n"
    """
    if backend == "numpy" and threads:  # BLAS reads these once, when numpy is first imported
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
    from craft.runtime.artifact import ArtifactError
    from craft.runtime.generator import GenerationError, Generator, load_artifact
    from craft.runtime.sampling import SamplingError

    if estimate:
        from craft.runtime.estimate import DeviceError, estimate as predict, format_estimates, load_profiles

        try:
            artifact = load_artifact(model)
            size = os.path.getsize(model)
            chosen = backend if click.get_current_context().get_parameter_source("backend").name != "DEFAULT" else None
            click.echo(format_estimates([predict(artifact, size, device, chosen) for device in load_profiles()]))
        except (ArtifactError, DeviceError) as e:
            fail(str(e))
        return
    if prompt is None:
        if sys.stdin.isatty():
            click.echo("reading the prompt from stdin (end with Ctrl-D)...", err=True)
        prompt = sys.stdin.read()
    if max_new_tokens < 0:
        fail(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    stop = [unescape(s) for s in stop]
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  repetition_penalty=repetition_penalty, seed=seed, stop=stop, truncate=truncate)
    try:
        generator = Generator(model, backend=backend, threads=threads)
        if as_json:
            completion = generator.generate(prompt, **kwargs)
            click.echo(json.dumps({"text": completion.text, "token_ids": completion.token_ids, "stats": completion.stats.to_dict()}, ensure_ascii=False))
            return
        out = sys.stdout
        if hasattr(out, "reconfigure"):
            out.reconfigure(errors="replace")
        for piece in generator.stream(prompt, **kwargs):
            out.write(piece)
            out.flush()
        out.write("\n")
    except (ArtifactError, GenerationError, SamplingError, ValueError) as e:
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
