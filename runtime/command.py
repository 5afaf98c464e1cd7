"""click.Command with Craft's error style, shared by craft-train, craft-export and craft-run.

A usage error (unknown option, bad value) is one line on stderr - "PROG: error: ... (see
PROG --help)" - and exit code 2, instead of click's multi-line usage block.
"""

from __future__ import annotations

import sys

import click


class OneLineErrors(click.Command):
    def main(self, args=None, prog_name=None, **kwargs):
        kwargs["standalone_mode"] = False
        prog = prog_name or self.name
        try:
            result = super().main(args=args, prog_name=prog_name, **kwargs)
        except click.UsageError as e:
            message = e.format_message().replace("\n", " ")
            click.echo(f"{prog}: error: {message} (see {prog} --help)", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Exit as e:  # --help, --version
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)
