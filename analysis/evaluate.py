"""Evaluating registered checkpoints: `train.evaluate` on each, cached, summarised in
`ckpts.yaml`, and set next to the published Logic-RL numbers.

    python -m analysis eval --run kk-tiny --stage stage3 --people 2-8 --n-per-size 100

Per checkpoint the summary goes three places: the result cache (with the generations kept as
a parquet sidecar, read back by `load_generations`), the checkpoint's `eval` entry in
`ckpts.yaml`, and the command's `<out>/eval.json` with a comparison table and figure.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import typer

import train.generate as gen
from analysis.cache import DEFAULT_ROOT, ResultCache, atomic_write_text, weights_fingerprint
from analysis.selection import (SELECTION_OPTIONS, CheckpointSelection, checkpoints_cast, open_selection,
                                with_option_groups)
from train.data import parse_people, size_spec, write_parquet
from train.evaluate import (GENERATION_COLUMNS, EvalConfig, EvalError, eval_puzzles, evaluate_model,
                            make_config, puzzle_set_hash, summarize)
from train.kk import Puzzle
from train.models import ModelLoadError, check_model_folder, load_model_and_tokenizer, load_tokenizer

ANALYSIS = "eval"  # the analysis name in the result cache


# --------------------------------------------------------------------------- checkpoints

def registry_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The part of a summary kept in `ckpts.yaml` (rounded, plain types)."""
    def r(x: float) -> float | None:
        return None if x is None or math.isnan(x) else round(float(x), 4)

    return {
        "accuracy": r(summary["accuracy"]),
        "accuracy_by_size": {s: r(v) for s, v in summary["accuracy_by_size"].items()},
        "roles_accuracy": r(summary["roles_accuracy"]),
        "format_error_rate": r(summary["format_error_rate"]),
        "mean_response_tokens": r(summary["mean_response_tokens"]),
        "pass_at_k": {j: r(v) for j, v in summary["pass_at_k"].items()},
        "mode": summary["config"]["mode"],
        "k": summary["k"],
        "n_per_size": summary["config"]["n_per_size"],
        "n_puzzles": summary["n_puzzles"],
        "people": [int(n) for n in summary["sizes"]],
        "max_new_tokens": summary["config"]["max_new_tokens"],
        "seed": summary["config"]["seed"],
        "data": "external" if summary["config"]["external"] else "heldout",
    }


def _size(entry: Any) -> int:
    """How many answers an evaluation summary rests on (0 for none or an unreadable one)."""
    if not isinstance(entry, dict):
        return 0
    n = entry.get("n_puzzles") or entry.get("n_per_size") or 0
    try:
        return int(n) * int(entry.get("k") or 1)
    except (TypeError, ValueError):
        return 0


def evaluate_checkpoint(registry: Any, ck: Any, config: EvalConfig, cache: ResultCache, *,
                        progress: Any = True, puzzles: Sequence[Puzzle] | None = None) -> dict[str, Any]:
    """Evaluate one registered checkpoint, or reuse its cached evaluation.

    The result is cached under (ckpt id, "eval", config.cache_params()) together with the
    weights fingerprint and the puzzle set; a hit with other weights or puzzles is recomputed.
    Generations are kept in a parquet sidecar (written before the JSON, so a JSON hit always
    has its sidecar). The summary is merged into the checkpoint's `eval` entry in the
    registry. Returns the summary plus "cached" (True when nothing was generated).
    Raises ModelLoadError, having cached nothing, when the checkpoint cannot be loaded.
    """
    path = check_model_folder(registry.resolve(ck), ck.id)
    if puzzles is None:
        puzzles = eval_puzzles(config)
    params = config.cache_params()
    fingerprint = weights_fingerprint(path)
    puzzle_hash = puzzle_set_hash(puzzles)
    sidecar = cache.sidecar(ck.id, ANALYSIS, params, ".parquet")
    hit = cache.get(ck.id, ANALYSIS, params)
    kept_generations = None
    if (isinstance(hit, dict) and hit.get("weights") == fingerprint and hit.get("puzzle_set") == puzzle_hash):
        kept_generations = _read_generations(sidecar)
    if kept_generations is not None:
        # Summaries are recomputed from the kept generations, so a cached evaluation gains
        # whatever `summarize` has learnt to report since it was run.
        summary, cached = {**hit, **summarize(kept_generations, config.k)}, True
    else:                                  # nothing cached, or a torn sidecar: evaluate again
        backend = gen.resolve_backend(config.backend, path)
        if backend == "vllm":
            model, tokenizer = str(path), load_tokenizer(path, ck.id)
        else:
            model, tokenizer = load_model_and_tokenizer(path, name=ck.id)
        result = evaluate_model(model, tokenizer, puzzles, config, progress=progress)
        write_parquet(result.generations.to_dict("records"), sidecar)
        summary = {**result.summary, "checkpoint": ck.id, "path": str(path), "weights": fingerprint,
                   "puzzle_set": puzzle_hash, "backend": backend, "config": params,
                   "global_step": ck.global_step, "run": ck.run, "stage": ck.stage}
        cache.put(ck.id, ANALYSIS, params, summary)
        cached = False
    new = registry_summary(summary)
    old = getattr(registry.get(ck.id), "eval", None)
    kept = _size(old) > _size(new)
    if not kept:       # a smaller evaluation never replaces a larger one in ckpts.yaml
        registry.update(ck.id, eval=new)
    return {**summary, "cached": cached, "registry_kept": old if kept else None}


def _read_generations(path: Path):
    """A generations sidecar as a DataFrame, or None when it is missing, torn or foreign."""
    import pandas as pd

    if not path.is_file():
        return None
    try:
        frame = pd.read_parquet(path)
    except Exception:                      # pyarrow raises several types for torn or foreign bytes
        return None
    return frame if set(GENERATION_COLUMNS) <= set(frame.columns) else None


def load_generations(cache: ResultCache, ckpt_id: str, config: EvalConfig):
    """The kept generations of a cached evaluation, as a DataFrame (GENERATION_COLUMNS)."""
    frame = _read_generations(cache.sidecar(ckpt_id, ANALYSIS, config.cache_params(), ".parquet"))
    if frame is None:
        raise EvalError(f"no kept generations (or none readable) for checkpoint {ckpt_id} with these settings; "
                        f"run `python -m analysis eval --ids {ckpt_id}` first")
    return frame


def _earlier_results(path: Path, config: EvalConfig) -> list[dict[str, Any]]:
    """The summaries of an earlier eval.json made with the same settings ([] otherwise)."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        if earlier.get("config") != json.loads(json.dumps(config.cache_params(), default=str)):
            return []
        return [r for r in earlier.get("checkpoints", []) if isinstance(r, dict) and "checkpoint" in r]
    except (OSError, ValueError, AttributeError):
        return []


# --------------------------------------------------------------------------- published comparison

@dataclass(frozen=True)
class PublishedRow:
    model: str
    source: str
    accuracy: dict[int, float]  # people -> accuracy


_README = "Logic-RL README, Benchmark table"
_SIZES = tuple(range(2, 9))
# Per-size accuracy on K&K test sets of 2..8 people, as published in the Logic-RL README.
PUBLISHED: tuple[PublishedRow, ...] = tuple(
    PublishedRow(model, _README, dict(zip(_SIZES, values)))
    for model, values in (
        ("o3-mini-high", (0.99, 0.98, 0.97, 0.95, 0.94, 0.89, 0.83)),
        ("o1-2024-12-17", (0.83, 0.51, 0.38, 0.38, 0.35, 0.30, 0.20)),
        ("GPT-4o", (0.68, 0.57, 0.49, 0.32, 0.23, 0.21, 0.11)),
        ("Deepseek-Math-7b", (0.35, 0.21, 0.08, 0.06, 0.02, 0.00, 0.00)),
        ("Qwen2.5-7B-Instruct-1M", (0.49, 0.40, 0.25, 0.11, 0.02, 0.06, 0.01)),
        ("Qwen2.5-7B-Logic-RL (Logic-RL 7B)", (0.99, 0.99, 0.94, 0.92, 0.91, 0.80, 0.67)),
    )
)


def comparison_table(results: Iterable[dict[str, Any]], published: Sequence[PublishedRow] = PUBLISHED):
    """Published rows, then ours (one per evaluation summary), with columns
    model, source, 2..8 (accuracy; NaN where a size was not evaluated) and mean."""
    import pandas as pd

    rows = []
    for row in published:
        rows.append({"model": row.model, "source": row.source, **{n: row.accuracy.get(n) for n in _SIZES}})
    for s in results:
        cfg = s.get("config", {})
        data = "reference test sets" if cfg.get("external") else f"held-out seed {cfg.get('seed')}"
        how = "greedy" if cfg.get("mode", "greedy") == "greedy" else f"sampled T={cfg.get('temperature')}, mean of k={s.get('k')}"
        sizes = sorted(set(_SIZES) | {int(n) for n in s["accuracy_by_size"]})
        rows.append({"model": s["checkpoint"], "source": f"ours ({how}, {data})",
                     **{n: s["accuracy_by_size"].get(str(n)) for n in sizes}})
    df = pd.DataFrame(rows)
    size_cols = sorted(c for c in df.columns if isinstance(c, int))
    df = df[["model", "source", *size_cols]].copy()
    df[size_cols] = df[size_cols].astype(float)
    df["mean"] = df[size_cols].mean(axis=1, skipna=True)
    return df


def comparison_markdown(df) -> str:
    """A Markdown table of `comparison_table`'s frame (accuracies to two decimals)."""
    cols = list(df.columns)
    head = ["model", "source"] + [f"{c} ppl" if isinstance(c, int) else str(c) for c in cols[2:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in df.iterrows():
        cells = [str(row["model"]), str(row["source"])]
        cells += ["–" if row[c] is None or math.isnan(row[c]) else f"{row[c]:.2f}" for c in cols[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_figure(df, path: str | Path, max_lines: int = 8) -> Path:
    """Accuracy vs number of people: a line plot (published rows and up to `max_lines` of
    ours, evenly spaced, the last included) beside a heatmap of every row. Saved as PNG."""
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    size_cols = [c for c in df.columns if isinstance(c, int)]
    ours = df[df["source"].str.startswith("ours")]
    if len(ours) > max_lines:
        picks = sorted({round(i * (len(ours) - 1) / (max_lines - 1)) for i in range(max_lines)})
        ours = ours.iloc[picks]
    shown = pd.concat([df[~df["source"].str.startswith("ours")], ours])
    long = shown.melt(id_vars=["model", "source"], value_vars=size_cols, var_name="people", value_name="accuracy")
    long["kind"] = ["ours" if s.startswith("ours") else "published" for s in long["source"]]
    long = long.dropna(subset=["accuracy"])

    fig = Figure(figsize=(14, max(4.5, 0.35 * len(df) + 1.5)), layout="constrained")
    ax_line, ax_heat = fig.subplots(1, 2, width_ratios=(1, 1.1))
    sns.lineplot(data=long, x="people", y="accuracy", hue="model", style="kind", markers=True,
                 dashes={"published": (3, 2), "ours": ""}, ax=ax_line)
    ax_line.set(xlabel="number of people", ylabel="accuracy", ylim=(-0.02, 1.02), xticks=size_cols,
                title="K&K accuracy by puzzle size")
    ax_line.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    heat = df.set_index("model")[size_cols].astype(float)
    sns.heatmap(heat, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", cbar=False, ax=ax_heat,
                annot_kws={"fontsize": 7})
    ax_heat.set(xlabel="number of people", ylabel="", title="ours vs published (Logic-RL README)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------- command

def _default(name: str) -> Any:
    """EvalConfig's default for a field: each default is written once, in the config class."""
    return EvalConfig.model_fields[name].get_default(call_default_factory=True)


@with_option_groups
def eval_command(
    selection: CheckpointSelection = SELECTION_OPTIONS,
    people: str = typer.Option(size_spec(_default("people")), help="puzzle sizes: 3, 2-8 or 3,5,7"),
    n_per_size: int = typer.Option(_default("n_per_size"), min=1, help="puzzles per size"),
    mode: str = typer.Option(_default("mode"), help="greedy, or sampled (T=1.0 as the reference)"),
    k: int = typer.Option(_default("k"), min=1, help="samples per puzzle for pass@k (sampled mode)"),
    temperature: float = typer.Option(_default("temperature"), help="sampling temperature in sampled mode"),
    max_new_tokens: int = typer.Option(_default("max_new_tokens"), min=1, help="response length limit"),
    batch_size: int = typer.Option(_default("batch_size"), min=1, help="generation batch size"),
    prompt_style: str = typer.Option(_default("prompt_style"), help="chat, or raw (pre-filled <think>)"),
    seed: int = typer.Option(_default("seed"), help="held-out set seed"),
    external: Optional[Path] = typer.Option(None, help="reference data root (<N>ppl/test.parquet) instead of held-out sets"),
    train_data: Optional[Path] = typer.Option(None, help="training data root whose puzzles are excluded"),
    backend: str = typer.Option(_default("backend"), help="auto, transformers or vllm"),
    out: Path = typer.Option(Path("reports/eval"), help="folder for eval.json, comparison.md, comparison.png"),
    cache: Path = typer.Option(DEFAULT_ROOT, help="result cache folder"),
) -> None:
    """Evaluate checkpoints: accuracy per size, format errors, length, pass@k; compare with
    the published Logic-RL numbers. Cached per checkpoint; a bad checkpoint is reported and
    skipped (exit code 1 at the end)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from train.cli import check_output_folder, err_console

    config = make_config(people=parse_people(people), n_per_size=n_per_size, seed=seed, mode=mode,
                         k=k, temperature=temperature, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, prompt_style=prompt_style, external=external,
                         train_data=train_data, backend=backend)
    check_output_folder(out, "--out")
    check_output_folder(cache, "--cache")
    reg, checkpoints = open_selection(selection)
    reg.check_writable()              # summaries go into ckpts.yaml: fail now, not after the work
    if external is None:
        config = config.model_copy(update={"fixed_cast": checkpoints_cast(reg, checkpoints)})
    puzzles = eval_puzzles(config)
    missing = sorted(set(config.people) - {p.people for p in puzzles})
    if missing:
        err_console.print(f"note: no puzzles of size {', '.join(map(str, missing))} in {config.external}; skipped")
    store = ResultCache(cache)
    results: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("checkpoints", total=len(checkpoints))
        for ck in checkpoints:
            bar.update(task, description=f"checkpoints ({ck.id})")
            try:
                summary = evaluate_checkpoint(reg, ck, config, store, progress=bar, puzzles=puzzles)
            except ModelLoadError as exc:
                bar.console.print(f"[bold red]failed:[/] {exc}")
                failed.append({"id": ck.id, "error": str(exc)})
            else:
                results.append(summary)
                by_size = " ".join(f"{n}:{v:.2f}" for n, v in summary["accuracy_by_size"].items())
                bar.console.print(
                    f"{ck.id}: accuracy {summary['accuracy']:.3f} [{by_size}] roles-only accuracy "
                    f"{summary['roles_accuracy']:.3f} format errors "
                    f"{summary['format_error_rate']:.3f} length {summary['mean_response_tokens']:.0f}"
                    f"{' (cached)' if summary['cached'] else ''}")
                if summary["registry_kept"]:
                    bar.console.print(f"note: {reg.path} keeps {ck.id}'s larger evaluation "
                                      f"({_size(summary['registry_kept'])} answers) instead of this one")
            bar.advance(task)

    out.mkdir(parents=True, exist_ok=True)
    # Rows of an earlier call with the same settings stay in the comparison.
    earlier = [r for r in _earlier_results(out / "eval.json", config)
               if r.get("checkpoint") not in {x["checkpoint"] for x in results}]
    if earlier:
        err_console.print(f"note: {out}/eval.json keeps {len(earlier)} checkpoint(s) evaluated earlier with these settings")
    results = earlier + results
    table = comparison_table(results)
    atomic_write_text(out / "comparison.md", "# K&K accuracy by number of people\n\n" + comparison_markdown(table))
    comparison_figure(table, out / "comparison.png")
    report = {"config": config.cache_params(), "checkpoints": results, "failed": failed,
              "published": [{"model": r.model, "source": r.source, "accuracy": {str(n): v for n, v in r.accuracy.items()}}
                            for r in PUBLISHED]}
    atomic_write_text(out / "eval.json", json.dumps(report, indent=2, default=float) + "\n")
    err_console.print(f"{len(results)} evaluated, {len(failed)} failed; wrote {out}/eval.json, comparison.md, comparison.png")
    if failed:
        raise typer.Exit(1)
