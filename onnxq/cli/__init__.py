"""The ``onnxq`` command line: ``main`` runs it (``onnxq.cli.commands`` defines the commands)."""

from __future__ import annotations

import sys
from typing import NoReturn

INTERRUPTED = "interrupted: nothing was written; run the same convert with --resume to continue from its last checkpoint"


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the ``onnxq`` command on ``argv`` (default: the process's arguments) and exit: a usage
    error is one line and exit code 2 (not click's box), Ctrl-C one line and 130, at any moment
    (imports included)."""
    try:
        import typer
        from typer import _click

        from onnxq.cli.commands import app

        try:
            code = app(args=argv, prog_name="onnxq", standalone_mode=False)
        except _click.exceptions.ClickException as exc:
            command = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "onnxq"
            message = " ".join(exc.format_message().split()).rstrip(".")
            if message:  # no message: the help was printed (``onnxq`` alone)
                print(f"error: {message}; see '{command} --help'", file=sys.stderr)
            sys.exit(exc.exit_code)
        except typer.Abort:
            code = 130
    except KeyboardInterrupt:
        code = 130
    if code == 130:
        print(f"error: {INTERRUPTED}", file=sys.stderr)
    sys.exit(code or 0)
