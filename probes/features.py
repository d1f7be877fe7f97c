"""Residual-stream features at the decision points of a checkpoint's own generations.

For each puzzle of the puzzle set the prompt and the checkpoint's response are put back through the
model (nnsight traces over right-padded batches of responses) and the residual stream is read at the response's
decision points (`analysis.verify_prob.decision_points`: step starts, the position before
`</think>`, right after "X is a knight/knave" conclusions) that lie before the final answer
starts (`probes.targets.answer_start`). Layer 0 is the embedding output, layer i the output
of decoder layer i (the raw residual, before the final norm: HF's last `hidden_states` entry
is the normed one).

    fs = extract_features(lm, tokenizer, puzzles, generations, prompt_style="chat")
    fs.X.shape            # (rows, n_layers + 1, hidden), float32
    fs.rows               # one row per position: puzzle_id, people, pos, char, kinds, token_id, ...

Features are cached per checkpoint through the harness's `ResultCache`: the row metadata as
the JSON record, the array as a `.npy` sidecar (memory-mapped when read back).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from analysis.harness import HarnessError
from analysis.steps import token_offsets
from analysis.verify_prob import decision_points, thin
from train.layout import decoder_layers, decoder_layout, embedding
from probes.targets import answer_start

FEATURES = "probe_features"      # cache name of the features
FEATURES_VERSION = 1
ROW_COLUMNS = ("context", "puzzle_id", "people", "pos", "resp_tok", "char", "kinds", "token_id",
               "next_token_id", "next_text")


class FeatureError(HarnessError):
    pass


@dataclass
class FeatureSet:
    """Features of one checkpoint.

    X:        (rows, n_layers + 1, hidden) residuals (layer 0 = embeddings)
    rows:     DataFrame, one row per position (ROW_COLUMNS); `context` indexes `contexts`
    contexts: one dict per response: puzzle_id, people, names, solution, solution_text,
              prompt_style, text, answer, correct, prompt_len, ids (prompt + response ids)
    """

    X: np.ndarray
    rows: Any
    contexts: list[dict]
    checkpoint: str = ""

    @property
    def n_layers(self) -> int:
        """Number of residual layers (decoder layers + 1)."""
        return int(self.X.shape[1])

    def layer(self, i: int) -> np.ndarray:
        return np.asarray(self.X[:, i, :], dtype=np.float32)

    @property
    def groups(self) -> np.ndarray:
        return self.rows["puzzle_id"].to_numpy()

    @property
    def sizes(self) -> np.ndarray:
        return self.rows["people"].to_numpy()

    @property
    def token_types(self) -> np.ndarray:
        return self.rows["token_id"].to_numpy()

    def labels(self, target: str, rules: Any = None) -> np.ndarray:
        """Per-row labels of a target (1, 0, or -1 = not applicable)."""
        from probes.targets import context_labels

        out = np.full(len(self.rows), -1, dtype=np.int8)
        for c, idx in self.rows.groupby("context").indices.items():
            rows = self.rows.iloc[idx].to_dict("records")
            out[idx] = context_labels(self.contexts[int(c)], rows, target, rules)
        return out

    def at(self, kinds: Sequence[str]) -> np.ndarray:
        """Mask of the rows at a decision point of one of `kinds`."""
        wanted = set(kinds)
        return np.array([bool(wanted.intersection(k)) for k in self.rows["kinds"]], dtype=bool)

    def prefix_tokens(self) -> list[list[int]]:
        """Per row, the response token ids the model has read up to the position."""
        out = []
        for r in self.rows.itertuples():
            ctx = self.contexts[int(r.context)]
            out.append(ctx["ids"][ctx["prompt_len"]:int(r.pos) + 1])
        return out


# --------------------------------------------------------------------------- positions

def probe_positions(prompt_ids: Sequence[int], response: str, tokenizer: Any, *, max_points: int = 48,
                    max_tokens: int = 4096) -> tuple[list[int], list[dict]]:
    """Token ids (prompt + response) and the pre-answer decision points as row dicts.

    At most `max_points` points per response (the one before </think> always kept, the rest
    evenly thinned); `char` is the end (in response characters) of the prefix read at the
    point, `next_text` the characters of the next token (None at the end of the sequence).
    """
    ids, points = decision_points(prompt_ids, response, tokenizer, max_points=1 << 30, max_tokens=max_tokens)
    offsets = token_offsets(response, tokenizer)
    P = len(prompt_ids)
    cut = answer_start(response)

    def char_after(pos: int) -> int:
        return offsets[pos - P][1] if pos >= P else 0

    points = [p for p in points if char_after(p.pos) <= cut]
    points = [points[i] for i in thin(points, max_points)]
    rows = []
    for p in points:
        nxt = p.pos + 1
        next_text = None
        if nxt < len(ids):
            next_text = response[slice(*offsets[nxt - P])] if nxt >= P else ""
        rows.append({"pos": p.pos, "resp_tok": p.pos - P, "char": char_after(p.pos), "kinds": list(p.kinds),
                     "token_id": int(ids[p.pos]), "next_token_id": int(ids[nxt]) if nxt < len(ids) else -1,
                     "next_text": next_text})
    return ids, rows


# --------------------------------------------------------------------------- residuals

def _layout(lm: Any) -> tuple[Any, Any]:
    decoder_layout(lm, needs=("embedding",), what="residual features", error=FeatureError)
    return embedding(lm), decoder_layers(lm)


def read_residuals(lm: Any, ids: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """(positions, n_layers + 1, hidden) float32 residuals of one sequence through nnsight."""
    return read_residuals_batch(lm, [ids], [positions])[0]


def read_residuals_batch(lm: Any, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                         pad_id: int = 0) -> list[np.ndarray]:
    """Residuals of several sequences in one nnsight trace: right-padded with an attention
    mask (a causal model's real positions never see the padding). One (positions, n_layers + 1,
    hidden) float32 array per sequence."""
    import inspect

    import torch

    embed, layers = _layout(lm)
    hf = lm._module
    device = next(hf.parameters()).device
    width = max(len(s) for s in seqs)
    x = torch.full((len(seqs), width), int(pad_id), dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        x[b, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[b, :len(s)] = 1
    b_idx = torch.tensor([b for b, ps in enumerate(positions) for _ in ps], dtype=torch.long, device=device)
    p_idx = torch.tensor([p for ps in positions for p in ps], dtype=torch.long, device=device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}
    saved = []
    # Read in forward order; a decoder layer's .output is the hidden state tensor itself.
    with torch.no_grad(), lm.trace({"input_ids": x, "attention_mask": mask}, use_cache=False, **extra):
        saved.append(embed.output[b_idx, p_idx].save())
        for layer in layers:
            saved.append(layer.output[b_idx, p_idx].save())
    flat = torch.stack([t.float() for t in saved], dim=1).cpu().numpy()
    return np.split(flat, np.cumsum([len(ps) for ps in positions])[:-1])


def batches(lengths: Sequence[int], max_tokens: int, max_batch: int) -> list[list[int]]:
    """Consecutive index groups whose padded area (count x longest) stays within max_tokens."""
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if cur and (len(cur) >= max_batch or (len(cur) + 1) * max(longest, n) > max_tokens):
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


def extract_features(lm: Any, tokenizer: Any, puzzles: Sequence[Any], generations: Sequence[Mapping[str, Any]], *,
                     prompt_style: str = "chat", max_points: int = 48, max_tokens: int = 4096,
                     checkpoint: str = "", progress: Any = None, batch_tokens: int = 16384,
                     max_batch: int = 8) -> FeatureSet:
    """Features at the pre-answer decision points of each generation (one per puzzle); the
    forward passes are batched (`batch_tokens` padded tokens, at most `max_batch` sequences)."""
    import pandas as pd

    from train.generate import render_prompts

    by_id = {p.id: p for p in puzzles}
    contexts, points = [], []
    for rec in generations:
        p = by_id.get(rec["puzzle_id"])
        if p is None:
            raise FeatureError(f"generation for unknown puzzle {rec['puzzle_id']!r}")
        style = rec.get("prompt_style", prompt_style)
        prompt = render_prompts(tokenizer, [p], style)[0]
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids, pts = probe_positions(prompt_ids, rec["text"], tokenizer, max_points=max_points, max_tokens=max_tokens)
        contexts.append({"puzzle_id": p.id, "people": int(p.people), "names": list(p.names),
                         "solution": [bool(s) for s in p.solution], "solution_text": p.solution_text_format,
                         "prompt_style": style, "text": rec["text"], "answer": rec.get("answer"),
                         "correct": bool(rec.get("correct")), "prompt_len": len(prompt_ids),
                         "ids": [int(i) for i in ids]})
        points.append(pts)

    todo = [c for c, pts in enumerate(points) if pts]
    task = progress.add_task("probe features", total=len(todo)) if progress is not None else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    blocks: dict[int, np.ndarray] = {}
    for group in batches([len(contexts[c]["ids"]) for c in todo], batch_tokens, max_batch):
        cs = [todo[i] for i in group]
        out = read_residuals_batch(lm, [contexts[c]["ids"] for c in cs], [[r["pos"] for r in points[c]] for c in cs],
                                   pad_id=pad)
        blocks.update(zip(cs, out))
        if task is not None:
            progress.advance(task, len(cs))
    if task is not None:
        progress.remove_task(task)
    rows = [{"context": c, "puzzle_id": contexts[c]["puzzle_id"], "people": contexts[c]["people"], **r}
            for c in todo for r in points[c]]
    X = np.concatenate([blocks[c] for c in todo]) if todo else np.zeros((0, *_shape(lm)), dtype=np.float32)
    return FeatureSet(X=X, rows=pd.DataFrame(rows, columns=list(ROW_COLUMNS)), contexts=contexts,
                      checkpoint=checkpoint)


def _shape(lm: Any) -> tuple[int, int]:
    _, layers = _layout(lm)
    return len(layers) + 1, int(lm._module.config.hidden_size)


# --------------------------------------------------------------------------- cache

def features_params(fingerprint: str, config: Any, *, max_points: int, max_tokens: int) -> dict:
    """Cache key of a checkpoint's features (weights, puzzle set, generation settings, positions)."""
    from analysis.harness import generation_params

    return {**generation_params(fingerprint, config), "max_points": int(max_points),
            "max_tokens": int(max_tokens), "version": FEATURES_VERSION}


def _save_array(path: Path, X: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, np.ascontiguousarray(X, dtype=np.float32))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_features(cache: Any, ckpt_id: str, params: dict, fs: FeatureSet) -> None:
    """Array first, then the JSON record: a record on disk always has its array."""
    _save_array(cache.sidecar(ckpt_id, FEATURES, params, ".npy"), fs.X)
    cache.put(ckpt_id, FEATURES, params, {"rows": fs.rows.to_dict("list"), "contexts": fs.contexts,
                                          "shape": list(fs.X.shape)})


def load_features(cache: Any, ckpt_id: str, params: dict) -> FeatureSet | None:
    """Cached features, or None when missing or torn."""
    import pandas as pd

    record = cache.get(ckpt_id, FEATURES, params)
    path = cache.sidecar(ckpt_id, FEATURES, params, ".npy")
    if record is None or not path.is_file():
        return None
    try:
        X = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if list(X.shape) != list(record["shape"]):
        return None
    rows = pd.DataFrame(record["rows"], columns=list(ROW_COLUMNS))
    return FeatureSet(X=X, rows=rows, contexts=record["contexts"], checkpoint=ckpt_id)


def features_for(ctx: Any, *, max_points: int = 48, max_tokens: int = 4096, batch_tokens: int = 16384) -> FeatureSet:
    """A harness context's features: from the cache, or extracted now and cached. `batch_tokens`
    (padded tokens per forward pass) bounds the memory of the pass, not the features."""
    params = features_params(ctx.fingerprint, ctx.config, max_points=max_points, max_tokens=max_tokens)
    fs = load_features(ctx.cache, ctx.checkpoint.id, params)
    if fs is not None:
        return fs
    generations = ctx.generations
    lm = ctx.require_model()
    fs = extract_features(lm, ctx.tokenizer, ctx.puzzles, generations, prompt_style=ctx.config.generation.prompt_style,
                          max_points=max_points, max_tokens=max_tokens, checkpoint=ctx.checkpoint.id,
                          progress=ctx.progress, batch_tokens=batch_tokens)
    save_features(ctx.cache, ctx.checkpoint.id, params, fs)
    return load_features(ctx.cache, ctx.checkpoint.id, params) or fs
