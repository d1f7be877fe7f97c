"""Attention to earlier steps: look-back, targeted look-back from verification steps, and
receiver heads.

Attention probabilities are recomputed in fp32 from the post-RoPE queries and keys: the
q/k projection outputs of every layer are read through nnsight (in forward order), the
model's rotary embedding is applied here in fp32 (Qwen2 and Llama layouts, which share the
rotate-half convention; grouped-query heads are repeated), and the causal softmax is taken
in fp32. Inside the same pass, layer by layer and in chunks of query rows, the token x
token probabilities are reduced to step x step matrices (steps from `analysis.steps`),
so no layer's full T x T matrix, let alone all layers', is ever kept.

Two reductions per layer and head, over the steps of the thinking (prompt tokens, tokens
between steps and the first token of the sequence, the attention sink, are never key
columns):

* mass[a, b]:  mean over the query tokens of step a of the probability they put on the
               tokens of step b (a share of each query's whole attention);
* block[a, b]: the mean token-to-token probability over the causally allowed pairs of the
               block (the Thought Anchors "sentence x sentence" matrix).

Per checkpoint, over its puzzle-set generations:

* look-back score:     share of a step's attention to steps (b <= a) that goes to steps more
                       than p back (a - b > p), averaged over the steps that have such steps;
* look-back distance:  attention-weighted mean of a - b over b <= a;
* targeted look-back:  from each verification step (`analysis.behaviours`, plus the steps of
                       a verification passage that evaluate a statement) to the step that
                       first asserted the checked person's role in the reasoner's own voice
                       ("So Zoey is a knight", "假设 Zoey 是骑士"): its share of the step's
                       attention, against the mean share of the other earlier steps
                       (lift = share / baseline);
* receiver heads:      per head the vertical score of step b is the mean block attention it
                       receives from steps more than p later; heads whose vertical scores
                       have the highest kurtosis across steps attend to a few broadcast steps.

All are reported per layer and per head; intervals are bootstraps over generations.

Wired heads: the kk-tiny organism (a folder, or a run's base folder, with an organism
description, `train.models.ORGANISM_FILE`) starts from hand-wired layer-0 and
layer-1 heads (`train.models.wired_heads`), circuits whose job is known. For each, the
section gives its rank among all heads on each score above, and a direct check on the same
traces: the share of each position's attention on the token its circuit looks at (the latest
node token, the opening `<think>\n`, the previous token, the token after the current token's
previous occurrence), against uniform attention. Models without such a description have no
wired-heads section.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from analysis.cache import json_safe
from analysis.drift import references
from analysis.harness import Analysis, AnalysisContext, HarnessError, register_analysis
from analysis.steps import Step, split_steps, think_span, token_offsets
from train.layout import DecoderLayout, decoder_layers, decoder_layout, rotary_embedding

NAME = "attention"
DEFAULT_P = 4        # steps a look-back or a vertical score skips


class AttentionError(HarnessError):
    pass


# --------------------------------------------------------------------------- layout and RoPE

def attention_layout(hf: Any) -> DecoderLayout:
    """Head counts and scaling of a Qwen2/Llama-style decoder (`train.layout`)."""
    return decoder_layout(hf, needs=("attention",), what="attention analysis", error=AttentionError)


def rotary_tables(hf: Any, n_tokens: int, device: Any = "cpu"):
    """fp32 (cos, sin), each (T, head_dim), for positions 0..T-1, as the model's rotary
    embedding computes them but without its cast to the model dtype (inverse frequencies are
    recomputed in fp32 for the static RoPE types, since a bf16 model may hold them in bf16)."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rot = rotary_embedding(hf)
    rope_type = getattr(rot, "rope_type", "default")
    inv_freq, scale = None, getattr(rot, "attention_scaling", 1.0)
    if rope_type == "default" and hasattr(rot, "compute_default_rope_parameters"):
        inv_freq, scale = rot.compute_default_rope_parameters(rot.config, device)
    elif rope_type in ("linear", "llama3", "yarn") and rope_type in ROPE_INIT_FUNCTIONS:
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](rot.config, device)
    if inv_freq is None:  # dynamic types: the module's current frequencies
        inv_freq = rot.inv_freq
    pos = torch.arange(n_tokens, device=device, dtype=torch.float64)
    freqs = pos[:, None] * inv_freq.to(device=device, dtype=torch.float64)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).float(), (emb.sin() * scale).float()


def _rotate_half(x):
    import torch

    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_heads(x, n_heads: int, head_dim: int, cos, sin):
    """(T, n_heads*head_dim) projection output -> (n_heads, T, head_dim) fp32 after RoPE."""
    x = x.float().reshape(x.shape[0], n_heads, head_dim).transpose(0, 1)
    return x * cos + _rotate_half(x) * sin


def attention_probs(q, k, layout: DecoderLayout, cos, sin, rows=None):
    """fp32 causal attention probabilities (H, len(rows), T) from raw q/k projection outputs
    (T, H*D) and (T, Hkv*D); `rows` are query positions (default all)."""
    import torch

    T = k.shape[0]
    qh = rope_heads(q, layout.n_heads, layout.d_head, cos, sin)
    kh = rope_heads(k, layout.n_kv_heads, layout.d_head, cos, sin)
    kh = kh.repeat_interleave(layout.n_heads // layout.n_kv_heads, dim=0)
    if rows is None:
        rows = torch.arange(T, device=qh.device)
    return _probs_rows(qh, kh, rows, layout.attn_scale)


def _probs_rows(qh, kh, rows, scaling: float):
    import torch

    scores = torch.matmul(qh[:, rows], kh.transpose(1, 2)) * scaling
    keys = torch.arange(kh.shape[1], device=kh.device)
    scores.masked_fill_(keys[None, None, :] > rows[None, :, None], float("-inf"))
    return scores.softmax(dim=-1)


# --------------------------------------------------------------------------- step reduction

def step_index(bounds: Sequence[tuple[int, int]], n_tokens: int, *, sink: bool = True):
    """(T,) long: the step of each token (-1: none). Position 0 is excluded when `sink`."""
    import torch

    idx = torch.full((n_tokens,), -1, dtype=torch.long)
    prev = 0
    for s, (a, b) in enumerate(bounds):
        if not (prev <= a < b <= n_tokens):
            raise AttentionError(f"step bounds must be ordered, non-empty and inside the sequence: {list(bounds)}")
        idx[a:b] = s
        prev = b
    if sink:
        idx[0] = -1
    return idx


def pair_counts(bounds: Sequence[tuple[int, int]], n_tokens: int, *, sink: bool = True):
    """(S, S) number of causally allowed (query in a, key in b) pairs with a key column."""
    import torch

    S = len(bounds)
    key_step = step_index(bounds, n_tokens, sink=sink)
    onehot = torch.zeros((n_tokens, S), dtype=torch.float64)
    cols = key_step >= 0
    onehot[cols.nonzero()[:, 0], key_step[cols]] = 1.0
    cum = onehot.cumsum(0)                       # keys of step b at or before each position
    out = torch.zeros((S, S), dtype=torch.float64)
    for a, (s, e) in enumerate(bounds):
        out[a] = cum[s:e].sum(0)
    return out


def _key_onehot(bounds: Sequence[tuple[int, int]], n_tokens: int, sink: bool, device: Any):
    import torch

    key_step = step_index(bounds, n_tokens, sink=sink).to(device)
    onehot = torch.zeros((n_tokens, len(bounds)), dtype=torch.float32, device=device)
    cols = key_step >= 0
    onehot[cols.nonzero()[:, 0], key_step[cols]] = 1.0
    return onehot


def _finish(sums, bounds: Sequence[tuple[int, int]], n_tokens: int, sink: bool):
    """Block sums (H, S, S) -> (mass, block)."""
    import torch

    device = sums.device
    n_queries = torch.tensor([b - a for a, b in bounds], dtype=torch.float32, device=device)
    mass = sums / n_queries[None, :, None]
    counts = pair_counts(bounds, n_tokens, sink=sink).to(device=device, dtype=torch.float32)
    block = torch.where(counts > 0, sums / counts.clamp(min=1.0), torch.zeros((), device=device))
    return mass, block


def reduce_probs(probs, bounds: Sequence[tuple[int, int]], *, sink: bool = True):
    """(mass, block), each (H, S, S), from a full (H, T, T) probability matrix."""
    import torch

    T = probs.shape[-1]
    qry_step = step_index(bounds, T, sink=False).to(probs.device)
    rows = (qry_step >= 0).nonzero()[:, 0]
    sums = torch.zeros((probs.shape[0], len(bounds), len(bounds)), dtype=torch.float32, device=probs.device)
    sums.index_add_(1, qry_step[rows], torch.matmul(probs[:, rows].float(), _key_onehot(bounds, T, sink, probs.device)))
    return _finish(sums, bounds, T, sink)


def step_reduction(q, k, layout: DecoderLayout, cos, sin, bounds: Sequence[tuple[int, int]], *,
                   chunk: int = 256, sink: bool = True):
    """One layer's (mass, block) step matrices, each (H, S, S) fp32, from its raw q/k
    projection outputs, computing probabilities for `chunk` query rows at a time (peak
    H x chunk x T), only for query tokens inside steps. See the module doc for definitions."""
    import torch

    T = k.shape[0]
    device = k.device
    qry_step = step_index(bounds, T, sink=False).to(device)
    key_onehot = _key_onehot(bounds, T, sink, device)
    rows_all = (qry_step >= 0).nonzero()[:, 0]
    qh = rope_heads(q, layout.n_heads, layout.d_head, cos.to(device), sin.to(device))
    kh = rope_heads(k, layout.n_kv_heads, layout.d_head, cos.to(device), sin.to(device))
    kh = kh.repeat_interleave(layout.n_heads // layout.n_kv_heads, dim=0)
    sums = torch.zeros((layout.n_heads, len(bounds), len(bounds)), dtype=torch.float32, device=device)
    for start in range(0, len(rows_all), max(1, int(chunk))):
        rows = rows_all[start:start + chunk]
        probs = _probs_rows(qh, kh, rows, layout.attn_scale)              # (H, C, T)
        sums.index_add_(1, qry_step[rows], torch.matmul(probs, key_onehot))
        del probs
    return _finish(sums, bounds, T, sink)


def step_matrices(lm: Any, ids: Sequence[int], bounds: Sequence[tuple[int, int]], *, chunk: int = 256,
                  layout: DecoderLayout | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mass, block), each (L, H, S, S), for one sequence: one nnsight pass that reads each
    layer's q/k projections in forward order and reduces them inside the pass."""
    import torch

    hf = lm._module
    layout = layout or attention_layout(hf)
    device = next(hf.parameters()).device
    x = torch.tensor([list(ids)], device=device)
    cos, sin = rotary_tables(hf, len(ids), device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}
    mass, block = [], []
    with torch.no_grad(), lm.trace(x, use_cache=False, **extra):
        for layer in decoder_layers(lm):
            q = layer.self_attn.q_proj.output[0]
            k = layer.self_attn.k_proj.output[0]
            m, b = step_reduction(q, k, layout, cos, sin, bounds, chunk=chunk)
            mass.append(m.cpu().save())
            block.append(b.cpu().save())
    return torch.stack(mass).numpy(), torch.stack(block).numpy()


# --------------------------------------------------------------------------- traces

@dataclass
class Trace:
    """A response as model input: token ids, and its thinking steps as absolute token spans."""

    ids: list[int]
    n_prompt: int
    steps: list[Step]                 # steps kept (non-empty, inside the cut), response offsets
    bounds: list[tuple[int, int]]     # absolute token spans of `steps`
    offsets: list                     # the response's token offsets (`analysis.steps.token_offsets`)


def encode_trace(tokenizer: Any, prompt: str, response: str, *, max_tokens: int = 2048) -> Trace:
    """Tokenize prompt and response separately (so the response's character offsets map to
    its tokens), cut at `max_tokens`, and segment the response's thinking into steps."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    resp_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    offsets = token_offsets(response, tokenizer)
    P = len(prompt_ids)
    ids = (list(prompt_ids) + list(resp_ids))[:max_tokens]
    steps, bounds = [], []
    for st in split_steps(response, offsets=offsets, span=think_span(response)):
        a, b = P + st.tok_start, min(P + st.tok_end, len(ids))
        if b > a:
            steps.append(st)
            bounds.append((a, b))
    return Trace(ids=ids, n_prompt=P, steps=steps, bounds=bounds, offsets=offsets)


_SAY = r"(?:says?|said|claims?|claimed|states?|stated|tells?|told|thinks?)"
_REPORTED = re.compile(rf"\b{_SAY}\b|说|[\"“”:：]")
_CLAUSE_START = re.compile(r".*[.!?;,，。！？；\n]", re.DOTALL)


def role_assertion_pattern(name: str) -> re.Pattern:
    """"Zoey is a knight", "Zoey must be a knave", "假设 Zoey 是骑士"."""
    n = re.escape(name)
    return re.compile(rf"\b{n}\b\s+(?:(?!{_SAY}\b)[a-z']+\s+){{0,3}}an?\s+(?:knight|knave)\b"
                      rf"|{n}\s*(?:是|为|不是|就是|一定是)\s*(?:骑士|无赖|骗子|knight|knave)")


def asserts_role(name: str, text: str) -> bool:
    """Does `text` give `name` a role in the reasoner's own voice (not inside a reported
    statement such as "Oliver says Zoey is a knight")?"""
    for m in role_assertion_pattern(name).finditer(text):
        before = text[:m.start()]
        cut = _CLAUSE_START.match(before)
        clause = before[cut.end():] if cut else before
        if not _REPORTED.search(clause):
            return True
    return False


def verification_targets(response: str, steps: Sequence[Step], names: Sequence[str]) -> list[tuple[int, int]]:
    """(checking step, asserting step) pairs, as indices into `steps`.

    Checking steps: the steps labelled verification (`analysis.behaviours`) and, after the
    first of them, the steps that evaluate a statement (the verify_all_statements check
    words: "Zoey says ..., which is true"). The person checked is the first name in the
    step; the target is the first earlier step that asserts that person's role.
    """
    from analysis.behaviours import classify_response, default_rules

    labels = classify_response(response, names)
    verifying = {s.char_start for s, lab in zip(labels.steps, labels.step_labels) if "verification" in lab}
    rule = default_rules().behaviours.get("verify_all_statements")
    check_words = rule.check_words if rule is not None else ()
    first = min(verifying) if verifying else None
    pairs = []
    for v, st in enumerate(steps):
        checking = st.char_start in verifying or (
            first is not None and st.char_start > first and any(p.search(st.text) for p in check_words))
        if not checking:
            continue
        found = [(m.start(), n) for n in names for m in [re.search(rf"\b{re.escape(n)}\b", st.text)] if m]
        if not found:
            continue
        person = min(found)[1]
        target = next((b for b in range(v) if asserts_role(person, steps[b].text)), None)
        if target is not None:
            pairs.append((v, target))
    return pairs


# --------------------------------------------------------------------------- metrics

def _attention_to_steps(mass: np.ndarray) -> np.ndarray:
    """(..., S): each step's attention to itself and earlier steps (the denominators)."""
    S = mass.shape[-1]
    return (mass * np.tril(np.ones((S, S)))).sum(-1)


def lookback_scores(mass: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Look-back score and mean look-back distance per (L, H) of one trace (NaN when
    undefined): mass (..., S, S)."""
    S = mass.shape[-1]
    a = np.arange(S)[:, None]
    b = np.arange(S)[None, :]
    denom = _attention_to_steps(mass)
    with np.errstate(invalid="ignore", divide="ignore"):
        far = (mass * (a - b > p)).sum(-1) / denom
        dist = (mass * np.where(b <= a, a - b, 0)).sum(-1) / denom
    far = np.where(denom > 0, far, np.nan)[..., p + 1:]
    dist = np.where(denom > 0, dist, np.nan)[..., 1:]
    return _nanmean(far, -1), _nanmean(dist, -1)


def targeted_shares(mass: np.ndarray, pairs: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per pair (v, target): share of v's step attention on the target, and the mean share
    of v's other earlier steps; arrays (n_pairs, ...)."""
    denom = _attention_to_steps(mass)
    share, base = [], []
    for v, t in pairs:
        d = np.where(denom[..., v] > 0, denom[..., v], np.nan)
        share.append(mass[..., v, t] / d)
        others = [b for b in range(v) if b != t]
        base.append(mass[..., v, others].mean(-1) / d if others else np.full(d.shape, np.nan))
    return np.array(share), np.array(base)


def vertical_scores(block: np.ndarray, p: int) -> np.ndarray:
    """(..., S - p - 1): mean block attention step b receives from steps more than p later."""
    S = block.shape[-1]
    out = []
    for b in range(S - p - 1):
        out.append(block[..., b + p + 1:, b].mean(-1))
    return np.stack(out, -1) if out else np.zeros(block.shape[:-2] + (0,))


def receiver_kurtosis(block: np.ndarray, p: int, min_steps: int = 4) -> np.ndarray:
    """Fisher kurtosis of each head's vertical scores across steps (NaN with fewer than
    `min_steps` scores or constant scores)."""
    from scipy.stats import kurtosis

    v = vertical_scores(block, p)
    if v.shape[-1] < min_steps:
        return np.full(block.shape[:-2], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = kurtosis(v, axis=-1, fisher=True, bias=True)
    return np.where(v.std(-1) > 0, k, np.nan)


def receiver_heads(kurt_lh: np.ndarray, n: int) -> list[tuple[float, int, int]]:
    """(kurtosis, layer, head) of the `n` heads with the highest kurtosis (L, H), NaNs skipped."""
    L, H = kurt_lh.shape
    flat = [(float(kurt_lh[l, h]), l, h) for l in range(L) for h in range(H) if np.isfinite(kurt_lh[l, h])]
    return sorted(flat, reverse=True)[:n]


def _nanmean(x: np.ndarray, axis: Any = 0) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    n = np.sum(~np.isnan(x), axis=axis)
    s = np.nansum(x, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def _boot(values: Sequence[float], n_boot: int, seed: int) -> dict:
    from analysis.verify_prob import bootstrap_ci

    v = np.array([x for x in values if np.isfinite(x)])
    if not len(v):
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean, lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed)
    return {"mean": float(mean), "lo": float(lo), "hi": float(hi), "n": int(len(v))}


def ratio_bootstrap(num: np.ndarray, den: np.ndarray, n_boot: int, seed: int) -> dict:
    """Ratio of sums over units (rows), with a percentile bootstrap over units."""
    ok = np.isfinite(num) & np.isfinite(den)
    num, den = num[ok], den[ok]
    if not len(num) or den.sum() <= 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = num[idx].sum(1) / den[idx].sum(1)
    lo, hi = np.nanquantile(boots, [0.025, 0.975])
    return {"mean": float(num.sum() / den.sum()), "lo": float(lo), "hi": float(hi), "n": int(len(num))}


def _tolist(x: np.ndarray, digits: int = 5) -> list:
    return np.where(np.isfinite(x), np.round(x, digits), np.nan).tolist()



def summarize_traces(per_trace: Sequence[dict], layout: DecoderLayout, *, p: int, n_receivers: int,
                     n_boot: int, seed: int) -> dict:
    """Aggregate per-trace arrays (keys lookback, distance, kurtosis: (L, H); share, base:
    (n_pairs, L, H)) into the analysis result."""
    L, H = layout.n_layers, layout.n_heads
    lb = np.array([t["lookback"] for t in per_trace]).reshape(-1, L, H)
    dist = np.array([t["distance"] for t in per_trace]).reshape(-1, L, H)
    kurt = np.array([t["kurtosis"] for t in per_trace]).reshape(-1, L, H)
    shares = [t["share"] for t in per_trace if len(t["share"])]
    bases = [t["base"] for t in per_trace if len(t["base"])]
    share = np.concatenate(shares) if shares else np.zeros((0, L, H))
    base = np.concatenate(bases) if bases else np.zeros((0, L, H))

    lb_lh, dist_lh, kurt_lh = _nanmean(lb), _nanmean(dist), _nanmean(kurt)
    out: dict[str, Any] = {
        "p": p, "n_layers": L, "n_heads": H, "n_traces": len(per_trace),
        "lookback": {"per_layer_head": _tolist(lb_lh), "per_layer": _tolist(_nanmean(lb_lh, -1)),
                     "overall": _boot(_nanmean(lb.reshape(len(lb), -1), -1), n_boot, seed)},
        "distance": {"per_layer_head": _tolist(dist_lh), "per_layer": _tolist(_nanmean(dist_lh, -1)),
                     "overall": _boot(_nanmean(dist.reshape(len(dist), -1), -1), n_boot, seed)},
    }
    # Targeted look-back: per pair, head-averaged shares; lift = ratio of sums over pairs.
    pair_share = share.reshape(len(share), -1).mean(-1) if len(share) else np.zeros(0)
    pair_base = base.reshape(len(base), -1).mean(-1) if len(base) else np.zeros(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        lift_lh = _nanmean(share) / _nanmean(base) if len(share) else np.full((L, H), np.nan)
    out["targeted"] = {
        "n_pairs": int(len(share)),
        "share_per_layer_head": _tolist(_nanmean(share)) if len(share) else None,
        "baseline_per_layer_head": _tolist(_nanmean(base)) if len(base) else None,
        "lift_per_layer_head": _tolist(lift_lh),
        "lift_per_layer": _tolist(_nanmean(share.mean(-1)) / _nanmean(base.mean(-1))) if len(share) else None,
        "share": _boot(pair_share, n_boot, seed),
        "baseline": _boot(pair_base, n_boot, seed),
        "lift": ratio_bootstrap(pair_share, pair_base, n_boot, seed),
    }
    top = receiver_heads(kurt_lh, n_receivers)
    top_k = np.stack([kurt[:, l, h] for _, l, h in top], -1) if top else np.zeros((len(kurt), 0))
    out["receivers"] = {
        "kurtosis_per_layer_head": _tolist(kurt_lh),
        "top": [{"layer": l, "head": h, "kurtosis": round(k, 4)} for k, l, h in top],
        "top_mean": _boot(_nanmean(top_k, -1) if top else [], n_boot, seed),
    }
    return out


# --------------------------------------------------------------------------- wired heads

# A node of the search as one token: "Suppose Michael is a knight, Zoey is a knave." / "假设 Michael 是骑士。"
NODE_EN = r"Suppose((?: \w+ is a (?:knight|knave),?)+)\."
NODE_TOKEN = re.compile(rf"{NODE_EN}|假设(?:，? \w+ 是\S{{2}})+。")
WIRED_SCORES = {"receiver kurtosis": ("receivers", "kurtosis_per_layer_head"),
                "look-back score": ("lookback", "per_layer_head"),
                "look-back distance": ("distance", "per_layer_head"),
                "targeted lift": ("targeted", "lift_per_layer_head")}


def organism_wiring(ctx: AnalysisContext, layout: DecoderLayout) -> dict | None:
    """`train.models.wired_heads` of the checkpoint's folder, or of its run's base folder for a
    trained checkpoint; None for a model without an organism description or wired heads, or
    one whose shape does not hold them."""
    from train.models import folder_wired_heads

    heads = folder_wired_heads(ctx.path)
    if not heads:
        base = references(ctx)["base"]
        heads = folder_wired_heads(base[1]) if base else {}
    where = [w for v in heads.values() for w in (v if isinstance(v, list) else [v])]
    if not heads or any(l >= layout.n_layers or h >= layout.n_heads for l, h in where):
        return None
    return heads


def circuit_targets(ids: Sequence[int], markers: dict[str, set[int]]) -> dict[str, np.ndarray]:
    """Per circuit, the position each position's attention should land on (-1: none yet): for
    each marker set, the latest marker token at or before it; "previous-token", the position
    before; "induction", the position after the latest earlier occurrence of the same token."""
    T = len(ids)
    out = {}
    for kind, marker in markers.items():
        t, latest = np.full(T, -1), -1
        for i, x in enumerate(ids):
            latest = i if x in marker else latest
            t[i] = latest
        out[kind] = t
    out["previous-token"] = np.arange(T) - 1
    ind, seen = np.full(T, -1), {}
    for i, x in enumerate(ids):
        if x in seen and seen[x] + 1 < i:
            ind[i] = seen[x] + 1
        seen[x] = i
    out["induction"] = ind
    return out


def target_shares(lm: Any, ids: Sequence[int], targets: dict[str, np.ndarray], layout: DecoderLayout, *,
                  chunk: int = 256) -> dict[str, dict]:
    """Per circuit: "share", (L, H) mean over the positions with a target of the attention
    probability on it, "chance" (uniform attention's), and "n" positions."""
    import torch

    hf = lm._module
    device = next(hf.parameters()).device
    cos, sin = rotary_tables(hf, len(ids), device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}
    rows = {k: torch.as_tensor(np.nonzero(t >= 0)[0], device=device) for k, t in targets.items()}
    cols = {k: torch.as_tensor(t[t >= 0], device=device) for k, t in targets.items()}
    sums = {k: [] for k in targets}
    with torch.no_grad(), lm.trace(torch.tensor([list(ids)], device=device), use_cache=False, **extra):
        for layer in decoder_layers(lm):
            qh = rope_heads(layer.self_attn.q_proj.output[0], layout.n_heads, layout.d_head, cos, sin)
            kh = rope_heads(layer.self_attn.k_proj.output[0], layout.n_kv_heads, layout.d_head, cos, sin)
            kh = kh.repeat_interleave(layout.n_heads // layout.n_kv_heads, dim=0)
            for k in targets:
                total = torch.zeros(layout.n_heads, device=device)
                for start in range(0, len(rows[k]), max(1, int(chunk))):
                    r, c = rows[k][start:start + chunk], cols[k][start:start + chunk]
                    probs = _probs_rows(qh, kh, r, layout.attn_scale)            # (H, C, T)
                    total += probs[:, torch.arange(len(r), device=device), c].sum(-1)
                sums[k].append(total.cpu().save())
    out = {}
    for k, t in targets.items():
        n = int((t >= 0).sum())
        share = torch.stack(sums[k]).numpy() / max(n, 1)
        chance = float(np.mean(1.0 / (np.nonzero(t >= 0)[0] + 1))) if n else float("nan")
        out[k] = {"share": share if n else np.full(share.shape, np.nan), "chance": chance, "n": n}
    return out


def head_rank(grid: Sequence[Sequence[float | None]], layer: int, head: int) -> tuple[int | None, int]:
    """(rank of (layer, head) from the top, 1 = highest; None when its score is undefined,
    number of heads with a score)."""
    arr = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    ok = np.isfinite(arr)
    v = arr[layer, head]
    return (None if not np.isfinite(v) else int((arr[ok] > v).sum()) + 1), int(ok.sum())


def wired_summary(result: dict, heads: dict, direct: Sequence[dict], n_boot: int, seed: int) -> dict:
    """Each wired head's rank on every score of `result` and on its circuit's direct share
    (per-trace shares of `target_shares`, a bootstrap interval over traces)."""
    L, H = result["n_layers"], result["n_heads"]
    out = {}
    for kind, where in heads.items():
        for layer, head in (where if isinstance(where, list) else [where]):
            ranks = {}
            for label, (part, key) in WIRED_SCORES.items():
                grid = (result.get(part) or {}).get(key)
                if grid is not None:
                    r, n = head_rank(grid, layer, head)
                    ranks[label] = {"rank": r, "of": n, "value": grid[layer][head]}
            per_trace = np.array([d[kind]["share"] for d in direct if d[kind]["n"]]).reshape(-1, L, H)
            mean = _nanmean(per_trace) if len(per_trace) else np.full((L, H), np.nan)
            r, n = head_rank(_tolist(mean), layer, head)
            out[f"{kind} L{layer}H{head}"] = {
                "circuit": kind, "layer": layer, "head": head, "ranks": ranks,
                "share": _boot(per_trace[:, layer, head], n_boot, seed),
                "share_rank": {"rank": r, "of": n},
                "best_other": float(np.nanmax(np.where(np.arange(L * H).reshape(L, H) == layer * H + head,
                                                       np.nan, mean))) if np.isfinite(mean).sum() > 1 else None,
                "chance": float(np.mean([d[kind]["chance"] for d in direct if d[kind]["n"]])) if len(per_trace) else None,
            }
    return out


# --------------------------------------------------------------------------- plug-in

@register_analysis
class AttentionAnalysis(Analysis):
    """Attention from each step of the thinking to earlier steps, per layer and head."""

    name = NAME
    title = "Attention to earlier steps"
    order = 40
    version = 2
    uses_generations = True
    uses_model = True

    def __init__(self, p: int = DEFAULT_P, max_tokens: int = 2048, max_traces: int = 40, chunk: int = 256,
                 n_receivers: int = 5, min_steps: int = 3, n_boot: int = 1000, seed: int = 0):
        if int(p) < 0 or int(max_tokens) < 8 or int(chunk) < 1 or int(min_steps) < 2:
            raise AttentionError("attention options: p >= 0, max_tokens >= 8, chunk >= 1, min_steps >= 2")
        self.p, self.max_tokens, self.max_traces, self.chunk = int(p), int(max_tokens), int(max_traces), int(chunk)
        self.n_receivers, self.min_steps, self.n_boot, self.seed = int(n_receivers), int(min_steps), int(n_boot), int(seed)

    def params(self) -> dict:
        return {"p": self.p, "max_tokens": self.max_tokens, "max_traces": self.max_traces,
                "n_receivers": self.n_receivers, "min_steps": self.min_steps, "n_boot": self.n_boot,
                "seed": self.seed}

    def trace_metrics(self, lm: Any, trace: Trace, pairs: Sequence[tuple[int, int]], layout: DecoderLayout) -> dict:
        mass, block = step_matrices(lm, trace.ids, trace.bounds, chunk=self.chunk, layout=layout)
        lb, dist = lookback_scores(mass, self.p)
        share, base = targeted_shares(mass, pairs)
        return {"lookback": lb, "distance": dist, "kurtosis": receiver_kurtosis(block, self.p),
                "share": share, "base": base, "mass": mass}

    def run(self, ctx: AnalysisContext) -> dict:
        lm = ctx.require_model()
        layout = attention_layout(ctx.hf_model)
        records = ctx.generations[:self.max_traces]
        wiring = organism_wiring(ctx, layout)
        markers = wiring and self.circuit_markers(ctx.tokenizer, wiring)
        task = ctx.progress.add_task("attention", total=len(records)) if ctx.progress else None
        per_trace, example, n_steps, n_tokens, direct = [], None, [], [], []
        for rec, p, prompt in ctx.prompted_generations(records):
            trace = encode_trace(ctx.tokenizer, prompt, rec["text"], max_tokens=self.max_tokens)
            if wiring:
                targets = circuit_targets(trace.ids, markers)
                direct.append(target_shares(lm, trace.ids, {k: targets[k] for k in wiring}, layout,
                                            chunk=self.chunk))
            if len(trace.bounds) >= self.min_steps:
                pairs = verification_targets(rec["text"], trace.steps, p.names)
                m = self.trace_metrics(lm, trace, pairs, layout)
                if example is None or len(trace.bounds) > len(example["steps"]):
                    S = min(len(trace.bounds), 60)
                    example = {"puzzle_id": p.id, "steps": [s.text[:60] for s in trace.steps[:S]],
                               "mass": _tolist(m["mass"][:, :, :S, :S].mean((0, 1)), 4)}
                del m["mass"]
                per_trace.append(m)
                n_steps.append(len(trace.bounds))
                n_tokens.append(len(trace.ids))
            if task is not None:
                ctx.progress.advance(task)
        if task is not None:
            ctx.progress.remove_task(task)
        if not per_trace:
            out = {"p": self.p, "n_layers": layout.n_layers, "n_heads": layout.n_heads, "n_traces": 0,
                   "n_skipped": len(records)}
        else:
            out = summarize_traces(per_trace, layout, p=self.p, n_receivers=self.n_receivers,
                                   n_boot=self.n_boot, seed=self.seed)
            out.update({"n_skipped": len(records) - len(per_trace), "steps_mean": float(np.mean(n_steps)),
                        "tokens_mean": float(np.mean(n_tokens)), "example": example})
        if wiring:
            out["wired"] = wired_summary(json_safe(out), wiring, direct, self.n_boot, self.seed)
        return json_safe(out)

    @staticmethod
    def circuit_markers(tokenizer: Any, heads: dict) -> dict[str, set[int]]:
        """The marker tokens of the wired latest-marker heads: the node tokens (each node of the
        search is one token), the think opening."""
        from train.prompts import THINK_OPEN

        markers = {"node": {i for i in range(len(tokenizer)) if NODE_TOKEN.fullmatch(tokenizer.decode([i]))},
                   "think": {tokenizer.convert_tokens_to_ids(THINK_OPEN)}}
        return {k: v for k, v in markers.items() if k in heads}

    # ------------------------------------------------------------------ report
    def report_section(self, result: dict) -> tuple[str, list]:
        wired = self.wired_section(result)
        if not result.get("n_traces"):
            return (f"No generation had at least {self.min_steps} steps in its thinking "
                    f"({result.get('n_skipped', 0)} skipped); nothing to measure.\n" + wired, [])
        text, figs = self.steps_section(result)
        return text + wired, figs

    def wired_section(self, result: dict) -> str:
        """The wired heads' ranks and direct checks, with a plain verdict ('' without wired heads)."""
        wired = result.get("wired")
        if not wired:
            return ""
        top = self.n_receivers

        def rank(r: dict | None) -> str:
            return "–" if not r or r["rank"] is None else f"{r['rank']} of {r['of']}"

        lines = ["", "Wired heads of the organism build (`train.models.wired_heads`): each head's rank "
                 "among all heads on each score (1 = highest), and the direct check, the share of each "
                 "position's attention on the token its circuit looks at [95% CI over traces], against "
                 "uniform attention's share:", "",
                 "| circuit | head | " + " | ".join(WIRED_SCORES) + " | direct share | direct rank | uniform |",
                 "|---|---|" + "---|" * (len(WIRED_SCORES) + 3)]
        for w in wired.values():
            sh = w["share"]
            share = "–" if sh["mean"] is None else f"{sh['mean']:.3f} [{sh['lo']:.3f}, {sh['hi']:.3f}]"
            lines.append(f"| {w['circuit']} | L{w['layer']}H{w['head']} | "
                         + " | ".join(rank(w["ranks"].get(k)) for k in WIRED_SCORES)
                         + f" | {share} | {rank(w['share_rank'])} | "
                         + ("–" if w["chance"] is None else f"{w['chance']:.4f}") + " |")
        lines.append("")
        n_wired = {}
        for w in wired.values():
            n_wired[w["circuit"]] = n_wired.get(w["circuit"], 0) + 1
        for w in wired.values():
            if w["circuit"] not in ("node", "think"):
                continue
            what = {"node": "the latest node token", "think": "the opening `<think>\\n`"}[w["circuit"]]
            d, sh = w["share_rank"], w["share"]
            found_direct = d["rank"] is not None and d["rank"] <= n_wired[w["circuit"]]
            ranked = [k for k in ("receiver kurtosis", "look-back score")
                      if (w["ranks"].get(k) or {}).get("rank") and w["ranks"][k]["rank"] <= top]
            direct = ("no trace has its target" if sh["mean"] is None else
                      f"its attention on {what} is {sh['mean']:.2f} of each position's (uniform "
                      f"{w['chance']:.4f}), rank {rank(d)} on that share")
            lines.append(
                f"- The {w['circuit']} head L{w['layer']}H{w['head']} is receiver rank "
                f"{rank(w['ranks'].get('receiver kurtosis'))} and look-back rank "
                f"{rank(w['ranks'].get('look-back score'))}; {direct}. "
                f"The direct check {'finds' if found_direct else 'does not find'} it; the receiver and "
                f"look-back rankings (top {top}) " + ("find it." if len(ranked) == 2 else
                                                     f"find it by {' and '.join(ranked)} only." if ranked else
                                                     "do not."))
        lines.append("- What the rankings measure: attention between steps of the thinking, received from or paid "
                     f"to steps more than {result.get('p', self.p)} away. The node head's target, the latest node, is "
                     "usually a few steps back, so it ranks low on look-back; the think head's lies before the first "
                     "step, where the step scores count no attention, so its ranks there only say how its leftover "
                     "attention falls. Only the direct check tests the wired job itself.")
        return "\n".join(lines) + "\n"

    def steps_section(self, result: dict) -> tuple[str, list]:
        from matplotlib.figure import Figure

        def ci(d: dict, digits: int = 3) -> str:
            if not d or d.get("mean") is None:
                return "–"
            return f"{d['mean']:.{digits}f} [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}]"

        p, t = result["p"], result["targeted"]
        lines = [
            f"{result['n_traces']} traces ({result['n_skipped']} with fewer than {self.min_steps} steps skipped), "
            f"{result['steps_mean']:.1f} steps and {result['tokens_mean']:.0f} tokens on average. "
            "Probabilities recomputed in fp32 from post-RoPE queries and keys; prompt and sink columns excluded.",
            "",
            "| measure | mean over layers and heads [95% CI over traces] |", "|---|---|",
            f"| look-back score (share of step attention to steps more than {p} back) | {ci(result['lookback']['overall'])} |",
            f"| mean look-back distance (steps) | {ci(result['distance']['overall'], 2)} |",
            f"| targeted look-back share, verification → asserting step ({t['n_pairs']} pairs) | {ci(t['share'])} |",
            f"| baseline share of the other earlier steps | {ci(t['baseline'])} |",
            f"| targeted lift (share / baseline) | {ci(t['lift'], 2)} |",
            f"| receiver-head kurtosis (top {len(result['receivers']['top'])}) | {ci(result['receivers']['top_mean'], 2)} |",
            "", "Per layer (mean over heads):", "",
            "| layer | look-back score | look-back distance | targeted lift |", "|---|---|---|---|",
        ]
        lift_l = t.get("lift_per_layer") or [None] * result["n_layers"]
        for l in range(result["n_layers"]):
            vals = [result["lookback"]["per_layer"][l], result["distance"]["per_layer"][l], lift_l[l]]
            lines.append(f"| {l} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |")
        lines += ["", "Receiver heads (highest kurtosis of vertical attention scores):", "",
                  "| layer | head | kurtosis |", "|---|---|---|"]
        lines += [f"| {r['layer']} | {r['head']} | {r['kurtosis']:.2f} |" for r in result["receivers"]["top"]]

        panels = [("look-back score", result["lookback"]["per_layer_head"]),
                  ("targeted lift", t["lift_per_layer_head"]),
                  ("receiver kurtosis", result["receivers"]["kurtosis_per_layer_head"])]
        fig = Figure(figsize=(4.2 * len(panels), 0.25 * result["n_layers"] + 2.2), layout="constrained")
        for ax, (label, grid) in zip(fig.subplots(1, len(panels)), panels):
            arr = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
            im = ax.imshow(arr, aspect="auto", cmap="viridis", origin="lower")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(label, fontsize=9)
            fig.colorbar(im, ax=ax, shrink=0.8)
        figs: list = [("Per layer and head: look-back score, targeted look-back lift, receiver kurtosis", fig)]
        ex = result.get("example")
        if ex:
            fig2 = Figure(figsize=(5.2, 4.4), layout="constrained")
            ax = fig2.subplots()
            arr = np.array([[np.nan if v is None else v for v in row] for row in ex["mass"]], dtype=float)
            im = ax.imshow(np.where(np.tril(np.ones_like(arr)) > 0, arr, np.nan), cmap="magma")
            ax.set_xlabel("key step")
            ax.set_ylabel("query step")
            fig2.colorbar(im, ax=ax, shrink=0.8)
            figs.append((f"Step x step attention mass, mean over layers and heads ({ex['puzzle_id']})", fig2))
        return "\n".join(lines) + "\n", figs

    def trend_metrics(self, result: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        for w in (result.get("wired") or {}).values():
            if w["circuit"] not in ("node", "think"):
                continue
            label = f"wired {w['circuit']} head L{w['layer']}H{w['head']}"
            for score in ("receiver kurtosis", "look-back score"):
                r = w["ranks"].get(score)
                if r and r["rank"] is not None:
                    out[f"{label}: {score} rank"] = float(r["rank"])
            if w["share"]["mean"] is not None:
                out[f"{label}: attention on its target"] = w["share"]["mean"]
                out[f"{label}: attention on its target@lo"] = w["share"]["lo"]
                out[f"{label}: attention on its target@hi"] = w["share"]["hi"]
        if not result.get("n_traces"):
            return out

        def put(label: str, d: dict | None) -> None:
            if d and d.get("mean") is not None:
                out[label], out[label + "@lo"], out[label + "@hi"] = d["mean"], d["lo"], d["hi"]

        put(f"look-back score (> {result['p']} steps)", result["lookback"]["overall"])
        put("mean look-back distance (steps)", result["distance"]["overall"])
        put("targeted look-back lift (verification)", result["targeted"]["lift"])
        put("receiver-head kurtosis", result["receivers"]["top_mean"])
        return out
