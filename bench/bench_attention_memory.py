"""Peak memory of step x step attention with and without the reduction inside the pass.

    python bench/bench_attention_memory.py                       # SmolLM2-135M, a 1,000-token trace
    python bench/bench_attention_memory.py --model kk-tiny --tokens 1000

Two ways to get the same (L, H, S, S) step matrices from one forward pass:

* full:    keep every layer's fp32 T x T attention probabilities, reduce after the pass;
* reduced: `analysis.attention.step_matrices`: reduce each layer inside the pass, in chunks of
           query rows, keeping only the step matrices.

Each runs in a fresh process; the figure is the rise of the peak resident set size over a
baseline taken after loading the model and running one plain forward of the same length.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_trace(tokenizer, n_tokens: int):
    """A chat prompt for a 7-person probe puzzle and a canonical trace (English steps with
    Chinese ones mixed in), repeated until the sequence holds `n_tokens` tokens."""
    from analysis.attention import encode_trace
    from train.generate import render_prompts
    from analysis.harness import PuzzleSetConfig, puzzle_set
    from analysis.neurons import mixed_trace
    from analysis.verify_prob import canonical_trace

    p = puzzle_set(PuzzleSetConfig(sizes=(7,), per_size=1))[0]
    prompt = render_prompts(tokenizer, [p], "chat")[0]
    body = canonical_trace(p) + "\n" + mixed_trace(p)
    response = "<think>" + body
    while len(tokenizer(prompt + response, add_special_tokens=False)["input_ids"]) < n_tokens + 10:
        response += "\nLet me check again.\n" + body
    trace = encode_trace(tokenizer, prompt, response, max_tokens=n_tokens)
    if len(trace.ids) != n_tokens:
        raise SystemExit(f"could not build a {n_tokens}-token trace")
    return trace


def child(model: str, n_tokens: int, mode: str, chunk: int) -> dict:
    import torch

    from analysis.attention import attention_layout, attention_probs, reduce_probs, rotary_tables, step_matrices
    from analysis.harness import load_model

    torch.set_num_threads(1)
    lm, tok = load_model(model)
    hf = lm._module
    trace = make_trace(tok, n_tokens)
    layout = attention_layout(hf)
    x = torch.tensor([trace.ids])
    with torch.no_grad():
        hf(x, logits_to_keep=1, use_cache=False)        # baseline: the plain eager forward
    base = peak_mib()
    t0 = time.perf_counter()
    if mode == "reduced":
        mass, block = step_matrices(lm, trace.ids, trace.bounds, chunk=chunk, layout=layout)
        kept = mass.nbytes + block.nbytes
    else:
        cos, sin = rotary_tables(hf, len(trace.ids))
        probs = []
        with torch.no_grad(), lm.trace(x, use_cache=False, logits_to_keep=1):
            for layer in lm.model.layers:
                q = layer.self_attn.q_proj.output[0]
                k = layer.self_attn.k_proj.output[0]
                probs.append(attention_probs(q, k, layout, cos, sin).save())
        kept = sum(p.numel() * p.element_size() for p in probs)
        reduced = [reduce_probs(p, trace.bounds) for p in probs]
        mass = torch.stack([m for m, _ in reduced]).numpy()
        block = torch.stack([b for _, b in reduced]).numpy()
    seconds = time.perf_counter() - t0
    return {"mode": mode, "peak_rise_mib": peak_mib() - base, "baseline_mib": base, "kept_mib": kept / 2 ** 20,
            "seconds": seconds, "layers": layout.n_layers, "heads": layout.n_heads, "tokens": len(trace.ids),
            "steps": len(trace.bounds), "checksum": float(mass.sum()), "block_checksum": float(block.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="preset name (train.models) or HF folder")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=256, help="query rows per probability block (reduced)")
    ap.add_argument("--mode", choices=["full", "reduced"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(child(args.path, args.tokens, args.mode, args.chunk)))
        return

    from train.models import resolve_model

    path = resolve_model(args.model)
    rows = {}
    for mode in ("full", "reduced"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--path", str(path), "--tokens",
                              str(args.tokens), "--chunk", str(args.chunk)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{mode} run failed:\n{out.stderr[-2000:]}")
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    f, r = rows["full"], rows["reduced"]
    print(f"model {args.model} ({f['layers']} layers x {f['heads']} heads), {f['tokens']} tokens, {f['steps']} steps")
    for m in (f, r):
        print(f"{m['mode']:>8}: peak memory +{m['peak_rise_mib']:8.1f} MiB over the plain forward "
              f"(kept tensors {m['kept_mib']:8.2f} MiB), {m['seconds']:.1f} s")
    # ru_maxrss moves in pages: a reduced pass that stays under the plain forward's own peak
    # rises by nothing, and a ratio against that would be meaningless.
    rise = (f"{f['peak_rise_mib'] / r['peak_rise_mib']:.1f}x" if r["peak_rise_mib"] >= 1.0
            else "n/a (the reduced pass stays within the plain forward's peak)")
    print(f"ratio full / reduced peak rise: {rise}; kept tensors: {f['kept_mib'] / r['kept_mib']:.0f}x")
    same = abs(f["checksum"] - r["checksum"]) <= 1e-3 * max(1.0, abs(f["checksum"]))
    print(f"same step matrices: {same} (sum of mass {f['checksum']:.6f} vs {r['checksum']:.6f})")


if __name__ == "__main__":
    main()
