"""K&K datasets: seeded train/test splits per number of people, import of external K&K data,
export to veRL's RL parquet schema, and the `python -m train.data` CLI.

    python -m train.data build --out data/kk --people 2-8 --train 900 --test 100 --seed 0
    python -m train.data import ../shared/data/logic-rl-kk/3ppl/test.parquet --out data/ref3
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from train.kk import (MAX_PEOPLE, MIN_PEOPLE, GeneratorConfig, Puzzle, PuzzleError, PuzzleGenerator,
                      make_puzzle, parse_statements, statement_types)
from train.cli import check_output_folder
from train.errors import UserError
from train.prompts import SYSTEM_PROMPT, chat_messages, raw_prompt

DATA_SOURCE = "kk_logic"  # the reference's data_source, so veRL reward routing agrees
SPLITS = ("train", "test")


class DataError(UserError, ValueError):
    """Bad dataset input: the message is one line naming the file and the problem."""


# --------------------------------------------------------------------------- splits

def split_seed(seed: int, people: int, split: str) -> int:
    """A distinct, stable generator seed per (seed, size, split)."""
    return seed * 1_000_003 + people * 101 + SPLITS.index(split)


def generate_split(people: int, n_train: int = 900, n_test: int = 100, seed: int = 0,
                   exclude: Iterable[str] = (), progress=None,
                   fixed_cast: bool = False) -> dict[str, list[Puzzle]]:
    """Train and test puzzles of one size, disjoint by content (and from `exclude` keys).

    The test set is drawn first so that its contents do not depend on the train size.
    `fixed_cast`: the people are the first names of `train.kk.NAMES` (`GeneratorConfig`).
    """
    if not MIN_PEOPLE <= people <= MAX_PEOPLE:
        raise DataError(f"number of people {people} is outside the supported range {MIN_PEOPLE}..{MAX_PEOPLE}")
    seen = set(exclude)
    out: dict[str, list[Puzzle]] = {}
    for split, count in (("test", n_test), ("train", n_train)):
        gen = PuzzleGenerator(split_seed(seed, people, split), GeneratorConfig(fixed_cast=fixed_cast))
        puzzles: list[Puzzle] = []
        misses = 0
        while len(puzzles) < count:
            p = gen.generate(people)
            if p.content_key in seen:
                misses += 1
                if misses > 50 * count + 1000:  # tiny sizes have few distinct puzzles
                    raise DataError(f"only {len(puzzles)} distinct {people}-person puzzles found for {split}")
                continue
            seen.add(p.content_key)
            puzzles.append(_with_split(p, split, seed))
            if progress is not None:
                progress()
        out[split] = puzzles
    return out


def _with_split(p: Puzzle, split: str, seed: int) -> Puzzle:
    from dataclasses import replace
    return replace(p, split=split, seed=seed)


def parse_people(spec: str | Sequence[int]) -> list[int]:
    """"3", "2-8" or "3,5,7" (or a list) -> sorted sizes, each within the supported range."""
    if not isinstance(spec, str):
        sizes = [int(x) for x in spec]
    else:
        sizes = []
        for part in spec.split(","):
            part = part.strip()
            try:
                if "-" in part:
                    lo, hi = (int(x) for x in part.split("-", 1))
                    sizes.extend(range(lo, hi + 1))
                elif part:
                    sizes.append(int(part))
            except ValueError:
                raise DataError(f"bad people spec {spec!r}: use e.g. 3, 2-8 or 3,5,7") from None
    for n in sizes:
        if not MIN_PEOPLE <= n <= MAX_PEOPLE:
            raise DataError(f"number of people {n} is outside the supported range {MIN_PEOPLE}..{MAX_PEOPLE}")
    if not sizes:
        raise DataError(f"bad people spec {spec!r}: no sizes")
    return sorted(set(sizes))


def size_spec(sizes: Sequence[int]) -> str:
    """(3, 4, 5) -> "3-5"; (3, 5) -> "3,5" (what `train.data.parse_people` reads back)."""
    sizes = sorted(sizes)
    contiguous = len(sizes) > 2 and sizes == list(range(sizes[0], sizes[-1] + 1))
    return f"{sizes[0]}-{sizes[-1]}" if contiguous else ",".join(map(str, sizes))


# --------------------------------------------------------------------------- records

def to_rl_row(p: Puzzle, index: int, prompt_style: str = "chat", tokenizer=None) -> dict:
    """One row of veRL's RL schema (data_source, prompt, ability, reward_model, extra_info).

    prompt_style "chat": system + user messages (the engine applies the chat template);
    "raw": a single message holding the reference's rendered prompt with `<think>` pre-filled.
    """
    if prompt_style == "chat":
        prompt = chat_messages(p.quiz)
    elif prompt_style == "raw":
        prompt = [{"role": "user", "content": raw_prompt(p.quiz, tokenizer)}]
    else:
        raise DataError(f"unknown prompt style {prompt_style!r}: use chat or raw")
    return {
        "data_source": DATA_SOURCE,
        "prompt": prompt,
        "ability": "logic",
        "reward_model": {
            "style": "rule",
            "ground_truth": {"solution_text_format": p.solution_text_format,
                             "statements": repr(p.statements)},
        },
        "extra_info": {"index": index, "split": p.split, "id": p.id, "people": p.people,
                       "prefilled_think": prompt_style == "raw"},
        # Puzzle fields kept at top level, so the file is also a full puzzle record.
        "id": p.id, "people": p.people, "names": list(p.names), "statements": repr(p.statements),
        "solution": list(p.solution), "quiz": p.quiz,
        "solution_text_format": p.solution_text_format, "split": p.split, "seed": p.seed,
    }


def write_parquet(rows: list[dict], path: Path) -> None:
    """Atomic parquet write (temp file in the same folder, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".parquet.tmp")
    os.close(fd)
    try:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_puzzles(path: str | Path) -> list[Puzzle]:
    """Puzzles from a parquet file (ours or the reference's) or a K&K jsonl file.

    Every ground truth is re-derived from the statements; a disagreement is an error.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for non-parquet bytes
            raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__})") from None
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    else:
        raise DataError(f"{path}: unknown file type (expected .parquet or .jsonl)")
    if not rows:
        raise DataError(f"{path}: empty file, no puzzles")
    return [_row_to_puzzle(r, path, i) for i, r in enumerate(rows)]


def _row_to_puzzle(row: dict, path: Path, i: int) -> Puzzle:
    stmts = row.get("statements")
    if stmts is None and isinstance(row.get("reward_model"), dict):
        stmts = (row["reward_model"].get("ground_truth") or {}).get("statements")
    names = row.get("names")
    if stmts is None or names is None:
        raise DataError(f"{path}: row {i} lacks 'statements' or 'names' (not a K&K file?)")
    try:
        names = list(names)
        statements = parse_statements(stmts, len(names))
        extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
        return make_puzzle(
            names, statements, rng=random.Random(i), solution=row.get("solution"),
            quiz=row.get("quiz"), split=row.get("split") or extra.get("split", ""),
            seed=row.get("seed"), source=str(row.get("data_source") or path.name),
        )
    except PuzzleError as exc:
        raise DataError(f"{path}: row {i}: {exc}") from None


# --------------------------------------------------------------------------- build

@dataclass
class BuildSummary:
    counts: dict[int, dict[str, int]]
    statement_types: dict[str, int]
    files: list[str]
    fixed_cast: bool = False

    def to_json(self) -> dict:
        return {"counts": {str(k): v for k, v in self.counts.items()}, "fixed_cast": self.fixed_cast,
                "statement_types": self.statement_types, "files": self.files}


def dataset_paths(out: Path, people: int) -> dict[str, Path]:
    return {s: out / f"{people}ppl" / f"{s}.parquet" for s in SPLITS}


def existing_sizes(root: Path) -> list[int]:
    """The sizes a data root already holds files for (its `<N>ppl/*.parquet`)."""
    if not root.is_dir():
        return []
    return sorted({int(d.name.removesuffix("ppl")) for d in root.glob("*ppl")
                   if d.is_dir() and d.name.removesuffix("ppl").isdigit() and any(d.glob("*.parquet"))})


def build(out: str | Path, people: Sequence[int], n_train: int = 900, n_test: int = 100,
          seed: int = 0, prompt_style: str = "chat", progress: bool = True,
          fixed_cast: bool = False, replace: bool = False) -> BuildSummary:
    """Generate every size, write `<out>/<N>ppl/{train,test}.parquet` and `summary.json`.

    Disjointness holds across all sizes and splits. All files are written to a staging
    folder first and moved into place only when every size succeeded. A folder that already
    holds a data root is refused unless `replace`; then the whole root is replaced, so its
    summary always describes its files.
    """
    from rich.progress import Progress

    out = Path(out)
    check_output_folder(out, "--out")
    if n_train + n_test == 0:
        raise DataError("--train and --test are both 0: nothing to build")
    held = existing_sizes(out)
    if (held or (out / "summary.json").exists()) and not replace:
        raise DataError(f"--out {out}: already holds a data root ({', '.join(f'{n}ppl' for n in held) or 'summary.json'}); "
                        "choose another folder, or pass --force to replace it whole")
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    except OSError as exc:
        raise DataError(f"{out}: cannot write there ({exc.strerror})") from None
    counts: dict[int, dict[str, int]] = {}
    types: collections.Counter = collections.Counter()
    seen: set[str] = set()
    total = len(people) * (n_train + n_test)
    try:
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("generating puzzles", total=total)
            for n in people:
                sets = generate_split(n, n_train, n_test, seed, exclude=seen,
                                      progress=lambda: bar.advance(task), fixed_cast=fixed_cast)
                for split, puzzles in sets.items():
                    seen.update(p.content_key for p in puzzles)
                    rows = [to_rl_row(p, i, prompt_style) for i, p in enumerate(puzzles)]
                    write_parquet(rows, dataset_paths(staging, n)[split])
                    for p in puzzles:
                        for s in p.statements:
                            types.update(statement_types(s))
                counts[n] = {s: len(v) for s, v in sets.items()}
        for n in held:                         # the old root goes whole: no size of another build stays
            shutil.rmtree(out / f"{n}ppl", ignore_errors=True)
        files = []
        for n in people:
            for split, path in dataset_paths(out, n).items():
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(dataset_paths(staging, n)[split], path)
                files.append(str(path))
        summary = BuildSummary(counts, dict(sorted(types.items())), files, fixed_cast)
        (out / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")
        return summary
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_built(root: str | Path, people: Sequence[int], n_train: int = 900, n_test: int = 100,
                 seed: int = 0, prompt_style: str = "chat", progress: bool = True,
                 fixed_cast: bool = False) -> None:
    """Build the datasets under `root` unless every requested size is already there.

    A partial folder is rebuilt whole so that disjointness across sizes holds. A root built
    with the other cast is an error (nothing is overwritten).
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: data root exists and is not a folder")
    summary = root / "summary.json"
    if summary.exists():
        try:
            built_fixed = bool(json.loads(summary.read_text()).get("fixed_cast", False))
        except ValueError:
            raise DataError(f"{summary}: not valid JSON; delete the data root to rebuild it") from None
        if built_fixed != fixed_cast:
            raise DataError(f"{root}: built with fixed_cast={built_fixed}, but this run wants "
                            f"fixed_cast={fixed_cast}; use another data root")
    if all(p.exists() for n in people for p in dataset_paths(root, n).values()):
        return
    built = sorted({int(d.name.removesuffix("ppl")) for d in root.glob("*ppl") if d.is_dir()} | set(people)) \
        if root.exists() else sorted(set(people))
    build(root, built, n_train, n_test, seed, prompt_style, progress=progress, fixed_cast=fixed_cast, replace=True)


def load_split(root: str | Path, people: Sequence[int], split: str) -> list[Puzzle]:
    """Our built puzzles of the given sizes and split."""
    out: list[Puzzle] = []
    for n in people:
        path = dataset_paths(Path(root), n)[split]
        if not path.exists():
            raise DataError(f"{path}: missing; build it with `python -m train.data build --out {root}`")
        out.extend(read_puzzles(path))
    return out


def import_file(src: str | Path, out: str | Path, prompt_style: str = "chat", replace: bool = False) -> Path:
    """Re-solve an external K&K file and write it in our schema to `<out>/<N>ppl/<split>.parquet`.

    A generated data root (it has a summary.json) is refused: its summary would no longer
    describe its files. An existing file of the same size and split is replaced only with
    `replace`."""
    out = Path(out)
    check_output_folder(out, "--out")
    if (out / "summary.json").exists():
        raise DataError(f"--out {out}: is a generated data root (summary.json); import into another folder")
    puzzles = read_puzzles(src)
    by_size: dict[tuple[int, str], list[Puzzle]] = collections.defaultdict(list)
    split_guess = "test" if "test" in Path(src).stem else "train"
    for p in puzzles:
        by_size[(p.people, p.split or split_guess)].append(p)
    clash = [p for (n, split) in sorted(by_size) if (p := out / f"{n}ppl" / f"{split}.parquet").exists()]
    if clash and not replace:
        raise DataError(f"--out {out}: {clash[0].relative_to(out)} exists; pass --force to replace it")
    written = []
    for (n, split), ps in sorted(by_size.items()):
        path = Path(out) / f"{n}ppl" / f"{split}.parquet"
        write_parquet([to_rl_row(_with_split(p, split, p.seed), i, prompt_style) for i, p in enumerate(ps)], path)
        written.append(path)
    return Path(out)


__all__ = ["DATA_SOURCE", "DataError", "SYSTEM_PROMPT", "build", "dataset_paths", "generate_split",
           "import_file", "load_split", "parse_people", "read_puzzles", "to_rl_row", "write_parquet"]


# --------------------------------------------------------------------------- CLI

def _cli():
    import typer

    from train.cli import err_console, run_app

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                      help="Build, import and inspect K&K datasets.")

    @app.command("build")
    def build_cmd(out: Path = typer.Option(Path("data/kk"), help="output folder"),
                  people: str = typer.Option("3-7", help="sizes: 3, 2-8 or 3,5,7"),
                  train: int = typer.Option(900, min=0, help="train puzzles per size"),
                  test: int = typer.Option(100, min=0, help="test puzzles per size"),
                  seed: int = typer.Option(0, help="generator seed"),
                  prompt_style: str = typer.Option("chat", help="chat (messages) or raw (pre-filled <think>)"),
                  fixed_cast: bool = typer.Option(False, help="people are the first names of the "
                                                  "name list, in order (the kk-tiny world)"),
                  force: bool = typer.Option(False, help="replace a data root already at --out, whole")):
        """Generate disjoint train/test parquet files per size, plus summary.json."""
        if prompt_style not in ("chat", "raw"):
            raise DataError(f"--prompt-style {prompt_style!r}: use chat or raw")
        s = build(out, parse_people(people), train, test, seed, prompt_style, fixed_cast=fixed_cast, replace=force)
        err_console.print(f"wrote {len(s.files)} files under {out}")
        for n, c in s.counts.items():
            err_console.print(f"  {n} people: {c['train']} train, {c['test']} test")
        top = ", ".join(f"{k} {v}" for k, v in sorted(s.statement_types.items(), key=lambda kv: -kv[1]))
        err_console.print(f"  statement types: {top}")

    @app.command("import")
    def import_cmd(src: Path, out: Path = typer.Option(..., help="output folder"),
                   prompt_style: str = typer.Option("chat"),
                   force: bool = typer.Option(False, help="replace files of the same size and split")):
        """Re-solve an external K&K file (reference parquet or K&K jsonl) and write it in our schema."""
        if prompt_style not in ("chat", "raw"):
            raise DataError(f"--prompt-style {prompt_style!r}: use chat or raw")
        import_file(src, out, prompt_style, replace=force)
        err_console.print(f"imported {src} -> {out}")

    run_app(app)


if __name__ == "__main__":
    _cli()
