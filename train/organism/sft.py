"""SFT: the fine-tuning loop, and `build`, which writes a finished organism folder."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from train.models import ORGANISM_FILE
from train.organism.config import BUILD_VERSION, OrganismConfig, use_bf16
from train.organism.data import encode_example, heldout_puzzles, sft_puzzles, sft_traces
from train.organism.model import make_model, uses_value_tokens
from train.organism.tokenizer import train_tokenizer

def _batches(lengths: Sequence[int], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Index batches of similar length (little padding), in a seeded random order."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), 256):           # sort within chunks, not globally
        chunk = sorted(order[start:start + 256], key=lambda i: lengths[i])
        batch: list[int] = []
        for i in chunk:
            if batch and (len(batch) + 1) * max(lengths[j] for j in batch + [i]) > batch_tokens:
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def sft(model, examples: Sequence[tuple[list[int], int]], config: OrganismConfig, pad_id: int,
        progress: bool = True, callback: Callable[[int, float], None] | None = None,
        desc: str = "kk-tiny SFT") -> list[float]:
    """Plain causal-LM fine-tuning with the loss on the response tokens only; returns the
    per-step losses. `callback(step, loss)` runs after every optimizer step."""
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(config.threads)
    # Every example starts with the same system turn: run it once per step and share its keys
    # and values across the batch (exact, and about a third less compute).
    first = examples[0][0]
    shared = min(n_prompt for _, n_prompt in examples) - 1   # keep a prompt token to predict from
    for ids, _ in examples:
        while shared and ids[:shared] != first[:shared]:
            shared -= 1
    prefix = torch.tensor([first[:shared]]) if shared else None

    rng = random.Random(config.seed + 2)
    lengths = [len(ids) - shared for ids, _ in examples]
    plan: list[list[int]] = []
    whole, frac = int(config.epochs), config.epochs - int(config.epochs)
    for _ in range(whole):
        plan += _batches(lengths, config.batch_tokens, rng)
    if frac > 0:
        extra = _batches(lengths, config.batch_tokens, rng)
        plan += extra[: max(1, round(frac * len(extra)))]

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=config.lr, betas=(0.9, 0.95))
    total = len(plan)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        t = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
        return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    bf16 = use_bf16(config)
    model.train()
    losses = []
    bar = tqdm(plan, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), shared + width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq, n_prompt = examples[i]
            ids[row, : len(seq) - shared] = torch.tensor(seq[shared:])
            labels[row, n_prompt - shared: len(seq) - shared] = torch.tensor(seq[n_prompt:])
            mask[row, : len(seq)] = 1
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            cache = None
            if prefix is not None:
                cache = model.model(input_ids=prefix, use_cache=True).past_key_values
                for layer in cache.layers:
                    layer.keys = layer.keys.expand(len(batch), -1, -1, -1)
                    layer.values = layer.values.expand(len(batch), -1, -1, -1)
            positions = torch.arange(shared, shared + width).expand(len(batch), width)
            logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache,
                           position_ids=positions).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if callback is not None:
            callback(step, losses[-1])
    model.eval()
    return losses


# --------------------------------------------------------------------------- build

def build(out_dir: str | Path, config: OrganismConfig | None = None, progress: bool = True,
                  monitor_every: int = 0, monitor_puzzles: int = 16) -> Path:
    """Write a kk-tiny organism (model, tokenizer, generation config, organism.json) to `out_dir`.

    With `monitor_every` > 0, every that many SFT steps (and at the end) the loss per token
    class (`teacher_forced_losses`) on `monitor_puzzles` held-out 3-person puzzles is printed
    and kept in organism.json as `sft_curve`: the learning curve of each skill.
    """
    import torch

    config = config or OrganismConfig()
    out = Path(out_dir)
    t0 = time.time()
    torch.set_num_threads(config.threads)
    puzzles = sft_puzzles(config)
    traces = sft_traces(puzzles, config)
    from train.prompts import SYSTEM_PROMPT

    tok = train_tokenizer([SYSTEM_PROMPT] + [p.quiz for p in puzzles] + [t.text for t in traces],
                          config.vocab_size, config.names_as_tokens, config.clause_tokens,
                          value_tokens=uses_value_tokens(config),
                          think_token=config.think_head and config.induction_init,
                          node_people=max(config.sizes))
    examples = [encode_example(tok, p, t.text) for p, t in zip(puzzles, traces)]
    kept = [e for e in examples if len(e[0]) <= config.max_length]
    model = make_model(config, tok)
    # Two phases, each with its own warm-up and decay: the bare quiz first, then the full prompt.
    phases = [("full prompt", kept, config)]
    if config.bare_quiz_epochs > 0:
        bare = [encode_example(tok, p, t.text, bare=True) for p, t in zip(puzzles, traces)]
        phases.insert(0, ("bare quiz", [e for e in bare if len(e[0]) <= config.max_length],
                          config.model_copy(update={"epochs": config.bare_quiz_epochs})))
    curve: list[dict[str, Any]] = []
    losses: list[float] = []
    monitor = heldout_puzzles(3, monitor_puzzles, config.heldout_seed) if monitor_every > 0 else []

    def record(phase: str, step: int, loss: float) -> None:
        from train.organism.measure import teacher_forced_losses

        # Always measured with the full prompt, the one the organism is used with.
        per_class = teacher_forced_losses(model, tok, monitor, seed=config.seed, config=config)
        model.train()
        curve.append({"step": step, "phase": phase, "train_loss": round(loss, 4),
                      **{k: v["loss"] for k, v in per_class.items()}})
        if progress:
            from tqdm.auto import tqdm

            tqdm.write("kk-tiny SFT " + " ".join(f"{k} {v}" for k, v in curve[-1].items()))

    for phase, phase_examples, phase_config in phases:
        done = len(losses)       # steps of earlier phases: the curve counts steps across phases

        def callback(step: int, loss: float) -> None:
            if monitor and (done + step + 1) % monitor_every == 0:
                record(phase, done + step + 1, loss)
        losses += sft(model, phase_examples, phase_config, tok.pad_token_id, progress=progress,
                      callback=callback, desc=f"kk-tiny SFT, {phase}")
    if monitor and (not curve or curve[-1]["step"] != len(losses)):
        record(phases[-1][0], len(losses), losses[-1])
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    n_tokens = sum(len(ids) for ids, _ in kept)
    info = {
        "preset": "kk-tiny",
        "config": config.model_dump(mode="json"),
        "fingerprint": config.fingerprint(),
        "build_version": BUILD_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "sft_examples": len(kept),
        "sft_dropped_too_long": len(examples) - len(kept),
        "sft_tokens": n_tokens,
        "sft_steps": len(losses),
        "sft_final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "trace_stats": {
            "correct": sum(t.correct for t in traces) / len(traces),
            "verified": sum(t.verified for t in traces) / len(traces),
            "think_format": sum(t.answer_style == "think" for t in traces) / len(traces),
        },
        "bf16": use_bf16(config),
        "build_seconds": round(time.time() - t0, 1),
    }
    if curve:
        info["sft_curve"] = curve
    (out / ORGANISM_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out
