"""Cost of the analysis forward pass (nnsight trace reading every decoder layer's residual,
logit lens at the decision points) against a bare forward pass over the same tokens, in the
same run.

    python bench/bench_analysis.py [--model DIR] [--contexts 3] [--repeats 3] [--threads 1]

Model: --model (any HF folder), else SmolLM2-135M-Instruct when
`train.models.resolve_model("smollm2-135m")` gives a folder, else the test fixture's tiny
random Qwen2 (said in the output). Contexts: the
verify-prob fixed contexts (chat prompt + canonical trace) of held-out puzzles of 3, 5 and 7
people. Phases, each timed as the median of --repeats (time.perf_counter, after a warm-up):

  bare          model(input_ids) under no_grad: the forward an analysis cannot avoid
  trace_full    nnsight trace saving every layer's full residual stream (all positions)
  lens          the analysis pass: nnsight trace saving every layer's residual at the
                decision points, then final norm + unembedding + token-set masses per layer
  lens+phrases  lens plus exact phrase log-probabilities by teacher forcing from the KV cache
                at the analysis's default number of points per context (the full per-context
                cost of `verify_prob`)

Peak memory per phase: resident set size sampled every 2 ms by a thread (psutil), peak minus
the RSS at the phase's start; plus the process's ru_maxrss at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def find_model(tmp: Path, given: str | None) -> tuple[Path, str]:
    if given:
        return Path(given), Path(given).name
    try:
        from train.models import resolve_model

        path = resolve_model("smollm2-135m")
        path = Path(getattr(path, "path", path))
        if path.is_dir():
            return path, "SmolLM2-135M-Instruct"
    except Exception as exc:  # absent module or model: fall back to the fixture model
        print(f"note: smollm2-135m unavailable ({type(exc).__name__}: {str(exc)[:80]}); using a tiny random model")
    from tests.conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp / "tiny"), "tiny random Qwen2 (tests.conftest.make_tiny_checkpoint)"


class PeakRSS:
    """Peak resident set size above the level at entry, sampled by a background thread."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc, self.interval = psutil.Process(), interval

    def read(self) -> int:
        return self.proc.memory_info().rss

    def __enter__(self):
        self.start = self.peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="an HF model folder to measure")
    ap.add_argument("--contexts", type=int, default=3, help="fixed contexts (puzzles of 3, 5, 7, ... people)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = ap.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from train.evaluate import heldout_puzzles
    from analysis.harness import load_model
    from analysis.verify_prob import (PHRASES, DecisionPoint, VerifyProbAnalysis, build_fixed_contexts, logit_lens,
                                      score_context, token_sets)

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        path, name = find_model(Path(tmp), args.model)
        lm, tok = load_model(path)
        hf = lm._module
        sizes = [3 + 2 * (i % 3) for i in range(args.contexts)]
        puzzles = [p for n in sorted(set(sizes)) for p in heldout_puzzles([n], sizes.count(n))]
        contexts = build_fixed_contexts(tok, puzzles, "chat")
        sets = token_sets(tok)
        n_layers = len(hf.model.layers)

        def bare(c):
            with torch.no_grad():
                hf(torch.tensor([c["ids"]]))

        def trace_full(c):
            saved = []
            with torch.no_grad(), lm.trace(torch.tensor([c["ids"]])):
                for layer in lm.model.layers:
                    saved.append(layer.output.save())
            return saved

        def points(c):
            return [DecisionPoint(pos=p["pos"], kinds=tuple(p["kinds"]), lead=p["lead"]) for p in c["points"]]

        def lens(c):
            logit_lens(lm, c["ids"], [p["pos"] for p in c["points"]], sets)

        phrase_points = VerifyProbAnalysis().phrase_points

        def lens_phrases(c):
            score_context(lm, tok, c["ids"], points(c), sets, PHRASES, phrase_points=phrase_points)

        phases = {"bare": bare, "trace_full": trace_full, "lens": lens, "lens+phrases": lens_phrases}
        for fn in phases.values():       # warm-up (nnsight compiles its trace code once)
            fn(contexts[0])
        times = {k: [] for k in phases}
        peaks = {k: 0.0 for k in phases}
        for _ in range(args.repeats):
            for key, fn in phases.items():   # interleaved, so drift hits every phase alike
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    for c in contexts:
                        fn(c)
                    times[key].append(time.perf_counter() - t0)
                peaks[key] = max(peaks[key], mem.delta_mb)

        n_tokens = sum(len(c["ids"]) for c in contexts)
        n_points = sum(len(c["points"]) for c in contexts)
        base = statistics.median(times["bare"])
        print(f"model: {name} ({sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M params, {n_layers} layers, "
              f"vocab {hf.config.vocab_size}), fp32, {args.threads} thread(s)")
        print(f"contexts: {len(contexts)} fixed contexts, {n_tokens} tokens, {n_points} decision points; "
              f"median of {args.repeats}")
        print(f"{'phase':<14}{'seconds':>10}{'ratio':>8}{'peak RSS +MB':>14}")
        for key in phases:
            t = statistics.median(times[key])
            print(f"{key:<14}{t:>10.3f}{t / base:>8.2f}{peaks[key]:>14.1f}")
        ratio = statistics.median(times["lens"]) / base
        print(f"analysis forward overhead (lens / bare): {ratio:.2f} (target <= 1.5)"
              f"{'' if ratio <= 1.5 else '  ABOVE TARGET'}")
        print(f"process max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
