"""Shared CLI plumbing: every command turns a known user error into one line and exit code 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

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


def parse_sets(items: Sequence[str], option: str = "--set") -> list[tuple[str, Any]]:
    """The one override syntax of every command: `a.b=value` items -> (dotted key, value),
    each value read as YAML (so `5`, `1e-4`, `true`, `[3, 4]` and `{start: 1.0}` are a number,
    a boolean, a list and a mapping; anything else a string). One line for a malformed item."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"{option} {item!r}: use key=value (a dotted key such as stages.stage1.steps)")
        try:
            value = YAML(typ="safe").load(raw) if raw.strip() else raw
        except YAMLError as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise UserError(f"{option} {item!r}: the value is not valid YAML ({problem})") from None
        out.append((key, value))
    return out


def check_output_folder(path: str | os.PathLike, option: str) -> None:
    """One line, before any work, unless `path` is (or can become) a writable folder:
    not a file, nor under one, nor in a folder this user cannot write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file, not a folder")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{option} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: {probe} is not writable")
