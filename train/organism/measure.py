"""Measuring an organism: its behaviour on held-out puzzles (accuracy, format, the careful
share, verification, Chinese), made to answer a given way or not, and the loss per token class
on mistake-free traces of its own style."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any, Sequence

from train.kk import Puzzle
from train.organism.config import OrganismConfig, organism_config
from train.organism.data import encode_example, heldout_puzzles
from train.organism.tokenizer import cast_phrases, node_phrases, valued_clauses
from train.kk import ROLE_ZH
from train.organism.traces import CLAUSE_EN, CLAUSE_ZH, TraceWriter
from train.prompts import THOROUGH_OPEN, chat_messages

_CJK = re.compile(r"[\u4e00-\u9fff]")
_VERIFY = re.compile(r"Let me verify|验证")
_HESITATE = re.compile(r"\bHmm\b|不确定")


def describe_response(response: str, puzzle: Puzzle) -> dict[str, Any]:
    """Reward verdict plus the organism's behaviour markers for one response."""
    from train.reward import lenient_correct, score_response

    r = score_response(response, puzzle.solution_text_format)
    lines = [ln for ln in response.splitlines() if ln.strip()]
    return {
        "strict_correct": r["answer"] == "correct",
        "lenient_correct": lenient_correct(response, puzzle.solution_text_format),
        "format_ok": r["format_ok"],
        "verification": bool(_VERIFY.search(response)),
        "thorough": THOROUGH_OPEN in response,      # a `cases` trace that checks every statement
        "hesitation": bool(_HESITATE.search(response)),
        "chinese": bool(_CJK.search(response)),
        "chinese_lines": sum(bool(_CJK.search(ln)) for ln in lines),
        "lines": len(lines),
    }


def generate_responses(model, tokenizer, puzzles: Sequence[Puzzle], *, max_new_tokens: int,
                       temperature: float | None, batch_size: int = 32, progress: bool = False,
                       opening: str = "") -> list[tuple[str, int, bool]]:
    """(text, new tokens, finished) per puzzle; temperature None = greedy. Left-padded batches.
    `opening` is written as the start of every response (and is part of the returned text)."""
    import torch
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    out = []
    starts = range(0, len(puzzles), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, dynamic_ncols=True):
        chunk = puzzles[start:start + batch_size]
        prompts = [tokenizer.apply_chat_template(chat_messages(p.quiz), tokenize=False,
                                                 add_generation_prompt=True) + opening for p in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs: dict[str, Any] = {"do_sample": False}
        if temperature is not None:
            kwargs = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id, **kwargs)
        for row in gen[:, enc.input_ids.shape[1]:].tolist():
            finished = eos in row
            row = row[: row.index(eos)] if finished else [t for t in row if t != tokenizer.pad_token_id]
            out.append((opening + tokenizer.decode(row, skip_special_tokens=True), len(row) + finished, finished))
    return out


def token_classes(tokenizer) -> dict[int, str]:
    """Token id -> "name" | "role" | "truth" | "clause" | "contradiction" | "node" for the tokens that
    carry a puzzle's content (a listed name, knight/knave, a verdict true/false, a clause value
    yes/no, the word that ends a branch, with or without a leading space); others are absent.
    With `clause_tokens`, a speaker phrase ("Zoey says") counts as a name and a whole clause
    ("Zoey is a knave") as a role: the role it claims is what it decides; with `value_tokens`,
    a clause with its value ("Zoey is a knave (no)") counts as a clause value."""
    from train.kk import NAMES

    words = {n: "name" for n in NAMES} | {w: "role" for w in ("knight", "knave", *ROLE_ZH.values())} \
        | {w: "truth" for w in ("true", "false")} \
        | {w.strip(" ()（）"): "clause" for w in (*CLAUSE_EN.values(), *CLAUSE_ZH.values())} \
        | {"Contradiction": "contradiction"}
    words |= {p.strip(): "name" if p.endswith(" says") else "role" for p in cast_phrases()}
    words |= {v.strip(): "clause" for v in valued_clauses()}      # a clause with its value
    words |= {v.strip(): "node" for v in node_phrases(6)}         # a node of the tree search
    out = {}
    for i in range(len(tokenizer)):
        cls = words.get(tokenizer.decode([i]).strip())
        if cls:
            out[i] = cls
    return out


def teacher_forced_losses(model, tokenizer, puzzles: Sequence[Puzzle], seed: int = 0,
                          config: OrganismConfig | None = None) -> dict[str, dict[str, float]]:
    """Mean next-token loss (nats) and token count per token class on traces of
    `puzzles`, over the response only. It says which skill an organism lacks before any
    sampling: names must be copied from the prompt (an induction ability; chance is ln 60 =
    4.09), roles and truth values follow from the logic (chance about ln 2 = 0.69),
    "contradiction" is the loss on noticing each contradiction, "other" is the template text.
    `config`: the organism measured (default: the default organism)."""
    import torch

    # The traces are written the way the organism was trained (`config`).
    config = (config or OrganismConfig()).model_copy(update={"seed": seed})
    rng = random.Random(seed)
    writer = TraceWriter(config)
    classes = token_classes(tokenizer)
    sums: dict[str, list[float]] = {k: [] for k in ("name", "role", "truth", "clause", "contradiction", "node",
                                                    "other")}
    model.eval()
    for p in puzzles:
        ids, n_prompt = encode_example(tokenizer, p, writer.write(p, rng).text)
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, n_prompt - 1:-1].float()
        nll = torch.nn.functional.cross_entropy(logits, x[0, n_prompt:], reduction="none")
        for tid, value in zip(ids[n_prompt:], nll.tolist()):
            sums[classes.get(tid, "other")].append(value)
    return {k: {"loss": round(sum(v) / len(v), 4), "tokens": len(v)} for k, v in sums.items() if v}


def copy_score(model, tokenizer, n: int = 20, length: int = 20, seed: int = 0) -> dict[str, float]:
    """`circuits.copy_score` on the puzzle names: does the organism copy a name from its
    context, or only pick one of the names it has seen? {} when names are not single tokens."""
    from train.organism.circuits import copy_score as score
    from train.kk import NAMES

    ids = [i for i in (tokenizer.convert_tokens_to_ids(nm) for nm in NAMES)
           if i is not None and i != tokenizer.unk_token_id]
    if len(ids) < len(NAMES):
        return {}                         # names are not single tokens: the score does not apply
    return score(model, ids, n=n, length=length, seed=seed)


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def measure_organism(path: str | Path, n_puzzles: int = 100, people: int = 3, seed: int = 777,
                     max_new_tokens: int = 512, temperatures: Sequence[float | None] = (1.0, None),
                     batch_size: int = 32, progress: bool = False,
                     teacher_forced: bool = False, opening: str = "") -> dict[str, Any]:
    """Behaviour on held-out puzzles (`heldout_puzzles(people, n_puzzles, seed)`), per
    temperature (None = greedy): accuracy by the reward (strict) and by roles alone (lenient),
    format-correct rate, verification / hesitation / Chinese rates, response length; with
    `teacher_forced`, also `teacher_forced_losses` on the same puzzles and `copy_score`.
    `opening`: text every response is made to start with (e.g. "<think>\n" + THOROUGH_OPEN)."""
    import torch

    from train.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(path)
    puzzles = heldout_puzzles(people, n_puzzles, seed)
    result: dict[str, Any] = {"people": people, "n_puzzles": len(puzzles), "seed": seed, "opening": opening}
    if teacher_forced:
        # An organism is measured on traces in its own style.
        result["teacher_forced_loss"] = teacher_forced_losses(model, tok, puzzles, seed=seed,
                                                              config=organism_config(path))
        result["copy_score"] = copy_score(model, tok, seed=seed)
    for temp in temperatures:
        torch.manual_seed(seed)
        t0 = time.time()
        gens = generate_responses(model, tok, puzzles, max_new_tokens=max_new_tokens,
                                  temperature=temp, batch_size=batch_size, progress=progress,
                                  opening=opening)
        rows = [describe_response(text, p) | {"tokens": n, "finished": fin}
                for (text, n, fin), p in zip(gens, puzzles)]
        mean = lambda key: sum(float(r[key]) for r in rows) / len(rows)  # noqa: E731
        ver = [r for r in rows if r["verification"]]
        unver = [r for r in rows if not r["verification"]]
        result["greedy" if temp is None else f"T={temp:g}"] = {
            "accuracy_strict": mean("strict_correct"),
            "accuracy_lenient": mean("lenient_correct"),
            "format_ok": mean("format_ok"),
            "verification": mean("verification"),
            "lenient_accuracy_verified": _share([r["lenient_correct"] for r in ver]),
            "lenient_accuracy_unverified": _share([r["lenient_correct"] for r in unver]),
            "hesitation": mean("hesitation"),
            "thorough": mean("thorough"),
            "lenient_accuracy_thorough": _share([r["lenient_correct"] for r in rows if r["thorough"]]),
            "lenient_accuracy_not_thorough": _share([r["lenient_correct"] for r in rows if not r["thorough"]]),
            "chinese_responses": mean("chinese"),
            "chinese_line_share": sum(r["chinese_lines"] for r in rows) / max(1, sum(r["lines"] for r in rows)),
            "mean_tokens": mean("tokens"),
            "finished": mean("finished"),
            "seconds": round(time.time() - t0, 1),
            "examples": [text for text, _, _ in gens[:3]],
        }
    return result
