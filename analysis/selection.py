"""Choosing checkpoints on the command line, declared once for `python -m analysis report`,
`python -m analysis eval` and `python -m probes run`: the options --registry, --run, --stage,
--steps, --every and --ids (`SELECTION_OPTIONS`), and the parsers behind --steps and --ids.

A command takes a group of shared options as one parameter whose default is the group:

    @app.command("report")
    @with_option_groups
    def report_command(selection: CheckpointSelection = SELECTION_OPTIONS, out: Path = ...):
        reg, checkpoints = open_selection(selection)      # analysis.harness

`with_option_groups` puts the group's options where that parameter stands (same names,
defaults and help in every command) and passes the command their values as one object.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import typer

from train.errors import UserError


class OptionGroup:
    """Typer options shared by several commands (see `with_option_groups`). `options` maps each
    parameter name to `(type, typer.Option(...))`; the command gets `make(**their values)`."""

    def __init__(self, make: Callable[..., Any], **options: tuple[Any, Any]):
        self.make, self.options = make, options


def with_option_groups(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for a typer command (apply it below `app.command`): every parameter whose
    default is an `OptionGroup` is replaced, in place, by that group's options, and the command
    is called with the group's `make(...)` of their values under that parameter's name."""
    signature = inspect.signature(command, eval_str=True)
    params, groups = [], {}
    for p in signature.parameters.values():
        if isinstance(p.default, OptionGroup):
            groups[p.name] = p.default
            params += [p.replace(name=name, annotation=annotation, default=option)
                       for name, (annotation, option) in p.default.options.items()]
        else:
            params.append(p)

    @functools.wraps(command)
    def wrapper(**values: Any) -> Any:
        for name, group in groups.items():
            values[name] = group.make(**{option: values.pop(option) for option in group.options})
        return command(**values)

    wrapper.__signature__ = signature.replace(parameters=params)  # what typer reads
    wrapper.__annotations__ = {p.name: p.annotation for p in params} | {"return": signature.return_annotation}
    return wrapper


@dataclass(frozen=True)
class CheckpointSelection:
    """The values of the checkpoint-selection options, as given (see `SELECTION_OPTIONS`)."""

    registry: Path
    run: str | None
    stage: str | None
    steps: str | None
    every: int
    ids: str | None


SELECTION_OPTIONS = OptionGroup(
    CheckpointSelection,
    registry=(Path, typer.Option(Path("ckpts.yaml"), help="checkpoint registry")),
    run=(Optional[str], typer.Option(None, help="only this run")),
    stage=(Optional[str], typer.Option(None, help="only these stages (comma list)")),
    steps=(Optional[str], typer.Option(None, help='global step range "lo-hi" (either end open)')),
    every=(int, typer.Option(1, min=1, help="every k-th selected checkpoint (the last always)")),
    ids=(Optional[str], typer.Option(None, help="checkpoint ids, comma-separated (overrides the filters)")),
)


def parse_steps(spec: str | None, *, error: type[Exception] = UserError,
                name: str = "step range") -> tuple[int | None, int | None]:
    """"lo-hi", "lo-", "-hi" or "n" -> a global step range (None = open end); None or blank ->
    (None, None). A malformed spec raises `error("bad <name> <spec>: use lo-hi, ...")`."""
    if spec is None or not spec.strip():
        return None, None
    try:
        if "-" not in spec:
            return int(spec), int(spec)
        lo, hi = spec.split("-", 1)
        return (int(lo) if lo.strip() else None), (int(hi) if hi.strip() else None)
    except ValueError:
        raise error(f"bad {name} {spec!r}: use lo-hi, lo-, -hi or a single step") from None


def split_ids(ids: str | Sequence[str] | None) -> list[str] | None:
    """Checkpoint ids from a comma list (or a sequence of ids); None when there are none."""
    if isinstance(ids, str):
        ids = [i.strip() for i in ids.split(",") if i.strip()]
    return list(ids) if ids else None
