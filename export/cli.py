"""craft-export: compile a run directory, Hugging Face directory or GGUF file into one verified .onnx file
(a thin layer over exporter.export)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from craft import __version__
from craft.runtime.artifact import ATTENTIONS, ORT_INPLACE_MIN
from craft.runtime.artifact_check import file_identity
from craft.runtime.command import (
    OneLineErrors,
    OptionalOutput,
    Terminated,
    echo_error,
    echo_stderr,
    printable,
    require_cwd,
    settle,
)
from craft.runtime.weights import INT8, NONE, SCHEMES

EXIT_OUTPUT, EXIT_USAGE, EXIT_VERIFY = 1, 2, 3


def format_size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def print_report(report: dict, output: Path | None, echo) -> None:
    echo(
        f"  size    {format_size(report['file_bytes'])} ({report['quantization']}); "
        f"fp32 {format_size(report['fp32_file_bytes'])}; "
        f"ratio {report['size_ratio']:.1%}; {report['parameters']:,} parameters; opset {report['opset']}"
    )
    if report["quantization"] != NONE:
        echo(f"  weights max {report['quantization']} reconstruction error {report['max_weight_quant_error']:.2e}")
    if output is not None:
        echo(f"wrote {printable(str(output))} in {report['export_s']:.1f}s")  # a name may hold ESC or a newline


def source_path(source: str) -> Path:
    if not source.strip():  # Path("") is the current directory
        raise click.BadParameter(
            "SOURCE is empty; give a run directory, a Hugging Face model directory or a .gguf file"
        )
    return Path(source)


@click.command(
    name="craft-export",
    cls=OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.argument("source", type=click.Path(), callback=lambda ctx, param, value: source_path(value))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Output .onnx file.  "
    "[default: SOURCE/model.<quantize>.onnx; for a .gguf file: its name with .<quantize>.onnx]",
)
@click.option(
    "--quantize",
    type=click.Choice(list(SCHEMES)),
    default=INT8,
    help="Weights: " + "; ".join(f"{s.name} ({s.description})" for s in SCHEMES.values()) + ".",
)
@click.option("--opset", type=click.IntRange(14, 21), default=None, help="ONNX opset of the graph.  [default: 17]")
@click.option(
    "--checkpoint", default="checkpoint.pt", help="Checkpoint file in a run directory to export (e.g. best.pt)."
)
@click.option(
    "--from",
    "kind",
    type=click.Choice(["run", "hf", "gguf"]),
    default=None,
    help="What SOURCE is: a craft-train run, a Hugging Face model directory or a GGUF file.  [default: detected]",
)
@click.option(
    "--attention",
    type=click.Choice(list(ATTENTIONS)),
    default=None,
    help="KV-cache attention: standard (standard ONNX ops; a float32 file then runs on any ONNX runtime) or "
    f"inplace (ONNX Runtime's GroupQueryAttention writing a preallocated cache in place: faster decode, needs "
    f"onnxruntime>={ORT_INPLACE_MIN})."
    "  [default: inplace for quantized transformers, whose files need ONNX Runtime anyway, with heads a multiple "
    "of 16 wide; standard for none, recurrent models and other head widths]",
)
@click.version_option(__version__, prog_name="craft-export")
def main(
    source: Path,
    output: Path | None,
    quantize: str,
    opset: int | None,
    checkpoint: str,
    kind: str | None,
    attention: str | None,
) -> None:
    """Compile SOURCE into one self-contained .onnx file. SOURCE is a run directory (written by
    craft-train), a Hugging Face model directory (config.json, safetensors, tokenizer.json; Llama,
    Mistral, Qwen2) or a GGUF file of the llama architecture.

    The file carries the model config, tokenizer, special ids and chat template in its metadata
    and has KV-cache inputs/outputs; craft-run needs nothing else. Before writing, the export is
    verified: PyTorch vs ONNX Runtime logits on a prefill and 8 cached decode steps, and for a
    quantized file its top-1 agreement and perplexity against float32 (the run's val split; for
    an imported model a bundled English text). Exit codes: 0 written, 1 the output could not be
    written (permission, a read-only or full disk), 2 bad input - a source missing, unreadable or
    damaged, a bad option or output path (nothing written), 3 verification failed (nothing
    written; the figures are printed), 130 interrupted (Ctrl-C) and 143 / 129 terminated (SIGTERM / SIGHUP), nothing
    written.
    """
    require_cwd("craft-export")  # before torch's import
    from craft.export.exporter import ExportError, OutputWriteError, VerificationError, export
    from craft.export.graph import DEFAULT_OPSET

    if output is None:
        try:
            is_file = source.is_file()
        except OSError:  # a name too long: export() says what is wrong with the source
            is_file = False
        output = source.with_suffix(f".{quantize}.onnx") if is_file else source / f"model.{quantize}.onnx"
    elif str(output) == "-":
        raise click.BadParameter("craft-export writes a file, not stdout; give its path", param_hint="'-o'")
    out = OptionalOutput(sys.stdout)  # the log: a reader gone (| head -1) must not cost the verified model
    before = file_identity(output)
    try:
        try:
            report = export(
                source,
                output,
                quantize=quantize,
                opset=opset or DEFAULT_OPSET,
                checkpoint=checkpoint,
                log=out.echo,
                kind=kind,
                attention=attention,
            )
        except ExportError as e:  # an OutputWriteError too: the output could not be written (exit 1)
            echo_error("craft-export", e)
            sys.exit(EXIT_OUTPUT if isinstance(e, OutputWriteError) else EXIT_USAGE)
        except VerificationError as e:
            print_report(e.report, None, out.echo)
            echo_stderr(f"craft-export: verification failed, nothing written: {printable(str(e))}")
            sys.exit(EXIT_VERIFY)
        print_report(report, output, out.echo)
        settle()  # written: a signal from here on changes nothing (also caught below while this runs)
    except (KeyboardInterrupt, Terminated):  # 130 / 143 / 129 mean nothing was written: true until the rename
        if file_identity(output) in (None, before):
            raise
        settle()
        echo_stderr(f"craft-export: a signal arrived after {printable(str(output))} was written; the file is complete")


if __name__ == "__main__":
    main()
