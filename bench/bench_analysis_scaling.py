"""Peak memory and time of every analysis as the model and the response grow, carried to
Qwen2.5-7B at 4,096 tokens (docs/scaling.md reads the table).

    python bench/bench_analysis_scaling.py          # what docs/measurements/analysis-scaling.jsonl lacks, then the table
    python bench/bench_analysis_scaling.py --hidden 256 --tokens 512 --out /tmp/one.jsonl   # one size and length

Models: random-initialised Qwen2 with the Qwen2.5 layer structure (grouped-query attention with
4 query heads per key/value head, SwiGLU MLP 5.25x wide, RMSNorm, untied unembedding, rope theta
1e6), hidden 256 / 512 / 1024, head dim 64, 4 layers, and SmolLM2's tokenizer (49,152 tokens;
the model's vocabulary must fit its tokenizer). Responses: 4 puzzles of 7 people, each answered
with a canonical trace (steps in Chinese and English, "Let me check again." between repeats)
cut at 512 / 1,024 / 2,048 response tokens.

Each (analysis, size, length) point runs in a fresh process, fp32, one torch thread: load the
model, one bare forward of every response (the pass no analysis avoids), the analysis once on
128-token responses (imports and first-call set-up), then, measured, on the 4 responses. Peak
memory is the anonymous resident memory sampled every 2 ms above the level before the measured
step, for the bare forwards and for the analysis alike; time is the analysis's wall time over
the 4 bare forwards' time.

To 7B: the bare forward's peak is fitted (non-negative least squares) as a mix of one layer's
attention scores and one layer's MLP activations, and evaluated at Qwen2.5-7B's shape; each
analysis adds what it keeps beyond its pass (`kept_mib`, from its code and default options),
which the measured points bound (the analysis's peak less its passes' is small at every size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.bench_analysis import PeakRSS  # noqa: E402

HIDDEN = (256, 512, 1024)
TOKENS = (512, 1024, 2048)
LAYERS = 4
N_RESPONSES = 4
ANALYSES = ("behaviours", "verify_prob", "attention", "probes", "neurons", "drift")
# Options that keep each point a few minutes on 2 cores; none changes how memory grows.
OPTIONS = {
    "verify_prob": {"max_tokens": 8192, "n_boot": 200},
    "attention": {"max_tokens": 8192, "n_boot": 200},
    "probes": {"max_tokens": 8192, "n_permutations": 2, "control_draws": 1, "n_splits": 2, "inner_splits": 2,
               "save_probes": False},
    "neurons": {"max_tokens": 8192, "source": "own", "ks": "5", "n_random": 1, "min_switch_points": 2,
                "min_switch_contexts": 2},
}
# A row of the table that runs an analysis with other options: its bound by option.
VARIANTS = {"probes@batch_tokens=4096": ("probes", {**OPTIONS["probes"], "batch_tokens": 4096})}
VOCAB_ROWS = {"verify_prob", "neurons"}       # hold next-token distributions over the vocabulary
GPU_GIB = 80


class AnonymousPeak(PeakRSS):
    """Peak anonymous resident memory (resident set size less file-backed pages, so weights
    read through memory-mapped safetensors do not count) above the level at entry."""

    def read(self) -> int:
        info = self.proc.memory_info()
        return info.rss - info.shared


# --------------------------------------------------------------------------- models and responses

def qwen25_like(hidden: int) -> dict:
    heads = hidden // 64
    return {"hidden_size": hidden, "num_hidden_layers": LAYERS, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 4), "intermediate_size": int(round(hidden * 5.25 / 64)) * 64,
            "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 32768}


def build_model(folder: Path, hidden: int, seed: int) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from train.models import resolve_model

    if (folder / "config.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **qwen25_like(hidden))
    model = Qwen2ForCausalLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def responses(tokenizer, puzzles, n_tokens: int) -> list[dict]:
    """Generation records (the harness's shape) whose responses hold exactly `n_tokens` tokens."""
    from analysis.neurons import mixed_trace
    from analysis.verify_prob import canonical_trace

    records = []
    for p in puzzles:
        body = mixed_trace(p) + "\n" + canonical_trace(p)
        text = "<think>" + body
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
            text += "\nLet me check again.\n" + body
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
        text = tokenizer.decode(ids)
        records.append({"puzzle_id": p.id, "people": p.people, "names": list(p.names), "prompt_style": "chat",
                        "text": text, "n_tokens": n_tokens, "finished": False, "answer": "no_answer",
                        "correct": False, "score": -1.0, "format_ok": False})
    return records


# --------------------------------------------------------------------------- one point (child)

def measure(analysis: str, hidden: int, n_tokens: int, models: Path) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    from analysis.cache import ResultCache
    from analysis.drift import weight_drift
    from analysis.harness import (AnalysisContext, HarnessConfig, PuzzleSetConfig, get_analysis, load_model,
                                  puzzle_set)
    from train.generate import render_prompts
    from train.registry import Checkpoint

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    path = build_model(models / f"h{hidden}-a", hidden, seed=0)
    if analysis == "drift":
        ref = build_model(models / f"h{hidden}-b", hidden, seed=1)
        with AnonymousPeak() as mem:
            t0 = time.perf_counter()
            weight_drift(path, ref)
            seconds = time.perf_counter() - t0
        from safetensors import safe_open

        n_params = 0
        for f in path.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as fh:
                n_params += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
        return {"analysis": analysis, "hidden": hidden, "tokens": n_tokens, "params": n_params,
                "extra_mib": mem.delta_mb, "seconds": seconds, "bare_seconds": None, "bare_extra_mib": None}

    config = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(7,), per_size=N_RESPONSES))
    puzzles = puzzle_set(config.puzzles)
    lm, tok = load_model(path)
    records = responses(tok, puzzles, n_tokens)
    prompts = render_prompts(tok, puzzles, "chat")
    seqs = [tok(pr + r["text"], add_special_tokens=False)["input_ids"] for pr, r in zip(prompts, records)]
    hf = lm._module
    with torch.no_grad():
        hf(torch.tensor([seqs[0][:64]]), use_cache=False)            # warm-up
        with AnonymousPeak() as bare_mem:
            t0 = time.perf_counter()
            for s in seqs:
                hf(torch.tensor([s]), use_cache=False, logits_to_keep=1)
            bare = time.perf_counter() - t0
    ck = Checkpoint(id=f"bench/h{hidden}", path=str(path))
    name, options = VARIANTS.get(analysis, (analysis, OPTIONS.get(analysis, {})))
    job = get_analysis(name, **options)

    def context(cache: str, recs: list[dict]) -> AnalysisContext:
        return AnalysisContext(checkpoint=ck, path=path, model=lm, tokenizer=tok, puzzles=puzzles, config=config,
                               cache=ResultCache(Path(cache)), fingerprint=f"bench-h{hidden}", _generations=recs)

    with tempfile.TemporaryDirectory() as warm, tempfile.TemporaryDirectory() as tmp:
        job.run(context(warm, responses(tok, puzzles, 128)))   # imports and first-call set-up, not measured
        with AnonymousPeak() as mem:
            t0 = time.perf_counter()
            job.run(context(tmp, records))
            seconds = time.perf_counter() - t0
    return {"analysis": analysis, "hidden": hidden, "tokens": n_tokens, "params": sum(p.numel() for p in hf.parameters()),
            "sequence": max(len(s) for s in seqs), "extra_mib": mem.delta_mb, "seconds": seconds,
            "bare_seconds": bare, "bare_extra_mib": bare_mem.delta_mb}


# --------------------------------------------------------------------------- fit and table

# --------------------------------------------------------------------------- the model of memory

def shape(hidden: int, sequence: int, **over) -> dict:
    """The quantities memory depends on, for a model of this bench (or `over`, e.g. Qwen2.5-7B)."""
    cfg = qwen25_like(hidden)
    return {"layers": LAYERS, "hidden": hidden, "heads": cfg["num_attention_heads"],
            "kv_heads": cfg["num_key_value_heads"], "head_dim": 64, "mlp": cfg["intermediate_size"],
            "vocab": 49152, "seq": sequence, **over}


QWEN7B_SHAPE = shape(3584, 4096 + 320, layers=28, heads=28, kv_heads=4, head_dim=128, mlp=18944, vocab=152064)
QWEN7B_WEIGHTS_GIB = 7.62e9 * 2 / 2 ** 30


def forward_terms(s: dict) -> list[float]:
    """MiB of one layer's fp32 attention scores (heads x seq x seq) and MLP activations (seq x mlp):
    a forward's transient peak is a mix of these (eager attention, one layer at a time)."""
    return [s["heads"] * s["seq"] ** 2 * 4 / 2 ** 20, s["seq"] * s["mlp"] * 4 / 2 ** 20]


def fit_forward(rows: list[dict]) -> tuple[list[float], float]:
    """Non-negative least squares of the bare forward's measured peak rise on `forward_terms`;
    (coefficients, R^2)."""
    import numpy as np
    from scipy.optimize import nnls

    pts = [r for r in rows if r.get("bare_extra_mib") is not None]
    X = np.array([forward_terms(shape(r["hidden"], r["sequence"])) for r in pts])
    y = np.array([r["bare_extra_mib"] for r in pts])
    coef, _ = nnls(X, y)
    pred = X @ coef
    return [float(c) for c in coef], 1.0 - float(((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def kept_mib(name: str, s: dict) -> float:
    """What the analysis holds beyond its forward pass, from its code and default options: the
    logit lens at 48 decision points per layer and the KV cache of the phrase scoring
    (verify_prob); step x step matrices of up to 256 steps and one chunk of 256 query rows
    (attention); the residual at 48 points per layer for 100 responses (probes, on the host); the
    per-layer sums and 50 switch points (neurons, float64 on the host); five fp32 copies of the
    largest tensor: both, their difference and two of its temporaries (drift, on the host)."""
    L, S = s["layers"], s["seq"]
    entries = {"behaviours": 0.0,
               "verify_prob": L * 48 * s["vocab"] + 2 * L * S * s["kv_heads"] * s["head_dim"],
               "attention": 2 * L * s["heads"] * 256 ** 2 + 256 * s["heads"] * S,
               "probes": 100 * (L + 1) * 48 * s["hidden"],
               "neurons": 2 * L * (3 + 2 * 50) * s["mlp"],
               "drift": 5 * s["vocab"] * s["hidden"]}[name]
    return entries * 4 / 2 ** 20


def unreduced_mib(name: str, s: dict) -> float:
    """What the analysis would hold in fp32 without its reduction inside the pass: every layer's
    logit lens at every position (verify_prob), every layer's attention probabilities (attention),
    every layer's MLP activations at every position (neurons), every layer's residual at every
    position (probes); drift and behaviours have no such pass."""
    L, S = s["layers"], s["seq"]
    entries = {"behaviours": 0, "verify_prob": L * S * s["vocab"], "attention": L * s["heads"] * S * S,
               "probes": (L + 1) * S * s["hidden"], "neurons": L * S * s["mlp"], "drift": 0}[name]
    return entries * 4 / 2 ** 20


def sequences_per_pass(name: str, options: dict, seq: int) -> int:
    """Responses that share one forward pass (probes batches up to `batch_tokens` padded tokens)."""
    if name != "probes":
        return 1
    return max(1, min(N_RESPONSES, options.get("batch_tokens", 16384) // seq))


def table(rows: list[dict]) -> str:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["analysis"], []).append(r)
    coef, r2 = fit_forward(rows)
    bare7 = sum(c * t for c, t in zip(coef, forward_terms(QWEN7B_SHAPE)))
    top_h, top_t = HIDDEN[-1], TOKENS[-1]
    out = [f"Bare forward: peak rise = {coef[0]:.2f} x one layer's attention scores + {coef[1]:.2f} x one layer's "
           f"MLP activations (fp32), R² = {r2:.2f} over the measured points; Qwen2.5-7B at 4,096 response "
           f"tokens: {bare7 / 1024:.1f} GiB. Weights in bf16: {QWEN7B_WEIGHTS_GIB:.1f} GiB.", "",
           f"| analysis | peak over a bare forward's peak, MiB, hidden {top_h}: {' / '.join(f'{t:,}' for t in TOKENS)} "
           "tokens | largest such difference over the sizes | time / bare forward "
           f"(hidden {top_h}, {top_t:,} tokens) | without its in-pass reduction, hidden {top_h} / 7B | "
           "7B at 4,096 tokens: forward peak + kept | fits one 80 GB GPU |",
           "|---|---|---|---|---|---|---|"]
    for name in (*ANALYSES, *VARIANTS):
        pts = by.get(name, [])
        if not pts:
            continue
        kind, options = VARIANTS.get(name, (name, OPTIONS.get(name, {})))
        cell = {(r["hidden"], r["tokens"]): r for r in pts}
        if kind == "drift":
            d = max(pts, key=lambda r: r["params"])
            gib = kept_mib(kind, QWEN7B_SHAPE) / 1024
            model = kept_mib(kind, shape(d["hidden"], 0))
            out.append(f"| {name} | {d['extra_mib']:.0f} MiB at {d['params'] / 1e6:.0f}M parameters (weights only, "
                       f"no forward; its model: {model:.0f} MiB) | – | – | – | {gib:.1f} GiB of host memory "
                       f"| runs on the CPU |")
            continue
        if kind == "behaviours":
            worst = max(r["extra_mib"] for r in pts)
            out.append(f"| {name} | {worst:.1f} MiB at most (text only, no forward) | – | – | – | 0 | yes |")
            continue

        def over(r: dict) -> float:
            return r["extra_mib"] - sequences_per_pass(kind, options, r["sequence"]) * r["bare_extra_mib"]

        diffs = " / ".join(f"{over(cell[top_h, t]):+.0f}" if (top_h, t) in cell else "–" for t in TOKENS)
        worst = max((over(r) for r in pts), key=abs)
        top = cell.get((top_h, top_t))
        ratio = f"{top['seconds'] / top['bare_seconds']:.1f}x" if top else "–"
        small = unreduced_mib(kind, shape(top_h, top["sequence"])) if top else float("nan")
        big = unreduced_mib(kind, QWEN7B_SHAPE) / 1024
        n7 = sequences_per_pass(kind, options, QWEN7B_SHAPE["seq"])
        need = (n7 * bare7 + kept_mib(kind, QWEN7B_SHAPE)) / 1024 if kind != "behaviours" else 0.0
        fits = "yes" if QWEN7B_WEIGHTS_GIB + need < GPU_GIB * 0.9 else "no"
        out.append(f"| {name} | {diffs} | {worst:+.0f} | {ratio} | {small:.0f} MiB / {big:.1f} GiB | "
                   f"{need:.1f} GiB{f' ({n7} responses a pass)' if n7 > 1 else ''} | {fits} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, action="append", help=f"hidden sizes (default {HIDDEN})")
    ap.add_argument("--tokens", type=int, action="append", help=f"response lengths (default {TOKENS})")
    ap.add_argument("--analyses", default=",".join([*ANALYSES, *VARIANTS]))
    ap.add_argument("--out", default="docs/measurements/analysis-scaling.jsonl",
                    help="measurements (a rerun measures only the points missing from it)")
    ap.add_argument("--models", default=None, help="folder for the random models (default: a temporary one)")
    ap.add_argument("--point", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point:
        name, hidden, n_tokens, models = args.point.split(":", 3)
        print(json.dumps(measure(name, int(hidden), int(n_tokens), Path(models))))
        return

    hidden, tokens = args.hidden or list(HIDDEN), args.tokens or list(TOKENS)
    analyses = [a for a in args.analyses.split(",") if a]
    out = Path(args.out)
    done = [json.loads(l) for l in out.read_text().splitlines() if l.strip()] if out.is_file() else []
    have = {(r["analysis"], r["hidden"], r["tokens"]) for r in done}
    models = Path(args.models) if args.models else Path(tempfile.mkdtemp(prefix="scaling-models-"))
    from rich.progress import Progress

    todo = [(a, h, t) for h in hidden for t in tokens for a in analyses
            if (a, h, t) not in have and not (a == "drift" and t != tokens[0])]
    with Progress() as progress:
        task = progress.add_task("points", total=len(todo))
        for a, h, t in todo:
            progress.update(task, description=f"{a} h{h} {t} tokens")
            res = subprocess.run([sys.executable, __file__, "--point", f"{a}:{h}:{t}:{models}"],
                                 capture_output=True, text=True)
            if res.returncode:
                progress.console.print(f"[red]{a} h{h} {t}: failed[/] {res.stderr.strip().splitlines()[-1:]}")
            else:
                row = json.loads(res.stdout.strip().splitlines()[-1])
                done.append(row)
                with out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
            progress.advance(task)
    print(table(done))


if __name__ == "__main__":
    main()
