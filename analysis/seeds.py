"""A multi-seed study: the same schedule trained with several GRPO seeds, each stage end
evaluated, every figure a mean with a 95% interval across seeds.

    python -m train.run stage3 --seeds 0,1,2          # runs kk-tiny-seed0, -seed1, -seed2
    python -m analysis seeds --run kk-tiny --seeds 0,1,2

One training run is an anecdote; this is the distribution. Per seed run, the base and the
final checkpoint of each stage are evaluated on the held-out sets (`analysis.evaluate`,
cached): greedy, and sampled at T=1 where the behaviour shares are read
(`analysis.behaviours`). The training rollouts' own metrics come from the run's
`metrics.jsonl`. Each metric is reported per checkpoint as the mean over seeds with a
Student-t 95% interval, and as the change from the base (per seed, then the same summary,
plus the smallest change of any seed). Writes `seeds.md`, `seeds.json` and `seeds.png`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import typer
from pydantic import BaseModel, ConfigDict, Field

from analysis.cache import DEFAULT_ROOT, ResultCache, atomic_write_text, json_safe
from analysis.evaluate import evaluate_checkpoint, load_generations
from train.evaluate import EvalError, eval_puzzles, make_config
from train.errors import UserError
from train.registry import Checkpoint, Registry, parse_seeds, seed_run

STAGE_POINTS = ("base", "stage1", "stage2", "stage3")
# (metric, what it is) in the order of the tables.
METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy_3", "greedy accuracy, 3 people (the reward's)"),
    ("accuracy_5", "greedy accuracy, 5 people"),
    ("roles_accuracy_3", "greedy roles-only accuracy, 3 people (whatever the format)"),
    ("roles_accuracy_5", "greedy roles-only accuracy, 5 people"),
    ("format_error", "greedy format-error rate (3 and 5 people)"),
    ("length", "greedy mean response length in tokens (3 and 5 people)"),
    ("sampled_accuracy", "accuracy at T=1 (3 and 5 people)"),
    ("verification", "share of T=1 responses that verify (behaviours.yaml `verification`)"),
    ("verify_all_statements", "share of T=1 responses that check every statement before answering"),
    ("chinese_thinking", "share of T=1 thinking lines written in Chinese"),
    ("train_format_error_last5", "training rollouts: format-error ratio over the stage's last 5 steps"),
    ("train_correct_last5", "training rollouts: fully correct ratio over the stage's last 5 steps"),
)


class SeedStudyError(UserError, ValueError):
    """A study that cannot be assembled (missing runs or stages); one line."""


class SeedStudyConfig(BaseModel):
    """What a study evaluates; the defaults are the demo table's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run: str = Field("kk-tiny", description="The schedule's run name; seed N is run `<run>-seed<N>`.")
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1)
    people: tuple[int, ...] = Field((3, 5), description="Held-out puzzle sizes.")
    n_per_size: int = Field(100, ge=1, description="Held-out puzzles per size.")
    max_new_tokens: int = Field(768, ge=1)
    temperature: float = Field(1.0, gt=0, description="Temperature of the sampled evaluation.")
    batch_size: int = Field(32, ge=1)
    last_steps: int = Field(5, ge=1, description="Training steps averaged at each stage's end.")


def stage_points(registry: Registry, run: str) -> dict[str, Checkpoint]:
    """The base and the final checkpoint of each stage of a run."""
    cks = [c for c in registry.checkpoints() if c.run == run]
    points: dict[str, Checkpoint] = {}
    for c in cks:
        if c.stage == "base":
            points["base"] = c
        elif c.stage in STAGE_POINTS and getattr(c, "stage_final", False):
            points[c.stage] = c
    missing = [s for s in STAGE_POINTS if s not in points]
    if missing:
        raise SeedStudyError(f"{registry.path}: run {run} has no {', '.join(missing)} checkpoint "
                             f"(train it: python -m train.run stage3 --seeds ...)")
    return points


def training_tail(metrics_file: Path, stage: str, last: int) -> dict[str, float]:
    """Mean format error and fully-correct ratio of a stage's last `last` logged steps."""
    if not metrics_file.is_file():
        raise SeedStudyError(f"{metrics_file}: no training metrics")
    rows = {}
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue             # a line torn by a kill
        if isinstance(r, dict) and r.get("stage") == stage and "global_step" in r:
            rows[r["global_step"]] = r        # a resumed step replaces its first record
    tail = [rows[s] for s in sorted(rows)[-last:]]
    if not tail:
        raise SeedStudyError(f"{metrics_file}: no {stage} steps")
    mean = lambda key: sum(float(r.get(key, math.nan)) for r in tail) / len(tail)  # noqa: E731
    return {"train_format_error_last5": mean("format_error"), "train_correct_last5": mean("correct")}


def behaviour_shares(texts: Sequence[str], names: Sequence[Sequence[str]]) -> dict[str, float]:
    """Shares of responses showing `verification` and `verify_all_statements`, and the share
    of thinking lines in Chinese."""
    from analysis.behaviours import classify_response, default_rules

    rules = default_rules()
    hits = {"verification": 0, "verify_all_statements": 0}
    zh_lines = lines = 0
    for text, who in zip(texts, names):
        found = classify_response(text, list(who), rules)
        for key in hits:
            hits[key] += bool(found.present.get(key))
        think = text.split("</think>")[0]
        for line in (ln for ln in think.splitlines() if ln.strip()):
            lines += 1
            zh_lines += any("\u4e00" <= ch <= "\u9fff" for ch in line)
    n = max(1, len(texts))
    return {**{k: v / n for k, v in hits.items()}, "chinese_thinking": zh_lines / max(1, lines)}


def checkpoint_metrics(registry: Registry, ck: Checkpoint, config: SeedStudyConfig, cache: ResultCache,
                       progress: Any = False) -> dict[str, float]:
    """Greedy and T=1 evaluation figures of one checkpoint (cached by `analysis.evaluate`)."""
    from train.models import fixed_cast

    common = dict(people=list(config.people), n_per_size=config.n_per_size, max_new_tokens=config.max_new_tokens,
                  batch_size=config.batch_size, fixed_cast=fixed_cast(registry.resolve(ck)))
    greedy_cfg = make_config(mode="greedy", **common)
    sampled_cfg = make_config(mode="sampled", temperature=config.temperature, k=1, **common)
    greedy = evaluate_checkpoint(registry, ck, greedy_cfg, cache, progress=progress, puzzles=eval_puzzles(greedy_cfg))
    sampled = evaluate_checkpoint(registry, ck, sampled_cfg, cache, progress=progress,
                                  puzzles=eval_puzzles(sampled_cfg))
    frame = load_generations(cache, ck.id, sampled_cfg)
    names = {p.id: p.names for p in eval_puzzles(sampled_cfg)}
    out = {
        "format_error": greedy["format_error_rate"],
        "length": greedy["mean_response_tokens"],
        "sampled_accuracy": sampled["accuracy"],
        **behaviour_shares(list(frame["text"]), [names[i] for i in frame["puzzle_id"]]),
    }
    for n in config.people:
        out[f"accuracy_{n}"] = greedy["accuracy_by_size"][str(n)]
        out[f"roles_accuracy_{n}"] = greedy["roles_accuracy_by_size"][str(n)]
    return out


def interval(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and Student-t 95% interval of `values` (no interval for a single value)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": None, "lo": None, "hi": None, "min": None, "n": 0}
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return {"mean": mean, "lo": None, "hi": None, "min": min(vals), "n": 1}
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    half = t.ppf(0.975, len(vals) - 1) * sd / math.sqrt(len(vals))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "min": min(vals), "n": len(vals)}


def aggregate(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """{metric: {point: interval}} and {metric: {point: interval of the change from base}}
    from per-seed figures {seed: {point: {metric: value}}}."""
    metrics = sorted({m for points in per_seed.values() for figs in points.values() for m in figs})
    levels: dict[str, dict[str, Any]] = {}
    changes: dict[str, dict[str, Any]] = {}
    for m in metrics:
        levels[m] = {p: interval([per_seed[s][p].get(m) for s in per_seed if m in per_seed[s].get(p, {})])
                     for p in STAGE_POINTS}
        changes[m] = {}
        for p in STAGE_POINTS[1:]:
            deltas = [per_seed[s][p][m] - per_seed[s]["base"][m] for s in per_seed
                      if m in per_seed[s].get(p, {}) and m in per_seed[s].get("base", {})]
            changes[m][p] = interval(deltas)
    return {"levels": levels, "changes": changes}


def _cell(iv: dict[str, Any], digits: int = 2) -> str:
    if iv["mean"] is None:
        return "–"
    if iv["lo"] is None:
        return f"{iv['mean']:.{digits}f}"
    return f"{iv['mean']:.{digits}f} [{iv['lo']:.{digits}f}, {iv['hi']:.{digits}f}]"


def study_markdown(result: dict[str, Any]) -> str:
    """The study as Markdown: levels per checkpoint, then changes from the base."""
    cfg, agg = result["config"], result["aggregate"]
    seeds = ", ".join(map(str, cfg["seeds"]))
    lines = [f"# Multi-seed study: run {cfg['run']}, GRPO seeds {seeds}", "",
             f"Held-out puzzles: {cfg['n_per_size']} per size ({', '.join(map(str, cfg['people']))} people), "
             f"greedy and at T={cfg['temperature']:g}. Each cell: mean over {len(cfg['seeds'])} seeds "
             "[95% interval, Student t]. The base is shared by every seed.", ""]
    digits = lambda m: 0 if m == "length" else 2  # noqa: E731
    head = "| metric | " + " | ".join(STAGE_POINTS) + " |"
    lines += ["## Per checkpoint", "", head, "|" + "---|" * (len(STAGE_POINTS) + 1)]
    for m, what in METRICS:
        if m in agg["levels"]:
            cells = [_cell(agg["levels"][m][p], digits(m)) for p in STAGE_POINTS]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Change from the base (per seed, then summarised; min = the smallest change of any seed)",
              "", "| metric | " + " | ".join(f"{p} − base" for p in STAGE_POINTS[1:]) + " |",
              "|" + "---|" * len(STAGE_POINTS)]
    for m, what in METRICS:
        if m in agg["changes"] and not m.startswith("train_"):
            cells = [f"{_cell(agg['changes'][m][p], digits(m))}, min {agg['changes'][m][p]['min']:.{digits(m)}f}"
                     if agg["changes"][m][p]["mean"] is not None else "–" for p in STAGE_POINTS[1:]]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Metrics", ""] + [f"- `{m}`: {what}" for m, what in METRICS] + [""]
    return "\n".join(lines)


def study_figure(result: dict[str, Any], path: Path) -> Path:
    """One panel per metric: each seed a thin line, the mean with its interval on top."""
    from matplotlib.figure import Figure

    per_seed, agg = result["per_seed"], result["aggregate"]["levels"]
    shown = [m for m, _ in METRICS if m in agg and not m.startswith("train_")]
    cols = 3
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    x = list(range(len(STAGE_POINTS)))
    for ax, m in zip(axes, shown):
        for seed, points in per_seed.items():
            ax.plot(x, [points[p].get(m, math.nan) for p in STAGE_POINTS], color="0.7", lw=0.8)
        means = [agg[m][p]["mean"] for p in STAGE_POINTS]
        lo = [agg[m][p]["lo"] if agg[m][p]["lo"] is not None else agg[m][p]["mean"] for p in STAGE_POINTS]
        hi = [agg[m][p]["hi"] if agg[m][p]["hi"] is not None else agg[m][p]["mean"] for p in STAGE_POINTS]
        ax.errorbar(x, means, yerr=[[a - b for a, b in zip(means, lo)], [b - a for a, b in zip(means, hi)]],
                    color="C0", marker="o", capsize=3, lw=1.8)
        ax.set(xticks=x, xticklabels=STAGE_POINTS, title=m)
        ax.tick_params(labelsize=8)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    fig.suptitle(f"{result['config']['run']}: {len(per_seed)} GRPO seeds (grey), mean and 95% interval (blue)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def run_study(registry: Registry, config: SeedStudyConfig, runs_dir: Path, cache: ResultCache,
              out: Path, progress: Any = False) -> dict[str, Any]:
    """Evaluate every seed run's stage points, aggregate, and write seeds.{md,json,png} to `out`."""
    points = {seed: stage_points(registry, seed_run(config.run, seed)) for seed in config.seeds}
    out.mkdir(parents=True, exist_ok=True)
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    base_figures: dict[Path, dict[str, float]] = {}     # one evaluation per distinct base folder
    for seed, pts in points.items():
        per_seed[seed] = {}
        for p in STAGE_POINTS:
            ck = pts[p]
            folder = registry.resolve(ck)
            if p == "base" and folder in base_figures:
                figures = dict(base_figures[folder])
            else:
                figures = checkpoint_metrics(registry, ck, config, cache, progress=progress)
                if p == "base":
                    base_figures[folder] = dict(figures)
            if p != "base":
                figures |= training_tail(runs_dir / seed_run(config.run, seed) / "metrics.jsonl", p,
                                         config.last_steps)
            per_seed[seed][p] = figures
    result = {"config": config.model_dump(mode="json"),
              "checkpoints": {seed: {p: ck.id for p, ck in pts.items()} for seed, pts in points.items()},
              "per_seed": per_seed, "aggregate": aggregate(per_seed)}
    atomic_write_text(out / "seeds.json", json.dumps(json_safe(result), indent=1) + "\n")
    atomic_write_text(out / "seeds.md", study_markdown(result))
    study_figure(result, out / "seeds.png")
    return result


def seeds_command(
    run: str = typer.Option("kk-tiny", help="the schedule's run name (seed N is run <run>-seed<N>)"),
    seeds: str = typer.Option("0,1,2", help="seeds trained with `python -m train.run stage3 --seeds`"),
    people: str = typer.Option("3,5", help="held-out puzzle sizes"),
    n_per_size: int = typer.Option(100, min=1, help="held-out puzzles per size"),
    max_new_tokens: int = typer.Option(768, min=1, help="response length limit"),
    temperature: float = typer.Option(1.0, min=0.0, help="temperature of the sampled evaluation"),
    registry: Path = typer.Option(Path("ckpts.yaml"), help="checkpoint registry"),
    runs_dir: Path = typer.Option(Path("runs"), help="where the runs' metrics.jsonl are"),
    out: Path = typer.Option(Path("reports/seeds"), help="folder for seeds.md, seeds.json, seeds.png"),
    cache: Path = typer.Option(DEFAULT_ROOT, help="result cache folder"),
) -> None:
    """Mean and 95% interval across GRPO seeds of accuracy, length, behaviours and training
    metrics at the base and each stage end."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from train.cli import check_output_folder, err_console
    from train.data import parse_people

    try:
        config = SeedStudyConfig(run=run, seeds=tuple(parse_seeds(seeds)), people=tuple(parse_people(people)),
                                 n_per_size=n_per_size, max_new_tokens=max_new_tokens, temperature=temperature)
    except ValueError as exc:
        raise EvalError(f"seeds: {str(exc).splitlines()[-1]}") from None
    check_output_folder(out, "--out")
    check_output_folder(cache, "--cache")
    reg = Registry(registry)
    reg.check_path()
    if not reg.path.is_file():
        raise SeedStudyError(f"--registry {reg.path}: does not exist")
    reg.check_writable()              # evaluation summaries go into it
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one weight-loading bar per checkpoint would drown the display
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        result = run_study(reg, config, runs_dir, ResultCache(cache), out, progress=bar)
    print(study_markdown(result))
    err_console.print(f"wrote {out}/seeds.md, seeds.json, seeds.png")
