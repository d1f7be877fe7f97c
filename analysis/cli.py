"""`python -m analysis`: per-checkpoint reports and evaluation.

    python -m analysis report --run kk-tiny --stage stage2,stage3 --every 2
    python -m analysis report --ids kk-tiny/stage1/step-000010 --analyses behaviours
    python -m analysis eval --run kk-tiny --people 3-7
    python -m analysis list
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from analysis.cache import DEFAULT_ROOT
from analysis.evaluate import EVAL_SEED, eval_command
from train.cli import err_console, run_app

app = typer.Typer(help="Checkpoint-by-checkpoint analysis of what RL changed: reports and evaluation.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.command("eval")(eval_command)


def _parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """["behaviours.rules=my.yaml", "verify_prob.max_points=16"] -> options per analysis."""
    from analysis.harness import HarnessError

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, option = key.partition(".")
        if not sep or not dot or not name or not option:
            raise HarnessError(f"bad --set {item!r}: use ANALYSIS.OPTION=VALUE")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(name, {})[option] = value
    return out


@app.command("report")
def report_command(
    registry: Path = typer.Option(Path("ckpts.yaml"), help="checkpoint registry"),
    run: Optional[str] = typer.Option(None, help="only this run"),
    stage: Optional[str] = typer.Option(None, help="only these stages (comma list)"),
    steps: Optional[str] = typer.Option(None, help='global step range "lo-hi" (either end open)'),
    every: int = typer.Option(1, min=1, help="every k-th selected checkpoint (the last always)"),
    ids: Optional[str] = typer.Option(None, help="checkpoint ids, comma-separated (overrides the filters)"),
    out: Path = typer.Option(Path("reports"), help="report folder"),
    cache: Path = typer.Option(DEFAULT_ROOT, help="result cache folder"),
    analyses: Optional[str] = typer.Option(None, help="analyses to run, comma-separated (default: all; see `list`)"),
    probe_per_size: int = typer.Option(8, min=1, help="probe puzzles per size"),
    probe_sizes: str = typer.Option("3-7", help="probe puzzle sizes: 3-7 or 3,5,7"),
    probe_seed: int = typer.Option(EVAL_SEED, help="probe set seed (evaluation's held-out seed by default)"),
    max_new_tokens: int = typer.Option(512, min=1, help="response length limit of probe generations"),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0, min=0),
    prompt_style: str = typer.Option("chat", help="chat, or raw (pre-filled <think>)"),
    batch_size: int = typer.Option(8, min=1, help="generation batch size"),
    behaviours: Optional[Path] = typer.Option(None, help="extra behaviour rules (YAML, extends behaviours.yaml)"),
    set_: list[str] = typer.Option([], "--set", help="analysis option, e.g. verify_prob.max_points=16 (repeatable)"),
    plugin: list[str] = typer.Option([], help="extra module registering analyses (repeatable)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16"),
) -> None:
    """Analyse checkpoints and write a report per checkpoint plus an index with trends.
    Results are cached; a rerun computes only what is missing. A checkpoint that cannot be
    analysed is reported in one line and skipped (exit code 1 at the end)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers.utils import logging as hf_logging

    from analysis.cache import ResultCache
    from analysis.harness import (GenerationConfig, HarnessConfig, HarnessError, ProbeConfig, analyse_checkpoints,
                                  available_analyses, get_analysis, load_plugins, select_checkpoints)
    from analysis.report import write_reports
    from train.data import parse_people
    from train.registry import Registry

    reg = Registry(registry)
    if not reg.path.exists():
        raise HarnessError(f"registry {reg.path} does not exist")
    checkpoints = select_checkpoints(reg, run=run, stage=stage, steps=steps, every=every, ids=ids)
    load_plugins(plugin)
    names = [n.strip() for n in analyses.split(",") if n.strip()] if analyses else list(available_analyses())
    options = _parse_sets(set_)
    if behaviours is not None:
        options.setdefault("behaviours", {})["rules"] = str(behaviours)
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise HarnessError(f"--set/--behaviours name analyses not being run: {', '.join(unknown)}")
    chosen = [get_analysis(n, **options.get(n, {})) for n in names]
    config = HarnessConfig(
        probe=ProbeConfig(sizes=tuple(parse_people(probe_sizes)), per_size=probe_per_size, seed=probe_seed),
        generation=GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    top_k=top_k, prompt_style=prompt_style, batch_size=batch_size),
        device=device, dtype=dtype)

    hf_logging.disable_progress_bar()  # transformers' own bars would garble the rich display
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        def note(o) -> None:
            if o.error:
                bar.console.print(f"[bold red]error:[/] {o.error}")
            else:
                done = ", ".join(o.computed) if o.computed else "all cached"
                bar.console.print(f"{o.checkpoint.id}: {done}")

        outcomes = analyse_checkpoints(reg, checkpoints, chosen, cache=ResultCache(cache), config=config,
                                       progress=bar, on_outcome=note)
    files = write_reports(outcomes, chosen, out)
    failed = sum(1 for o in outcomes if o.error)
    err_console.print(f"{len(outcomes) - failed} analysed, {failed} failed; "
                      f"wrote {files.index_html} and {files.index_md}")
    if failed:
        sys.exit(1)  # SystemExit passes through click's standalone_mode=False untouched


@app.command("list")
def list_command(plugin: list[str] = typer.Option([], help="extra module registering analyses")) -> None:
    """List the registered analyses (name and report section title)."""
    from analysis.harness import available_analyses, load_plugins

    load_plugins(plugin)
    for name, cls in available_analyses().items():
        typer.echo(f"{name:<16} {cls.title or ''}")


def main() -> None:
    run_app(app)
