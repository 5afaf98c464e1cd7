"""click.Command with Craft's error style, shared by craft-train, craft-export and craft-run.

A usage error (unknown option, bad value) is one line on stderr - "PROG: error: ... (see
PROG --help)" - and exit code 2, instead of click's multi-line usage block. An OSError that
reaches the top (a full disk, a permission, a read-only mount) is one line naming the file and
the fix, exit code 1; so is running out of memory. SIGTERM raises Terminated, so the code it
interrupts unwinds (temp files are removed by the `finally` blocks that made them) before the
process exits with 143.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from functools import partial

import click

EXIT_OS_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 130, 143

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
}


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt: `except Exception` lets it through)."""


def echo_error(prog: str, message: object) -> None:
    """`PROG: error: MESSAGE` on stderr, one line: a newline inside the message (a path may hold one)
    is written as \\n."""
    text = str(message).replace("\r", "\\r").replace("\n", "\\n")
    click.echo(f"{prog}: error: {text}", err=True)


def os_error_message(e: OSError) -> str:
    """One line for an OSError: what failed, on which file, and what to do about it."""
    name = os.fsdecode(e.filename) if isinstance(e.filename, bytes) else e.filename  # TensorBoard passes bytes
    where = f"{name}: " if name is not None else ""
    reason = e.strerror or type(e).__name__
    fix = _FIXES.get(e.errno)
    return f"{where}{reason}" + (f"; {fix}" if fix else "")


def _raise_terminated(signum, _frame) -> None:
    raise Terminated(signum)


def _stdout_failed(e: OSError) -> bool:
    """Whether `e` came from printing (click.echo: stdout on a full disk, a closed pipe); then
    stdout is pointed at /dev/null, so that Python's flush at exit prints no second error."""
    tb = e.__traceback__
    while tb is not None and not (tb.tb_frame.f_code.co_name == "echo" and "click" in tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    if tb is None:
        return False
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (embedded)
        pass
    return True


def _quiet_os_errors(hook, args) -> None:
    """threading.excepthook during a command: an OSError in TensorBoard's writer thread (its event
    file on a full disk) comes back to the main thread at its next write, which prints it in one
    line; the thread's own traceback is not printed. Anything else goes to `hook`."""
    from_tensorboard = type(args.thread).__module__.startswith("tensorboard") if args.thread else False
    if not (issubclass(args.exc_type, OSError) and from_tensorboard):
        hook(args)


def _signal_behind(error: BaseException) -> type | None:
    """KeyboardInterrupt or Terminated where one caused `error` (its __cause__ / __context__ chain)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (KeyboardInterrupt, Terminated)):
            return KeyboardInterrupt if isinstance(error, KeyboardInterrupt) else Terminated
        error = error.__cause__ or error.__context__
    return None


class OneLineErrors(click.Command):
    def main(self, args=None, prog_name=None, **kwargs):
        kwargs["standalone_mode"] = False
        prog = prog_name or self.name
        previous = signal.getsignal(signal.SIGTERM)
        if previous is signal.SIG_DFL:  # not when embedded in a program that handles SIGTERM itself
            signal.signal(signal.SIGTERM, _raise_terminated)
        thread_hook = threading.excepthook
        threading.excepthook = partial(_quiet_os_errors, thread_hook)
        try:
            result = super().main(args=args, prog_name=prog_name, **kwargs)
        except click.UsageError as e:
            message = e.format_message().replace("\n", " ")
            echo_error(prog, f"{message} (see {prog} --help)")
            sys.exit(e.exit_code)
        except click.exceptions.Exit as e:  # --help, --version
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("\ninterrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Terminated:
            click.echo(f"{prog}: terminated", err=True)
            sys.exit(EXIT_TERMINATED)
        except ImportError as e:  # onnxruntime's module init turns a signal during its import into ImportError
            signalled = _signal_behind(e)
            if signalled is None:
                raise
            click.echo("\ninterrupted" if signalled is KeyboardInterrupt else f"{prog}: terminated", err=True)
            sys.exit(EXIT_INTERRUPTED if signalled is KeyboardInterrupt else EXIT_TERMINATED)
        except MemoryError as e:  # numpy's names the array; a bare one (file.read) says nothing
            detail = f" ({str(e)[:200]})" if str(e) else ""
            echo_error(prog, f"out of memory{detail}; close other programs or choose a smaller model or context")
            sys.exit(EXIT_OS_ERROR)
        except OSError as e:
            stdout = e.filename is None and _stdout_failed(e)
            echo_error(prog, f"{'stdout: ' if stdout else ''}{os_error_message(e)}")
            sys.exit(EXIT_OS_ERROR)
        finally:
            threading.excepthook = thread_hook
            if previous is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, previous)
        sys.exit(result if isinstance(result, int) else 0)
