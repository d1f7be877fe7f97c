"""Which steps matter: resampling importance of each step of a trace (after Bogdan et al.,
"Thought Anchors", 2025).

For the first `max_traces` puzzle-set generations of a checkpoint with steps in their
thinking (`analysis.steps`, up to where the answer starts, at most `max_steps`), the response
is cut at every step boundary: before step 0, before step 1, ..., after the last step (S + 1
prefixes, cut between tokens). From each prefix the checkpoint writes `n_samples` continuations through the
project's seeded generator (`train.generate.generate`: a sample is seeded by (seed, prompt
text, sample index)), at `temperature`, within the response's own token budget (the
generation's max_new_tokens less the prefix's tokens). Each prefix + continuation, the whole
response, is scored with the harness's reward (`analysis.harness.generation_records`), and
P(correct | prefix) is the share of correct ones. The importance of step k is
P(after k) - P(before k): how much writing that step moved the chance of a right answer.

Steps are grouped by kind (`analysis.claims.step_kind`); per kind the mean importance and the
mean |importance| over its steps come with 95% bootstrap intervals over traces (ratio of
sums, `analysis.attention.ratio_bootstrap`).

Link to receiver heads (`analysis.attention`): per trace, the step x step attention of the
checkpoint on the original response; the receiver heads are the `n_receivers` heads with the
highest kurtosis of their vertical scores (mean over the traces); a step's received attention
is its vertical score (the attention it receives from steps more than `p` later) averaged over
those heads. The Spearman correlation of |importance| and received attention is pooled over
steps, with a bootstrap interval over traces.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from analysis.attention import (DEFAULT_P, attention_layout, encode_trace, ratio_bootstrap,
                                receiver_heads, receiver_kurtosis, step_matrices, vertical_scores)
from analysis.claims import STEP_KINDS, step_kinds
from analysis.harness import Analysis, AnalysisContext, HarnessError, generation_records, register_analysis
from train.generate import GenerationOut, generate

NAME = "resampling"
HEADLINE_KINDS = ("case header", "statement check", "contradiction", "verification", "answer-way opening")
BUDGET_STEP = 64          # continuations are generated in groups by budget, rounded up to this


class ResamplingError(HarnessError):
    pass


@dataclass
class Prefixed:
    """One trace cut at its step boundaries."""

    record: dict
    puzzle: Any
    prompt: str
    kinds: list[str]                  # per step
    texts: list[str]                  # per step
    cuts: list[int]                   # S + 1 character offsets into the response
    budgets: list[int]                # S + 1 tokens left for a continuation
    bounds: list[tuple[int, int]]     # absolute token spans of the steps (attention)
    ids: list[int]                    # prompt + response tokens (attention)


def boundary_cuts(steps: Sequence[Any], offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(character offset, tokens before it) of the S + 1 step boundaries of a response whose
    tokens span `offsets`: before the token that opens each step, and after the last step's
    last token. Cuts fall between tokens, so a prefix re-tokenizes as the model wrote it (a cut
    at the step's first character would leave the space of " Zoey" as a token of its own)."""
    if not steps:
        return []
    toks = [st.tok_start for st in steps] + [steps[-1].tok_end]
    return [(offsets[t][0], t) for t in toks[:-1]] + [(offsets[toks[-1] - 1][1], toks[-1])]


def importances(probs: Sequence[float]) -> np.ndarray:
    """Importance of step k from the S + 1 boundary probabilities: P(after k) - P(before k)."""
    return np.diff(np.asarray(probs, dtype=float))


def prefix_probabilities(model: Any, tokenizer: Any, jobs: Sequence[tuple[str, str, int, Any]], *, prompt_style: str,
                         n_samples: int, temperature: float, top_p: float, top_k: int, seed: int, batch_size: int,
                         progress: Any = False) -> tuple[list[float], int]:
    """P(correct | prefix) of each job (prompt, prefix, token budget, puzzle) from `n_samples`
    continuations scored as whole responses; and the number of tokens generated. Jobs are
    generated in a few calls grouped by budget; a continuation is cut at its own budget."""
    probs: list[float] = [0.0] * len(jobs)
    groups: dict[int, list[int]] = {}
    for i, (_, _, budget, _) in enumerate(jobs):
        groups.setdefault(-(-max(budget, 0) // BUDGET_STEP) * BUDGET_STEP, []).append(i)
    n_tokens = 0
    for ceiling, members in sorted(groups.items()):
        if ceiling > 0:
            outs = generate(model, tokenizer, [jobs[i][0] + jobs[i][1] for i in members], max_new_tokens=ceiling,
                            temperature=temperature, top_p=top_p, top_k=top_k, num_samples=n_samples,
                            batch_size=batch_size, seed=seed, progress=progress)
        else:
            outs = [[GenerationOut(text="", n_tokens=0, finished=False)] * n_samples for _ in members]
        for i, samples in zip(members, outs):
            _, prefix, budget, puzzle = jobs[i]
            whole = []
            for o in samples:
                text = o.text
                if o.n_tokens > budget:
                    text = tokenizer.decode(list(o.token_ids[:max(budget, 0)]), skip_special_tokens=True)
                n_tokens += min(o.n_tokens, max(budget, 0))
                whole.append(GenerationOut(text=prefix + text, n_tokens=o.n_tokens, finished=o.finished))
            recs = generation_records([puzzle] * len(whole), whole, prompt_style)
            probs[i] = float(np.mean([r["correct"] for r in recs]))
    return probs, n_tokens


def kind_table(traces: Sequence[dict], *, n_boot: int, seed: int) -> dict[str, dict]:
    """Per step kind: steps, mean importance and mean |importance| over its steps, with 95%
    bootstrap intervals over traces (ratio of sums over traces)."""
    out = {}
    for kind in STEP_KINDS:
        num, absn, den = [], [], []
        for t in traces:
            imp = importances(t["p"])
            mask = np.array([k == kind for k in t["kinds"]], dtype=bool)
            num.append(imp[mask].sum())
            absn.append(np.abs(imp[mask]).sum())
            den.append(float(mask.sum()))
        if sum(den) == 0:
            continue
        num, absn, den = np.array(num), np.array(absn), np.array(den)
        out[kind] = {"n_steps": int(den.sum()), "n_traces": int((den > 0).sum()),
                     "importance": ratio_bootstrap(num, den, n_boot, seed),
                     "abs_importance": ratio_bootstrap(absn, den, n_boot, seed)}
    return out


def pooled_spearman(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], *, n_boot: int, seed: int) -> dict:
    """Spearman correlation of x and y pooled over units (one (x, y) pair of arrays per unit),
    with a percentile bootstrap over units; None where undefined (constant values)."""
    from scipy.stats import spearmanr

    units = [(np.asarray(x, float), np.asarray(y, float)) for x, y in pairs if len(x)]

    def rho(idx: Sequence[int]) -> float:
        x = np.concatenate([units[i][0] for i in idx])
        y = np.concatenate([units[i][1] for i in idx])
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
            return float("nan")
        return float(spearmanr(x[ok], y[ok]).statistic)

    n_points = int(sum(len(x) for x, _ in units))
    whole = rho(range(len(units))) if units else float("nan")
    if not np.isfinite(whole):
        return {"mean": None, "lo": None, "hi": None, "n": n_points, "n_traces": len(units)}
    rng = np.random.default_rng(seed)
    boots = np.array([rho(rng.integers(0, len(units), len(units))) for _ in range(n_boot)])
    lo, hi = np.nanquantile(boots, [0.025, 0.975]) if np.isfinite(boots).any() else (whole, whole)
    return {"mean": whole, "lo": float(lo), "hi": float(hi), "n": n_points, "n_traces": len(units)}


@register_analysis
class ResamplingAnalysis(Analysis):
    """Counterfactual importance of each step of a trace by resampling (see module doc)."""

    name = NAME
    title = "Which steps matter: resampling importance"
    order = 45
    by_default = False      # n_samples continuations per step boundary: run it by name
    version = 1
    uses_generations = True
    uses_model = True

    def __init__(self, n_samples: int = 16, max_traces: int = 8, max_steps: int = 48, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, batch_size: int = 64, receivers: bool = True,
                 p: int = DEFAULT_P, n_receivers: int = 5, max_tokens: int = 2048, n_boot: int = 1000):
        self.n_samples, self.max_traces, self.max_steps = int(n_samples), int(max_traces), int(max_steps)
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), int(top_k)
        self.seed, self.batch_size, self.receivers = int(seed), int(batch_size), bool(receivers)
        self.p, self.n_receivers, self.max_tokens, self.n_boot = int(p), int(n_receivers), int(max_tokens), int(n_boot)
        for option in ("n_samples", "max_traces", "max_steps", "batch_size", "n_receivers", "n_boot"):
            if getattr(self, option) < 1:
                raise ResamplingError(f"--set resampling.{option}={getattr(self, option)}: must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ResamplingError(f"--set resampling.temperature={temperature} top_p={top_p}: need temperature >= 0 "
                                  "and 0 < top_p <= 1")

    def params(self) -> dict:
        return {"n_samples": self.n_samples, "max_traces": self.max_traces, "max_steps": self.max_steps,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                "receivers": self.receivers, "p": self.p, "n_receivers": self.n_receivers,
                "max_tokens": self.max_tokens, "n_boot": self.n_boot}

    def prefixed(self, ctx: AnalysisContext) -> list[Prefixed]:
        """The first `max_traces` generations with steps, cut at their step boundaries."""
        budget = ctx.config.generation.max_new_tokens
        out = []
        for rec, puzzle, prompt in ctx.prompted_generations():
            if len(out) == self.max_traces:
                break
            trace = encode_trace(ctx.tokenizer, prompt, rec["text"], max_tokens=self.max_tokens)
            kinds = {st.char_start: kind for st, kind in step_kinds(rec["text"], puzzle.names)}
            kept = [(st, b) for st, b in zip(trace.steps, trace.bounds) if st.char_start in kinds][:self.max_steps]
            if not kept:
                continue
            steps = [st for st, _ in kept]
            cuts = boundary_cuts(steps, trace.offsets)
            out.append(Prefixed(record=rec, puzzle=puzzle, prompt=prompt, kinds=[kinds[st.char_start] for st in steps],
                                texts=[st.text for st in steps], cuts=[c for c, _ in cuts],
                                budgets=[budget - n for _, n in cuts], bounds=[b for _, b in kept], ids=trace.ids))
        return out

    def received_attention(self, ctx: AnalysisContext, traces: Sequence[Prefixed]) -> tuple[list, list]:
        """(receiver heads, per trace the attention each step receives from those heads; NaN
        for the last p + 1 steps, which no step more than p later can attend to)."""
        lm = ctx.require_model()
        layout = attention_layout(ctx.hf_model)
        scores, kurts = [], []
        for t in traces:
            _, block = step_matrices(lm, t.ids, t.bounds, layout=layout)
            scores.append(vertical_scores(block, self.p))
            kurts.append(receiver_kurtosis(block, self.p))
        with warnings.catch_warnings():          # a head with no score in any trace stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            heads = receiver_heads(np.nanmean(np.array(kurts), axis=0), self.n_receivers)
        received = []
        for t, v in zip(traces, scores):
            r = np.full(len(t.bounds), np.nan)
            if heads and v.shape[-1]:
                r[:v.shape[-1]] = np.mean([v[l, h] for _, l, h in heads], axis=0)
            received.append(r)
        return heads, received

    def run(self, ctx: AnalysisContext) -> dict:
        ctx.require_model()
        start = time.perf_counter()
        traces = self.prefixed(ctx)
        jobs = [(t.prompt, t.record["text"][:c], b, t.puzzle) for t in traces for c, b in zip(t.cuts, t.budgets)]
        probs, n_tokens = prefix_probabilities(
            ctx.hf_model, ctx.tokenizer, jobs, prompt_style=ctx.config.generation.prompt_style,
            n_samples=self.n_samples, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=self.seed, batch_size=self.batch_size, progress=ctx.progress if ctx.progress is not None else False)
        rows, at = [], 0
        for t in traces:
            n = len(t.cuts)
            rows.append({"puzzle_id": t.puzzle.id, "correct": bool(t.record["correct"]), "kinds": t.kinds,
                         "steps": [s[:80] for s in t.texts], "p": probs[at:at + n]})
            at += n
        result: dict[str, Any] = {
            "n_samples": self.n_samples, "temperature": self.temperature, "n_traces": len(rows),
            "n_steps": int(sum(len(r["kinds"]) for r in rows)), "n_continuations": len(jobs) * self.n_samples,
            "tokens_generated": n_tokens, "traces": rows,
            "by_kind": kind_table(rows, n_boot=self.n_boot, seed=self.seed)}
        if self.receivers and rows:
            heads, received = self.received_attention(ctx, traces)
            for r, rec in zip(rows, received):
                r["received"] = [None if not np.isfinite(x) else round(float(x), 6) for x in rec]
            pairs = [(np.abs(importances(r["p"])), rec) for r, rec in zip(rows, received)]
            result["receivers"] = {"p": self.p, "heads": [{"layer": l, "head": h, "kurtosis": round(k, 4)}
                                                          for k, l, h in heads],
                                   "spearman": pooled_spearman(pairs, n_boot=self.n_boot, seed=self.seed)}
        result["seconds"] = round(time.perf_counter() - start, 1)
        return result

    # ------------------------------------------------------------------ report
    def report_section(self, result: dict) -> tuple[str, list]:
        if not result.get("n_traces"):
            return "No generation had steps in its thinking: nothing to resample.\n", []
        from matplotlib.figure import Figure

        def ci(d: dict | None) -> str:
            return "–" if not d or d.get("mean") is None else f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"

        by_kind = result["by_kind"]
        lines = [f"{result['n_traces']} traces, {result['n_steps']} steps; P(correct) from each of the "
                 f"{result['n_steps'] + result['n_traces']} step boundaries by N = {result['n_samples']} continuations "
                 f"at T = {result['temperature']:g} ({result['n_continuations']} in all, {result['tokens_generated']} "
                 f"tokens, {result['seconds']:.0f} s). Importance of a step = P(correct after it) - P(correct before "
                 "it); mean over the kind's steps [95% bootstrap interval over traces].", "",
                 "| step kind | steps | traces | mean importance | mean abs importance |", "|---|---|---|---|---|"]
        for kind, d in by_kind.items():
            lines.append(f"| {kind} | {d['n_steps']} | {d['n_traces']} | {ci(d['importance'])} | "
                         f"{ci(d['abs_importance'])} |")
        rec = result.get("receivers")
        if rec:
            heads = ", ".join(f"L{h['layer']}H{h['head']}" for h in rec["heads"]) or "none"
            s = rec["spearman"]
            lines += ["", f"Receiver heads (top kurtosis, p = {rec['p']}): {heads}. Spearman correlation of a step's "
                      f"abs importance with the attention it receives from them: {ci(s)} ({s['n']} steps, "
                      f"{s.get('n_traces', 0)} traces)."]
        kinds = list(by_kind)
        fig = Figure(figsize=(max(4.0, 1.1 * len(kinds) + 1.5), 3.4), layout="constrained")
        ax = fig.subplots()
        x = np.arange(len(kinds))
        for offset, key, label in ((-0.2, "importance", "importance"), (0.2, "abs_importance", "abs importance")):
            d = [by_kind[k][key] for k in kinds]
            mean = np.array([v["mean"] if v["mean"] is not None else np.nan for v in d])
            lo = np.array([v["lo"] if v["lo"] is not None else np.nan for v in d])
            hi = np.array([v["hi"] if v["hi"] is not None else np.nan for v in d])
            ax.bar(x + offset, mean, width=0.4, label=label,
                   yerr=np.nan_to_num(np.vstack([mean - lo, hi - mean])), capsize=3)
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.set_xticks(x, kinds, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("Δ P(correct)")
        ax.legend(fontsize=7)
        return "\n".join(lines) + "\n", [("Resampling importance by step kind (95% bootstrap over traces)", fig)]

    def trend_metrics(self, result: dict) -> dict[str, float]:
        out: dict[str, float] = {}

        def put(label: str, d: dict | None) -> None:
            if d and d.get("mean") is not None:
                out[label], out[label + "@lo"], out[label + "@hi"] = d["mean"], d["lo"], d["hi"]

        for kind in HEADLINE_KINDS:
            put(f"resampling: importance of {kind}", (result.get("by_kind", {}).get(kind) or {}).get("importance"))
        put("resampling: abs importance vs receiver attention (Spearman)",
            (result.get("receivers") or {}).get("spearman"))
        return out
