"""Throughput of the K&K reward (train/reward.py) on one core, against a naive baseline.

    python bench/bench_reward.py [--n 20000] [--seed 0]

Builds a seeded corpus of ~1.5k-character responses (correct, wrong, unparseable and
format-broken, 3-7 people), checks that both scorers give the same verdicts, then reports
responses scored per second (best of 3 passes, time.perf_counter) and the speed-up. Each
response has its own puzzle, so the solution text is parsed once per response (no cache hits).
Then the same kinds of response with 100x longer thinking (~150k characters): characters scored
per second against the short corpus's, which stays near 1 when scoring is linear in the length
(the reward has no character cap; the engine's token limit bounds a response).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.reward import _parse_solution_text, compute_score, score_response  # noqa: E402

NAMES = ["Amelia", "Penelope", "Evelyn", "Michael", "Zoey", "Ethan", "Jack", "Jackson", "Liam",
         "William", "Sofia", "Sophia", "Oliver", "Olivia", "Mia", "Noah", "Ava", "Avery", "Grace"]


def solution_text(names: list[str], roles: list[bool]) -> str:
    return "\n".join(f"({i}) {n} is a {'knight' if r else 'knave'}" for i, (n, r) in enumerate(zip(names, roles), 1))


def thinking(rng: random.Random, names: list[str], target_chars: int) -> str:
    steps = [
        "Assume {a} is a knight. Then {a}'s statement holds, so {b} is a knave.",
        "If {b} is a knave, {b}'s claim that {a} lies is false, which is consistent.",
        "Let's test both possibilities for {a}.",
        "Wait, that contradicts what {b} said about {a}; let me go back.",
        "Now we have determined {a}. Checking {b}'s statement again: it is consistent.",
        "Hmm, I am not sure about {b} yet, so verify every statement once more.",
    ]
    parts: list[str] = []
    while sum(map(len, parts)) < target_chars:
        a, b = rng.sample(names, 2)
        parts.append(rng.choice(steps).format(a=a, b=b))
    return " ".join(parts)


def make_corpus(n: int, seed: int, think_chars: tuple[int, int] = (1200, 1600)) -> list[tuple[str, str]]:
    """(response, solution text) pairs: 40% correct, 25% wrong, 15% unparseable, 20% broken."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(n):
        names = rng.sample(NAMES, rng.randint(3, 7))
        roles = [rng.random() < 0.5 for _ in names]
        truth = solution_text(names, roles)
        think = thinking(rng, names, rng.randint(*think_chars))
        kind = rng.random()
        answer = truth
        if 0.40 <= kind < 0.65:
            flipped = list(roles)
            flipped[rng.randrange(len(flipped))] ^= True
            answer = solution_text(names, flipped)
        elif 0.65 <= kind < 0.80:
            answer = truth.replace(" is a knight", " is a knight or knave", 1) if rng.random() < 0.5 \
                else "\n".join(truth.splitlines()[:-1])
        response = f"<think>{think}</think>\n<answer>{answer}</answer><|im_end|>"
        if kind >= 0.80:
            response = rng.choice([
                f"{think}\n<answer>{answer}</answer>",
                f"<think>{think}</think>\n{answer}",
                f"<think>{think}<answer>{answer}</answer></think>",
                f"<think>{think}</think><answer>{answer}</answer>\nHope this helps!",
            ])
        corpus.append((response, truth))
    return corpus


# ---- Baseline, for comparison only: the same rules written the straightforward way, as the
# reference reward is written: pattern strings built on every call and handed to re.findall /
# re.search (so each call pays re's compile-cache lookup), one search per name, the solution
# text re-parsed on every call.
def naive_baseline_score(response: str, truth: str) -> float:
    people = []
    for line in truth.split("\n"):
        m = re.match(r"\((\d+)\)\s*(.+?)\s+is\s+a\s+(knight|knave)", line.strip(), re.IGNORECASE)
        people.append((m.group(2), m.group(3).lower() == "knight"))
    text = re.sub(r"(?:\s*(?:<\|im_end\|>|<\|endoftext\|>|</s>|<\|eot_id\|>))*\s*$", "", response)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        if len(re.findall(re.escape(tag), text)) != 1:
            return -3.0
    m = re.fullmatch(r"\s*<think>(.*)</think>\s*<answer>(.*)</answer>", text, re.DOTALL)
    if m is None:
        return -3.0
    block = m.group(2)
    role = r"[Kk][Nn](?:[Ii][Gg][Hh][Tt]|[Aa][Vv][Ee])"
    if len(re.findall(rf"(?<!\w){role}[Ss]?(?!\w)", block)) != len(people):
        return -1.0
    right = 0
    for name, is_knight in people:
        if len(re.findall(rf"(?<!\w){re.escape(name)}(?!\w)", block)) != 1:
            return -1.0
        claim = re.search(rf"(?<!\w){re.escape(name)}\s+[Ii][Ss]\s+[Aa]\s+({role})(?!\w)", block)
        if claim is None:
            return -1.0
        right += (claim.group(1).lower() == "knight") == is_knight
    return 3.0 if right == len(people) else -0.5


def rate(fn, corpus, repeats: int = 3, cold: bool = True) -> float:
    best = float("inf")
    for _ in range(repeats):
        # Every response in the corpus belongs to a different puzzle: a cold pass starts with an
        # empty solution-parse cache, so parsing is paid once per response, as in the baseline.
        if cold:
            _parse_solution_text.cache_clear()
        start = time.perf_counter()
        for response, truth in corpus:
            fn(response, truth)
        best = min(best, time.perf_counter() - start)
    return len(corpus) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core

    corpus = make_corpus(args.n, args.seed)
    mean_chars = sum(len(r) for r, _ in corpus) / len(corpus)
    verdicts: dict[float, int] = {}
    for response, truth in corpus:
        score = score_response(response, truth)["score"]
        if score != naive_baseline_score(response, truth):
            raise SystemExit(f"scorers disagree on: {response!r}")
        verdicts[score] = verdicts.get(score, 0) + 1

    ground_truths = [{"solution_text_format": truth, "statements": ""} for _, truth in corpus]
    verl_corpus = list(zip((r for r, _ in corpus), ground_truths))
    ours = rate(lambda r, t: score_response(r, t), corpus)
    verl = rate(lambda r, gt: compute_score("kk_logic", r, gt), verl_corpus)
    naive = rate(naive_baseline_score, corpus)
    # In GRPO the n completions of a prompt share one solution text, so its parse is cached.
    warm = rate(lambda r, t: score_response(r, t), corpus, cold=False)

    print(f"corpus: {len(corpus)} responses, mean {mean_chars:.0f} chars, seed {args.seed}; "
          f"totals {dict(sorted(verdicts.items(), reverse=True))}; baseline agrees on all")
    print(f"score_response (cold parse)   {ours:>9,.0f} responses/s")
    print(f"compute_score  (cold parse)   {verl:>9,.0f} responses/s")
    print(f"score_response (cached parse) {warm:>9,.0f} responses/s")
    print(f"naive baseline                {naive:>9,.0f} responses/s")
    print(f"speed-up over baseline (cold) {ours / naive:>9.1f}x")

    n_long = max(1, args.n // 100)
    long_corpus = make_corpus(n_long, args.seed, think_chars=(120_000, 160_000))
    long_mean = sum(len(r) for r, _ in long_corpus) / len(long_corpus)
    short_cps = rate(lambda r, t: score_response(r, t), corpus) * mean_chars
    long_cps = rate(lambda r, t: score_response(r, t), long_corpus) * long_mean
    print(f"length scaling: {short_cps / 1e6:.1f}M chars/s at {mean_chars:,.0f} chars, "
          f"{long_cps / 1e6:.1f}M chars/s at {long_mean:,.0f} chars ({n_long} responses): "
          f"ratio {long_cps / short_cps:.2f}")


if __name__ == "__main__":
    main()
