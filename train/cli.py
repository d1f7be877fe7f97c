"""Shared CLI plumbing: every command turns a known user error into one line and exit code 2."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from train.errors import UserError

# A wide console when piped (CI logs, files): tables stay readable.
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def _click_errors() -> tuple[type[Exception], ...]:
    """Usage errors (bad option values): newer typer raises those of its vendored click."""
    import click

    errors: list[type[Exception]] = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException as VendoredClickException
    except ImportError:
        pass
    else:
        errors.append(VendoredClickException)
    return tuple(errors)


_CLICK_ERRORS = _click_errors()


def run_app(app: typer.Typer) -> None:
    """Run a typer app; a user error prints `error: <one line>` and exits 2."""
    try:
        # Without standalone mode click returns a command's `typer.Exit(code)` instead of exiting.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                          soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except _CLICK_ERRORS as exc:
        exc.show()
        sys.exit(exc.exit_code)
