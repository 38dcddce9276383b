"""What every command shares: the console and the clean report of user errors."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console
from rich.markup import escape

# Tables are wide: outside a terminal (CI logs, files) rich would wrap them at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
error_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def fail_cleanly(command):
    """Print a giblet error (bad file, bad config) as one message, no traceback, and exit 2."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        from giblet.errors import GibletError

        try:
            return command(*args, **kwargs)
        except GibletError as error:
            error_console.print(f"[red]error:[/red] {escape(str(error))}")
            raise typer.Exit(2) from None

    return run
