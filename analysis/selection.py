"""Choosing checkpoints on the command line, declared once for `python -m analysis report`,
`python -m analysis eval` and `python -m probes run`: the options --registry, --run, --stage,
--steps, --every and --ids (`SELECTION_OPTIONS`), and the parsers behind --steps and --ids.

A command takes a group of shared options as one parameter whose default is the group:

    @app.command("report")
    @with_option_groups
    def report_command(selection: CheckpointSelection = SELECTION_OPTIONS, out: Path = ...):
        reg, checkpoints = open_selection(selection)

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
from train.registry import Checkpoint, Registry


class SelectionError(UserError):
    """Bad checkpoint-selection input; one line."""


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


def select_checkpoints(registry: Registry, *, run: str | None = None, stage: str | None = None,
                       steps: tuple[int | None, int | None] | str | None = None, every: int = 1,
                       ids: Sequence[str] | str | None = None) -> list[Checkpoint]:
    """Checkpoints of the registry by run, stage (comma list), step range, every k-th, or ids."""
    if every < 1:
        raise SelectionError(f"--every must be at least 1, got {every}")
    if isinstance(steps, str) or steps is None:
        steps = parse_steps(steps, error=SelectionError)
    return registry.select(run=run, stage=stage, steps=steps, every=every, ids=split_ids(ids))


def open_selection(chosen: CheckpointSelection) -> tuple[Registry, list[Checkpoint]]:
    """The registry the command line's selection options name (it must exist) and the
    checkpoints they select."""
    registry = Registry(chosen.registry)
    registry.check_path()
    if not registry.path.exists():
        raise SelectionError(f"registry {registry.path} does not exist")
    steps = parse_steps(chosen.steps, error=SelectionError, name="--steps")
    return registry, select_checkpoints(registry, run=chosen.run, stage=chosen.stage, steps=steps,
                                        every=chosen.every, ids=chosen.ids)


def checkpoints_cast(registry: Registry, checkpoints: Sequence[Checkpoint]) -> bool:
    """The puzzle world of the selected checkpoints: True when they were made for the fixed
    cast (`train.models.fixed_cast`, e.g. kk-tiny). Folders without a config.json are left to
    fail on their own; checkpoints of both worlds together are an error."""
    from train.models import fixed_cast

    paths = {ck.id: registry.resolve(ck) for ck in checkpoints}
    worlds = {k: fixed_cast(p) for k, p in paths.items() if _readable_config(p)}
    if len(set(worlds.values())) > 1:
        fixed = [k for k, v in worlds.items() if v]
        other = [k for k, v in worlds.items() if not v]
        raise SelectionError(f"the selection mixes fixed-cast checkpoints ({fixed[0]}, ...) with others "
                           f"({other[0]}, ...); select one run")
    return next(iter(worlds.values()), False)


def _readable_config(folder: Path) -> bool:
    """Whether `folder` has a config.json that parses as a JSON object; other folders are left
    to fail on their own, in one line, when they are loaded."""
    import json

    try:
        return isinstance(json.loads((folder / "config.json").read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False
