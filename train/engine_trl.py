"""The TRL engine: one segment of the schedule trained with TRL's GRPOTrainer.

CPU by default, one GPU when present. Our code only adds what is ours: the dataset of puzzle
prompts, the reward functions, per-step metrics, dense atomic checkpoints registered in
ckpts.yaml as they are written, and resume from the last registered checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from train.engine import SegmentJob, checkpoint_id
from train.registry import Checkpoint
from train.schedule import Schedule, ScheduleError, Segment

# TRL log keys -> our metric names (the seed's panels + diagnostics).
METRIC_KEYS = {
    "reward": "reward",
    "rewards/kk_correct/mean": "correct",
    "rewards/kk_format_error/mean": "format_error",
    "rewards/kk_wrong/mean": "wrong",
    "rewards/kk_unparseable/mean": "unparseable",
    "completions/mean_length": "length_mean",
    "completions/min_length": "length_min",
    "completions/max_length": "length_max",
    "kl": "kl",
    "entropy": "entropy",
    "learning_rate": "lr",
}


def build_dataset(schedule: Schedule, seg: Segment, tokenizer, skip: int):
    """Train prompts of the segment's sizes, shuffled by the segment seed, first `skip` rows dropped.

    TRL 1.16 has no prompt truncation, so prompts longer than max_prompt_length are dropped.
    Rows repeat (new order per repeat) until the segment's steps are covered.
    """
    import random

    from datasets import Dataset

    from train.data import load_split
    from train.prompts import chat_messages, raw_prompt

    puzzles = load_split(schedule.data.root, seg.people, "train")
    rows = []
    for p in puzzles:
        if schedule.data.prompt_style == "raw":
            prompt = raw_prompt(p.quiz, tokenizer)
            n_tok = len(tokenizer(prompt)["input_ids"])
        else:
            prompt = chat_messages(p.quiz)
            n_tok = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
        if n_tok <= seg.max_prompt_length:
            rows.append({"prompt": prompt, "solution_text_format": p.solution_text_format,
                         "people": p.people, "puzzle_id": p.id})
    if not rows:
        from train.schedule import ScheduleError
        raise ScheduleError(f"no {seg.people}-person prompt fits max_prompt_length={seg.max_prompt_length}")
    need = seg.steps * seg.batch_prompts
    ordered: list[dict] = []
    rng = random.Random(seg.seed)
    while len(ordered) < need + skip:
        block = rows[:]
        rng.shuffle(block)
        ordered.extend(block)
    return Dataset.from_list(ordered[skip: skip + need])


def _save_atomic(model, tokenizer, final: Path) -> None:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if final.exists():  # left by a run killed between rename and registration
        shutil.rmtree(final)
    os.replace(tmp, final)


class TrlEngine:
    """`train.engine.Engine` on TRL: GRPO only (TRL has no REINFORCE++)."""

    name = "trl"

    def check(self, schedule: Schedule, segments: Sequence[Segment]) -> None:
        if schedule.algorithm != "grpo":
            raise ScheduleError(f"algorithm {schedule.algorithm!r} runs on the veRL engine only (TRL has no "
                                "REINFORCE++); use --engine verl or algorithm: grpo")

    def run_segment(self, job: SegmentJob) -> str:
        return run_segment(job)


def run_segment(job: SegmentJob) -> str:
    """Train one segment (or its remainder); returns the id of its last checkpoint."""
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    from train.models import fixed_cast, load_model_and_tokenizer
    from train.reward import RewardConfig, make_trl_reward_funcs

    hf_logging.disable_progress_bar()  # weight load/save bars would drown the step lines
    seg, sched = job.segment, job.schedule
    remaining = seg.steps - job.done_steps
    cuda = torch.cuda.is_available()
    model, tokenizer = load_model_and_tokenizer(job.init_path, name=job.parent_id, device="cpu",
                                                dtype="bfloat16" if cuda else "float32")
    dataset = build_dataset(sched, seg.model_copy(update={"steps": remaining}), tokenizer,
                            skip=job.done_steps * seg.batch_prompts)
    reward_cfg = RewardConfig(**{**sched.reward, "prefilled_think": sched.data.prompt_style == "raw"})
    funcs = make_trl_reward_funcs(reward_cfg)
    out_dir = job.run_dir / seg.stage
    out_dir.mkdir(parents=True, exist_ok=True)
    report_to = [x for x, on in (("tensorboard", sched.logging.tensorboard), ("wandb", sched.logging.wandb)) if on]
    if sched.logging.wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
    args = GRPOConfig(
        output_dir=str(job.run_dir / "trl" / f"{seg.stage}-seg{seg.index}"),
        per_device_train_batch_size=seg.batch_prompts * seg.rollout_n,
        num_generations=seg.rollout_n,
        gradient_accumulation_steps=1,
        steps_per_generation=1,            # on-policy: one optimizer step per rollout batch
        max_steps=remaining,
        learning_rate=seg.lr,
        lr_scheduler_type="constant",      # the anneal is carried by the segments
        warmup_steps=0,
        temperature=seg.temperature,
        top_p=seg.top_p,
        top_k=seg.top_k,
        beta=seg.kl_coef,                  # TRL's KL term is the k3 estimator (veRL low_var_kl)
        loss_type=sched.loss_type,
        max_completion_length=seg.max_response_length,
        reward_weights=[1.0] + [0.0] * (len(funcs) - 1),   # the others are logged metrics only
        shuffle_dataset=False,             # order fixed by build_dataset, so resume can skip
        logging_steps=1,
        save_strategy="no",                # we save ourselves: atomic, registered
        report_to=report_to or "none",
        logging_dir=str(job.run_dir / "tensorboard") if sched.logging.tensorboard else None,
        use_cpu=not cuda,
        bf16=cuda,
        seed=seg.seed + job.done_steps,
        data_seed=seg.seed,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    metrics_file = job.run_dir / "metrics.jsonl"
    # A resumed segment replays the steps after its last checkpoint: their earlier records go.
    drop_metrics_after(metrics_file, seg.start_step + job.done_steps)
    last = {"id": job.parent_id}
    validate = _validator(sched, seg, tokenizer, fixed_cast(job.init_path)) if seg.eval_every else None

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, model=None, **kw):
            if not logs or "reward" not in logs:
                return
            local = job.done_steps + state.global_step
            step = seg.start_step + local
            m = {ours: logs[k] for k, ours in METRIC_KEYS.items() if k in logs and logs[k] is not None}
            m["temperature"] = seg.temperature
            if validate is not None and (local % seg.eval_every == 0 or local == seg.steps):
                m.update(validate(model))
            record = {"global_step": step, "stage": seg.stage, "segment": seg.index, **m,
                      "time": time.time()}
            with open(metrics_file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            if job.on_step:
                job.on_step(step, m)
            if local % seg.save_every == 0 or local == seg.steps:
                final = out_dir / f"step-{step:06d}"
                _save_atomic(model, tokenizer, final)
                ck_id = checkpoint_id(sched.run, seg.stage, step)
                job.registry.add(Checkpoint(
                    id=ck_id, path=str(final), run=sched.run, stage=seg.stage, global_step=step,
                    parent=last["id"], segment=seg.index, segment_final=local == seg.steps,
                    stage_final=local == seg.steps and seg.index == seg.n_segments - 1,
                    sampling=seg.sampling, lr=seg.lr, metrics={k: _r(v) for k, v in m.items()},
                    preset=sched.preset, config_hash=job.config_hash, engine=TrlEngine.name,
                ))
                last["id"] = ck_id

    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Recorder()])
    trainer.remove_callback(PrinterCallback)  # our Recorder prints one compact line per step
    trainer.train()
    del trainer, model
    return last["id"]


def _validator(sched: Schedule, seg: Segment, tokenizer, fixed_cast: bool, n_per_size: int = 16):
    """Periodic validation: greedy accuracy on held-out puzzles of the segment's sizes, scored
    by the training reward (the same evaluation `python -m analysis eval` runs)."""
    from train.evaluate import eval_puzzles, evaluate_model, make_config

    config = make_config(people=seg.people, n_per_size=n_per_size, mode="greedy",
                         max_new_tokens=seg.max_response_length, prompt_style=sched.data.prompt_style,
                         train_data=sched.data.root, fixed_cast=fixed_cast)
    puzzles = eval_puzzles(config)

    def run(model) -> dict:
        was_training = model.training
        model.eval()
        s = evaluate_model(model, tokenizer, puzzles, config).summary
        model.train(was_training)
        return {"val_accuracy": s["accuracy"], "val_format_error": s["format_error_rate"]}

    return run


def drop_metrics_after(metrics_file: Path, step: int) -> None:
    """Rewrite `metrics_file` without the records of global steps after `step` (and without
    lines torn by a kill)."""
    if not metrics_file.is_file():
        return
    kept = []
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("global_step", 0) <= step:
            kept.append(line)
    tmp = metrics_file.with_name(metrics_file.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    os.replace(tmp, metrics_file)


def _r(v: float) -> float:
    return round(float(v), 6) if isinstance(v, (int, float)) and math.isfinite(v) else v
