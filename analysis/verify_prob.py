"""Verify-token probability: how much the model wants to verify at its decision points.

Decision points of a response (token positions whose next token the model chooses):

* step_start:        the position before a step's first token (see `analysis.steps`),
* before_think_end:  the position before `</think>`: verify once more, or stop thinking,
* after_conclusion:  right after an "X is a knight/knave" conclusion (with its full stop).

At each point we read, through the logit lens (final norm + unembedding applied to every
decoder layer's residual output; at the last layer this is exactly the model's logits),

* the probability mass of the first tokens of verify-type continuations (verify, check,
  recheck, wait, 验证, 检查, 等等, each with and without a leading space or newline) and of
  control connectives (so, therefore, now, thus, 所以, 因此, 现在),
* and, at the last layer only, the exact log-probability of canonical phrases ("Let me
  verify", "Wait", ...) by teacher forcing from the point's KV cache (at every
  before_think_end point and a few evenly spaced others per context: `phrase_points`).

Two kinds of contexts:

* fixed: the same token ids for every checkpoint, built from the puzzles of the puzzle set and a
  canonical trace template and cached once per tokenizer identity, so differences between
  checkpoints are differences of the model alone;
* own: each checkpoint's own puzzle-set generations (prompt ids + the response text
  re-tokenized, so that steps map to tokens through the offset mapping).

Values are averaged per puzzle; 95% intervals are percentile bootstraps over puzzles.
"""

from __future__ import annotations

import bisect
import inspect
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from analysis.harness import Analysis, AnalysisContext, HarnessError, register_analysis, tokenizer_identity
from analysis.steps import split_steps, think_span, token_offsets
from train.kk import Puzzle, evaluate, statement_text
from train.layout import decoder_layers, decoder_layout, final_norm, unembedding

KINDS = ("step_start", "before_think_end", "after_conclusion")
VERIFY_CUES = ("verify", "Verify", "check", "Check", "recheck", "Recheck", "double-check", "Double-check",
               "wait", "Wait", "验证", "检查", "等等")
CONTROL_CUES = ("so", "So", "therefore", "Therefore", "now", "Now", "thus", "Thus", "所以", "因此", "现在")
PHRASES = ("Let me verify", "Let's verify", "Let me check", "Wait", "But wait", "Let me double-check",
           "验证一下", "等等")
LEADS = ("", " ", "\n", "\n\n")
TEMPLATE_VERSION = 1

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
_CONCLUSION = re.compile(
    r"\b([A-Z][a-z]+)(?:\s+(?:is|must be|has to be|is definitely|is indeed|is therefore|is thus|is also)"
    r"\s+an?\s+(?:knight|knave)\b|\s*是(?:骑士|无赖|knight|knave))([.!。]?)")
_HYPOTHETICAL = re.compile(r"\b(?:if|assum\w*|suppos\w*|whether|that|says?|said|claim\w*|stated?|thinks?)\b|假设|如果",
                           re.IGNORECASE)
_QUOTES = re.compile(r"[\"“”]")


class VerifyProbError(HarnessError):
    pass


# --------------------------------------------------------------------------- token sets

def cue_first_tokens(tokenizer: Any, cues: Sequence[str], leads: Sequence[str] = LEADS,
                     min_chars: int = 3) -> list[int]:
    """Ids of the first content token of each cue after each lead.

    A leading token that is only whitespace is skipped (it is not a cue). A first token
    that is a byte fragment of a character, or shorter than `min_chars` letters while the
    cue is longer (e.g. "w" of "wait" in a small vocabulary), is too generic and dropped.
    """
    out: set[int] = set()
    for cue in cues:
        for lead in leads:
            ids = tokenizer(lead + cue, add_special_tokens=False)["input_ids"]
            first = next((i for i in ids if tokenizer.decode([i]).strip()), None)
            if first is None:
                continue
            piece = tokenizer.decode([first])
            core = piece.strip()
            if "\ufffd" in piece:
                continue
            if len(core) < min(min_chars, len(cue)) and not _CJK.search(core):
                continue
            out.add(int(first))
    return sorted(out)


def token_sets(tokenizer: Any) -> dict[str, list[int]]:
    """verify and control first-token sets; a token in both counts for neither."""
    verify = set(cue_first_tokens(tokenizer, VERIFY_CUES))
    control = set(cue_first_tokens(tokenizer, CONTROL_CUES))
    both = verify & control
    return {"verify": sorted(verify - both), "control": sorted(control - both)}


# --------------------------------------------------------------------------- decision points

@dataclass(frozen=True)
class DecisionPoint:
    pos: int                 # position in the full token sequence whose next token is chosen
    kinds: tuple[str, ...]
    lead: str                # whitespace the actual next token starts with (phrases get it too)


def thin(points: Sequence[DecisionPoint], n: int) -> list[int]:
    """Indices of at most `n` points (before_think_end ones always), the rest evenly spaced."""
    keep = [i for i, p in enumerate(points) if "before_think_end" in p.kinds]
    rest = [i for i, p in enumerate(points) if "before_think_end" not in p.kinds]
    room = max(n - len(keep), 0)
    if len(rest) > room:
        picks = np.linspace(0, len(rest) - 1, room).round().astype(int) if room else []
        rest = [rest[j] for j in sorted(set(int(j) for j in picks))]
    return sorted(keep + rest)


def conclusions(text: str, span: tuple[int, int]) -> list[int]:
    """End offsets (after a full stop, if one follows) of "X is a knight/knave" conclusions in
    text[span], skipping hypotheses ("if X is a knight"), reported speech and quotes."""
    lo, hi = span
    ends = []
    for m in _CONCLUSION.finditer(text, lo, hi):
        sentence_start = max(text.rfind(c, lo, m.start()) for c in ".!?\n:。！？；;")
        clause = text[max(sentence_start + 1, lo):m.start()]
        if _HYPOTHETICAL.search(clause):
            continue
        if len(_QUOTES.findall(text, lo, m.start())) % 2:
            continue
        ends.append(m.end())
    return ends


def decision_points(prompt_ids: Sequence[int], response: str, tokenizer: Any, *,
                    max_points: int = 48, max_tokens: int = 4096) -> tuple[list[int], list[DecisionPoint]]:
    """The token ids of prompt + response and the response's decision points.

    The response is tokenized on its own (so its character offsets map to tokens) and
    appended to `prompt_ids`. The sequence is cut at `max_tokens`; with more than
    `max_points` points, every before_think_end point is kept and the rest evenly thinned.
    """
    enc = tokenizer(response, add_special_tokens=False)
    resp_ids = list(enc["input_ids"])
    offsets = token_offsets(response, tokenizer)
    ends = [e for _, e in offsets]
    P = len(prompt_ids)
    ids = list(prompt_ids) + resp_ids
    span = think_span(response)

    def token_at(char: int) -> int:          # index of the response token holding `char`
        return bisect.bisect_right(ends, char)

    kinds: dict[int, set[str]] = defaultdict(set)
    for st in split_steps(response, offsets=offsets, span=span):
        kinds[P + st.tok_start - 1].add("step_start")
    close = response.find("</think>", span[0])
    if close >= 0:
        kinds[P + token_at(close) - 1].add("before_think_end")
    for end in conclusions(response, span):
        kinds[P + token_at(end - 1)].add("after_conclusion")

    n = min(len(ids), max_tokens)
    ids = ids[:n]
    points = []
    for p in sorted(p for p in kinds if 0 <= p < n):
        nxt = tokenizer.decode([ids[p + 1]]) if p + 1 < n else ""
        lead = nxt[:len(nxt) - len(nxt.lstrip())]
        points.append(DecisionPoint(pos=p, kinds=tuple(k for k in KINDS if k in kinds[p]), lead=lead))
    return ids, [points[i] for i in thin(points, max_points)]


# --------------------------------------------------------------------------- fixed contexts

def canonical_trace(p: Puzzle) -> str:
    """A deterministic, correct reasoning trace for a puzzle: each person's statement, its
    truth value under the solution, the conclusion, then a stage summary."""
    lines = ["Let's analyze each statement in turn."]
    for i, name in enumerate(p.names):
        stmt = statement_text(p.statements[i], p.names)
        truth = evaluate(p.statements[i], p.solution)
        role = "knight" if p.solution[i] else "knave"
        lines.append(f'{name} says: "{stmt}." Under our analysis this statement is '
                     f'{"true" if truth else "false"}. So {name} is a {role}.')
    lines.append(f"Now we have determined the roles of all {p.people} people.")
    return "\n".join(lines)


def fixed_response(p: Puzzle, prompt: str) -> str:
    opener = "" if prompt.rstrip().endswith("<think>") else "<think>"
    return (f"{opener}{canonical_trace(p)}\n</think>\n<answer>\n{p.solution_text_format}\n</answer>")


def build_fixed_contexts(tokenizer: Any, puzzles: Sequence[Puzzle], prompt_style: str, *,
                         max_points: int = 48, max_tokens: int = 4096) -> list[dict]:
    """Fixed contexts as JSON-able records: puzzle id, token ids, decision points."""
    from train.generate import render_prompts

    prompts = render_prompts(tokenizer, puzzles, prompt_style)
    out = []
    for p, prompt in zip(puzzles, prompts):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids, points = decision_points(prompt_ids, fixed_response(p, prompt), tokenizer,
                                      max_points=max_points, max_tokens=max_tokens)
        out.append({"puzzle_id": p.id, "people": p.people, "ids": ids,
                    "points": [{"pos": d.pos, "kinds": list(d.kinds), "lead": d.lead} for d in points]})
    return out


# --------------------------------------------------------------------------- model readout

@dataclass
class LensReadout:
    masses: dict[str, np.ndarray]     # token-set name -> (layers, points) probability mass
    final_logits: Any                 # (points, vocab) model logits at the points
    cache: Any                        # the context's KV cache (None unless asked for)


def logit_lens(lm: Any, ids: Sequence[int], positions: Sequence[int], sets: dict[str, Sequence[int]],
               *, keep_cache: bool = False) -> LensReadout:
    """One forward pass through nnsight reading every decoder layer's residual output at
    `positions`, then final norm + unembedding per layer; mass of each token set."""
    import torch

    hf = lm._module
    decoder_layout(hf, needs=("final_norm", "unembedding"), what="the logit lens", error=VerifyProbError)
    norm, head = final_norm(hf), unembedding(hf)
    device = next(hf.parameters()).device
    x = torch.tensor([list(ids)], device=device)
    pos = torch.tensor(list(positions), device=device, dtype=torch.long)
    resid: list[Any] = []
    # Only the decision points' logits are needed: skip the unembedding of every other position.
    extra = {"logits_to_keep": pos} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}
    # Modules must be read in forward order; a decoder layer's .output is the hidden state.
    with torch.no_grad(), lm.trace(x, use_cache=keep_cache, **extra):
        for layer in decoder_layers(lm):
            resid.append(layer.output[0, pos].save())
        out = lm.output.save()
    masses = {name: np.zeros((len(resid), len(pos))) for name in sets}
    index = {name: torch.tensor(list(t), device=device, dtype=torch.long) for name, t in sets.items()}
    with torch.no_grad():
        for layer, h in enumerate(resid):
            logp = head(norm(h)).float().log_softmax(-1)
            for name, idx in index.items():
                if len(idx):
                    masses[name][layer] = logp[:, idx].logsumexp(-1).exp().cpu().numpy()
    final = out.logits[0] if extra else out.logits[0, pos]
    return LensReadout(masses=masses, final_logits=final.float(),
                       cache=out.past_key_values if keep_cache else None)


def phrase_logprobs(hf: Any, readout: LensReadout, points: Sequence[DecisionPoint],
                    phrase_ids: dict[str, list[list[int]]]) -> np.ndarray:
    """(points, phrases) exact log P(phrase | context up to the point), by teacher forcing.

    phrase_ids maps a point's lead to the token ids of each phrase after that lead. Per
    point, the context's KV cache is cropped to the point (latest point first, so cropping
    only ever shortens it) and all phrases go through the model as ONE sequence with a
    block-causal attention mask: each phrase token sees the context and the earlier tokens
    of its own phrase, at the positions it would have right after the point. This costs one
    short forward per point and no copy of the cache.
    """
    import torch

    cache = readout.cache
    n_phr = len(next(iter(phrase_ids.values())))
    out = np.zeros((len(points), n_phr))
    logp0 = readout.final_logits.log_softmax(-1)
    device = next(hf.parameters()).device
    dtype = next(hf.parameters()).dtype
    for i in sorted(range(len(points)), key=lambda i: -points[i].pos):
        pt = points[i]
        seqs = phrase_ids[pt.lead]
        first = torch.tensor([s[0] for s in seqs], device=logp0.device)
        total = logp0[i, first].double().cpu().numpy()
        rest = [s for s in seqs if len(s) > 1]
        if rest:
            ctx_len = pt.pos + 1
            cache.crop(ctx_len)
            flat, positions, starts = [], [], []
            for s in seqs:
                starts.append(len(flat))
                flat += s
                positions += range(ctx_len, ctx_len + len(s))
            T = len(flat)
            allowed = torch.zeros((T, ctx_len + T), dtype=torch.bool, device=device)
            allowed[:, :ctx_len] = True
            for start, s in zip(starts, seqs):
                block = torch.ones((len(s), len(s)), dtype=torch.bool, device=device).tril()
                allowed[start:start + len(s), ctx_len + start:ctx_len + start + len(s)] = block
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
            mask.masked_fill_(~allowed, torch.finfo(dtype).min)
            with torch.no_grad():
                logits = hf(input_ids=torch.tensor([flat], device=device),
                            position_ids=torch.tensor([positions], device=device),
                            attention_mask=mask[None, None], past_key_values=cache, use_cache=True).logits[0]
            logp = logits.float().log_softmax(-1)
            for j, (start, s) in enumerate(zip(starts, seqs)):
                for k in range(1, len(s)):
                    total[j] += float(logp[start + k - 1, s[k]])
        out[i] = total
    return out


def score_context(lm: Any, tokenizer: Any, ids: Sequence[int], points: Sequence[DecisionPoint],
                  sets: dict[str, Sequence[int]], phrases: Sequence[str] = PHRASES,
                  phrase_points: int | None = None) -> list[dict]:
    """Per decision point: kinds, per-layer verify and control masses, and phrase log-probs
    (at every point, or at `phrase_points` of them chosen by `thin`; None elsewhere)."""
    if not points:
        return []
    readout = logit_lens(lm, ids, [p.pos for p in points], sets, keep_cache=bool(phrases))
    phr: dict[int, list[float]] = {}
    if phrases:
        chosen = thin(points, phrase_points) if phrase_points is not None else list(range(len(points)))
        sub = [points[i] for i in chosen]
        sub_readout = LensReadout(masses={}, final_logits=readout.final_logits[chosen], cache=readout.cache)
        phrase_ids = {lead: [tokenizer(lead + ph, add_special_tokens=False)["input_ids"] for ph in phrases]
                      for lead in sorted({p.lead for p in sub})}
        values = phrase_logprobs(lm._module, sub_readout, sub, phrase_ids)
        phr = {i: values[k].tolist() for k, i in enumerate(chosen)}
    return [{"kinds": list(p.kinds),
             "verify": readout.masses["verify"][:, i].tolist(),
             "control": readout.masses["control"][:, i].tolist(),
             "phrases": phr.get(i)} for i, p in enumerate(points)]


# --------------------------------------------------------------------------- statistics

def bootstrap_ci(values: Any, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[Any, Any, Any]:
    """Mean and percentile-bootstrap interval over the first axis (puzzles) of `values`
    (shape (n,) or (n, k)); seeded, so the same numbers give the same interval."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    mean = v.mean(axis=0)
    if len(v) == 1:
        return mean, mean.copy(), mean.copy()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    means = v[idx].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha], axis=0)
    return mean, lo, hi


def summarize(contexts: Sequence[dict], *, n_phrases: int, n_boot: int = 1000, seed: int = 0) -> dict:
    """Bootstrap summaries over puzzles, per decision-point kind (and "all").

    contexts: [{"puzzle_id", "points": score_context rows}].
    """
    out: dict[str, Any] = {"n_contexts": len(contexts), "n_points": {}, "verify": {}, "control": {},
                           "verify_share": {}, "phrases": {}}
    for kind in KINDS + ("all",):
        per_puzzle = defaultdict(list)
        for c in contexts:
            rows = [r for r in c["points"] if kind == "all" or kind in r["kinds"]]
            if not rows:
                continue
            v = np.array([r["verify"] for r in rows])
            k = np.array([r["control"] for r in rows])
            per_puzzle["verify"].append(v.mean(0))
            per_puzzle["control"].append(k.mean(0))
            per_puzzle["verify_share"].append((v / np.maximum(v + k, 1e-30)).mean(0))
            scored = [r["phrases"] for r in rows if r.get("phrases")]
            if n_phrases and scored:
                per_puzzle["phrases"].append(np.array(scored).mean(0))
        out["n_points"][kind] = sum(1 for c in contexts for r in c["points"] if kind == "all" or kind in r["kinds"])
        for key, values in per_puzzle.items():
            mean, lo, hi = bootstrap_ci(np.array(values), n_boot=n_boot, seed=seed)
            out[key][kind] = {"mean": mean.tolist(), "lo": lo.tolist(), "hi": hi.tolist(), "n_puzzles": len(values)}
    return out


# --------------------------------------------------------------------------- plug-in

@register_analysis
class VerifyProbAnalysis(Analysis):
    """Verify-token probability per layer at decision points, on fixed and own contexts."""

    name = "verify_prob"
    title = "Verify-token probability"
    order = 30
    uses_generations = True
    uses_model = True

    def __init__(self, max_points: int = 48, phrase_points: int = 6, max_tokens: int = 4096, n_boot: int = 1000,
                 seed: int = 0, own: bool = True):
        self.max_points, self.phrase_points, self.max_tokens = int(max_points), int(phrase_points), int(max_tokens)
        self.n_boot, self.seed, self.own = int(n_boot), int(seed), bool(own)
        if self.max_points < 1 or self.phrase_points < 0 or self.max_tokens < 8 or self.n_boot < 1:
            raise VerifyProbError("verify_prob options: max_points >= 1, phrase_points >= 0, max_tokens >= 8, "
                                  "n_boot >= 1")

    def params(self) -> dict:
        return {"max_points": self.max_points, "phrase_points": self.phrase_points, "max_tokens": self.max_tokens,
                "n_boot": self.n_boot,
                "seed": self.seed, "own": self.own, "cues": [VERIFY_CUES, CONTROL_CUES], "phrases": PHRASES,
                "leads": LEADS, "template": TEMPLATE_VERSION}

    def fixed_contexts(self, ctx: AnalysisContext) -> list[dict]:
        """Token ids shared by every checkpoint with this tokenizer (cached once)."""
        style = ctx.config.generation.prompt_style
        key = {"tokenizer": tokenizer_identity(ctx.tokenizer), "puzzles": ctx.config.puzzles.params(),
               "prompt_style": style, "max_points": self.max_points, "max_tokens": self.max_tokens,
               "template": TEMPLATE_VERSION}
        return ctx.shared_get_or_compute(
            "verify_prob_contexts", key,
            lambda: build_fixed_contexts(ctx.tokenizer, ctx.puzzles, style,
                                         max_points=self.max_points, max_tokens=self.max_tokens))

    def own_contexts(self, ctx: AnalysisContext) -> list[dict]:
        out = []
        for rec, p, prompt in ctx.prompted_generations():
            prompt_ids = ctx.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids, points = decision_points(prompt_ids, rec["text"], ctx.tokenizer,
                                          max_points=self.max_points, max_tokens=self.max_tokens)
            out.append({"puzzle_id": p.id, "people": p.people, "ids": ids,
                        "points": [{"pos": d.pos, "kinds": list(d.kinds), "lead": d.lead} for d in points]})
        return out

    def _score(self, ctx: AnalysisContext, contexts: list[dict], sets: dict, label: str) -> list[dict]:
        lm = ctx.require_model()
        task = ctx.progress.add_task(f"verify-prob ({label})", total=len(contexts)) if ctx.progress else None
        scored = []
        for c in contexts:
            points = [DecisionPoint(pos=d["pos"], kinds=tuple(d["kinds"]), lead=d["lead"]) for d in c["points"]]
            scored.append({"puzzle_id": c["puzzle_id"],
                           "points": score_context(lm, ctx.tokenizer, c["ids"], points, sets,
                                                   phrase_points=self.phrase_points)})
            if task is not None:
                ctx.progress.advance(task)
        if task is not None:
            ctx.progress.remove_task(task)
        return scored

    def run(self, ctx: AnalysisContext) -> dict:
        ctx.require_model()
        sets = token_sets(ctx.tokenizer)
        if not sets["verify"]:
            raise VerifyProbError(f"{ctx.checkpoint.id}: no verify cue has a usable first token in this vocabulary")
        result: dict[str, Any] = {
            "n_layers": decoder_layout(ctx.hf_model).n_layers,
            "verify_tokens": [ctx.tokenizer.decode([i]) for i in sets["verify"]],
            "control_tokens": [ctx.tokenizer.decode([i]) for i in sets["control"]],
            "phrases": list(PHRASES),
        }
        sources = {"fixed": self.fixed_contexts(ctx)}
        if self.own:
            sources["own"] = self.own_contexts(ctx)
        for label, contexts in sources.items():
            scored = self._score(ctx, contexts, sets, label)
            result[label] = summarize(scored, n_phrases=len(PHRASES), n_boot=self.n_boot, seed=self.seed)
            result[label]["per_puzzle_final"] = {
                s["puzzle_id"]: float(np.mean([r["verify"][-1] for r in s["points"]])) if s["points"] else None
                for s in scored}
        return result

    # ------------------------------------------------------------------ report
    def report_section(self, result: dict) -> tuple[str, list]:
        import seaborn as sns
        from matplotlib.figure import Figure

        def cell(d: dict | None, layer: int = -1, fmt: str = "{:.4f}") -> str:
            if not d:
                return "–"
            return f"{fmt.format(d['mean'][layer])} [{fmt.format(d['lo'][layer])}, {fmt.format(d['hi'][layer])}]"

        lines = [f"Verify first tokens: {', '.join(repr(t) for t in result['verify_tokens'])}; "
                 f"control: {', '.join(repr(t) for t in result['control_tokens'])}.", "",
                 "Final-layer probability mass at decision points (mean over puzzles, 95% bootstrap interval):", "",
                 "| contexts | kind | points | verify mass | control mass | verify share |",
                 "|---|---|---|---|---|---|"]
        sources = [s for s in ("fixed", "own") if s in result]
        for src in sources:
            r = result[src]
            for kind in KINDS + ("all",):
                lines.append(f"| {src} | {kind} | {r['n_points'].get(kind, 0)} | {cell(r['verify'].get(kind))} "
                             f"| {cell(r['control'].get(kind))} | {cell(r['verify_share'].get(kind), fmt='{:.3f}')} |")
        lines += ["", "Log-probability of canonical phrases by teacher forcing (final layer):", "",
                  "| contexts | kind | " + " | ".join(result["phrases"]) + " |",
                  "|---|---|" + "---|" * len(result["phrases"])]
        for src in sources:
            for kind in KINDS:
                d = result[src]["phrases"].get(kind)
                if d:
                    lines.append(f"| {src} | {kind} | " + " | ".join(f"{m:.2f}" for m in d["mean"]) + " |")

        fig = Figure(figsize=(5.5 * len(sources), 3.6), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(sources), sharey=True))
        palette = sns.color_palette("deep", len(KINDS) + 1)
        for ax, src in zip(axes, sources):
            for color, kind in zip(palette, KINDS + ("all",)):
                d = result[src]["verify"].get(kind)
                if not d:
                    continue
                x = np.arange(len(d["mean"]))
                ax.plot(x, d["mean"], marker="o", ms=3, color=color, label=kind)
                ax.fill_between(x, d["lo"], d["hi"], color=color, alpha=0.2)
            ax.set_yscale("log")
            ax.set_xlabel("layer (logit lens)")
            ax.set_title(f"{src} contexts")
        axes[0].set_ylabel("verify-token probability")
        if axes[-1].get_legend_handles_labels()[0]:
            axes[-1].legend(fontsize=7)
        return "\n".join(lines) + "\n", [("Verify-token probability per layer (logit lens), 95% bootstrap bands", fig)]

    def trend_metrics(self, result: dict) -> dict[str, float]:
        out: dict[str, float] = {}

        def put(label: str, d: dict | None, layer: int = -1) -> None:
            if d:
                out[label] = d["mean"][layer]
                out[label + "@lo"], out[label + "@hi"] = d["lo"][layer], d["hi"][layer]

        put("verify-token prob (fixed contexts)", result["fixed"]["verify"].get("all"))
        put("verify-token prob before </think> (fixed)", result["fixed"]["verify"].get("before_think_end"))
        if "own" in result:
            put("verify-token prob (own generations)", result["own"]["verify"].get("all"))
        phr = result["fixed"]["phrases"].get("before_think_end")
        if phr:
            j = result["phrases"].index("Let me verify")
            out["log P('Let me verify') before </think> (fixed)"] = phr["mean"][j]
        return out
