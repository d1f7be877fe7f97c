"""Generator benchmark: puzzles per second per size, and the uniqueness check against the
reference's 2^N enumeration on the same statements, measured in the same run.

    python bench/bench_generator.py [--count 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.kk import PuzzleGenerator, solve, solve_by_enumeration  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=200, help="puzzles per size")
    ap.add_argument("--max-enum", type=int, default=12, help="largest size checked by enumeration")
    args = ap.parse_args()
    print(f"{'people':>6} {'puzzles/s':>10} {'check ours (ms)':>16} {'check 2^N (ms)':>15} {'ratio':>7}")
    for n in range(2, 13):
        gen = PuzzleGenerator(seed=n)
        t = time.perf_counter()
        puzzles = [gen.generate(n) for _ in range(args.count if n > 2 else 50)]
        rate = len(puzzles) / (time.perf_counter() - t)
        stmts = [p.statements for p in puzzles[:50]]
        ours = best_of(lambda: [solve(s, limit=2) for s in stmts]) / len(stmts)
        if n <= args.max_enum:
            enum = best_of(lambda: [solve_by_enumeration(s, limit=2) for s in stmts], 1) / len(stmts)
            ratio = f"{enum / ours:6.1f}x"
            enum_ms = f"{enum * 1e3:15.3f}"
        else:
            enum_ms, ratio = f"{'-':>15}", "      -"
        print(f"{n:6d} {rate:10.0f} {ours * 1e3:16.3f} {enum_ms} {ratio}")


if __name__ == "__main__":
    main()
