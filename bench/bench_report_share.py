"""What one analysis adds to a report's run time, measured against the rest of the report in the
same process, phases alternating, so both see the same machine load.

    python bench/bench_report_share.py --registry ckpts.yaml --ids kk-tiny/stage3/step-000038 \
        [--analysis claims] [--repeats 3] [--puzzle-sizes 3,5] [--puzzles-per-size 8] [--max-new-tokens 640] \
        [--set probes.n_permutations=20 ...]

Each repeat starts from an empty result cache and times

  rest      the report's default analyses without --analysis (generations included: the report
            makes them whether or not the analysis runs)
  analysis  --analysis alone on the cache the rest has just filled

and prints each phase's min / median / max over repeats and the share analysis / rest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", default="ckpts.yaml")
    ap.add_argument("--ids", required=True, help="checkpoint ids, comma-separated")
    ap.add_argument("--analysis", default="claims")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--puzzle-sizes", default="3,5")
    ap.add_argument("--puzzles-per-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=640)
    ap.add_argument("--set", action="append", default=[], help="analysis option, as in `python -m analysis report`")
    args = ap.parse_args()

    from analysis.cache import ResultCache
    from analysis.cli import analysis_options
    from analysis.harness import (GenerationConfig, HarnessConfig, PuzzleSetConfig, analyse_checkpoints,
                                  default_analyses, get_analysis, load_plugins)
    from train.data import parse_people
    from train.registry import Registry

    load_plugins()
    registry = Registry(args.registry)
    checkpoints = [registry.get(i) for i in args.ids.split(",")]
    config = HarnessConfig(puzzles=PuzzleSetConfig(sizes=tuple(parse_people(args.puzzle_sizes)),
                                                   per_size=args.puzzles_per_size),
                           generation=GenerationConfig(max_new_tokens=args.max_new_tokens))
    options = analysis_options(args.set)
    rest = [get_analysis(n, **options.get(n, {})) for n in default_analyses() if n != args.analysis]
    one = [get_analysis(args.analysis, **options.get(args.analysis, {}))]
    times: dict[str, list[float]] = {"rest": [], "analysis": []}
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cache = ResultCache(Path(tmp))
            for phase, analyses in (("rest", rest), ("analysis", one)):
                t0 = time.perf_counter()
                outcomes = analyse_checkpoints(registry, checkpoints, analyses, cache=cache, config=config)
                times[phase].append(time.perf_counter() - t0)
                errors = [o.error for o in outcomes if o.error]
                if errors:
                    sys.exit(f"error: {errors[0]}")
        print(f"repeat {r + 1}: rest {times['rest'][-1]:.1f} s, {args.analysis} {times['analysis'][-1]:.2f} s",
              flush=True)
    for phase, xs in times.items():
        name = args.analysis if phase == "analysis" else f"rest ({len(rest)} analyses)"
        print(f"{name}: min {min(xs):.2f} s, median {statistics.median(xs):.2f} s, max {max(xs):.2f} s")
    shares = [a / b for a, b in zip(times["analysis"], times["rest"])]
    print(f"share {args.analysis} / rest: min {min(shares):.3f}, median {statistics.median(shares):.3f}, "
          f"max {max(shares):.3f} ({len(checkpoints)} checkpoint(s), {args.repeats} repeats)")


if __name__ == "__main__":
    main()
