"""craft-run: generate text from a Craft .onnx file - a thin map of flags onto the Python API.

Each sampling flag fills the SamplingParams field of its name and shows that field's default
(sampling.py is the one place they live); the CLI builds the object once and hands it to
Generator.stream / generate / chat. A new sampling flag is one `Field` option below plus its field.
--chat with a PROMPT answers it through the model's chat template; without one it is an
interactive session (converse below) over chat.Conversation.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import functools
import io
import json
import os
import re
import sys
import unicodedata
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn

import click

from craft import __version__
from craft.runtime.command import OneLineErrors, echo_error, echo_stderr, silence

if TYPE_CHECKING:  # the runtime is imported inside main(), after --threads has set BLAS's thread count
    from craft.runtime.generator import Generator, Stats
    from craft.runtime.sampling import SamplingParams

EXIT_OUTPUT, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
# stdin read as a prompt or a chat message: more than any context holds (64 characters a token,
# generator.MAX_CHARS_PER_TOKEN, at 262,144 positions), so that `< /dev/zero` is refused, not read
MAX_STDIN_BYTES = 16 * 2**20


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
    elif not re.fullmatch(r"\s*[1-9]\d*(\s*,\s*[1-9]\d*)*\s*", os.environ.get("OMP_NUM_THREADS", "1")):
        del os.environ[
            "OMP_NUM_THREADS"
        ]  # junk: the libraries ignore it, and libgomp (sentencepiece's) says so on stderr
    return threads


def unescape(text: str) -> str:
    """--stop "\\n\\n" from a shell means two newlines: expand \\n, \\t and \\\\."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}.get(m.group(1), m.group(0)), text)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    echo_error("craft-run", message)
    sys.exit(code)


def read_prompt(prompt: str | None, truncate: bool = False) -> str:
    """PROMPT, or stdin when it is omitted, as text. Bytes that are not UTF-8 are refused rather
    than replaced: a prompt silently changed would give a surprising continuation. Stdin past
    MAX_STDIN_BYTES is refused, or with `truncate` read to its end keeping only its last
    MAX_STDIN_BYTES (from a character boundary): memory stays bounded either way."""
    if prompt is not None and prompt != "-":  # "-": stdin, as for cat and most tools
        return utf8_argument(prompt, "the prompt")
    if sys.stdin is None:
        fail("no PROMPT was given and stdin is closed; give PROMPT or pipe it in")
    if sys.stdin.isatty():
        echo_stderr("reading the prompt from stdin (end with Ctrl-D)...")
    data = bytearray(sys.stdin.buffer.read(MAX_STDIN_BYTES + 1))
    if len(data) > MAX_STDIN_BYTES:
        if not truncate:
            fail(
                f"stdin holds more than {MAX_STDIN_BYTES >> 20} MiB, more than any context; pipe in a shorter "
                "prompt, or pass --truncate to keep its end"
            )
        while chunk := sys.stdin.buffer.read(1 << 20):
            data += chunk
            del data[: -MAX_STDIN_BYTES - 4]  # 4: room to start at a whole UTF-8 character below
        start = next(i for i in range(5) if i == len(data) or data[i] & 0xC0 != 0x80)  # skip continuation bytes
        data = data[start:]
    return utf8(bytes(data), "the prompt")


def utf8_argument(text: str, what: str) -> str:
    """A command-line argument as the text it was typed as: argv's undecodable bytes come back as
    they were (Python keeps them as surrogates, which no tokenizer can encode) and are refused."""
    return utf8(os.fsencode(text), what)


def utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(
            f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            f"convert it first, e.g. iconv -f LATIN1 -t UTF-8"
        )


def shown(piece: str, terminal: bool) -> str:
    """Generated text as a terminal shows it: on a terminal, control characters other than newline,
    tab and carriage return (a CRLF line end; ESC, which starts escape sequences, BEL, C1's CSI) are
    written as \\x1b etc., so a hostile tokenizer cannot retitle or clear the screen; in a pipe or
    file, as generated."""
    if not terminal:
        return piece
    return "".join(c if c in "\n\t\r" or unicodedata.category(c) != "Cc" else f"\\x{ord(c):02x}" for c in piece)


def stdout_is_tty() -> bool:
    try:
        return sys.stdout is not None and sys.stdout.isatty()
    except (OSError, ValueError):
        return False


@functools.cache
def encoder(encoding: str, errors: str) -> codecs.IncrementalEncoder:
    """One encoder per stream encoding for the process: a text written piece by piece is one text
    (PYTHONIOENCODING=utf-16 wrote a byte-order mark before every piece, encoded on its own)."""
    return codecs.getincrementalencoder(encoding)(errors)


def write(text: str) -> None:
    """Text to stdout, now. A reader that went away (`| head -1`) ends craft-run quietly; a full
    disk ends it with one line. Either way stdout is pointed at /dev/null so that Python's own
    flush at exit does not print a second error."""
    if sys.stdout is None:  # started with stdout closed (`>&-`)
        fail("stdout is closed; redirect it instead, e.g. > out.txt or > /dev/null", EXIT_OUTPUT)
    try:
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, ValueError, io.UnsupportedOperation):  # not a descriptor (embedded, tests)
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        # os.write, not sys.stdout.write: on a short write (a full disk, ulimit -f) Python's buffered
        # stdout drops the rest without an error, so --json ended as cut JSON with exit 0.
        sys.stdout.flush()
        view = memoryview(encoder(sys.stdout.encoding or "utf-8", sys.stdout.errors or "strict").encode(text))
        while view:
            view = view[os.write(fd, view) :]  # the write after a short one reports why (ENOSPC, EFBIG)
    except OSError as e:
        silence(sys.stdout)
        if e.errno == errno.EPIPE:
            sys.exit(EXIT_OUTPUT)
        fail(f"cannot write the output to stdout: {e.strerror or e}", EXIT_OUTPUT)


class RunCommand(OneLineErrors):
    native_grace_s = 3.0  # nothing to unwind: a signal whose handler cannot run in this time ends the process


@click.command(
    name="craft-run", cls=RunCommand, context_settings={"help_option_names": ["-h", "--help"], "show_default": True}
)
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("prompt", required=False)
@click.option("-n", "--max-new-tokens", cls=Field, type=int, help="Most tokens to generate (0: none).")
@click.option(
    "-t",
    "--temperature",
    cls=Field,
    type=float,
    help="Sampling temperature; 0 is greedy (always the most likely token).",
)
@click.option("--top-k", cls=Field, type=int, help="Sample among the k most likely tokens; 0 disables.")
@click.option(
    "--top-p", cls=Field, type=float, help="Sample among the fewest tokens holding probability p; 1 disables."
)
@click.option(
    "--min-p",
    cls=Field,
    type=float,
    help="Drop tokens less likely than min-p x the most likely one's probability (llama.cpp's min-p); 0 disables.",
)
@click.option(
    "--repetition-penalty", cls=Field, type=float, help="> 1 makes tokens already in the text less likely; 1 disables."
)
@click.option(
    "--seed",
    cls=Field,
    type=int,
    help="Random seed: the same seed, model, flags and backend give the same text.  [default: random]",
)
@click.option(
    "--stop",
    cls=Field,
    multiple=True,
    metavar="STR",
    help="Stop when the text produces STR (not printed); repeatable (up to 256); \\n and \\t mean newline and tab.",
)
@click.option(
    "--backend",
    type=click.Choice(["ort", "numpy"]),
    default="ort",
    help="ONNX Runtime, or pure numpy for devices without an onnxruntime wheel (the default where onnxruntime "
    "is not installed).",
)
@click.option(
    "--threads",
    type=click.IntRange(0, 1024),  # craft.runtime.generator.MAX_THREADS (imported later, with numpy)
    default=0,
    is_eager=True,
    callback=set_blas_threads,
    help="CPU threads; 0: the backend's default (one per core); capped at the CPUs this process may use.",
)
@click.option(
    "--max-context",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Cap the KV-cache at N positions.  [default: the model's context, cut to what fits in free memory]",
)
@click.option(
    "--chat",
    is_flag=True,
    help="Answer PROMPT with the model's chat template; without PROMPT, an interactive chat "
    "(Ctrl-D ends, Ctrl-C stops an answer).",
)
@click.option("--system", metavar="TEXT", help="The chat's system prompt (with --chat).")
@click.option(
    "--truncate", is_flag=True, help="Cut a prompt longer than the context to its end instead of refusing it."
)
@click.option(
    "--stats",
    is_flag=True,
    help="Print prompt/generated tokens, time to first token, prefill ms, decode tokens/s, stop reason and peak "
    "memory to stderr.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object (text, token ids, stats) instead of streaming text."
)
@click.option(
    "--estimate",
    is_flag=True,
    help="Do not generate: predict peak memory (KV-cache at --max-context, else the model's context) and decode "
    "tokens/s of MODEL on the device profiles in configs/devices/ (Raspberry Pi 4, 5, Zero 2 W).",
)
@click.version_option(__version__, prog_name="craft-run")
def main(
    model: str,
    prompt: str | None,
    backend: str,
    threads: int,
    max_context: int | None,
    chat: bool,
    system: str | None,
    truncate: bool,
    stats: bool,
    as_json: bool,
    estimate: bool,
    **sampling,
) -> None:
    """Generate text from MODEL (a .onnx file from craft-export), continuing PROMPT.

    With no PROMPT (or PROMPT -) the prompt is read from stdin (UTF-8); with --chat and no PROMPT, an
    interactive chat. Text streams to stdout as it is generated. Everything the model needs
    (config, tokenizer, chat template) is inside the file. Exit codes: 0 done, 1 stdout failed
    (a full disk) or out of memory, 2 bad input (piped --chat: a message was refused), 130 interrupted (Ctrl-C),
    143 terminated (SIGTERM), 129 hung up (SIGHUP).

    \b
    Examples:
      craft-run model.int8.onnx "def fibonacci(n):" -n 100
      craft-run model.int8.onnx "The" --temperature 0 --stats
      echo "Once upon a time" | craft-run model.int8.onnx --seed 1 --stop "\\n\\n"
      craft-run smollm2.int8.onnx --chat
      craft-run smollm2.int8.onnx "What is the capital of France?" --chat --system "Be brief."
    """
    from craft.runtime.artifact import ArtifactError
    from craft.runtime.generator import CONTEXT_LENGTH, GenerationError, Generator, load_artifact, load_tokenizer
    from craft.runtime.sampling import SamplingError, SamplingParams

    backend_given = click.get_current_context().get_parameter_source("backend").name != "DEFAULT"
    if not backend_given and backend == "ort":
        from craft.runtime.ort_backend import ort_installed

        backend = "ort" if ort_installed() else "numpy"  # 32-bit ARM has no onnxruntime wheel: numpy is the runtime
    if estimate:
        from craft.runtime.estimate import DeviceError, format_estimates, load_profiles
        from craft.runtime.estimate import estimate as predict

        ctx = click.get_current_context()
        generating = [  # what only generation reads: given with --estimate, it would be ignored in silence
            max(param.opts, key=len) if isinstance(param, click.Option) else param.human_readable_name
            for param in ctx.command.params
            if param.name not in ("model", "estimate", "backend", "max_context", "threads")
            and ctx.get_parameter_source(param.name) not in (None, click.core.ParameterSource.DEFAULT)
        ]
        if generating:
            fail(f"--estimate generates nothing, so {', '.join(generating)} would do nothing; drop them")

        try:
            artifact = load_artifact(model)
            load_tokenizer(artifact, model)  # a file that cannot run does not fit anywhere
            size = os.path.getsize(model)
            chosen = backend if backend_given else None
            if max_context is not None and max_context > artifact.spec.context_length:
                model_context = artifact.spec.context_length
                fail(f"--max-context must be in 1..{model_context} (the model's context), got {max_context}")
            report = format_estimates(
                [predict(artifact, size, device, chosen, max_context) for device in load_profiles()]
            )
        except (ArtifactError, DeviceError) as e:
            fail(str(e))
        write(report + "\n")
        return
    stop = tuple(unescape(utf8_argument(s, "--stop")) for s in sampling["stop"])
    try:
        params = SamplingParams(**{**sampling, "stop": stop})
    except SamplingError as e:
        fail(str(e))
    if system is not None and not chat:
        fail("--system is the chat's system prompt; add --chat")
    system = None if system is None else utf8_argument(system, "--system")
    if sys.stdout is None:
        fail("stdout is closed; redirect it instead, e.g. > out.txt or > /dev/null", EXIT_OUTPUT)
    if chat and prompt is None and sys.stdin is None:
        fail("--chat without PROMPT reads messages from stdin, which is closed; give PROMPT or a terminal")
    if chat and (truncate or (as_json and prompt is None)):
        fail("--chat takes neither --truncate nor, without a PROMPT (interactive), --json; drop them")
    prompt = None if chat and prompt is None else read_prompt(prompt, truncate)
    messages = [{"role": "system", "content": system}] * (system is not None) + [{"role": "user", "content": prompt}]
    try:
        generator = Generator(model, backend=backend, threads=threads, max_context=max_context)
        if generator.memory_capped:
            echo_stderr(
                f"craft-run: using a context of {generator.context_length} tokens, not the model's "
                f"{generator.spec.context_length}: a longer KV-cache would not fit in free memory "
                f"(--max-context N sets it)",
            )
        terminal = stdout_is_tty()
        if hasattr(sys.stdout, "reconfigure"):  # a pipe gets UTF-8, as the prompt is read, unless asked otherwise
            pipe_encoding = {} if terminal or "PYTHONIOENCODING" in os.environ else {"encoding": "utf-8"}
            sys.stdout.reconfigure(errors="replace", **pipe_encoding)
        if chat and prompt is None:
            return converse(generator, params, system, stats)
        if as_json:
            completion = (
                generator.generate_chat(messages, params)
                if chat
                else generator.generate(prompt, params, truncate=truncate)
            )
            encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "")
            write(
                json.dumps(
                    {"text": completion.text, "token_ids": completion.token_ids, "stats": completion.stats.to_dict()},
                    # \u escapes where stdout cannot hold every character, and on a terminal (C1 controls)
                    ensure_ascii=terminal or not encoding.startswith("utf"),
                )
                + "\n"
            )
        else:
            for piece in (
                generator.chat(messages, params) if chat else generator.stream(prompt, params, truncate=truncate)
            ):
                write(shown(piece, terminal))
            write("\n")
    except (ArtifactError, GenerationError, ValueError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        echo_stderr("\ninterrupted")
        sys.exit(EXIT_INTERRUPTED)
    if chat and generator.last_stats.stop_reason == CONTEXT_LENGTH:
        echo_stderr(context_full(generator))
    if stats:
        print_stats(generator.last_stats)


def print_stats(s: Stats) -> None:
    echo_stderr(
        f"[{s.backend}] prompt {s.prompt_tokens} tokens ({s.reused_tokens} cached), generated {s.generated_tokens} "
        f"({s.stop_reason}) | load {s.load_s * 1e3:.0f} ms, "
        f"time to first token {s.time_to_first_token_s * 1e3:.0f} ms, prefill {s.prefill_ms:.1f} ms, "
        f"decode {s.decode_tokens_per_s:.1f} tokens/s | peak RSS {s.peak_rss_mb:.0f} MB",
    )


def context_full(generator: Generator) -> str:
    more = (
        f"; --max-context up to {generator.spec.context_length} allows more"
        if generator.context_length < generator.spec.context_length
        else ""
    )
    return f"craft-run: the context is full ({generator.context_length} tokens){more}"


def read_message(tty: bool) -> str:
    """One line typed at the chat prompt (readline editing where it loaded), or piped; EOFError at the end.
    The prompt goes to the terminal: stdout when it is one (readline redraws it there), else stderr."""
    if tty and sys.stdout.isatty():
        return input("> ")
    if tty:
        echo_stderr("> ", nl=False)
        return input()
    # Piped: bytes, read as UTF-8 whatever the locale (as a piped prompt is); a line without end
    # (< /dev/zero) is bounded. UnicodeDecodeError for bytes that are not UTF-8.
    line = sys.stdin.buffer.readline(MAX_STDIN_BYTES + 1)
    if not line:
        raise EOFError
    if len(line) > MAX_STDIN_BYTES:
        fail(f"a chat message on stdin is longer than {MAX_STDIN_BYTES >> 20} MiB, more than any context")
    return line.removesuffix(b"\n").decode("utf-8")


@contextlib.contextmanager
def no_echo(tty: bool) -> Iterator[None]:
    """The terminal's echo off while an answer streams, as llama-cli does: keys typed meanwhile would
    be printed into the answer; they stay in the input for the next prompt. Ctrl-C still works."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd) if tty else None
    except (ImportError, OSError, ValueError, AttributeError):  # no termios (Windows), not a terminal
        saved = None
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # lflag
    try:  # set inside: a Ctrl-C right after it must not leave the echo off
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
        yield
    finally:
        with contextlib.suppress(OSError):  # the terminal closed meanwhile (SIGHUP)
            termios.tcsetattr(fd, termios.TCSANOW, saved)


def converse(generator: Generator, params: SamplingParams, system: str | None, stats: bool) -> None:
    """craft-run MODEL --chat: one message per line, each answer streamed; the conversation (and its
    KV-cache) carries over between turns. Ctrl-D ends; Ctrl-C stops an answer, at the prompt exits 130.
    When the context fills, the next message starts a new conversation (the system prompt stays).
    A refused message (not UTF-8, too long, refused by the template) is skipped with one line; piped
    messages then end in exit 2, so that a script sees that not every message was answered."""
    from craft.runtime.chat import ContextFull, Conversation
    from craft.runtime.generator import CONTEXT_LENGTH, MAX_NEW_TOKENS

    try:
        import readline  # noqa: F401  line editing and history for input(), where the platform has it
    except ImportError:
        pass
    conversation = Conversation(generator, system)
    tty, terminal = sys.stdin.isatty(), stdout_is_tty()
    if tty:
        echo_stderr(
            f"chatting with {generator.path.name} ({generator.context_length}-token context): Ctrl-D ends, "
            f"Ctrl-C stops an answer",
        )
    refused = 0
    while True:
        try:
            text = read_message(tty)
        except EOFError:
            echo_stderr("", nl=tty)
            if refused and not tty:
                were = "messages on stdin were" if refused > 1 else "message on stdin was"
                fail(f"{refused} {were} refused (above)")
            return
        except KeyboardInterrupt:
            echo_stderr("")
            sys.exit(EXIT_INTERRUPTED)
        except UnicodeDecodeError as e:
            echo_stderr(f"craft-run: error: the message is not UTF-8 text ({e.reason}); it was skipped")
            refused += 1
            continue
        try:  # a terminal in a C / POSIX locale reads with surrogateescape: bad bytes arrive as surrogates
            text.encode("utf-8")
        except UnicodeEncodeError:
            echo_stderr("craft-run: error: the message is not UTF-8 text; it was skipped")
            refused += 1
            continue
        if not text.strip():
            continue
        answer, before = conversation.reply(text, params), generator.last_stats
        try:
            with no_echo(tty):  # keys typed meanwhile wait for the next prompt instead of landing in the answer
                try:
                    first = next(answer, "")
                except ContextFull:  # this message does not fit after the conversation so far: start over with it
                    if len(conversation.messages) == (system is not None):
                        raise
                    echo_stderr("craft-run: the context is full; this message starts a new conversation")
                    conversation.restart()
                    answer = conversation.reply(text, params)
                    first = next(answer, "")
                write(shown(first, terminal))
                for piece in answer:
                    write(shown(piece, terminal))
                write("\n")
        except KeyboardInterrupt:
            answer.close()  # the answer so far stays in the conversation
            write("\n")
            echo_stderr("[stopped]")
            if stats and generator.last_stats is not before:  # Ctrl-C while rendering: no generation to report
                print_stats(generator.last_stats)
            continue
        except ValueError as e:  # the template refused the conversation, a message longer than the context
            if generator.last_stats is not before and generator.last_token_ids:  # failed mid-answer: end its line
                write("\n")
            echo_error("craft-run", e)
            refused += 1
            continue
        done = generator.last_stats
        if done.stop_reason == CONTEXT_LENGTH:
            echo_stderr(context_full(generator) + "; the next message starts a new conversation")
            conversation.restart()
        elif tty and done.stop_reason == MAX_NEW_TOKENS:  # notes for a person at the terminal, not a script
            echo_stderr(f"[cut at {params.max_new_tokens} tokens: -n sets the most]")
        elif tty and done.generated_tokens == 0:
            echo_stderr("[no answer: the model ended its turn at once]")
        if stats:
            print_stats(generator.last_stats)


if __name__ == "__main__":
    main()
