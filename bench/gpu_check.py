"""The GPU path, measured in one go (under 8 minutes on one GPU): GRPO steps of SmolLM2-135M with
the TRL engine in bf16, then `analysis report` on the base and the last GRPO checkpoint, one
analysis at a time, against a bare forward pass over the same puzzle set.

    bash bench/gpu_check.sh                     # installs from WHEELS=<folder> when given, then this
    python bench/gpu_check.py --out bench/gpu-check [--steps 4] [--device cuda]

Every phase runs as its own process (`python bench/gpu_check.py phase ...`) so that its peak GPU
memory (torch.cuda.max_memory_allocated) and wall time are its own. Writes <out>/gpu_check.md
and gpu_check.json: s/step and generated tokens/s of GRPO; per analysis its wall time, the ratio
to the bare forward pass and the peak memory; the device and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ANALYSES = ("behaviours", "verify_prob", "attention", "neurons", "drift", "probes")
PUZZLES = ["--puzzle-sizes", "3,5", "--puzzles-per-size", "4", "--max-new-tokens", "256"]


def phase(stats_file: str, module: str, *argv: str) -> None:
    """Run `python -m module argv` in this process; write its wall time and peak GPU memory."""
    import torch

    start, code = time.perf_counter(), 0
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        Path(stats_file).write_text(json.dumps({"wall_s": time.perf_counter() - start, "peak_bytes": peak,
                                                "exit": code}))
    sys.exit(code)


def bare_forward(registry: str, device: str) -> None:
    """The forward pass no analysis can avoid: every prompt of the puzzle set with its response
    budget of tokens, once, no_grad, on each checkpoint of the registry."""
    import torch

    from analysis.harness import PuzzleSetConfig, puzzle_set
    from train.generate import render_prompts
    from train.models import load_model_and_tokenizer
    from train.registry import Registry

    reg = Registry(registry)
    puzzles = puzzle_set(PuzzleSetConfig(sizes=(3, 5), per_size=4))
    for ck in reg.checkpoints():
        model, tok = load_model_and_tokenizer(reg.resolve(ck), device=device)
        with torch.no_grad():
            for prompt in render_prompts(tok, puzzles, "chat"):
                ids = tok(prompt, return_tensors="pt").input_ids.to(model.device)
                pad = torch.full((1, 256), tok.eos_token_id, device=model.device)
                model(torch.cat([ids, pad], dim=1))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        del model


def run_phase(name: str, out: Path, module: str, *argv: str) -> dict:
    stats = out / f"{name}.stats.json"
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.run([sys.executable, __file__, "phase", str(stats), module, *argv], cwd=out,
                              stdout=log, stderr=subprocess.STDOUT)
    result = json.loads(stats.read_text()) if stats.exists() else {"exit": proc.returncode}
    print(f"{name:<24} exit {result.get('exit')}  {result.get('wall_s', 0):7.1f} s  "
          f"peak {result.get('peak_bytes', 0) / 2**30:6.2f} GiB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "gpu-check")
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="smollm2-135m", help="model preset or HF folder")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KKLAB_CACHE", str(out / "models"))

    import torch
    import yaml

    from train.models import resolve_model

    base = resolve_model(args.preset, progress=False)
    stage = {"people": [3], "batch_prompts": 4, "rollout_n": 8, "temperature": {"start": 1.0},
             "lr": {"start": 1e-6}, "max_prompt_length": 512, "max_response_length": 256,
             "steps": args.steps, "save_every": args.steps}
    sched = {"run": "gpu-check", "preset": str(base), "data": {"root": str(out / "data"), "train_per_size": 64,
                                                               "test_per_size": 8},
             "stages": {"stage1": stage, "stage2": {**stage, "people": [5]}, "stage3": {**stage, "people": [3, 5]}}}
    (out / "sched.yaml").write_text(yaml.safe_dump(sched))
    registry = str(out / "ckpts.yaml")

    results: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                     "torch": torch.__version__, "steps": args.steps}
    grpo = run_phase("grpo", out, "train.run", "stage1", "--schedule", str(out / "sched.yaml"),
                     "--registry", registry, "--runs-dir", str(out / "runs"), "--quiet")
    steps = [json.loads(line) for line in (out / "runs" / "gpu-check" / "metrics.jsonl").read_text().splitlines()]
    times = [s["time"] for s in steps]
    per_step = (times[-1] - times[0]) / max(1, len(times) - 1)
    tokens = sum(s.get("length_mean", 0) for s in steps[1:]) * stage["batch_prompts"] * stage["rollout_n"]
    results["grpo"] = {**grpo, "s_per_step": per_step, "generated_tokens_per_s": tokens / max(1e-9, times[-1] - times[0])}

    bare = run_phase("bare_forward", out, "bench.gpu_check", "bare", registry, args.device)
    results["bare_forward"] = bare
    results["analyses"] = {}
    for name in ANALYSES:
        r = run_phase(f"report-{name}", out, "analysis", "report", "--registry", registry, "--analyses", name,
                      *PUZZLES, "--device", args.device, "--out", str(out / "reports"), "--cache",
                      str(out / "cache"))
        r["ratio_to_bare"] = r.get("wall_s", 0) / max(1e-9, bare.get("wall_s", 0))
        results["analyses"][name] = r
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    lines = [f"# GPU check: {results['device']}, torch {results['torch']}", "",
             f"GRPO ({args.steps} steps, 4 prompts x 8 responses, 256 tokens, "
             f"{'bf16' if torch.cuda.is_available() else 'fp32'}): "
             f"{per_step:.2f} s/step, {results['grpo']['generated_tokens_per_s']:.0f} generated tokens/s, "
             f"peak {grpo.get('peak_bytes', 0) / 2**30:.2f} GiB", "",
             "| phase | wall s | x bare forward | peak GiB |", "| --- | --- | --- | --- |",
             f"| bare forward (2 checkpoints, 8 puzzles) | {bare.get('wall_s', 0):.1f} | 1.0 | "
             f"{bare.get('peak_bytes', 0) / 2**30:.2f} |"]
    for name, r in results["analyses"].items():
        lines.append(f"| {name} | {r.get('wall_s', 0):.1f} | {r['ratio_to_bare']:.1f} | "
                     f"{r.get('peak_bytes', 0) / 2**30:.2f} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "phase":
        phase(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "bare":
        bare_forward(*sys.argv[2:4])
    else:
        main()
