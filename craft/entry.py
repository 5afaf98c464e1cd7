"""craft-train's console entry point (setup.py). craft.train imports torch, which takes about a
second; Ctrl-C in that second raised KeyboardInterrupt inside the import, before craft-train's
own handling runs, and printed the import's 40-line traceback. Here the import is guarded: Ctrl-C
then ends it as at any other moment, "interrupted" and exit 130. (SIGTERM needs no guard: until
craft-train installs its handler, the default one ends the process without a traceback.)"""

import sys

EXIT_INTERRUPTED = 130  # craft.runtime.command's, which this module must not import (it loads click)


def train() -> None:
    try:
        from craft.train import main
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    main()
