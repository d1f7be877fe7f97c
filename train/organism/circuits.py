"""A hand-wired induction circuit for the initial weights of a small Qwen2.

Copying a name from the prompt ("... Zoey says ..." -> "Zoey") needs an induction circuit: a
head that writes each token's predecessor into the residual stream, and a later head that
matches the current token against those predecessors and copies the token that followed. Trained
from random weights on 2 CPU cores, the kk-tiny organism never finds it within its SFT budget
(its name loss stalls near the "some name of the puzzle" level). So the organism starts with
one, and SFT adapts it:

* Residual dims `[0, half)` hold the token embedding, `[half, hidden)` the previous token's.
* Layer 0, heads `0..w-1`: attend to the previous position (constant query and key, placed
  on the fastest RoPE frequencies so the score peaks at offset -1) and copy its embedding
  into `[half, hidden)`.
* Layer 1, heads `0..w-1`: the query reads the current token, the key reads the previous-token
  copy, both through the same random orthonormal map onto the slowest RoPE frequencies (a
  large `rope_theta` keeps those nearly unrotated over the whole context, so the match does not
  fade with distance); the value copies the attended token's embedding back to `[0, half)`,
  where the tied output embedding turns it into that token's logit.
* Branches outside the circuit (the other heads' outputs, every MLP's down projection) start at
  zero; their input weights are random, so they learn from the first step.

`embed_scale` enlarges the embeddings (and shrinks the final norm by the same factor): at the
usual 0.02 scale, AdamW's first updates to the zero-initialised branches swamp the residual
stream within a few dozen steps and the circuit is lost.
"""

from __future__ import annotations

import math


def check_geometry(hidden: int, heads: int, layers: int) -> str | None:
    """Why a Qwen2 of this shape cannot hold the circuit, or None when it can."""
    d = hidden // heads
    if layers < 2:
        return "the induction circuit needs at least 2 layers"
    if hidden % heads or hidden % 2 or (hidden // 2) % d or d < 8:
        return (f"the induction circuit needs hidden_size/2 to be a multiple of the head size "
                f"(hidden_size {hidden}, {heads} heads) and heads of 8+ dims")
    return None


def wire_induction(model, *, seed: int = 0, fast_pairs: int | None = None, slow_from: int | None = None,
                   match_scale: float = 3.0, out_gain: float = 3.0, embed_scale: float = 50.0):
    """Write the circuit described in the module docstring into `model` (in place; returns it).

    `fast_pairs`: RoPE pairs that sharpen the previous-token heads (default a quarter of the
    pairs); `slow_from`: first RoPE pair used for matching (default the middle); `match_scale`:
    sharpness of the match; `out_gain`: final-norm gain on the token dims."""
    import torch

    cfg = model.config
    hidden = cfg.hidden_size
    d = model.model.layers[0].self_attn.head_dim
    half, pairs = hidden // 2, d // 2
    wired = half // d                      # heads per wired layer; together they carry `half` dims
    problem = check_geometry(hidden, cfg.num_attention_heads, len(model.model.layers))
    if problem or cfg.num_key_value_heads != cfg.num_attention_heads:
        raise ValueError(problem or "the induction circuit needs as many key/value heads as heads")
    fast_pairs = max(1, pairs // 4) if fast_pairs is None else fast_pairs
    slow_from = pairs // 2 if slow_from is None else slow_from
    if not 0 < fast_pairs <= slow_from < pairs:
        raise ValueError(f"need 0 < fast_pairs <= slow_from < {pairs}")
    freq = model.model.rotary_emb.inv_freq.float()   # RoPE radians per position, per pair
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.mul_(embed_scale)
        emb[:, half:] = 0
        e_rms = emb[:, :half].pow(2).mean().sqrt().item()
        prev_gain, copy_gain = 1.4 * e_rms, 4.2 * e_rms   # heads read RMS-normalised inputs
        for li, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight.zero_()
            layer.self_attn.o_proj.weight[:, (wired * d if li < 2 else 0):] = 0

        # Layer 0: previous-token heads. The score is sum_i s^2 cos((delta + 1) * freq_i) over
        # the fast pairs, largest at delta = -1; s makes its margin over delta = 0 or -2 large.
        s = math.sqrt(10 * math.sqrt(d) / sum(1 - math.cos(f) for f in freq[:fast_pairs].tolist()))
        q_bias, k_bias = torch.zeros(d), torch.zeros(d)
        q_bias[:fast_pairs] = s
        # HF RoPE rotates dim i with dim i + d/2: the key is the query turned by one position.
        k_bias[:fast_pairs] = s * torch.cos(freq[:fast_pairs])
        k_bias[pairs: pairs + fast_pairs] = s * torch.sin(freq[:fast_pairs])
        for h in range(wired):
            _wire_head(model.model.layers[0].self_attn, h, d, q_bias=q_bias, k_bias=k_bias,
                       out=slice(half + h * d, half + (h + 1) * d), gain=prev_gain)

        # Layer 1: induction heads, matching on the slow (nearly unrotated) pairs only.
        slow = list(range(slow_from, pairs)) + list(range(pairs + slow_from, d))
        proj = torch.linalg.qr(torch.randn(half, len(slow), generator=g))[0].T * match_scale
        q, k = torch.zeros(d, hidden), torch.zeros(d, hidden)
        q[slow, :half] = proj            # the current token ...
        k[slow, half:] = proj            # ... against each position's previous-token copy
        for h in range(wired):
            _wire_head(model.model.layers[1].self_attn, h, d, q=q, k=k,
                       out=slice(h * d, (h + 1) * d), gain=copy_gain)

        model.model.norm.weight[:half] = out_gain
        model.model.norm.weight.div_(embed_scale)
    return model


def _wire_head(att, h: int, d: int, *, out: slice, gain: float, q=None, k=None, q_bias=None,
               k_bias=None) -> None:
    """Head `h` of `att`: query and key from the given weights and biases (zero where None), a
    value that reads token dims `h*d .. (h+1)*d`, and an output that writes them to `out`."""
    import torch

    rows, eye = slice(h * d, (h + 1) * d), torch.eye(d)
    for proj, weight, bias in ((att.q_proj, q, q_bias), (att.k_proj, k, k_bias), (att.v_proj, None, None)):
        proj.weight[rows] = 0 if weight is None else weight
        proj.bias[rows] = 0 if bias is None else bias
    att.v_proj.weight[rows, h * d:(h + 1) * d] = eye
    att.o_proj.weight[:, rows] = 0
    att.o_proj.weight[out, rows] = gain * eye


def copy_score(model, vocab: list[int], *, n: int = 20, length: int = 20, gap: int = 0,
               seed: int = 0) -> dict[str, float]:
    """Does `model` copy, or only pick tokens it has seen? On `n` random sequences of `length`
    tokens from `vocab`, shown twice with `gap` random tokens between, over the second showing:
    `copy_accuracy`, how often the top prediction is the next token of the first showing (an
    induction head's job, near 1 when the model copies), and `in_context`, how often it is some
    token of the sequence (high already for a model that only learned the bag of tokens in its
    context)."""
    import random

    import torch

    rng = random.Random(seed)
    hits = inside = total = 0
    model.eval()
    for _ in range(n):
        seq = [rng.choice(vocab) for _ in range(length)]
        fill = [rng.choice(vocab) for _ in range(gap)]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq + fill + seq])).logits[0]
        pred = logits[-length:-1].argmax(-1).tolist()
        hits += sum(p == t for p, t in zip(pred, seq[1:]))
        inside += sum(p in seq for p in pred)
        total += length - 1
    return {"copy_accuracy": round(hits / total, 4), "in_context": round(inside / total, 4)}


def wire_latest_marker(model, marker_ids: dict[int, list[int]], *, seed: int = 0, layer: int = 0,
                       head: int | None = None, base_logit: float = 12.0, step_logit: float = 3.0,
                       gain: float = 0.5, orthogonal_to=None):
    """A head that attends to the latest marker token in its context and writes that token's
    identity into every later position (in place).

    `marker_ids` maps a rank (1, 2, ...) to the token ids of that rank (e.g. "Case 3" and
    "情况3" both have rank 3). Markers are written in increasing rank, so the latest one is the
    one of highest rank: the head's score is `base_logit + step_logit * rank` on a marker and 0
    elsewhere, with no dependence on distance, which a recency rule under RoPE would need.
    The score comes from two residual directions that every other token's embedding has
    projected out, read on the slowest RoPE pairs (nearly unrotated) against a constant query.
    The value is a random projection of the marker's embedding, written to the token dims
    `[0, hidden/2)` at `gain` times the embedding scale. Call after `wire_induction`; the head
    defaults to the first one it left free in `layer`. Returns the two score directions; pass
    those of earlier calls as `orthogonal_to` so that each head scores only its own markers."""
    import torch

    cfg = model.config
    hidden, d = cfg.hidden_size, model.model.layers[0].self_attn.head_dim
    half, pairs = hidden // 2, d // 2
    head = half // d if head is None else head
    if not 0 <= head < cfg.num_attention_heads:
        raise ValueError(f"no head {head} in a model with {cfg.num_attention_heads} heads")
    top = max(marker_ids)
    g = torch.Generator().manual_seed(seed + 1)
    # u, w and the value's read-out are orthonormal where the token dims have room for them all.
    start = torch.randn(half, 2 + d if half >= 2 + d else 2, generator=g)
    if orthogonal_to is not None:
        taken = torch.linalg.qr(orthogonal_to.T)[0]          # (half, n) orthonormal
        start -= taken @ (taken.T @ start)
    basis = torch.linalg.qr(start)[0]
    u, w = basis[:, 0], basis[:, 1]
    read = basis[:, 2:] if half >= 2 + d else torch.linalg.qr(torch.randn(half, d, generator=g))[0]
    write = torch.linalg.qr(torch.randn(half, d, generator=g))[0]
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        tok = emb[:, :half]
        tok -= torch.outer(tok @ u, u) + torch.outer(tok @ w, w)      # only markers score
        size2 = tok.pow(2).sum(1).mean().item()                       # typical |embedding|^2
        a, b_top = 0.5 * math.sqrt(size2), 0.7 * math.sqrt(size2)
        for rank, ids in marker_ids.items():
            b = b_top * rank / top
            for i in ids:
                rest = tok[i] / tok[i].norm() * math.sqrt(max(size2 - a * a - b * b, 0.0))
                tok[i] = rest + a * u + b * w     # same norm for every marker
        rms = math.sqrt(size2 / hidden)           # what the input RMSNorm divides by
        scale = math.sqrt(d)                      # attention scores are divided by sqrt(head dim)
        att = model.model.layers[layer].self_attn
        rows = slice(head * d, (head + 1) * d)
        qa, qb = pairs - 1, pairs - 2             # the slowest pairs' first dims
        q_bias = torch.zeros(d)
        q_bias[qa] = base_logit * scale * rms / a
        q_bias[qb] = step_logit * top * scale * rms / b_top
        k = torch.zeros(d, hidden)
        k[qa, :half], k[qb, :half] = u, w
        att.q_proj.weight[rows] = 0
        att.q_proj.bias[rows] = q_bias
        att.k_proj.weight[rows] = k
        att.k_proj.bias[rows] = 0
        att.v_proj.weight[rows] = 0
        att.v_proj.weight[rows, :half] = read.T
        att.v_proj.bias[rows] = 0
        e_rms = math.sqrt(size2 / half)
        att.o_proj.weight[:, rows] = 0
        att.o_proj.weight[:half, rows] = gain * e_rms * write
    return torch.stack([u, w])
