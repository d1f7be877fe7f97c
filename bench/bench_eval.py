"""Generation throughput of `train.generate.generate` (batched) against a plain per-prompt
`model.generate` loop, on the same prompts in the same run.

    python bench/bench_eval.py [--prompts 32] [--max-new-tokens 64] [--batch-size 16] [--threads 1]

Model: kk-tiny when `train.models.resolve_model("kk-tiny", build=False)` finds it, else the
test fixture's tiny random Qwen2 (built into a temporary folder). Greedy decoding on chat
prompts of held-out puzzles (3-5 people); both paths stop at the same end tokens. Reports
generated tokens per second of each (best of --repeats, time.perf_counter), the ratio (target:
batched no slower), and on how many prompts the two produced the same tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def find_model(tmp: Path) -> tuple[Path, str]:
    try:
        from train.models import resolve_model

        path = resolve_model("kk-tiny", build=False)
        if path is not None and Path(path).is_dir():
            return Path(path), "kk-tiny"
    except Exception:  # absent module or model not built: fall back to the fixture model
        pass
    from tests.conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp / "tiny"), "tiny random Qwen2 (tests.conftest.make_tiny_checkpoint)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.evaluate import heldout_puzzles
    from train.generate import generate, render_prompts, stop_token_ids

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path, name = find_model(Path(tmp))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path)
    per_size = -(-args.prompts // 3)
    puzzles = heldout_puzzles([3, 4, 5], per_size)[: args.prompts]
    prompts = render_prompts(tok, puzzles, "chat")
    stops = sorted(stop_token_ids(tok, model.generation_config))
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    n_params = sum(p.numel() for p in model.parameters())
    prompt_lens = [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
    print(f"model: {name}, {n_params / 1e6:.2f}M parameters; {len(prompts)} prompts of "
          f"{min(prompt_lens)}-{max(prompt_lens)} tokens; greedy, max_new_tokens={args.max_new_tokens}; "
          f"torch threads={args.threads}")

    def batched():
        outs = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, progress=False, backend="transformers")
        return [list(o[0].token_ids) for o in outs]

    def loop():
        result = []
        with torch.no_grad():
            for p in prompts:
                enc = tok(p, return_tensors="pt", add_special_tokens=False)
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     eos_token_id=stops, pad_token_id=pad)
                ids = out[0, enc.input_ids.shape[1]:].tolist()
                # Keep up to the first end token, as `generate` reports it.
                cut = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
                result.append(ids[:cut])
        return result

    def timed(fn):
        best, tokens = float("inf"), None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tokens = fn()
            best = min(best, time.perf_counter() - t0)
        return best, tokens

    # Warm up both paths (first-call allocations, lazy imports).
    generate(model, tok, prompts[:2], max_new_tokens=4, progress=False, backend="transformers")
    with torch.no_grad():
        model.generate(**tok(prompts[0], return_tensors="pt", add_special_tokens=False), max_new_tokens=4,
                       do_sample=False, pad_token_id=pad)

    t_batch, ids_batch = timed(batched)
    t_loop, ids_loop = timed(loop)
    n_batch = sum(len(x) for x in ids_batch)
    n_loop = sum(len(x) for x in ids_loop)
    same = sum(a == b for a, b in zip(ids_batch, ids_loop))
    rate_batch, rate_loop = n_batch / t_batch, n_loop / t_loop
    print(f"train.generate.generate (batch {args.batch_size}): {n_batch} tokens in {t_batch:.2f} s = {rate_batch:,.0f} tok/s")
    print(f"per-prompt model.generate loop:        {n_loop} tokens in {t_loop:.2f} s = {rate_loop:,.0f} tok/s")
    print(f"ratio batched / loop: {rate_batch / rate_loop:.2f}x; identical tokens on {same}/{len(prompts)} prompts")


if __name__ == "__main__":
    main()
