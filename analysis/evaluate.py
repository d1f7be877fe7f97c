"""Evaluation: accuracy per puzzle size, format errors, response length and pass@k per
checkpoint, next to the published Logic-RL numbers.

    python -m analysis eval --run kk-tiny --stage stage3 --people 2-8 --n-per-size 100

Responses are scored with `train.reward.score_response`, the training reward itself, so a
checkpoint's evaluation and its training curves agree on what "correct" means. Beside it,
`roles_accuracy` reads the roles whatever the format (`train.reward.lenient_roles`): a base
model that never writes the tags scores 0 by the reward, and this says what it knows.

Held-out puzzles are our generator's test split under `EVAL_SEED`, a seed reserved for
evaluation, with every puzzle of a given training set excluded by content; or, with
`external`, imported reference test files (`<root>/<N>ppl/test.parquet`).

Per checkpoint the summary goes three places: the result cache (with the generations kept as
a parquet sidecar, read back by `load_generations`), the checkpoint's `eval` entry in
`ckpts.yaml`, and the command's `<out>/eval.json` with a comparison table and figure.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import analysis.generate as gen
from analysis.cache import DEFAULT_ROOT, ResultCache, atomic_write_text, weights_fingerprint
from analysis.selection import SELECTION_OPTIONS, CheckpointSelection, parse_steps, split_ids, with_option_groups
from train.data import dataset_paths, generate_split, parse_people, read_puzzles, write_parquet
from train.errors import UserError
from train.models import ModelLoadError, check_model_folder, load_model_and_tokenizer, load_tokenizer
from train.kk import MAX_PEOPLE, MIN_PEOPLE, Puzzle, content_key, parse_statements
from train.reward import lenient_correct, score_response

__all__ = [
    "ANALYSIS",
    "EVAL_SEED",
    "PUBLISHED",
    "EvalConfig",
    "EvalError",
    "EvalResult",
    "PublishedRow",
    "comparison_figure",
    "comparison_markdown",
    "comparison_table",
    "eval_command",
    "eval_puzzles",
    "evaluate_checkpoint",
    "evaluate_model",
    "heldout_puzzles",
    "load_generations",
    "make_config",
    "mean_at_k",
    "pass_at_k",
    "registry_summary",
    "summarize",
    "training_keys",
]

ANALYSIS = "eval"  # the analysis name in the result cache
# Reserved for evaluation: never train with this seed. Training sets built with any other
# seed are further excluded by content when their root is given (EvalConfig.train_data).
EVAL_SEED = 424242
GENERATION_COLUMNS = ("puzzle_id", "people", "sample", "text", "n_tokens", "finished", "score",
                      "answer", "format_ok", "n_correct_people", "solution_text_format")


class EvalError(UserError, ValueError):
    """Bad evaluation input: the message is one line."""


# --------------------------------------------------------------------------- config

class EvalConfig(BaseModel):
    """What to evaluate on and how to decode. Defaults: greedy, 100 held-out puzzles per size
    for 2..8 people, chat prompts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    people: list[int] = Field(default_factory=lambda: list(range(2, 9)), description="Puzzle sizes.")
    n_per_size: int = Field(100, ge=1, description="Puzzles per size.")
    seed: int = Field(EVAL_SEED, description="Seed of the held-out sets (reserved for evaluation).")
    mode: Literal["greedy", "sampled"] = Field(
        "greedy", description="greedy: one argmax answer per puzzle; sampled: k samples at `temperature`.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature in sampled mode (the reference's 1.0).")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k.")
    k: int = Field(1, ge=1, description="Samples per puzzle; pass@j is reported for j = 1..k.")
    max_new_tokens: int = Field(1024, ge=1)
    batch_size: int = Field(16, ge=1, description="Rows per generation batch (does not change results).")
    prompt_style: Literal["chat", "raw"] = "chat"
    external: Optional[Path] = Field(
        None, description="Root of imported reference data, `<root>/<N>ppl/test.parquet`; "
        "sizes without a file are skipped.")
    train_data: Optional[Path] = Field(
        None, description="A training data root whose `<N>ppl/train.parquet` puzzles are excluded.")
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    fixed_cast: bool = Field(False, description="Held-out puzzles star the fixed cast "
                             "(`train.kk.GeneratorConfig.fixed_cast`); the CLI follows the checkpoints.")

    @field_validator("people")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("no puzzle sizes")
        for n in v:
            if not MIN_PEOPLE <= n <= MAX_PEOPLE:
                raise ValueError(f"number of people {n} is outside {MIN_PEOPLE}..{MAX_PEOPLE}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _greedy_k(self) -> "EvalConfig":
        if self.mode == "greedy" and self.k > 1:
            raise ValueError("k > 1 needs mode 'sampled' (greedy decoding gives one answer per puzzle)")
        return self

    @property
    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `analysis.generate.generate` for this config."""
        sampled = self.mode == "sampled"
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature if sampled else 0.0,
                    top_p=self.top_p if sampled else 1.0, top_k=self.top_k if sampled else 0,
                    num_samples=self.k, batch_size=self.batch_size, seed=self.seed, backend=self.backend)

    def cache_params(self) -> dict[str, Any]:
        """The cache key: everything that changes results (batch size and backend do not)."""
        d = self.model_dump(mode="json", exclude={"batch_size", "backend"})
        for key in ("external", "train_data"):
            if d[key] is not None:
                d[key] = str(Path(d[key]).resolve())
        return d


def make_config(**fields: Any) -> EvalConfig:
    """EvalConfig from user input; a validation problem becomes a one-line EvalError."""
    try:
        return EvalConfig(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise EvalError(f"eval config{' ' + where if where else ''}: {msg}") from None


# --------------------------------------------------------------------------- puzzles

def heldout_puzzles(people: Sequence[int], n_per_size: int, seed: int = EVAL_SEED,
                    exclude: Iterable[str] = (), fixed_cast: bool = False) -> list[Puzzle]:
    """The held-out set: `generate_split(n, 0, n_per_size, seed)`'s test split per size,
    skipping any puzzle whose content key is in `exclude`. Deterministic for given
    (people, n_per_size, seed, exclude)."""
    seen = set(exclude)
    out: list[Puzzle] = []
    for n in people:
        out.extend(generate_split(n, 0, n_per_size, seed=seed, exclude=seen, fixed_cast=fixed_cast)["test"])
    return out


def training_keys(root: str | Path) -> set[str]:
    """Content keys of every training puzzle under a data root (`<root>/<N>ppl/train.parquet`)."""
    import pyarrow.parquet as pq

    root = Path(root)
    files = sorted(root.glob("*ppl/train.parquet"))
    if not files:
        raise EvalError(f"{root}: no <N>ppl/train.parquet files (not a training data root?)")
    keys: set[str] = set()
    for path in files:
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for non-parquet bytes
            raise EvalError(f"{path}: not a readable parquet file ({type(exc).__name__})") from None
        # Only the statements matter for identity: reading them avoids re-solving every puzzle.
        if "statements" in table.column_names:
            column = table.column("statements").to_pylist()
        elif "reward_model" in table.column_names:
            column = [(r or {}).get("ground_truth", {}).get("statements")
                      for r in table.column("reward_model").to_pylist()]
        else:
            raise EvalError(f"{path}: no 'statements' column (not a K&K file?)")
        for i, stmts in enumerate(column):
            if stmts is None:
                raise EvalError(f"{path}: row {i} has no statements")
            try:
                keys.add(content_key(parse_statements(stmts)))
            except UserError as exc:
                raise EvalError(f"{path}: row {i}: {exc}") from None
    return keys


def eval_puzzles(config: EvalConfig) -> list[Puzzle]:
    """The puzzles a config evaluates on, sizes in order, never a training puzzle of
    `config.train_data`."""
    exclude = training_keys(config.train_data) if config.train_data else set()
    if config.external is None:
        return heldout_puzzles(config.people, config.n_per_size, config.seed, exclude, config.fixed_cast)
    root = Path(config.external)
    if not root.is_dir():
        raise EvalError(f"{root}: external data root is not a folder")
    out: list[Puzzle] = []
    for n in config.people:
        path = dataset_paths(root, n)["test"]
        if path.exists():
            kept = [p for p in read_puzzles(path) if p.people == n and p.content_key not in exclude]
            out.extend(kept[:config.n_per_size])
    if not out:
        raise EvalError(f"{root}: no test puzzles for sizes {config.people}")
    return out


def puzzle_set_hash(puzzles: Sequence[Puzzle]) -> str:
    return hashlib.sha1("\n".join(p.id for p in puzzles).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- metrics

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k),
    computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which stays exact for large n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_at_k(n: int, c: int) -> float:
    """mean@k: the fraction of a puzzle's n samples that are correct (averaged over puzzles
    it is the expected accuracy of a single sample, i.e. pass@1)."""
    if not 0 <= c <= n or n < 1:
        raise ValueError(f"mean@k needs 0 <= c <= n and n >= 1, got n={n} c={c}")
    return c / n


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


def summarize(frame, k: int) -> dict[str, Any]:
    """Summary of a generations frame (one row per puzzle and sample). Size keys are strings
    so the summary is the same after a JSON or YAML round trip."""
    df = frame.assign(correct=frame["answer"] == "correct",
                      # roles right whatever the format: what a model knows before it learns the format
                      roles_correct=[lenient_correct(t, sol) for t, sol in
                                     zip(frame["text"], frame["solution_text_format"])])
    per_puzzle = df.groupby("puzzle_id", sort=False).agg(
        people=("people", "first"), n=("sample", "size"), c=("correct", "sum"))
    sizes = sorted(int(s) for s in df["people"].unique())

    def pass_curve(rows) -> dict[str, float]:
        return {str(j): _mean(pass_at_k(int(n), int(c), j) for n, c in zip(rows["n"], rows["c"]))
                for j in range(1, k + 1)}

    by_size = {s: df[df["people"] == s] for s in sizes}
    return {
        "n_puzzles": int(len(per_puzzle)),
        "k": int(k),
        "sizes": sizes,
        "accuracy": float(df["correct"].mean()),
        "accuracy_by_size": {str(s): float(d["correct"].mean()) for s, d in by_size.items()},
        "roles_accuracy": float(df["roles_correct"].mean()),
        "roles_accuracy_by_size": {str(s): float(d["roles_correct"].mean()) for s, d in by_size.items()},
        "format_error_rate": float((~df["format_ok"].astype(bool)).mean()),
        "format_error_rate_by_size": {str(s): float((~d["format_ok"].astype(bool)).mean()) for s, d in by_size.items()},
        "answer_rates": {a: float((df["answer"] == a).mean()) for a in ("correct", "wrong", "unparseable", "missing")},
        "mean_score": float(df["score"].mean()),
        "mean_response_tokens": float(df["n_tokens"].mean()),
        "mean_response_tokens_by_size": {str(s): float(d["n_tokens"].mean()) for s, d in by_size.items()},
        "truncated_rate": float((~df["finished"].astype(bool)).mean()),
        "mean_at_k": _mean(mean_at_k(int(n), int(c)) for n, c in zip(per_puzzle["n"], per_puzzle["c"])),
        "pass_at_k": pass_curve(per_puzzle),
        "pass_at_k_by_size": {str(s): pass_curve(per_puzzle[per_puzzle["people"] == s]) for s in sizes},
    }


# --------------------------------------------------------------------------- evaluation

@dataclass
class EvalResult:
    """In-memory evaluation: `generations` has one row per (puzzle, sample), columns
    GENERATION_COLUMNS; `summary` is `summarize(generations, k)`."""

    config: EvalConfig
    generations: Any  # pandas.DataFrame
    summary: dict[str, Any]


def evaluate_model(model: Any, tokenizer: Any, puzzles: Sequence[Puzzle], config: EvalConfig,
                   *, progress: Any = False) -> EvalResult:
    """Generate for every puzzle (k samples each) and score with the training reward.

    Works on an in-memory model, e.g. the policy during training validation. `progress` is
    passed to `analysis.generate.generate`.
    """
    import pandas as pd

    if not puzzles:
        raise EvalError("no puzzles to evaluate")
    prompts = gen.render_prompts(tokenizer, puzzles, config.prompt_style)
    reward_config = gen.prompt_reward_config(config.prompt_style)
    outs = gen.generate(model, tokenizer, prompts, progress=progress, **config.generation_kwargs)
    rows = []
    for puzzle, samples in zip(puzzles, outs):
        for j, out in enumerate(samples):
            scored = score_response(out.text, puzzle.solution_text_format, reward_config)
            rows.append({
                "puzzle_id": puzzle.id, "people": puzzle.people, "sample": j, "text": out.text,
                "n_tokens": int(out.n_tokens), "finished": bool(out.finished),
                "score": float(scored["score"]), "answer": scored["answer"],
                "format_ok": bool(scored["format_ok"]), "n_correct_people": int(scored["n_correct_people"]),
                "solution_text_format": puzzle.solution_text_format,
            })
    frame = pd.DataFrame(rows, columns=list(GENERATION_COLUMNS))
    return EvalResult(config=config, generations=frame, summary=summarize(frame, config.k))


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
        "seed": summary["config"]["seed"],
        "data": "external" if summary["config"]["external"] else "heldout",
    }


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
    if (hit is not None and hit.get("weights") == fingerprint and hit.get("puzzle_set") == puzzle_hash
            and sidecar.exists()):
        import pandas as pd

        # Summaries are recomputed from the kept generations, so a cached evaluation gains
        # whatever `summarize` has learnt to report since it was run.
        summary, cached = {**hit, **summarize(pd.read_parquet(sidecar), config.k)}, True
    else:
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
    registry.update(ck.id, eval=registry_summary(summary))
    return {**summary, "cached": cached}


def load_generations(cache: ResultCache, ckpt_id: str, config: EvalConfig):
    """The kept generations of a cached evaluation, as a DataFrame (GENERATION_COLUMNS)."""
    import pandas as pd

    path = cache.sidecar(ckpt_id, ANALYSIS, config.cache_params(), ".parquet")
    if not path.exists():
        raise EvalError(f"no kept generations for checkpoint {ckpt_id} with these settings; "
                        f"run `python -m analysis eval --ids {ckpt_id}` first")
    return pd.read_parquet(path)


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

@with_option_groups
def eval_command(
    selection: CheckpointSelection = SELECTION_OPTIONS,
    people: str = typer.Option("2-8", help="puzzle sizes: 3, 2-8 or 3,5,7"),
    n_per_size: int = typer.Option(100, min=1, help="puzzles per size"),
    mode: str = typer.Option("greedy", help="greedy, or sampled (T=1.0 as the reference)"),
    k: int = typer.Option(1, min=1, help="samples per puzzle for pass@k (sampled mode)"),
    temperature: float = typer.Option(1.0, help="sampling temperature in sampled mode"),
    max_new_tokens: int = typer.Option(1024, min=1, help="response length limit"),
    batch_size: int = typer.Option(16, min=1, help="generation batch size"),
    prompt_style: str = typer.Option("chat", help="chat, or raw (pre-filled <think>)"),
    seed: int = typer.Option(EVAL_SEED, help="held-out set seed"),
    external: Optional[Path] = typer.Option(None, help="reference data root (<N>ppl/test.parquet) instead of held-out sets"),
    train_data: Optional[Path] = typer.Option(None, help="training data root whose puzzles are excluded"),
    backend: str = typer.Option("auto", help="auto, transformers or vllm"),
    out: Path = typer.Option(Path("reports/eval"), help="folder for eval.json, comparison.md, comparison.png"),
    cache: Path = typer.Option(DEFAULT_ROOT, help="result cache folder"),
) -> None:
    """Evaluate checkpoints: accuracy per size, format errors, length, pass@k; compare with
    the published Logic-RL numbers. Cached per checkpoint; a bad checkpoint is reported and
    skipped (exit code 1 at the end)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from train.cli import err_console
    from train.registry import Registry

    config = make_config(people=parse_people(people), n_per_size=n_per_size, seed=seed, mode=mode,
                         k=k, temperature=temperature, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, prompt_style=prompt_style, external=external,
                         train_data=train_data, backend=backend)
    reg = Registry(selection.registry)
    checkpoints = reg.select(run=selection.run, stage=selection.stage, every=selection.every,
                             steps=parse_steps(selection.steps, error=EvalError, name="--steps"),
                             ids=split_ids(selection.ids))
    if external is None:
        from analysis.harness import checkpoints_cast

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
            bar.advance(task)

    out.mkdir(parents=True, exist_ok=True)
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
