"""pass@k to large k: does RL find new solutions, or sharpen ones the base already had?

Each checkpoint samples `k` answers (default 256, at T=1) for every puzzle of the puzzle set
through evaluation's seeded generator (`train.evaluate.evaluate_model`), scored with the
training reward. From a puzzle's n samples with c correct, pass@j for j = 1..k is
evaluation's unbiased estimator (`train.evaluate.pass_at_k`); curves are means over the
puzzles of a size with 95% bootstrap bands over puzzles.

Against the run's base (the drift analysis's lineage; the base's result is read from the
cache, or computed once and cached under its own key):

* the difference pass@j(checkpoint) - pass@j(base) per j, with a paired bootstrap band over
  puzzles;
* the crossover: the first j at which the base's mean reaches the checkpoint's after the
  checkpoint was ahead at j = 1 (None when it never does; Yue et al. 2025 find one for
  LLMs trained with RLVR);
* new solutions: the share of puzzles the checkpoint solves in some sample that the base
  never solves in its k samples (and the reverse, solutions lost).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from analysis.cache import weights_fingerprint
from analysis.drift import references
from analysis.harness import (Analysis, AnalysisContext, HarnessError, analysis_params, load_model,
                              register_analysis, release_memory)
from analysis.verify_prob import bootstrap_ci
from train.evaluate import EVAL_SEED, EvalError, evaluate_model, make_config, pass_at_k

NAME = "passk"


class PassAtKError(HarnessError):
    pass


def pass_curve(n: int, c: int, k: int) -> np.ndarray:
    """pass@j for j = 1..k of one puzzle with c correct out of n samples."""
    return np.array([pass_at_k(n, c, j) for j in range(1, k + 1)])


def curve_band(counts: list[tuple[int, int]], k: int, *, n_boot: int, seed: int) -> dict:
    """Mean pass@j over puzzles (j = 1..k) with a 95% bootstrap band over puzzles."""
    mean, lo, hi = bootstrap_ci(np.stack([pass_curve(n, c, k) for n, c in counts]), n_boot=n_boot, seed=seed)
    return {"mean": mean.tolist(), "lo": lo.tolist(), "hi": hi.tolist(), "n_puzzles": len(counts)}


def crossover(ours: np.ndarray, base: np.ndarray) -> int | None:
    """The first k (1-based) at which `base` reaches `ours` after `ours` led at k = 1."""
    if not len(ours) or ours[0] <= base[0]:
        return None
    behind = np.nonzero(base >= ours)[0]
    return int(behind[0]) + 1 if len(behind) else None


def share_band(flags: list[bool], *, n_boot: int, seed: int) -> dict:
    mean, lo, hi = bootstrap_ci(np.asarray(flags, dtype=float), n_boot=n_boot, seed=seed)
    return {"mean": float(mean), "lo": float(lo), "hi": float(hi), "n": len(flags)}


def compare_with_base(ours: dict, base: dict, *, n_boot: int, seed: int) -> dict:
    """Difference curves, crossover and new/lost solutions of two results' per-puzzle counts,
    per size and over all puzzles (only puzzles both sampled)."""
    k = min(ours["k"], base["k"])
    ours_c, base_c = ours["counts"], base["counts"]
    shared = [p for p in ours_c if p in base_c]
    if not shared:
        return {"error": "no puzzle in common with the base's result"}
    out: dict[str, Any] = {"k": k, "by_size": {}}
    sizes = sorted({ours_c[p]["people"] for p in shared})
    for label, ids in [("all", shared)] + [(str(s), [p for p in shared if ours_c[p]["people"] == s]) for s in sizes]:
        mine = np.stack([pass_curve(ours_c[p]["n"], ours_c[p]["c"], k) for p in ids])
        theirs = np.stack([pass_curve(base_c[p]["n"], base_c[p]["c"], k) for p in ids])
        mean, lo, hi = bootstrap_ci(mine - theirs, n_boot=n_boot, seed=seed)
        out["by_size"][label] = {
            "difference": {"mean": mean.tolist(), "lo": lo.tolist(), "hi": hi.tolist()},
            "crossover": crossover(mine.mean(0), theirs.mean(0)),
            "new_solutions": share_band([ours_c[p]["c"] > 0 and base_c[p]["c"] == 0 for p in ids],
                                        n_boot=n_boot, seed=seed),
            "lost_solutions": share_band([ours_c[p]["c"] == 0 and base_c[p]["c"] > 0 for p in ids],
                                         n_boot=n_boot, seed=seed),
            "n_puzzles": len(ids)}
    return out


@register_analysis
class PassAtKAnalysis(Analysis):
    """pass@k for k = 1..`k` per puzzle size against the run's base (see module doc)."""

    name = NAME
    title = "pass@k to large k"
    order = 15
    by_default = False      # k samples per puzzle: run it by name
    version = 1
    uses_generations = False
    uses_model = True

    def __init__(self, k: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 max_new_tokens: int = 640, seed: int = EVAL_SEED, batch_size: int = 64, n_boot: int = 1000,
                 registry: str | None = None):
        self.k, self.temperature, self.top_p, self.top_k = int(k), float(temperature), float(top_p), int(top_k)
        self.max_new_tokens, self.seed, self.batch_size = int(max_new_tokens), int(seed), int(batch_size)
        self.n_boot, self.registry = int(n_boot), registry
        if self.k < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.n_boot < 1:
            raise PassAtKError("passk options: k, max_new_tokens, batch_size and n_boot must be at least 1")
        if self.temperature <= 0:
            raise PassAtKError(f"--set passk.temperature={temperature}: pass@k needs sampling (temperature > 0)")

    def params(self) -> dict:
        return {"k": self.k, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed, "n_boot": self.n_boot}

    def measure(self, model: Any, tokenizer: Any, ctx: AnalysisContext) -> dict:
        """Sample k answers per puzzle; per-puzzle counts and the curves per size."""
        puzzles = ctx.puzzles
        try:
            config = make_config(people=sorted({p.people for p in puzzles}), n_per_size=1, mode="sampled",
                                 k=self.k, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                 max_new_tokens=self.max_new_tokens, seed=self.seed, batch_size=self.batch_size,
                                 prompt_style=ctx.config.generation.prompt_style)
        except EvalError as exc:
            raise PassAtKError(f"passk: {exc}") from None
        frame = evaluate_model(model, tokenizer, puzzles, config,
                               progress=ctx.progress if ctx.progress is not None else False).generations
        per_puzzle = frame.assign(ok=frame["answer"] == "correct").groupby("puzzle_id", sort=False).agg(
            people=("people", "first"), n=("ok", "size"), c=("ok", "sum"))
        counts = {pid: {"people": int(r.people), "n": int(r.n), "c": int(r.c)} for pid, r in per_puzzle.iterrows()}
        sizes = sorted({v["people"] for v in counts.values()})
        curves = {"all": curve_band([(v["n"], v["c"]) for v in counts.values()], self.k,
                                    n_boot=self.n_boot, seed=self.seed)}
        for s in sizes:
            curves[str(s)] = curve_band([(v["n"], v["c"]) for v in counts.values() if v["people"] == s], self.k,
                                        n_boot=self.n_boot, seed=self.seed)
        return {"k": self.k, "temperature": self.temperature, "counts": counts, "curves": curves, "sizes": sizes}

    def _base_result(self, ctx: AnalysisContext, base_id: str, base_path) -> dict:
        """The base's own result, from the cache under the key the harness gives it, or
        measured now (the base loaded beside this checkpoint) and cached there."""
        key = analysis_params(self, weights_fingerprint(base_path), ctx.config)
        hit = ctx.cache.get(base_id, self.name, key)
        if isinstance(hit, dict) and "counts" in hit:
            return hit
        model, tokenizer = load_model(base_path, ckpt_id=base_id, device=ctx.config.device, dtype=ctx.config.dtype)
        try:
            result = self.measure(model._module, tokenizer, ctx)
        finally:
            del model
            release_memory()
        ctx.cache.put(base_id, self.name, key, result)
        return result

    def run(self, ctx: AnalysisContext) -> dict:
        ctx.require_model()
        result = self.measure(ctx.hf_model, ctx.tokenizer, ctx)
        base = references(ctx, self.registry)["base"]
        result["base"] = None if base is None or base[0] == ctx.checkpoint.id else base[0]
        if result["base"] is not None:
            result["vs_base"] = compare_with_base(result, self._base_result(ctx, *base),
                                                  n_boot=self.n_boot, seed=self.seed)
        return result

    # ------------------------------------------------------------------ report
    def report_section(self, result: dict) -> tuple[str, list]:
        from matplotlib.figure import Figure

        k, curves, vs = result["k"], result["curves"], result.get("vs_base") or {}
        marks = [j for j in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if j <= k]

        def band(d: dict, j: int) -> str:
            return f"{d['mean'][j - 1]:.2f} [{d['lo'][j - 1]:.2f}, {d['hi'][j - 1]:.2f}]"

        lines = [f"{k} samples per puzzle at T={result['temperature']:g}; pass@k is the "
                 "unbiased estimator, mean over puzzles [95% bootstrap interval over puzzles].", "",
                 "| size | puzzles | " + " | ".join(f"pass@{j}" for j in marks) + " |",
                 "|---|---|" + "---|" * len(marks)]
        for label, d in curves.items():
            lines.append(f"| {label} | {d['n_puzzles']} | " + " | ".join(band(d, j) for j in marks) + " |")
        if vs.get("by_size"):
            lines += ["", f"Against the base ({result['base']}): difference pass@k(this) - pass@k(base) [paired "
                      "bootstrap], the crossover k (the base catches up), and the share of puzzles this checkpoint "
                      f"solves in some sample that the base never solves in {vs['k']} (new), and the reverse (lost).",
                      "", "| size | " + " | ".join(f"Δ pass@{j}" for j in marks if j <= vs["k"])
                      + " | crossover k | new | lost |", "|---|" + "---|" * (len([j for j in marks if j <= vs["k"]]) + 3)]
            for label, d in vs["by_size"].items():
                cross = d["crossover"] if d["crossover"] is not None else f"none up to {vs['k']}"
                nw, lost = d["new_solutions"], d["lost_solutions"]
                lines.append(f"| {label} | " + " | ".join(band(d["difference"], j) for j in marks if j <= vs["k"])
                             + f" | {cross} | {nw['mean']:.2f} [{nw['lo']:.2f}, {nw['hi']:.2f}] | "
                             f"{lost['mean']:.2f} [{lost['lo']:.2f}, {lost['hi']:.2f}] |")
        elif vs.get("error"):
            lines += ["", f"No comparison with the base: {vs['error']}."]
        labels = list(curves)
        fig = Figure(figsize=(3.4 * len(labels), 3.2), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(labels), sharey=True))
        js = np.arange(1, k + 1)
        for ax, label in zip(axes, labels):
            d = curves[label]
            ax.plot(js, d["mean"], label="this checkpoint")
            ax.fill_between(js, d["lo"], d["hi"], alpha=0.25)
            d_vs = vs.get("by_size", {}).get(label)
            if d_vs:
                kb = vs["k"]
                base_mean = np.array(d["mean"][:kb]) - np.array(d_vs["difference"]["mean"])
                ax.plot(js[:kb], base_mean, color="grey", linestyle="--", label="base")
                if d_vs["crossover"]:
                    ax.axvline(d_vs["crossover"], color="red", linewidth=0.8, label="crossover")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("k")
            ax.set_title("all sizes" if label == "all" else f"{label} people", fontsize=9)
        axes[0].set_ylabel("pass@k")
        axes[0].legend(fontsize=7)
        return "\n".join(lines) + "\n", [("pass@k per puzzle size (band: 95% bootstrap over puzzles)", fig)]

    def trend_metrics(self, result: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        k = result["k"]
        for label, d in result["curves"].items():
            name = "" if label == "all" else f", {label} people"
            for j in sorted({1, k}):     # "@" separates a label from its band: "pass at k", not "pass@k"
                out[f"pass at k={j}{name}"] = d["mean"][j - 1]
                out[f"pass at k={j}{name}@lo"] = d["lo"][j - 1]
                out[f"pass at k={j}{name}@hi"] = d["hi"][j - 1]
        vs = (result.get("vs_base") or {}).get("by_size", {}).get("all")
        if vs:
            nw = vs["new_solutions"]
            out[f"puzzles solved that the base never solves in {result['k']}"] = nw["mean"]
            out[f"puzzles solved that the base never solves in {result['k']}@lo"] = nw["lo"]
            out[f"puzzles solved that the base never solves in {result['k']}@hi"] = nw["hi"]
        return out
