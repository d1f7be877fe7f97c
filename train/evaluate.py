"""Evaluation on held-out puzzles: the held-out sets, accuracy per size, format errors,
response length and pass@k, scored with the training reward itself.

    config = make_config(people=[3, 5], n_per_size=100)
    result = evaluate_model(model, tokenizer, eval_puzzles(config), config)
    result.summary["accuracy_by_size"]

Responses are scored with `train.reward.score_response`, the training reward, so a model's
evaluation and its training curves agree on what "correct" means. Beside it, `roles_accuracy`
reads the roles whatever the format (`train.reward.lenient_roles`): a base model that never
writes the tags scores 0 by the reward, and this says what it knows.

Held-out puzzles are our generator's test split under `EVAL_SEED`, a seed reserved for
evaluation, with every puzzle of a given training set excluded by content; or, with
`external`, imported reference test files (`<root>/<N>ppl/test.parquet`). This module works on
in-memory models (training validation uses it); `analysis.evaluate` evaluates registered
checkpoints with a result cache and compares them with the published numbers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import train.generate as gen
from train.data import dataset_paths, generate_split, read_puzzles
from train.errors import UserError, validation_problem
from train.kk import MAX_PEOPLE, MIN_PEOPLE, Puzzle, content_key, parse_statements
from train.reward import lenient_correct, score_response

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
        """Keyword arguments of `train.generate.generate` for this config."""
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
        where, msg = validation_problem(exc)
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
    passed to `train.generate.generate`.
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


