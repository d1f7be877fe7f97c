"""Language-switch neurons: MLP neurons tied to writing Chinese, and whether they cause the switch.

Neurons are the intermediate units of each layer's gated MLP, read through nnsight in
forward order: `mlp.act_fn.output` (a neuron fires when its gate is > 0, i.e. SiLU(gate) > 0)
and `mlp.down_proj.input` (its value act(gate) * up, what the layer writes with).

Token script: a token is Chinese (CJK) when its text holds a CJK character or punctuation,
or is the leading byte fragment of one; English when it holds Latin letters and no CJK;
otherwise (digits, spaces, ASCII punctuation, special tokens) it has no script.
A switch point is a position whose next token is CJK while the latest token with a script
(at or before the position, not counting the tokens of the puzzle's names, which are Latin
in either language: "假设 Zoey 是骑士") is English: the model is about to change language.

Scores, on the selection half of the contexts:

* LAPE (language activation probability entropy, Tang et al. 2024): per neuron the firing
  probabilities on English and on CJK tokens, normalised to a distribution over the two
  languages; its entropy is low for language-specific neurons. Chinese neurons: fire more
  on CJK, fire on at least `min_prob` of CJK tokens, ranked by entropy (lowest first).
* Switch score: AUROC and Cohen's d of the neuron's value at switch points against matched
  English positions (one per switch point: the nearest position of the same context where
  English follows English; with match="boundary", preferably one where a step starts),
  ranked by |AUROC - 0.5| then |d|.

Causal check, on the held-out half: mean-ablate the top-k neurons of each ranking (set the
value at every position to its mean over English tokens) and measure the change of the
probability mass the model puts on CJK tokens at the switch points, against k random
neurons drawn with the same count per layer (seeded, several draws).

Contexts, the first that switches to Chinese often enough: the checkpoint's own generations
of the puzzle set (greedy by default, which seldom switches); its own responses sampled at
T=1 (`samples` per puzzle, seeded), which carry the switches the model makes in its own
style; else fixed contexts (the same token ids for every checkpoint with this tokenizer):
each puzzle of the puzzle set's prompt and a deterministic trace whose lines alternate between English
and Chinese ("假设 Zoey 是骑士。", see `mixed_trace`).

Trend: the overlap (Jaccard) of the per-layer top neurons with the run's base checkpoint
and the previous checkpoint, read from their cached results (computed in step order).
"""

from __future__ import annotations

import inspect
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from analysis.cache import json_safe
from analysis.harness import Analysis, AnalysisContext, HarnessError, register_analysis, tokenizer_identity
from analysis.steps import split_steps, think_span, token_offsets
from train.layout import DecoderLayout, decoder_layers, decoder_layout
from train.kk import Puzzle, evaluate, persons_in

NAME = "neurons"
SOURCES = ("auto", "own", "sampled", "fixed")
EN, ZH, NONE = 0, 1, -1
CJK = re.compile(r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
_LATIN = re.compile(r"[A-Za-z]")
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
TEMPLATE_VERSION = 2


class NeuronsError(HarnessError):
    pass


# --------------------------------------------------------------------------- token scripts

def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _cjk_lead(raw: bytes) -> bool:
    """Does `raw` end in an incomplete UTF-8 sequence of a CJK-range character?"""
    i = len(raw) - 1
    while i >= 0 and raw[i] & 0xC0 == 0x80:      # skip continuation bytes
        i -= 1
    if i < 0 or raw[i] < 0xE0 or raw[i] >= 0xF0:  # no lead byte of a 3-byte sequence
        return False
    # E3..E9: U+3000..U+9FFF; EA..ED: Hangul; EF: compatibility ideographs and fullwidth forms.
    return len(raw) - i < 3 and (0xE3 <= raw[i] <= 0xED or raw[i] == 0xEF)


def script_of_bytes(raw: bytes) -> int:
    text = raw.decode("utf-8", errors="ignore")
    if CJK.search(text) or _cjk_lead(raw):
        return ZH
    if _LATIN.search(text):
        return EN
    return NONE


def token_scripts(tokenizer: Any) -> np.ndarray:
    """(vocab,) int8: ZH, EN or NONE per token id (special and added tokens: NONE)."""
    decoder = _byte_decoder()
    n = len(tokenizer)
    out = np.full(n, NONE, dtype=np.int8)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    toks = tokenizer.convert_ids_to_tokens(list(range(n)))
    for i, t in enumerate(toks):
        if t is None or i in special:
            continue
        m = _BYTE_TOKEN.match(t)
        if m:
            raw = bytes([int(m.group(1), 16)])
        elif all(c in decoder for c in t):
            raw = bytes(decoder[c] for c in t)
        else:
            raw = t.replace("\u2581", " ").encode("utf-8")
        out[i] = script_of_bytes(raw)
    return out


# --------------------------------------------------------------------------- contexts

@dataclass
class Context:
    """One token sequence: its ids, where the response starts, where its steps start and
    which of its tokens spell a person's name (absolute positions)."""

    ids: list[int]
    n_prompt: int
    step_starts: list[int] = field(default_factory=list)
    names: list[int] = field(default_factory=list)
    key: str = ""

    def to_json(self) -> dict:
        return {"ids": self.ids, "n_prompt": self.n_prompt, "step_starts": self.step_starts,
                "names": self.names, "key": self.key}


def make_context(tokenizer: Any, prompt: str, response: str, names: Sequence[str] = (), key: str = "",
                 max_tokens: int = 2048) -> Context:
    """Prompt and response tokenized separately (the response's character offsets map to its
    tokens) and cut at `max_tokens`."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    resp_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    P = len(prompt_ids)
    ids = (list(prompt_ids) + list(resp_ids))[:max_tokens]
    offsets = token_offsets(response, tokenizer)
    starts = [P + s.tok_start for s in split_steps(response, offsets=offsets, span=think_span(response))
              if P + s.tok_start < len(ids)]
    spans = [m.span() for n in names for m in re.finditer(rf"(?<![A-Za-z]){re.escape(n)}(?![A-Za-z])", response)]
    in_name = [P + i for i, (a, b) in enumerate(offsets)
               if P + i < len(ids) and any(a < e and s < b for s, e in spans)]
    return Context(ids=ids, n_prompt=P, step_starts=starts, names=in_name, key=key)


def mixed_trace(p: Puzzle) -> str:
    """A deterministic correct trace in the K&K step style of `train.organism` (one line per
    person: the role, then every statement that can now be evaluated), with the lines of
    odd-numbered people written in Chinese ("假设 Zoey 是骑士。 Zoey 说 Ethan 是骗子，这是真的。")."""
    from train.kk import ROLE_EN, ROLE_ZH, statement_en, statement_zh

    names, stmts = p.names, p.statements
    closes_at: list[list[int]] = [[] for _ in names]
    for j, st in enumerate(stmts):
        closes_at[max(persons_in(st) | {j})].append(j)
    lines = [" ".join(f"{names[j]} says {statement_en(st, names)}." for j, st in enumerate(stmts))]
    for k, name in enumerate(names):
        role = bool(p.solution[k])
        if k % 2:
            parts = [f"假设 {name} 是{ROLE_ZH[True]}。" if role else f"所以 {name} 是{ROLE_ZH[False]}。"]
            parts += [f"{names[j]} 说{statement_zh(stmts[j], names)}，这是{'真' if evaluate(stmts[j], p.solution) else '假'}的。"
                      for j in closes_at[k]]
        else:
            parts = [f"Assume {name} is a {ROLE_EN[True]}." if role else f"So {name} is a {ROLE_EN[False]}."]
            parts += [f"{names[j]} says {statement_en(stmts[j], names)}, which is "
                      f"{'true' if evaluate(stmts[j], p.solution) else 'false'}." for j in closes_at[k]]
        lines.append(" ".join(parts))
    return "\n".join(lines)


def build_fixed_contexts(tokenizer: Any, puzzles: Sequence[Puzzle], prompt_style: str,
                         max_tokens: int = 2048) -> list[dict]:
    from train.generate import render_prompts

    out = []
    for p, prompt in zip(puzzles, render_prompts(tokenizer, puzzles, prompt_style)):
        opener = "" if prompt.rstrip().endswith("<think>") else "<think>\n"
        response = f"{opener}{mixed_trace(p)}\n</think>\n<answer>\n{p.solution_text_format}\n</answer>"
        out.append(make_context(tokenizer, prompt, response, p.names, key=p.id, max_tokens=max_tokens).to_json())
    return out


def position_labels(ctx: Context, scripts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(script of each token, script of the latest token with a script at or before it,
    names skipped); names count as no script in the first array too."""
    s = scripts[np.asarray(ctx.ids, dtype=np.int64)].copy()
    s[[t for t in ctx.names if t < len(s)]] = NONE
    last = np.full(len(s), NONE, dtype=np.int8)
    cur = NONE
    for t in range(len(s)):
        if s[t] != NONE:
            cur = s[t]
        last[t] = cur
    return s, last


MATCHES = ("nearest", "boundary")


def switch_points(ctx: Context, scripts: np.ndarray, match: str = "nearest") -> tuple[list[int], list[int]]:
    """(switch points, matched English positions) of one context, in the response.

    Each switch point gets its own matched position: the nearest position of the same
    context where English follows English ("boundary": preferring those where the next
    token starts a step, which controls for the position type)."""
    s, last = position_labels(ctx, scripts)
    n = len(ctx.ids)
    sw = [t for t in range(max(ctx.n_prompt - 1, 0), n - 1) if s[t + 1] == ZH and last[t] != ZH]
    english = [t for t in range(ctx.n_prompt, n - 1) if s[t + 1] == EN and last[t] == EN]
    starts = set(ctx.step_starts)
    pools = ([t for t in english if t + 1 in starts], english) if match == "boundary" else (english,)
    used: set[int] = set()
    matched = []
    for t in sw:
        for pool in pools:
            free = [u for u in pool if u not in used]
            if free:
                u = min(free, key=lambda u: (abs(u - t), u))
                used.add(u)
                matched.append(u)
                break
    return sw, matched


# --------------------------------------------------------------------------- activations

def _mlp_layout(hf: Any) -> DecoderLayout:
    return decoder_layout(hf, needs=("mlp",), what="neuron analysis", error=NeuronsError)


@dataclass
class NeuronStats:
    """Per (layer, neuron) statistics accumulated over contexts."""

    fire_en: np.ndarray                  # (L, I) firing counts on English tokens
    fire_zh: np.ndarray
    n_en: int
    n_zh: int
    sum_en: np.ndarray                   # (L, I) sum of values on English tokens
    at_switch: list[np.ndarray]          # per switch point: (L, I) values
    at_matched: list[np.ndarray]

    @property
    def mean_en(self) -> np.ndarray:
        return self.sum_en / max(self.n_en, 1)


def collect_stats(lm: Any, contexts: Sequence[Context], scripts: np.ndarray, progress: Any = None,
                  match: str = "nearest") -> NeuronStats:
    """One nnsight pass per context; per layer, reductions are taken inside the pass."""
    import torch

    hf = lm._module
    layout = _mlp_layout(hf)
    L, I = layout.n_layers, layout.d_mlp
    device = next(hf.parameters()).device
    st = NeuronStats(np.zeros((L, I)), np.zeros((L, I)), 0, 0, np.zeros((L, I)), [], [])
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}
    for c in contexts:
        s, _ = position_labels(c, scripts)
        resp = np.arange(len(c.ids)) >= c.n_prompt
        en = torch.tensor(np.nonzero(resp & (s == EN))[0], device=device)
        zh = torch.tensor(np.nonzero(resp & (s == ZH))[0], device=device)
        sw, matched = switch_points(c, scripts, match)
        n_pair = min(len(sw), len(matched))
        pts = torch.tensor(sw[:n_pair] + matched[:n_pair], dtype=torch.long, device=device)
        per_layer = []
        with torch.no_grad(), lm.trace(torch.tensor([c.ids], device=device), use_cache=False, **extra):
            for layer in decoder_layers(lm):
                fired = layer.mlp.act_fn.output[0] > 0
                value = layer.mlp.down_proj.input[0].float()
                red = torch.cat([fired[en].sum(0, keepdim=True).float(), fired[zh].sum(0, keepdim=True).float(),
                                 value[en].sum(0, keepdim=True), value[pts]], 0)
                per_layer.append(red.cpu().save())
        red = torch.stack(per_layer).double().numpy()          # (L, 3 + 2 n_pair, I)
        st.fire_en += red[:, 0]
        st.fire_zh += red[:, 1]
        st.sum_en += red[:, 2]
        st.n_en += len(en)
        st.n_zh += len(zh)
        for j in range(n_pair):
            st.at_switch.append(red[:, 3 + j])
            st.at_matched.append(red[:, 3 + n_pair + j])
        if progress is not None:
            progress()
    return st


# --------------------------------------------------------------------------- scores

def lape_scores(st: NeuronStats) -> dict[str, np.ndarray]:
    """Firing probabilities per language and the LAPE entropy (nats; NaN where it never fires)."""
    p_en = st.fire_en / max(st.n_en, 1)
    p_zh = st.fire_zh / max(st.n_zh, 1)
    tot = p_en + p_zh
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.stack([p_en, p_zh]) / tot
        ent = -np.nansum(np.where(q > 0, q * np.log(q), 0.0), axis=0)
    ent = np.where(tot > 0, ent, np.nan)
    return {"p_en": p_en, "p_zh": p_zh, "entropy": ent}


def auroc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC per column: P(pos > neg) + 0.5 P(pos = neg)."""
    from scipy.stats import rankdata

    n1, n0 = len(pos), len(neg)
    ranks = rankdata(np.concatenate([pos, neg]), axis=0)
    u = ranks[:n1].sum(0) - n1 * (n1 + 1) / 2
    return u / (n1 * n0)


def cohens_d(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    n1, n0 = len(pos), len(neg)
    v = ((n1 - 1) * pos.var(0, ddof=1) + (n0 - 1) * neg.var(0, ddof=1)) / max(n1 + n0 - 2, 1)
    sd = np.sqrt(v)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = (pos.mean(0) - neg.mean(0)) / sd
    return np.where(sd > 0, d, 0.0)


def switch_scores(st: NeuronStats) -> dict[str, np.ndarray] | None:
    if len(st.at_switch) < 2:
        return None
    pos, neg = np.stack(st.at_switch), np.stack(st.at_matched)
    L, I = pos.shape[1:]
    a = auroc(pos.reshape(len(pos), -1), neg.reshape(len(neg), -1)).reshape(L, I)
    d = cohens_d(pos.reshape(len(pos), -1), neg.reshape(len(neg), -1)).reshape(L, I)
    return {"auroc": a, "d": d, "mean_switch": pos.mean(0), "mean_matched": neg.mean(0)}


def rank_lape(lape: dict[str, np.ndarray], min_prob: float) -> list[tuple[int, int]]:
    """Chinese-specific neurons, most specific first: (layer, neuron)."""
    ok = (lape["p_zh"] > lape["p_en"]) & (lape["p_zh"] >= min_prob) & np.isfinite(lape["entropy"])
    ls, ns = np.nonzero(ok)
    keys = np.lexsort((-(lape["p_zh"] - lape["p_en"])[ls, ns], lape["entropy"][ls, ns]))
    return [(int(ls[i]), int(ns[i])) for i in keys]


def rank_switch(sw: dict[str, np.ndarray]) -> list[tuple[int, int]]:
    sep = np.round(np.abs(sw["auroc"] - 0.5), 6).ravel()
    mag = np.abs(sw["d"]).ravel()
    order = np.lexsort((-mag, -sep))
    I = sw["auroc"].shape[1]
    return [(int(i // I), int(i % I)) for i in order]


def per_layer_top(ranked: Sequence[tuple[int, int]], n_layers: int, k: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n_layers)]
    for l, n in ranked:
        if len(out[l]) < k:
            out[l].append(n)
    return out


def jaccard(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float | None:
    sa = {(l, n) for l, ns in enumerate(a) for n in ns}
    sb = {(l, n) for l, ns in enumerate(b) for n in ns}
    if not sa and not sb:
        return None
    return len(sa & sb) / len(sa | sb)


# --------------------------------------------------------------------------- causal check

def cjk_mass(logits, zh_ids) -> Any:
    """Probability mass on the CJK token ids, per row of logits."""
    logp = logits.float().log_softmax(-1)
    return logp[:, zh_ids].logsumexp(-1).exp()


def switch_probability(lm: Any, contexts: Sequence[Context], points: Sequence[Sequence[int]], zh_ids: Sequence[int],
                       ablate: dict[int, tuple[Sequence[int], Sequence[float]]] | None = None) -> np.ndarray:
    """P(next token is CJK) at each context's points, with the neurons of `ablate`
    ({layer: (neurons, values)}) set to the values at every position."""
    import torch

    hf = lm._module
    device = next(hf.parameters()).device
    zh = torch.tensor(list(zh_ids), device=device, dtype=torch.long)
    has_keep = "logits_to_keep" in inspect.signature(hf.forward).parameters
    plan = {l: (torch.tensor(list(ix), device=device, dtype=torch.long),
                torch.tensor(list(v), device=device, dtype=hf.dtype)) for l, (ix, v) in (ablate or {}).items() if len(ix)}
    out = []
    for c, pts in zip(contexts, points):
        if not len(pts):
            continue
        pos = torch.tensor(list(pts), device=device, dtype=torch.long)
        extra = {"logits_to_keep": pos} if has_keep else {}
        with torch.no_grad(), lm.trace(torch.tensor([c.ids], device=device), use_cache=False, **extra):
            for l, layer in enumerate(decoder_layers(lm)):
                if l in plan:
                    ix, v = plan[l]
                    layer.mlp.down_proj.input[0, :, ix] = v
            logits = lm.output.logits[0].save()
        rows = logits if has_keep else logits[pos]
        out.append(cjk_mass(rows, zh).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def ablation_plan(neurons: Sequence[tuple[int, int]], mean_en: np.ndarray) -> dict[int, tuple[list[int], list[float]]]:
    plan: dict[int, tuple[list[int], list[float]]] = {}
    for l, n in neurons:
        ix, v = plan.setdefault(l, ([], []))
        ix.append(n)
        v.append(float(mean_en[l, n]))
    return plan


def random_like(neurons: Sequence[tuple[int, int]], n_neurons: int, rng: random.Random,
                exclude: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """As many random neurons per layer as `neurons` has, avoiding `exclude`."""
    out = []
    for l in sorted({l for l, _ in neurons}):
        need = sum(1 for ll, _ in neurons if ll == l)
        pool = [n for n in range(n_neurons) if (l, n) not in exclude]
        out += [(l, n) for n in rng.sample(pool, min(need, len(pool)))]
    return out


# --------------------------------------------------------------------------- plug-in

def _cached_result(cache: Any, ckpt_id: str, expected: dict) -> dict | None:
    """The newest cached result of this analysis on another checkpoint whose cache key
    matches `expected` in every field but the weights."""
    from analysis.cache import safe_id

    folder = cache.root / safe_id(ckpt_id)
    best, best_time = None, -1.0
    for path in folder.glob(f"{NAME}-*.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            key = record["params"]
            if any(key.get(k) != v for k, v in expected.items()):
                continue
            mtime = path.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if mtime > best_time:
            best, best_time = record["result"], mtime
    return best


@register_analysis
class NeuronsAnalysis(Analysis):
    """Chinese-language and language-switch MLP neurons, with a mean-ablation check."""

    name = NAME
    title = "Language-switch neurons"
    order = 50
    version = 1
    uses_generations = True
    uses_model = True

    def __init__(self, top_per_layer: int = 10, ks: Sequence[int] = (5, 20), n_random: int = 8,
                 min_prob: float = 0.05, min_switch_points: int = 16, min_switch_contexts: int = 4,
                 max_contexts: int = 40, max_tokens: int = 2048, seed: int = 0, source: str = "auto",
                 match: str = "nearest", samples: int = 4, registry: str | None = None):
        if isinstance(ks, (int, float, str)):
            ks = [int(k) for k in str(ks).split(",") if str(k).strip()]
        if source not in SOURCES:
            raise NeuronsError(f"neurons.source must be one of {', '.join(SOURCES)}, not {source!r}")
        if int(samples) < 1:
            raise NeuronsError(f"neurons.samples must be at least 1, not {samples!r}")
        self.samples = int(samples)
        if match not in MATCHES:
            raise NeuronsError(f"neurons match must be one of {', '.join(MATCHES)}, not {match!r}")
        if int(top_per_layer) < 1 or int(n_random) < 1 or any(int(k) < 0 for k in ks) or not 0 <= float(min_prob) <= 1:
            raise NeuronsError("neurons options: top_per_layer >= 1, n_random >= 1, ks >= 0, 0 <= min_prob <= 1")
        self.top_per_layer, self.ks, self.n_random = int(top_per_layer), tuple(int(k) for k in ks), int(n_random)
        self.min_prob, self.min_switch_points = float(min_prob), int(min_switch_points)
        self.min_switch_contexts, self.max_contexts, self.max_tokens = int(min_switch_contexts), int(max_contexts), int(max_tokens)
        self.seed, self.source, self.match, self.registry = int(seed), source, match, registry
        self._seen: dict[str, dict] = {}

    def params(self) -> dict:
        return {"top_per_layer": self.top_per_layer, "ks": list(self.ks), "n_random": self.n_random,
                "min_prob": self.min_prob, "min_switch_points": self.min_switch_points,
                "min_switch_contexts": self.min_switch_contexts, "max_contexts": self.max_contexts,
                "max_tokens": self.max_tokens, "seed": self.seed, "source": self.source, "match": self.match,
                "samples": self.samples, "template": TEMPLATE_VERSION}

    # ------------------------------------------------------------------ contexts
    def fixed_contexts(self, ctx: AnalysisContext) -> list[Context]:
        style = ctx.config.generation.prompt_style
        key = {"tokenizer": tokenizer_identity(ctx.tokenizer), "puzzles": ctx.config.puzzles.params(),
               "prompt_style": style, "max_tokens": self.max_tokens, "template": TEMPLATE_VERSION}
        raw = ctx.shared_get_or_compute("neurons_contexts", key, lambda: build_fixed_contexts(
            ctx.tokenizer, ctx.puzzles, style, max_tokens=self.max_tokens))
        return [Context(**c) for c in raw]

    def own_contexts(self, ctx: AnalysisContext) -> list[Context]:
        return [make_context(ctx.tokenizer, prompt, rec["text"], p.names, key=p.id, max_tokens=self.max_tokens)
                for rec, p, prompt in ctx.prompted_generations()]

    def sampled_contexts(self, ctx: AnalysisContext) -> list[Context]:
        """The checkpoint's own responses to the puzzle set at T=1, `samples` per puzzle."""
        from train.generate import generate, render_prompts

        gen = ctx.config.generation
        prompts = render_prompts(ctx.tokenizer, ctx.puzzles, gen.prompt_style)
        outs = generate(ctx.hf_model, ctx.tokenizer, prompts, max_new_tokens=gen.max_new_tokens, temperature=1.0,
                        num_samples=self.samples, batch_size=gen.batch_size, seed=self.seed,
                        progress=ctx.progress or False)
        return [make_context(ctx.tokenizer, prompt, out.text, p.names, key=f"{p.id}#{j}", max_tokens=self.max_tokens)
                for p, prompt, samples in zip(ctx.puzzles, prompts, outs) for j, out in enumerate(samples)]

    def _enough(self, contexts: Sequence[Context], scripts: np.ndarray) -> bool:
        counts = [len(switch_points(c, scripts)[0]) for c in contexts]
        return sum(counts) >= self.min_switch_points and sum(1 for n in counts if n) >= self.min_switch_contexts

    def choose_contexts(self, ctx: AnalysisContext, scripts: np.ndarray) -> tuple[str, list[Context]]:
        """The first source (own, sampled, fixed; or the one asked for) with enough switches."""
        order = {"auto": ("own", "sampled", "fixed")}.get(self.source, (self.source,))
        make = {"own": self.own_contexts, "sampled": self.sampled_contexts, "fixed": self.fixed_contexts}
        for source in order:
            contexts = make[source](ctx)
            if source == order[-1] or self._enough(contexts, scripts):
                return source, contexts
        raise AssertionError("unreachable")

    def split(self, contexts: Sequence[Context], scripts: np.ndarray) -> tuple[list[Context], list[Context]]:
        """Selection and held-out halves of the contexts with switch points (seeded);
        contexts without any join the selection half."""
        with_sw = [c for c in contexts if switch_points(c, scripts)[0]]
        without = [c for c in contexts if not switch_points(c, scripts)[0]]
        if len(with_sw) < 2:
            raise NeuronsError(f"only {len(with_sw)} context(s) switch to Chinese; need at least 2 "
                               "(one to select neurons, one to test them)")
        rng = random.Random(self.seed)
        order = list(range(len(with_sw)))
        rng.shuffle(order)
        half = len(order) // 2
        held = sorted(order[:half])
        sel = sorted(order[half:])
        select = ([with_sw[i] for i in sel] + without)[:self.max_contexts]
        heldout = [with_sw[i] for i in held][:self.max_contexts]
        return select, heldout

    # ------------------------------------------------------------------ run
    def run(self, ctx: AnalysisContext) -> dict:
        lm = ctx.require_model()
        hf = ctx.hf_model
        layout = _mlp_layout(hf)
        L, I = layout.n_layers, layout.d_mlp
        scripts = token_scripts(ctx.tokenizer)
        zh_ids = np.nonzero(scripts[:hf.get_input_embeddings().weight.shape[0]] == ZH)[0].tolist()
        if not zh_ids:
            raise NeuronsError(f"{ctx.checkpoint.id}: the vocabulary has no CJK token")
        source, contexts = self.choose_contexts(ctx, scripts)
        select, heldout = self.split(contexts, scripts)

        n_tasks = len(select) + len(heldout) * (1 + 2 * len(self.ks) * (1 + self.n_random))
        task = ctx.progress.add_task("neurons", total=n_tasks) if ctx.progress else None

        def tick(n: int = 1) -> None:
            if task is not None:
                ctx.progress.advance(task, n)

        st = collect_stats(lm, select, scripts, progress=tick, match=self.match)
        if st.n_zh == 0 or st.n_en == 0:
            raise NeuronsError(f"{ctx.checkpoint.id}: the selection contexts lack English or CJK tokens")
        lape = lape_scores(st)
        sw = switch_scores(st)
        rankings = {"lape": rank_lape(lape, self.min_prob)}
        if sw is not None:
            rankings["switch"] = rank_switch(sw)

        held_points = [switch_points(c, scripts)[0] for c in heldout]
        base_p = switch_probability(lm, heldout, held_points, zh_ids)
        tick(len(heldout))
        causal: dict[str, Any] = {}
        mean_en = st.mean_en
        for method, ranked in rankings.items():
            causal[method] = {}
            for k in self.ks:
                top = ranked[:k]
                if k and not top:
                    continue
                if not top:  # nothing to ablate: the model is unchanged
                    p_top, rand = base_p, [0.0] * self.n_random
                    tick(len(heldout) * (1 + self.n_random))
                else:
                    p_top = switch_probability(lm, heldout, held_points, zh_ids, ablation_plan(top, mean_en))
                    tick(len(heldout))
                    rand = []
                    for draw in range(self.n_random):
                        rng = random.Random(f"{self.seed}:{method}:{k}:{draw}")
                        pick = random_like(top, I, rng, set(top))
                        p_r = switch_probability(lm, heldout, held_points, zh_ids, ablation_plan(pick, mean_en))
                        rand.append(float((p_r - base_p).mean()))
                        tick(len(heldout))
                delta = float((p_top - base_p).mean())
                causal[method][str(k)] = {
                    "k": len(top), "delta": delta,
                    "relative": delta / float(base_p.mean()) if base_p.mean() > 0 else None,
                    "random": rand, "random_mean": float(np.mean(rand)), "random_min": float(np.min(rand)),
                    "beats_random": bool(delta < min(rand)) if k else False,
                    "share_random_below": float(np.mean([r <= delta for r in rand])),
                    "neurons": [f"L{l}.N{n}" for l, n in top[:20]],
                }
        if task is not None:
            ctx.progress.remove_task(task)

        def lape_row(l: int, n: int) -> dict:
            return {"layer": l, "neuron": n, "entropy": float(lape["entropy"][l, n]), "p_en": float(lape["p_en"][l, n]),
                    "p_zh": float(lape["p_zh"][l, n])}

        def switch_row(l: int, n: int) -> dict:
            return {"layer": l, "neuron": n, "auroc": float(sw["auroc"][l, n]), "d": float(sw["d"][l, n]),
                    "mean_switch": float(sw["mean_switch"][l, n]), "mean_matched": float(sw["mean_matched"][l, n])}

        top_sets = {m: per_layer_top(r, L, self.top_per_layer) for m, r in rankings.items()}
        result: dict[str, Any] = {
            "checkpoint": ctx.checkpoint.id, "source": source, "n_layers": L, "n_neurons": I,
            "n_contexts": {"select": len(select), "heldout": len(heldout)},
            "n_switch_points": {"select": len(st.at_switch), "heldout": int(sum(len(p) for p in held_points))},
            "n_tokens": {"en": st.n_en, "zh": st.n_zh}, "n_cjk_vocab": len(zh_ids),
            "lape": {"n_chinese": len(rankings["lape"]),
                     "n_specific": int(sum(1 for l, n in rankings["lape"] if lape["entropy"][l, n] < 0.3)),
                     "top": [lape_row(l, n) for l, n in rankings["lape"][:20]],
                     "entropy_per_layer": _row_nanmean(np.where(lape["p_zh"] > lape["p_en"], lape["entropy"], np.nan))},
            "switch": {"top": [switch_row(l, n) for l, n in rankings["switch"][:20]],
                       "max_abs_d_per_layer": np.round(np.abs(sw["d"]).max(1), 4).tolist()} if sw is not None else None,
            "top_per_layer": top_sets,
            "baseline_switch_prob": float(base_p.mean()) if len(base_p) else None,
            "causal": causal,
        }
        result["jaccard"] = self._jaccard(ctx, top_sets)
        return json_safe(result)

    def _jaccard(self, ctx: AnalysisContext, top_sets: dict) -> dict:
        from analysis.drift import references

        refs = references(ctx, self.registry)
        out: dict[str, Any] = {}
        expected = {"params": json.loads(json.dumps(self.params())), "version": self.version,
                    "puzzles": ctx.config.puzzles.params(), "generation": ctx.config.generation.params()}
        expected = json.loads(json.dumps(expected))
        for label in ("base", "parent"):
            ref = refs[label]
            if ref is None:
                out[label] = None
                continue
            ref_id = ref[0]
            hit = ({"top_per_layer": top_sets} if ref_id == ctx.checkpoint.id
                   else _cached_result(ctx.cache, ref_id, expected))
            entry: dict[str, Any] = {"id": ref_id}
            for method, sets in top_sets.items():
                other = (hit or {}).get("top_per_layer", {}).get(method)
                entry[method] = jaccard(sets, other) if other is not None else None
            out[label] = entry
        return out

    # ------------------------------------------------------------------ report
    def report_section(self, result: dict) -> tuple[str, list]:
        from matplotlib.figure import Figure

        def f(x: Any, digits: int = 4) -> str:
            return "–" if x is None else f"{x:.{digits}g}"

        src = {"own": "the checkpoint's own generations of the puzzle set",
               "sampled": "the checkpoint's own responses sampled at T=1 (its puzzle-set generations "
                          "switch to Chinese too rarely)",
               "fixed": "fixed contexts with Chinese steps (its own responses switch to Chinese too rarely)",
               }[result["source"]]
        lines = [f"Contexts: {src}; {result['n_contexts']['select']} for selection, {result['n_contexts']['heldout']} "
                 f"held out; {result['n_tokens']['en']} English and {result['n_tokens']['zh']} CJK tokens; "
                 f"{result['n_switch_points']['select']} / {result['n_switch_points']['heldout']} switch points. "
                 f"Held-out P(next token CJK) at switch points: {f(result['baseline_switch_prob'])}.", "",
                 "**Causal check**: mean-ablate the top-k neurons (value set to its English mean) and measure "
                 "the change of P(next token CJK) at held-out switch points, against k random neurons per layer.", "",
                 "| ranking | k | change | relative | random draws (mean, min) | lower than every random draw | neurons |",
                 "|---|---|---|---|---|---|---|"]
        for method, by_k in result["causal"].items():
            for k, r in by_k.items():
                names = ", ".join(r["neurons"][:8]) + (" …" if len(r["neurons"]) > 8 else "")
                lines.append(f"| {method} | {r['k']} | {f(r['delta'])} | {f(r['relative'], 3)} | "
                             f"{f(r['random_mean'])}, {f(r['random_min'])} | {'yes' if r['beats_random'] else 'no'} | {names} |")
        lines += ["", f"Chinese-specific neurons by LAPE: {result['lape']['n_chinese']} fire more on CJK than English "
                  f"(entropy < 0.3 nats: {result['lape']['n_specific']}).", "",
                  "| neuron | LAPE entropy | P(fire | en) | P(fire | zh) |", "|---|---|---|---|"]
        lines += [f"| L{r['layer']}.N{r['neuron']} | {r['entropy']:.3f} | {r['p_en']:.3f} | {r['p_zh']:.3f} |"
                  for r in result["lape"]["top"][:10]]
        if result.get("switch"):
            lines += ["", "Switch neurons (value at switch points vs matched English positions):", "",
                      "| neuron | AUROC | Cohen's d | mean at switch | mean matched |", "|---|---|---|---|---|"]
            lines += [f"| L{r['layer']}.N{r['neuron']} | {r['auroc']:.3f} | {r['d']:.2f} | {r['mean_switch']:.3g} | "
                      f"{r['mean_matched']:.3g} |" for r in result["switch"]["top"][:10]]
        jac = result.get("jaccard") or {}
        parts = [f"{label} {v['id']}: " + ", ".join(f"{m} {f(v.get(m), 3)}" for m in result["top_per_layer"])
                 for label, v in jac.items() if v]
        if parts:
            lines += ["", f"Overlap (Jaccard) of the top {self.top_per_layer} neurons per layer with " + "; ".join(parts) + "."]

        figs = []
        rows = [(m, k, r) for m, by_k in result["causal"].items() for k, r in by_k.items() if r["k"]]
        if rows:
            fig = Figure(figsize=(1.3 * len(rows) + 2.5, 3.4), layout="constrained")
            ax = fig.subplots()
            for i, (m, k, r) in enumerate(rows):
                ax.scatter([i] * len(r["random"]), r["random"], color="grey", s=12, label="random" if i == 0 else None)
                ax.scatter([i], [r["delta"]], color="#c44e52", s=40, marker="D", label="top-k" if i == 0 else None)
            ax.axhline(0, color="black", lw=0.6)
            ax.set_xticks(range(len(rows)), [f"{m}\nk={r['k']}" for m, _, r in rows], fontsize=8)
            ax.set_ylabel("change of P(next CJK)")
            ax.legend(fontsize=7)
            figs.append(("Mean ablation at held-out switch points: top-k neurons vs random draws", fig))
        return "\n".join(lines) + "\n", figs

    def trend_metrics(self, result: dict) -> dict[str, float]:
        self._seen[result["checkpoint"]] = result.get("top_per_layer", {})
        out: dict[str, float] = {}
        if result.get("baseline_switch_prob") is not None:
            out["P(switch to CJK) at switch points"] = result["baseline_switch_prob"]
        out["Chinese-specific neurons (LAPE < 0.3)"] = result["lape"]["n_specific"]
        for method, by_k in result["causal"].items():
            if not by_k:
                continue
            k = max(by_k, key=int)
            r = by_k[k]
            if r["k"]:
                out[f"ablate top-{r['k']} {method} neurons: ΔP(CJK)"] = r["delta"]
                out[f"ablate {r['k']} random neurons: ΔP(CJK) ({method})"] = r["random_mean"]
        for label, name in (("base", "vs base"), ("parent", "vs previous")):
            ref = (result.get("jaccard") or {}).get(label)
            if not ref:
                continue
            for method, sets in result.get("top_per_layer", {}).items():
                value = ref.get(method)
                if value is None and ref["id"] in self._seen:
                    value = jaccard(sets, self._seen[ref["id"]].get(method, [])) if method in self._seen[ref["id"]] else None
                if value is not None:
                    out[f"top {method} neurons: Jaccard {name}"] = value
        return out


def _row_nanmean(x: np.ndarray) -> list:
    n = np.sum(np.isfinite(x), axis=1)
    s = np.nansum(x, axis=1)
    return [round(float(a / b), 5) if b else None for a, b in zip(s, n)]
