"""`python -m probes`: linear probes on hidden states across checkpoints.

    python -m probes run --run kk-tiny
    python -m probes run --run kk-tiny --stage stage2 --every 2 --targets answer_correct,next_verification
    python -m probes run --ids kk-tiny/base --per-size 20 --out reports/probes

Writes to --out: summary.md, results.json, figures/ (layer x checkpoint heatmaps of AUROC and
selectivity, transfer matrices, direction cosines) and probes/<checkpoint>/<target>/layer-XX.*
(loadable with `probes.fit.load_probe`). Per-checkpoint work (generations, features, probe
fits) is cached under --cache and shared with `python -m analysis report`.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from analysis.cache import DEFAULT_ROOT
from analysis.harness import GENERATION_OPTIONS, PUZZLE_SET_OPTIONS, GenerationConfig, PuzzleSetConfig
from train.data import size_spec
from analysis.selection import SELECTION_OPTIONS, CheckpointSelection, with_option_groups
from train.cli import check_output_folder, err_console, run_app

app = typer.Typer(help="Linear probes on hidden states across checkpoints.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _main() -> None:
    """Linear probes on hidden states across checkpoints."""


@app.command("run")
@with_option_groups
def run_command(
    selection: CheckpointSelection = SELECTION_OPTIONS,
    targets: list[str] = typer.Option([], help="probe targets, comma-separated or repeated (default: all)"),
    out: Path = typer.Option(Path("reports/probes"), help="output folder"),
    cache: Path = typer.Option(DEFAULT_ROOT, help="result cache folder"),
    puzzles: PuzzleSetConfig = PUZZLE_SET_OPTIONS,
    generation: GenerationConfig = GENERATION_OPTIONS,
    max_points: int = typer.Option(48, min=1, help="decision points per response"),
    at: str = typer.Option("all", help="kinds of decision point probed, comma-separated: step_start, "
                           "before_think_end (the position before </think>), after_conclusion; or all"),
    max_tokens: int = typer.Option(4096, min=8, help="longest prompt + response read"),
    batch_tokens: int = typer.Option(16384, min=1, help="padded tokens per forward pass of the feature reading "
                                     "(bounds its memory; 4096 reads one 4k-token response at a time)"),
    folds: int = typer.Option(5, min=2, help="outer cross-validation folds (of puzzles)"),
    permutations: int = typer.Option(100, min=0, help="permutations for the p-value at the best layer"),
    control_draws: int = typer.Option(5, min=1, help="random labellings of each control task, averaged"),
    cs: Optional[str] = typer.Option(None, "--cs", help="C grid searched by the inner cross-validation, "
                                     "comma-separated (default 1e-4,...,10)"),
    seed: int = typer.Option(0, help="seed of folds, control task and permutations"),
    layer: Optional[int] = typer.Option(None, min=0, help="layer of transfer and cosine matrices "
                                        "(default: best mean AUROC per target)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16"),
) -> None:
    """Probe every layer of the selected checkpoints and compare them. A checkpoint that cannot
    be analysed is reported in one line and skipped (exit code 1 at the end)."""
    from analysis.cache import ResultCache, weights_fingerprint
    from analysis.harness import HarnessConfig, analyse_checkpoints, outcome_display, puzzle_set
    from analysis.selection import checkpoints_cast, open_selection
    from probes.compare import ComparisonEntry, write_comparison
    from probes.features import features_params, load_features
    from probes.fit import puzzle_fold_map
    from probes.plugin import ProbesAnalysis
    from probes.targets import TARGETS

    check_output_folder(out, "--out")
    check_output_folder(cache, "--cache")
    reg, checkpoints = open_selection(selection)
    chosen = [t for item in targets for t in item.split(",")] or list(TARGETS)
    analysis = ProbesAnalysis(targets=chosen, max_points=max_points, max_tokens=max_tokens, n_splits=folds,
                              n_permutations=permutations, seed=seed, Cs=cs, control_draws=control_draws,
                              at=at, batch_tokens=batch_tokens)
    config = HarnessConfig(puzzles=replace(puzzles, fixed_cast=checkpoints_cast(reg, checkpoints)),
                           generation=generation, device=device, dtype=dtype)
    results_cache = ResultCache(cache)

    with outcome_display(err_console, lambda o: "probed" if o.computed else "cached") as (bar, note):
        outcomes = analyse_checkpoints(reg, checkpoints, [analysis], cache=results_cache, config=config,
                                       progress=bar, on_outcome=note)
        entries = []
        for o in outcomes:
            if o.error:
                continue
            result = o.results[analysis.name]
            params = features_params(weights_fingerprint(reg.resolve(o.checkpoint)), config,
                                     max_points=max_points, max_tokens=max_tokens)
            fs = load_features(results_cache, o.checkpoint.id, params)
            if fs is None:
                bar.console.print(f"[bold red]error:[/] {o.checkpoint.id}: cached features are missing; rerun")
                continue
            probe_dir = results_cache.root / result["probe_dir"] if result.get("probe_dir") else None
            entries.append(ComparisonEntry(checkpoint=o.checkpoint.id, step=o.checkpoint.global_step,
                                           result=result, features=fs, probe_dir=probe_dir))
        ordered = puzzle_set(config.puzzles)
        fold_map = puzzle_fold_map([p.id for p in ordered], [p.people for p in ordered], folds, seed)
        task = bar.add_task("comparing", total=None)
        files = write_comparison(entries, out, targets=analysis.targets, fold_map=fold_map, config=analysis.fit,
                                 layer=layer, header=f"Puzzle set: sizes {size_spec(puzzles.sizes)}, {puzzles.per_size} per size "
                                 f"(seed {puzzles.seed}); "
                                 f"{'greedy' if generation.temperature == 0 else f'T={generation.temperature}'} "
                                 f"generations of up to {generation.max_new_tokens} tokens; probed at: {', '.join(analysis.at)}.",
                                 progress=lambda d: bar.update(task, description=d))
        bar.remove_task(task)
    failed = len(outcomes) - len(entries)
    err_console.print(f"{len(entries)} probed, {failed} failed; wrote {files.summary}, {files.results}, "
                      f"{len(files.figures)} figures and the probes of {len(files.probes)} checkpoints")
    if failed:
        sys.exit(1)  # SystemExit passes through click's standalone_mode=False untouched


def main() -> None:
    run_app(app)
