"""The organism's SFT data: held-out puzzles (never trained on), the SFT puzzles and their
traces, and how a (prompt, response) pair becomes token ids."""

from __future__ import annotations

import random
from typing import Sequence

from train.kk import GeneratorConfig, Puzzle, PuzzleGenerator
from train.organism.config import OrganismConfig
from train.organism.traces import Trace, TraceWriter
from train.prompts import chat_messages


def heldout_puzzles(people: int, n: int, seed: int = 777) -> list[Puzzle]:
    """The first `n` distinct held-out puzzles of one size (what measurements use).

    Fewer when the size has fewer distinct puzzles (there are about 400 of 2 people).
    """
    gen = PuzzleGenerator(seed * 1000 + people, GeneratorConfig(fixed_cast=True))
    out, seen, misses = [], set(), 0
    while len(out) < n and misses < 20 * n + 100:
        p = gen.generate(people)
        if p.content_key in seen:
            misses += 1
            continue
        seen.add(p.content_key)
        out.append(p)
    return out


def excluded_keys(config: OrganismConfig) -> set[str]:
    """Content keys SFT must not see: held-out measurement puzzles and the dataset test splits."""
    keys: set[str] = set()
    for n in config.sizes:
        keys |= {p.content_key for p in heldout_puzzles(n, config.heldout_per_size, config.heldout_seed)}
        if config.exclude_data_seed is not None and config.exclude_test_per_size:
            from train.data import generate_split

            test = generate_split(n, n_train=0, n_test=config.exclude_test_per_size,
                                  seed=config.exclude_data_seed, fixed_cast=True)["test"]
            keys |= {p.content_key for p in test}
    return keys


def sft_puzzles(config: OrganismConfig, exclude: set[str] | None = None) -> list[Puzzle]:
    """SFT puzzles, sizes drawn by `size_weights`, none of them in `exclude` (by default
    `excluded_keys(config)`). Small sizes repeat puzzles; each repeat gets its own trace."""
    exclude = excluded_keys(config) if exclude is None else exclude
    rng = random.Random(config.seed)
    world = GeneratorConfig(fixed_cast=True)
    gens = {n: PuzzleGenerator(config.seed * 1000 + 500 + n, world) for n in config.sizes}
    out = []
    while len(out) < config.n_puzzles:
        n = rng.choices(config.sizes, weights=config.size_weights)[0]
        for _ in range(10_000):
            p = gens[n].generate(n)
            if p.content_key not in exclude:
                out.append(p)
                break
        else:
            raise ValueError(f"every {n}-person puzzle found is excluded; lower heldout_per_size")
    return out


def sft_traces(puzzles: Sequence[Puzzle], config: OrganismConfig) -> list[Trace]:
    rng = random.Random(config.seed + 1)
    writer = TraceWriter(config)
    return [writer.write(p, rng) for p in puzzles]


def encode_example(tokenizer, puzzle: Puzzle, response: str, bare: bool = False) -> tuple[list[int], int]:
    """(ids, prompt length): the chat prompt as a generation would see it (`bare`: the quiz as
    the only turn), then the response and the end-of-turn token, tokenized apart exactly as
    generated tokens would be."""
    messages = chat_messages(puzzle.quiz)
    prompt = tokenizer.apply_chat_template(messages[1:] if bare else messages, tokenize=False,
                                           add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    r_ids = tokenizer(response, add_special_tokens=False).input_ids
    return p_ids + r_ids + [tokenizer.eos_token_id], len(p_ids)
