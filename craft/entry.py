"""craft-train's console entry point (setup.py). craft.train imports torch, which takes about a
second; Ctrl-C in that second raised KeyboardInterrupt inside the import, before craft-train's
own handling runs, and printed the import's 40-line traceback. Here the import is guarded: Ctrl-C
then ends it as at any other moment, "interrupted" and exit 130. (SIGTERM needs no guard: until
craft-train installs its handler, the default one ends the process without a traceback.)"""

import sys

EXIT_INTERRUPTED = 130  # craft.runtime.command's, which this module must not import (it loads click)


def train() -> None:
    try:
        from craft.runtime.command import require_cwd

        require_cwd("craft-train")
        from craft.train import main
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    except ModuleNotFoundError as e:  # a device install (the runtime alone) has no torch
        from craft.runtime.command import EXIT_OS_ERROR, echo_error, missing_package

        echo_error("craft-train", missing_package(e))
        sys.exit(EXIT_OS_ERROR)
    main()
