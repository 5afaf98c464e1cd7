"""click.Command with Craft's error style, shared by craft-train, craft-export and craft-run.

A usage error (unknown option, bad value) is one line on stderr - "PROG: error: ... (see
PROG --help)" - and exit code 2, instead of click's multi-line usage block. An OSError that
reaches the top (a full disk, a permission, a read-only mount) is one line naming the file and
the fix, exit code 1; so is running out of memory. SIGTERM raises Terminated, so the code it
interrupts unwinds (temp files are removed by the `finally` blocks that made them) before the
process exits with 143. A command whose state needs no unwinding (craft-run: `native_grace_s`)
also ends itself when a signal's handler cannot run because the main thread is stuck in native
code (end_native_hangs).
"""

from __future__ import annotations

import contextvars
import errno
import os
import signal
import sys
import threading
import unicodedata
from functools import partial
from typing import NoReturn

import click

EXIT_OS_ERROR, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130

_FIXES = {
    errno.ENOSPC: "free some space (or choose another path) and run again",
    errno.EDQUOT: "free some space (or choose another path) and run again",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "it is on a read-only filesystem; choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EISDIR: "it is a directory; give a file",
    errno.EEXIST: "something else is in the way; choose another path",
    errno.ENOENT: "check the path",
    errno.EIO: "the device reported an I/O error; check the disk",
    errno.ENAMETOOLONG: "a name in the path is longer than the file system allows (255 bytes); use a shorter one",
}
MAX_NAME_SHOWN = 160  # characters of a file name an error line shows (a name past NAME_MAX was a 4 KB line)


# The packages of an extra (setup.py) that a command imports only when it runs: a device installs
# the runtime alone, where craft-train and craft-export find them missing.
# Craft installs from its checkout (PyPI's 'craft' is another project): the extra, from there, after torch's
# CPU build (the README's two commands; `torch` alone from PyPI is a multi-GB CUDA build on x86_64 Linux).
INSTALL_HINTS = {
    name: """install torch's CPU build, then pip install -e ".[train]" in Craft's checkout (README, "Two commands")"""
    for name in ("torch", "onnx", "yaml", "tqdm", "gguf")
}


def missing_package(e: ModuleNotFoundError) -> str:
    """One line for a package that is not installed, with the command that installs it."""
    name = (e.name or "").partition(".")[0] or "a package"
    return f"the Python package '{name}' is not installed; {INSTALL_HINTS.get(name, f'pip install {name}')}"


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt: `except Exception` lets it through)."""


MAX_ERROR_CHARS = 1000  # an error line's length: a hostile file's 1 MB architecture name is cut in the middle


def printable(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` safe to print as one line of a terminal: control and format characters (newlines, ESC
    and the escape sequences it starts, BEL, bidi overrides such as U+202E) written as \\n,
    \\x1b, \\u202e; cut in the middle past `limit` characters, keeping the start and the end (the fix)."""
    if len(text) > limit:
        tail = limit // 4
        text = f"{text[: limit - tail]} [... {len(text) - limit:,} characters ...] {text[-tail:]}"
    return "".join(_ESCAPES.get(c) or (_escape(c) if unicodedata.category(c) in _UNSAFE else c) for c in text)


_UNSAFE = ("Cc", "Cf", "Zl", "Zp", "Cs")  # controls, format (bidi, zero-width), line / paragraph separators, surrogates
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"


def echo_error(prog: str, message: object) -> None:
    """`PROG: error: MESSAGE` on stderr, one printable line (see printable: a message quotes paths,
    file metadata and template text, any of which may be hostile). A stderr that fails is let be:
    the exit code still says what happened."""
    echo_stderr(f"{prog}: error: {printable(str(message))}")


def silence(stream) -> None:
    """Point `stream`'s descriptor at /dev/null once writing to it failed: what Python still holds
    buffered for it is flushed at exit, and would fail there again ("Exception ignored ...
    BrokenPipeError"). Nothing to do for a stream without a descriptor (embedded) or closed."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(devnull, stream.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    finally:
        os.close(devnull)


class OptionalOutput:
    """stdout or stderr for a log (progress bars, lines saying how it goes) that no run is worth
    losing for: closed (2>&-), full (>/dev/full) or with the reader gone (`craft-train | head -1`),
    it falls silent and the work goes on (craft-train died in tqdm or click.echo without a
    checkpoint; craft-export dropped a verified model). Not for a command's product: craft-run's text."""

    def __init__(self, stream):
        self.stream, self.failed = stream, stream is None

    def _try(self, call, fallback):
        if not self.failed:
            try:
                return call()
            except (OSError, ValueError):  # ValueError: a closed file
                self.failed = True
                silence(self.stream)
        return fallback

    def echo(self, text: str) -> None:
        """One line, flushed at once (the log of a run someone is watching); characters the
        stream's encoding lacks (PYTHONIOENCODING=ascii) are escaped, not fatal."""
        self.write((text + "\n").encode(self.encoding, "backslashreplace").decode(self.encoding))
        self.flush()

    def write(self, text: str) -> int:
        return self._try(lambda: self.stream.write(text), len(text))

    def flush(self) -> None:
        self._try(lambda: self.stream.flush(), None)

    def isatty(self) -> bool:
        return self._try(lambda: self.stream.isatty(), False)

    def fileno(self) -> int:  # tqdm sizes the bar to the terminal through it
        if self.failed:
            raise OSError("this output failed")
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # tqdm draws Unicode blocks only where the stream's encoding has them
        return getattr(self.stream, "encoding", None) or "ascii"


def require_cwd(prog: str) -> None:
    """Exit 1 with one line if the current directory was deleted: torch's import then dies in
    oneMKL ("Cannot load libtorch_cpu.so", exit 2), whatever paths the command was given."""
    try:
        os.getcwd()
    except FileNotFoundError:
        echo_error(prog, "the current directory no longer exists (deleted while the shell was in it); cd elsewhere")
        sys.exit(EXIT_OS_ERROR)


def os_error_message(e: OSError) -> str:
    """One line for an OSError: what failed, on which file, and what to do about it."""
    name = os.fsdecode(e.filename) if isinstance(e.filename, bytes) else e.filename  # TensorBoard passes bytes
    if name is not None and len(str(name)) > MAX_NAME_SHOWN:
        name = f"{str(name)[: MAX_NAME_SHOWN - 40]}...{str(name)[-37:]}"
    where = f"{name}: " if name is not None else ""
    reason = e.strerror or type(e).__name__
    fix = _FIXES.get(e.errno)
    return f"{where}{reason}" + (f"; {fix}" if fix else "")


TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def echo_stderr(text: str, nl: bool = True) -> None:
    """A note on stderr, if stderr is still there (2>/dev/full; after SIGHUP the terminal is gone): a
    note that cannot be shown changes no outcome and no exit code."""
    try:
        click.echo(text, err=True, nl=nl)
    except (OSError, ValueError):
        pass


HANDLED = [0]  # signals whose Python handler has run: it runs only once the main thread is back in Python


def _raise_terminated(signum, _frame) -> None:
    HANDLED[0] += 1
    raise Terminated(signum)


def _raise_interrupted(_signum, _frame) -> None:
    HANDLED[0] += 1
    raise KeyboardInterrupt


def end_native_hangs(prog: str, grace_s: float) -> None:
    """A Python signal handler runs only when the main thread is back in Python: inside one long native
    call (ONNX Runtime running a crafted graph for hours) SIGTERM did nothing, and only SIGKILL ended
    craft-run. A thread reads the signals as they arrive (signal.set_wakeup_fd) and ends the process
    itself, with the line and exit code the handler would give, when a SIGTERM / SIGHUP is still
    unhandled after grace_s, or a second Ctrl-C comes before the first was handled. Main thread only;
    nothing where a wakeup fd is already in use (an event loop's)."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except (ValueError, OSError):
        previous = None
    if previous != -1:
        if previous is not None:
            signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_interrupted)
    threading.Thread(target=_watch_signals, args=(read, prog, grace_s), daemon=True, name="craft-signals").start()


def _watch_signals(read: int, prog: str, grace_s: float) -> None:
    interrupted = None  # HANDLED when the last Ctrl-C arrived
    while True:
        try:
            arrived = os.read(read, 64)
        except OSError:
            return
        for signum in arrived:
            if signum == signal.SIGINT:
                if interrupted == HANDLED[0]:  # the one before is still waiting for the main thread
                    _exit_now(prog, signum)
                interrupted = HANDLED[0]
            elif signum in TERMINATING_SIGNALS:
                timer = threading.Timer(grace_s, _exit_if_unhandled, (prog, signum, HANDLED[0]))
                timer.daemon = True
                timer.start()


def _exit_if_unhandled(prog: str, signum: int, handled: int) -> None:
    if HANDLED[0] == handled:
        _exit_now(prog, signum)


def _exit_now(prog: str, signum: int) -> NoReturn:
    """_exit_signalled's line and code, from another thread: the main thread cannot unwind."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError, AttributeError):
        pass
    if signum == signal.SIGINT:
        echo_stderr("\ninterrupted")
    else:
        echo_stderr(f"{prog}: {'hung up' if signum == getattr(signal, 'SIGHUP', None) else 'terminated'}")
    os._exit(128 + signum)


def _stream_failed(e: OSError) -> str | None:
    """ "stdout" or "stderr" where `e` came from printing (click.echo: a full disk, a closed pipe),
    else None; the stream is pointed at /dev/null, so that Python's flush at exit prints no second error."""
    tb = e.__traceback__
    while tb is not None and not (tb.tb_frame.f_code.co_name == "echo" and "click" in tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    if tb is None:
        return None
    stream = sys.stderr if tb.tb_frame.f_locals.get("err") else sys.stdout
    silence(stream)
    return "stderr" if stream is sys.stderr else "stdout"


def _quiet_os_errors(hook, args) -> None:
    """threading.excepthook during a command: an OSError in TensorBoard's writer thread (its event
    file on a full disk) comes back to the main thread at its next write, which prints it in one
    line; the thread's own traceback is not printed. Anything else goes to `hook`."""
    from_tensorboard = type(args.thread).__module__.startswith("tensorboard") if args.thread else False
    if not (issubclass(args.exc_type, OSError) and from_tensorboard):
        hook(args)


def _signal_behind(error: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or Terminated that caused `error` (its __cause__ / __context__ chain)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (KeyboardInterrupt, Terminated)):
            return error
        error = error.__cause__ or error.__context__
    return None


def _exit_signalled(prog: str, signalled: BaseException) -> None:
    """Ctrl-C: 'interrupted', 130; SIGTERM / SIGHUP: one line, 128 + the signal's number."""
    if isinstance(signalled, KeyboardInterrupt):
        echo_stderr("\ninterrupted")
        sys.exit(EXIT_INTERRUPTED)
    signum = int(signalled.args[0]) if signalled.args else signal.SIGTERM
    echo_stderr(f"{prog}: {'hung up' if signum == getattr(signal, 'SIGHUP', None) else 'terminated'}")
    sys.exit(128 + signum)


CONSOLE = contextvars.ContextVar("craft_console", default=False)  # OneLineErrors runs as the process itself


def settle() -> None:
    """From here a console command's outcome stands: SIGINT, SIGTERM and SIGHUP are ignored. One arriving
    during the interpreter's teardown (torch's takes half a second) killed the process or printed a
    KeyboardInterrupt traceback from an atexit callback; one landing while they are set here is dropped.
    Nothing where the command is embedded (main([...]) from a test or a program keeps its handlers)."""
    if not CONSOLE.get():
        return
    for s in (signal.SIGINT, *TERMINATING_SIGNALS):
        while signal.getsignal(s) is not signal.SIG_IGN:
            try:
                signal.signal(s, signal.SIG_IGN)
            except (KeyboardInterrupt, Terminated):
                pass


# How a native library says it ran out of memory (ulimit -v, a full machine) as it loads or starts a
# thread, at the end of its message: dlopen, std::bad_alloc through pybind11, pthread_create's ENOMEM
MEMORY_FAILURES = ("failed to map segment from shared object", "bad_alloc", "Cannot allocate memory")


TORCH_OUT_OF_MEMORY = "can't allocate memory"  # torch's DefaultCPUAllocator, in a RuntimeError


def memory_failure(error: BaseException) -> bool:
    """Whether `error` is a native library's out-of-memory (not a name quoted mid-message)."""
    return isinstance(error, MemoryError) or str(error).rstrip().endswith(MEMORY_FAILURES)


def exit_out_of_memory_loading(prog: str, error: BaseException) -> NoReturn:
    """One line and exit 1 for a library that could not load for want of memory (memory_failure)."""
    detail = " ".join(str(error).split())[-120:]
    echo_error(prog, f"out of memory loading its libraries ({detail}); close other programs or raise ulimit -v")
    sys.exit(EXIT_OS_ERROR)


INFO_OPTIONS = frozenset(("-h", "--help", "--version"))  # the options that print to stdout and exit


class OneLineErrors(click.Command):
    native_grace_s: float | None = None  # end_native_hangs' grace: for a command with nothing to unwind

    def main(self, args=None, prog_name=None, **kwargs):
        kwargs["standalone_mode"] = False
        prog = prog_name or self.name
        # SIGHUP (the terminal closed, an ssh session dropped) ends a command as SIGTERM does, tidily;
        # not when embedded in a program that handles them itself
        main_thread = threading.current_thread() is threading.main_thread()  # signal.signal works there only
        previous = {s: signal.getsignal(s) for s in TERMINATING_SIGNALS} if main_thread else {}
        for s, handler in previous.items():
            if handler is signal.SIG_DFL:
                signal.signal(s, _raise_terminated)
        thread_hook = threading.excepthook
        threading.excepthook = partial(_quiet_os_errors, thread_hook)
        console = CONSOLE.set(args is None and main_thread)  # its console script: the process ends with it
        if CONSOLE.get() and self.native_grace_s is not None:
            end_native_hangs(prog, self.native_grace_s)
        if sys.stdout is None and INFO_OPTIONS.intersection(sys.argv[1:] if args is None else args):
            # fd 1 closed at start (>&-): click would print the help or version nowhere and exit 0
            echo_error(prog, "stdout is closed, so there is nowhere to print that; run it without >&-")
            sys.exit(EXIT_OS_ERROR)
        try:
            result = super().main(args=args, prog_name=prog_name, **kwargs)
        except click.UsageError as e:
            message = e.format_message().replace("\n", " ")
            echo_error(prog, f"{message} (see {prog} --help)")
            sys.exit(e.exit_code)
        except click.exceptions.Exit as e:  # --help, --version
            sys.exit(e.exit_code)
        except click.Abort:
            _exit_signalled(prog, KeyboardInterrupt())
        except Terminated as e:
            _exit_signalled(prog, e)
        except ImportError as e:  # onnxruntime's module init turns a signal during its import into ImportError
            signalled = _signal_behind(e)
            if signalled is None:
                if isinstance(e, ModuleNotFoundError):
                    echo_error(prog, missing_package(e))
                    sys.exit(EXIT_OS_ERROR)
                if memory_failure(e):  # a library imported lazily (onnxruntime, torch) under a memory limit
                    exit_out_of_memory_loading(prog, e)
                raise
            _exit_signalled(prog, signalled)
        except (MemoryError, RuntimeError) as e:  # numpy's names the array; a bare one (file.read) says nothing
            if isinstance(e, RuntimeError) and TORCH_OUT_OF_MEMORY not in str(e):
                raise
            detail = " ".join(str(e).split())[:200]
            detail = f" ({detail})" if detail else ""
            echo_error(prog, f"out of memory{detail}; close other programs or choose a smaller model or context")
            sys.exit(EXIT_OS_ERROR)
        except OSError as e:
            stream = _stream_failed(e) if e.filename is None else None
            echo_error(prog, f"{stream + ': ' if stream else ''}{os_error_message(e)}")
            sys.exit(EXIT_BAD_INPUT if e.errno == errno.ENAMETOOLONG else EXIT_OS_ERROR)  # a name the user gave
        finally:
            threading.excepthook = thread_hook
            if CONSOLE.get():
                settle()
            else:  # embedded (a test, a program calling main([...])): its own handlers back
                for s, handler in previous.items():
                    if handler is signal.SIG_DFL:
                        signal.signal(s, handler)
            CONSOLE.reset(console)
        sys.exit(result if isinstance(result, int) else 0)
