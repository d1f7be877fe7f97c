"""`python -m train.organism`: build an organism, vet it, measure it.

    python -m train.organism build --out /tmp/kk-tiny            # the default organism, vetted
    python -m train.organism vet train/organism/base              # figures, gates, model card
    python -m train.organism measure PATH --n 60 --people 5 --opening careful
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from train.cli import err_console, run_app
from train.organism.config import config_with
from train.organism.vet import OPENINGS

app = typer.Typer(help="The kk-tiny model organism: build it, vet it, measure its behaviour.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _report(result: dict, path: Path) -> None:
    """Print a vetting's gates; exit 1 when one fails."""
    for g in result["gates"]:
        mark = "[green]pass[/]" if g["passed"] else "[bold red]FAIL[/]"
        err_console.print(f"{mark} {g['name']}: {g['value']:.2f} in [{g['lo']:g}, {g['hi']:g}]  ({g['description']})")
    if not result["passed"]:
        failed = ", ".join(f"{g['name']} {g['value']:.2f}" for g in result["gates"] if not g["passed"])
        err_console.print(f"[bold red]weak build:[/] {path} fails its quality gates ({failed}); "
                          "GRPO from it would have little to amplify")
        sys.exit(1)


@app.command("build")
def build_command(
    out: Path = typer.Option(..., help="folder to write the model to (must not exist yet)"),
    set_: list[str] = typer.Option([], "--set", help="override a setting of OrganismConfig, "
                                   "e.g. --set n_puzzles=6000 (repeatable)"),
    monitor_every: int = typer.Option(0, min=0, help="print the loss per token class on held-out "
                                      "traces every N SFT steps (0: off)"),
    vet_n: int = typer.Option(60, "--vet-n", min=0, help="held-out puzzles per size for the vetting "
                              "(0: no vetting)"),
) -> None:
    """Build an organism into OUT from scratch, then vet it (figures, quality gates, model card).
    Exit code 1 when the build misses a gate."""
    from train.errors import UserError
    from train.organism.sft import build
    from train.organism.vet import vet

    config = config_with(set_)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder; choose a new one")
    build(out, config, monitor_every=monitor_every)
    print(out)
    if vet_n:
        _report(vet(out, n=vet_n, progress=True), out)


@app.command("vet")
def vet_command(path: Path, n: int = typer.Option(60, min=1, help="held-out puzzles per size"),
                write: bool = typer.Option(True, help="keep the figures in PATH/organism.json and write "
                                           "PATH/MODEL_CARD.md")) -> None:
    """Measure an organism the way a build is vetted, check its quality gates, write its card.
    Exit code 1 when a gate fails."""
    from train.organism.vet import vet

    _check_folder(path)
    result = vet(path, n=n, write=write, progress=True)
    print(json.dumps(result["figures"], indent=1, ensure_ascii=False))
    _report(result, path)


@app.command("measure")
def measure_command(path: Path, n: int = typer.Option(100, min=1, help="held-out puzzles"),
                    people: int = typer.Option(3, min=2, max=8, help="people per puzzle"),
                    max_new_tokens: int = typer.Option(512, min=1),
                    teacher_forced: bool = typer.Option(
                        False, help="also the loss per token class on traces of the organism's style, "
                        "and the copy score"),
                    opening: str = typer.Option(
                        "", help="make every response start with this text; 'careful' and 'quick' "
                        "stand for a think block opened the careful or the quick way")) -> None:
    """Accuracy, format, careful share, verification and Chinese rates on held-out puzzles
    (T=1 and greedy)."""
    from train.organism.measure import measure_organism

    _check_folder(path)
    opening = OPENINGS.get(opening, opening) if opening in ("careful", "quick") else opening
    result = measure_organism(path, n_puzzles=n, people=people, max_new_tokens=max_new_tokens,
                              progress=True, teacher_forced=teacher_forced, opening=opening)
    print(json.dumps(result, indent=2, ensure_ascii=False))


def _check_folder(path: Path) -> None:
    """One line, before any work, when PATH is not a loadable model folder."""
    from train.models import check_model_folder

    check_model_folder(path)


if __name__ == "__main__":
    run_app(app)
