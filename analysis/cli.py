"""`python -m analysis`: per-checkpoint reports and evaluation.

    python -m analysis report --run kk-tiny --stage stage2,stage3 --every 2
    python -m analysis report --ids kk-tiny/stage1/step-000010 --analyses behaviours
    python -m analysis report --run qwen-rl --ray auto --device cuda     # one Ray task per checkpoint
    python -m analysis eval --run kk-tiny --people 3-7
    python -m analysis seeds --run kk-tiny --seeds 0,1,2
    python -m analysis add /ckpt/qwen-rl --run qwen-rl
    python -m analysis list
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import typer

from analysis.add import add_command
from analysis.cache import DEFAULT_ROOT
from analysis.evaluate import eval_command
from analysis.harness import GENERATION_OPTIONS, PUZZLE_SET_OPTIONS, GenerationConfig, PuzzleSetConfig
from analysis.seeds import seeds_command
from analysis.selection import SELECTION_OPTIONS, CheckpointSelection, with_option_groups
from train.cli import check_output_folder, err_console, parse_sets, run_app

app = typer.Typer(help="Checkpoint-by-checkpoint analysis of what RL changed: reports and evaluation.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.command("add")(add_command)
app.command("eval")(eval_command)
app.command("seeds")(seeds_command)


def analysis_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """["behaviours.rules=my.yaml", "verify_prob.max_points=16"] -> options per analysis
    (`train.cli.parse_sets`)."""
    from analysis.harness import HarnessError

    out: dict[str, dict[str, Any]] = {}
    for key, value in parse_sets(items):
        name, dot, option = key.partition(".")
        if not dot or "." in option:
            raise HarnessError(f"--set {key}: use ANALYSIS.OPTION=VALUE")
        out.setdefault(name, {})[option] = value
    return out


@app.command("report")
@with_option_groups
def report_command(
    selection: CheckpointSelection = SELECTION_OPTIONS,
    out: Path = typer.Option(Path("reports"), help="report folder"),
    cache: Path = typer.Option(DEFAULT_ROOT, help="result cache folder"),
    analyses: Optional[str] = typer.Option(None, help="analyses to run, comma-separated (default: all but the "
                                           "ones `list` marks 'by name only')"),
    puzzles: PuzzleSetConfig = PUZZLE_SET_OPTIONS,
    generation: GenerationConfig = GENERATION_OPTIONS,
    behaviours: Optional[Path] = typer.Option(None, help="extra behaviour rules (YAML, extends behaviours.yaml)"),
    set_: list[str] = typer.Option([], "--set", help="analysis option, e.g. verify_prob.max_points=16 (repeatable)"),
    plugin: list[str] = typer.Option([], help="extra module registering analyses (repeatable)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16"),
    ray: Optional[str] = typer.Option(None, "--ray", help="one Ray task per checkpoint: local (start Ray here), "
                                      "auto or a cluster address"),
    ray_cpus: int = typer.Option(1, min=1, help="CPUs per Ray task (on CPU; a CUDA task asks for one GPU)"),
) -> None:
    """Analyse checkpoints and write a report per checkpoint plus an index with trends.
    Results are cached; a rerun computes only what is missing. A checkpoint that cannot be
    analysed is reported in one line and skipped (exit code 1 at the end)."""
    from analysis.cache import ResultCache
    from analysis.harness import (HarnessConfig, HarnessError, analyse_checkpoints, default_analyses,
                                  cached_outcome, get_analysis, load_plugins, outcome_display)
    from analysis.report import indexed_checkpoints, write_reports
    from analysis.selection import checkpoints_cast, open_selection

    from train.models import pick_dtype

    check_output_folder(out, "--out")
    check_output_folder(cache, "--cache")
    pick_dtype(dtype)                 # a bad --dtype is one line now, not one per checkpoint later
    reg, checkpoints = open_selection(selection)
    load_plugins(plugin)
    names = [n.strip() for n in analyses.split(",") if n.strip()] if analyses else default_analyses()
    options = analysis_options(set_)
    if behaviours is not None:
        options.setdefault("behaviours", {})["rules"] = str(behaviours)
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise HarnessError(f"--set/--behaviours name analyses not being run: {', '.join(unknown)}")
    chosen = [get_analysis(n, **options.get(n, {})) for n in names]
    config = HarnessConfig(puzzles=replace(puzzles, fixed_cast=checkpoints_cast(reg, checkpoints)),
                           generation=generation, device=device, dtype=dtype)

    with outcome_display(err_console, lambda o: ", ".join(o.computed) if o.computed else "all cached") as (bar, note):
        if ray is None:
            outcomes = analyse_checkpoints(reg, checkpoints, chosen, cache=ResultCache(cache), config=config,
                                           progress=bar, on_outcome=note)
        else:
            from analysis.fanout import analyse_on_ray

            specs = [(n, options.get(n, {})) for n in names]
            outcomes = analyse_on_ray(reg, checkpoints, specs, plugins=plugin, cache=ResultCache(cache),
                                      config=config, address=ray, cpus_per_task=ray_cpus, progress=bar,
                                      on_outcome=note)
    failed = sum(1 for o in outcomes if o.error)
    # An index already in --out keeps its other checkpoints wherever their results are cached.
    known = {c.id: c for c in reg.checkpoints()}
    earlier = [known[i] for i in indexed_checkpoints(out) if i in known and i not in {c.id for c in checkpoints}]
    kept = [o for o in (cached_outcome(reg, ck, chosen, cache=ResultCache(cache), config=config) for ck in earlier) if o]
    if earlier:
        dropped = len(earlier) - len(kept)
        err_console.print(f"note: the index in {out} keeps {len(kept)} checkpoint(s) of its earlier runs"
                          + (f"; {dropped} more are left out (their results for these analyses and settings "
                             "are not cached)" if dropped else ""))
    if kept:
        outcomes = sorted(outcomes + kept, key=lambda o: (o.checkpoint.run, o.checkpoint.global_step, o.checkpoint.id))
    from analysis.changepoints import training_frame

    files = write_reports(outcomes, chosen, out, training=training_frame(reg, {o.checkpoint.run for o in outcomes}))
    err_console.print(f"{len(outcomes) - failed} analysed, {failed} failed; "
                      f"wrote {files.index_html} and {files.index_md}")
    if failed:
        sys.exit(1)  # SystemExit passes through click's standalone_mode=False untouched


@app.command("list")
def list_command(plugin: list[str] = typer.Option([], help="extra module registering analyses")) -> None:
    """List the registered analyses (name and report section title); the costly ones a report
    runs only when named with --analyses are marked."""
    from analysis.harness import available_analyses, load_plugins

    load_plugins(plugin)
    for name, cls in available_analyses().items():
        typer.echo(f"{name:<16} {cls.title or ''}" + ("" if cls.by_default else "  (by name only)"))


def main() -> None:
    run_app(app)
