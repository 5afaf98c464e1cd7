"""The console scripts' entry points (setup.py). Each imports its command's module here, guarded:
Ctrl-C during that import (craft-train's torch takes about a second; click, numpy and the runtime
take craft-run and craft-export a tenth of one) raised KeyboardInterrupt inside the import, before
the command's own handling runs, and printed the import's traceback. Guarded, Ctrl-C then ends it
as at any other moment, "interrupted" and exit 130. (SIGTERM needs no guard: until a command
installs its handler, the default one ends the process without a traceback.)"""

import sys
from typing import Callable

EXIT_INTERRUPTED = 130  # craft.runtime.command's, which this module imports only once loading failed (click)


def imported(load: Callable[[], Callable[[], None]], prog: str) -> Callable[[], None]:
    """load(), the command's main; a Ctrl-C while it imports ends the process with exit 130, too
    little memory to load its libraries with one line and exit 1."""
    try:
        return load()
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    except ImportError as e:
        try:  # only now: click, which the runtime's module loads, is what this module must not import early
            from craft.runtime.command import exit_out_of_memory_loading, memory_failure
        except ImportError:
            raise e from None
        if not memory_failure(e):
            raise
        exit_out_of_memory_loading(prog, e)


def load_train() -> Callable[[], None]:
    try:
        from craft.runtime.command import require_cwd

        require_cwd("craft-train")
        from craft.train import main
    except ModuleNotFoundError as e:  # a device install (the runtime alone) has no torch
        from craft.runtime.command import EXIT_OS_ERROR, echo_error, missing_package

        echo_error("craft-train", missing_package(e))
        sys.exit(EXIT_OS_ERROR)
    return main


def load_export() -> Callable[[], None]:
    from craft.export.cli import main

    return main


def load_run() -> Callable[[], None]:
    from craft.runtime.cli import main

    return main


def train() -> None:
    imported(load_train, "craft-train")()


def export() -> None:
    imported(load_export, "craft-export")()


def run() -> None:
    imported(load_run, "craft-run")()
