"""The veRL engine: the same schedule on GPU clusters through veRL 0.9.1 and Ray.

Each segment of the plan becomes one `python -m verl.trainer.main_ppo <hydra overrides>` run
that starts from the previous segment's last HF folder. While it runs, a watcher registers
every checkpoint veRL finishes in ckpts.yaml (same fields as the TRL engine, engine "verl"),
so analysis can start on early checkpoints long before the run ends.

    python -m train.run stage3 --engine verl --schedule qwen2.5-7b-instruct-1m-4xa100 --dry-run

The schedule's `verl:` section holds the cluster settings (`VerlSpec`); everything that shapes
the checkpoints comes from the stages, exactly as on the TRL engine; the stage loop itself
(`train.run.train`) is the same for both engines.

veRL's layout, per segment (`runs/<run>/verl/<stage>-seg<k>/`):

    latest_checkpointed_iteration.txt   written after a save has finished (sync saves)
    global_step_<N>/actor/              FSDP shards model_world_size_<W>_rank_<r>.pt, fsdp_config.json
    global_step_<N>/actor/huggingface/  config + tokenizer always; full weights with save_contents hf_model
    metrics.jsonl                       veRL's "file" logger, one line per step (metrics.<k>.jsonl:
                                        earlier launches of a resumed segment)

A step folder counts as complete once the tracker names N or a later step. Its HF folder is
`actor/huggingface` when it holds weights, else `actor/hf_merged`, produced by
`python -m verl.model_merger merge --backend fsdp` (`train.checkpoint_folders`, which `python -m analysis add`
shares).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from train.checkpoint_folders import VERL_STEP_DIR, verl_hf_folder, verl_latest_step
from train.engine import SegmentJob, base_id, checkpoint_id
from train.errors import UserError, validation_problem
from train.registry import Checkpoint, Registry
from train.schedule import Schedule, Segment, plan

MAIN_PPO = ("-m", "verl.trainer.main_ppo")
METRICS_FILE = "metrics.jsonl"

# veRL metric keys -> our metric names (the TRL engine's, where they exist).
VERL_METRICS = {
    "critic/score/mean": "reward",
    "response_length/mean": "length_mean",
    "response_length/min": "length_min",
    "response_length/max": "length_max",
    "response_length/clip_ratio": "clip_ratio",
    "actor/kl_loss": "kl",
    "actor/entropy": "entropy",
    "actor/pg_loss": "pg_loss",
    "actor/lr": "lr",
}

# TRL loss aggregation names (schedule.loss_type) -> veRL actor.loss_agg_mode.
LOSS_AGG = {"grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm",
            "dapo": "token-mean", "bnpo": "token-mean"}

# For prompt_style "raw": the row's single message already holds the rendered prompt with
# `<think>` pre-filled, so the chat template must pass it through unchanged.
PASSTHROUGH_TEMPLATE = '{% for m in messages %}{{ m["content"] }}{% endfor %}'


class VerlError(UserError):
    pass


# --------------------------------------------------------------------------- cluster settings

class VerlSpec(BaseModel):
    """The schedule's `verl:` section. Defaults fit one node of 4 x A100-80GB and a 7B model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_gpus_per_node: int = Field(4, ge=1)
    nnodes: int = Field(1, ge=1)
    strategy: Literal["fsdp", "fsdp2"] = "fsdp"          # actor/ref training backend
    rollout: Literal["vllm", "sglang"] = "vllm"           # generation server
    tensor_model_parallel_size: int = Field(1, ge=1)      # GPUs per rollout replica
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1)  # rollout KV-cache share of GPU memory
    # Prompts per optimizer step; None = the stage's batch_prompts (one update per rollout batch).
    ppo_mini_batch_size: int | None = Field(None, ge=1)
    use_dynamic_bsz: bool = True                          # pack micro batches by token count
    ppo_max_token_len_per_gpu: int = Field(16384, ge=1)   # token budget per micro batch (dynamic)
    ppo_micro_batch_size_per_gpu: int = Field(4, ge=1)    # sequences per micro batch (static)
    log_prob_micro_batch_size_per_gpu: int = Field(8, ge=1)  # rollout/ref log-prob micro batch
    param_offload: bool = False                           # actor params to CPU between phases
    optimizer_offload: bool = True                        # Adam states to CPU (4 GPUs, 7B)
    ref_param_offload: bool = True                        # the frozen KL reference lives on CPU
    gradient_checkpointing: bool = True
    logger: list[Literal["console", "wandb", "tensorboard", "mlflow", "swanlab", "file"]] = ["console"]
    project: str = Field("logic-rl", min_length=1)        # trainer.project_name
    # Hydra overrides appended verbatim after ours (so they win), e.g.
    # "actor_rollout_ref.rollout.max_num_seqs=512".
    extra_overrides: list[str] = Field(default_factory=list)

    @property
    def n_gpus(self) -> int:
        return self.n_gpus_per_node * self.nnodes

    @model_validator(mode="after")
    def _fits(self):
        if self.n_gpus % self.tensor_model_parallel_size:
            raise ValueError(f"tensor_model_parallel_size {self.tensor_model_parallel_size} must divide "
                             f"the {self.n_gpus} GPUs")
        for item in self.extra_overrides:
            if "=" not in item:
                raise ValueError(f"extra_overrides item {item!r} is not a Hydra override (key=value)")
        return self


def verl_spec(sched: Schedule) -> VerlSpec:
    """The validated `verl:` section of a schedule (one-line error for bad input)."""
    raw = sched.verl or {}
    if not isinstance(raw, dict):
        raise VerlError("schedule verl: must be a mapping of cluster settings")
    unknown = sorted(set(raw) - set(VerlSpec.model_fields))
    if unknown:
        raise VerlError(f"schedule verl: unknown key(s) {', '.join(unknown)}; known: {', '.join(VerlSpec.model_fields)}")
    try:
        return VerlSpec.model_validate(raw)
    except ValidationError as exc:
        where, msg = validation_problem(exc)
        raise VerlError(f"schedule verl{'.' + where if where else ''}: {msg}") from None


def check_fit(spec: VerlSpec, seg: Segment) -> None:
    """The batch arithmetic veRL asserts at start-up, checked before anything is launched."""
    where = f"{seg.stage} (segment {seg.index + 1}/{seg.n_segments})"
    rows = seg.batch_prompts * seg.rollout_n
    if rows % spec.n_gpus:
        raise VerlError(f"{where}: batch_prompts x rollout_n = {rows} responses per step must be divisible "
                        f"by the {spec.n_gpus} GPUs")
    mini = spec.ppo_mini_batch_size or seg.batch_prompts
    if mini > seg.batch_prompts or seg.batch_prompts % mini:
        raise VerlError(f"{where}: verl.ppo_mini_batch_size {mini} must divide batch_prompts {seg.batch_prompts}")
    if (mini * seg.rollout_n) % spec.n_gpus:
        raise VerlError(f"{where}: ppo_mini_batch_size x rollout_n = {mini * seg.rollout_n} must be divisible "
                        f"by the {spec.n_gpus} GPUs")
    per_gpu = mini * seg.rollout_n // spec.n_gpus
    if not spec.use_dynamic_bsz and per_gpu % spec.ppo_micro_batch_size_per_gpu:
        raise VerlError(f"{where}: {per_gpu} responses per GPU per update are not divisible by "
                        f"verl.ppo_micro_batch_size_per_gpu {spec.ppo_micro_batch_size_per_gpu}")


# --------------------------------------------------------------------------- paths

def segment_dir(run_dir: Path, seg: Segment) -> Path:
    """veRL's trainer.default_local_dir for one segment."""
    return Path(run_dir) / "verl" / f"{seg.stage}-seg{seg.index}"


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"global_step_{step}"


def final_hf_dir(out_dir: Path, step: int) -> Path:
    """Where the HF folder of a step lies when veRL saves `hf_model` (our default)."""
    return step_dir(out_dir, step) / "actor" / "huggingface"


def segment_data_files(sched: Schedule, seg: Segment) -> dict[str, list[Path]]:
    """Absolute train/val parquet files of the segment's puzzle sizes (built by train.data)."""
    from train.data import dataset_paths

    root = Path(sched.data.root).expanduser().resolve()
    train = [dataset_paths(root, n)["train"] for n in seg.people]
    # Without a test split, validation (off unless eval_every > 0) reads the train files.
    val = [dataset_paths(root, n)["test"] for n in seg.people] if sched.data.test_per_size > 0 else train
    return {"train": train, "val": val}


def _abs(path: str | Path) -> str:
    """An absolute path (Ray workers do not share our working directory); placeholders kept."""
    return str(path) if str(path).startswith("<") else str(Path(path).expanduser().resolve())


def _reward_module() -> Path:
    from importlib.util import find_spec

    return Path(find_spec("train.reward").origin).resolve()


# --------------------------------------------------------------------------- compiling

_PLAIN = re.compile(r"[A-Za-z0-9_./+-]+")


def hydra_value(v: Any) -> str:
    """A Python value written in Hydra's override grammar (strings quoted when needed)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    s = str(v)
    if _PLAIN.fullmatch(s) and s.lower() not in ("true", "false", "null", "nan", "inf", "-inf"):
        try:
            float(s)
        except ValueError:
            return s
    if "${" in s:
        raise VerlError(f"value {s!r} contains '${{', which Hydra reads as an interpolation")
    return "'" + s.replace("'", "\\'") + "'"


def compile_segment(sched: Schedule, seg: Segment, model_path: str | Path,
                    data_files: Mapping[str, Sequence[str | Path]], out_dir: str | Path) -> list[str]:
    """Hydra overrides for `python -m verl.trainer.main_ppo` that train one segment.

    model_path: the HF folder the segment starts from (also its KL reference);
    data_files: {"train": [...], "val": [...]} parquet files; out_dir: trainer.default_local_dir.
    """
    spec = verl_spec(sched)
    check_fit(spec, seg)
    out_dir = Path(out_dir).expanduser().resolve()
    mini = spec.ppo_mini_batch_size or seg.batch_prompts
    kl = seg.kl_coef > 0
    loggers = list(dict.fromkeys([*spec.logger, *(["tensorboard"] if sched.logging.tensorboard else []),
                                  *(["wandb"] if sched.logging.wandb else []), "file"]))
    env = {"VERL_FILE_LOGGER_PATH": str(out_dir / METRICS_FILE)}
    if "tensorboard" in loggers:
        env["TENSORBOARD_DIR"] = str(out_dir / "tensorboard")
    if sched.logging.wandb:
        env["WANDB_MODE"] = "offline"                    # as on the TRL engine: never a server
    reward_kwargs = dict(sched.reward)
    a, r, ref = "actor_rollout_ref.actor", "actor_rollout_ref.rollout", "actor_rollout_ref.ref"
    ov: list[tuple[str, Any]] = [
        # algorithm: GRPO / REINFORCE++ advantages, KL as a loss term (not in the reward)
        ("algorithm.adv_estimator", sched.algorithm),
        ("algorithm.use_kl_in_reward", False),
        # data: our parquet (veRL RL schema); overlong prompts dropped as on the TRL engine
        ("data.train_files", [str(Path(p).resolve()) for p in data_files["train"]]),
        ("data.val_files", [str(Path(p).resolve()) for p in data_files["val"]]),
        ("data.train_batch_size", seg.batch_prompts),
        ("data.max_prompt_length", seg.max_prompt_length),
        ("data.max_response_length", seg.max_response_length),
        ("data.filter_overlong_prompts", True),
        ("data.shuffle", True),
        ("data.seed", seg.seed),
        # model: the previous segment's last checkpoint (or the base model)
        ("actor_rollout_ref.model.path", _abs(model_path)),
        ("actor_rollout_ref.model.use_remove_padding", True),
        ("actor_rollout_ref.model.enable_gradient_checkpointing", spec.gradient_checkpointing),
    ]
    if sched.data.prompt_style == "raw":
        ov.append(("actor_rollout_ref.model.custom_chat_template", PASSTHROUGH_TEMPLATE))
    ov += [
        # actor: constant lr inside a segment (the anneal is carried by the segments, and
        # min_lr_ratio=1.0 keeps that true should a cosine scheduler be chosen in extra_overrides)
        (f"{a}.strategy", spec.strategy),
        (f"{a}.optim.lr", seg.lr),
        (f"{a}.optim.lr_scheduler_type", "constant"),
        (f"{a}.optim.lr_warmup_steps", 0),
        (f"{a}.optim.min_lr_ratio", 1.0),
        (f"{a}.ppo_mini_batch_size", mini),
        (f"{a}.use_dynamic_bsz", spec.use_dynamic_bsz),
        (f"{a}.ppo_max_token_len_per_gpu", spec.ppo_max_token_len_per_gpu),
        (f"{a}.ppo_micro_batch_size_per_gpu", spec.ppo_micro_batch_size_per_gpu),
        (f"{a}.loss_agg_mode", LOSS_AGG.get(sched.loss_type, "token-mean")),
        (f"{a}.use_kl_loss", kl),
        (f"{a}.kl_loss_type", seg.kl_type),
        (f"{a}.kl_loss_coef", seg.kl_coef),
        (f"{a}.fsdp_config.param_offload", spec.param_offload),
        (f"{a}.fsdp_config.optimizer_offload", spec.optimizer_offload),
        (f"{a}.checkpoint.save_contents", ["model", "optimizer", "extra", "hf_model"]),
        (f"{ref}.log_prob_micro_batch_size_per_gpu", spec.log_prob_micro_batch_size_per_gpu),
        (f"{ref}.fsdp_config.param_offload", spec.ref_param_offload),
        # rollout: the segment's sampling (veRL's top_k -1 = off)
        (f"{r}.name", spec.rollout),
        (f"{r}.n", seg.rollout_n),
        (f"{r}.temperature", seg.temperature),
        (f"{r}.top_p", seg.top_p),
        (f"{r}.top_k", seg.top_k if seg.top_k > 0 else -1),
        (f"{r}.tensor_model_parallel_size", spec.tensor_model_parallel_size),
        (f"{r}.gpu_memory_utilization", spec.gpu_memory_utilization),
        (f"{r}.log_prob_micro_batch_size_per_gpu", spec.log_prob_micro_batch_size_per_gpu),
        # reward: our scorer (the same one evaluation uses)
        ("reward.custom_reward_function.path",
         str(Path(__file__).resolve() if reward_kwargs else _reward_module())),
        ("reward.custom_reward_function.name", "compute_score_with_overrides" if reward_kwargs else "compute_score"),
    ]
    if reward_kwargs:
        ov.append(("+reward.custom_reward_function.reward_kwargs", reward_kwargs))
    ov += [
        # trainer: steps, dense checkpoints with a full HF folder each, resume inside the segment
        ("trainer.total_training_steps", seg.steps),
        ("trainer.total_epochs", seg.steps),          # an upper bound; total_training_steps stops it
        ("trainer.save_freq", seg.save_every),
        ("trainer.test_freq", seg.eval_every if seg.eval_every > 0 else -1),
        ("trainer.val_before_train", seg.eval_every > 0 and seg.start_step == 0),  # the base, once
        ("trainer.default_local_dir", str(out_dir)),
        ("trainer.resume_mode", "auto"),
        ("trainer.n_gpus_per_node", spec.n_gpus_per_node),
        ("trainer.nnodes", spec.nnodes),
        ("trainer.logger", loggers),
        ("trainer.project_name", spec.project),
        ("trainer.experiment_name", f"{sched.run}-{seg.stage}-seg{seg.index}"),
        ("hydra.run.dir", str(out_dir / "hydra")),
    ]
    ov += [(f"+ray_kwargs.ray_init.runtime_env.env_vars.{k}", v) for k, v in env.items()]
    return [f"{k}={hydra_value(v)}" for k, v in ov] + list(spec.extra_overrides)


def base_path_for_plan(sched: Schedule, registry: Registry) -> tuple[str, str | None]:
    """The base model folder without building anything (for --dry-run), and why it is missing.

    A missing base gives the placeholder `<base:PRESET>`; `python -m train.run base` resolves it.
    """
    for ck in registry.checkpoints():
        if ck.id == base_id(sched.run):
            return str(registry.resolve(ck)), None
    try:
        from train.models import resolve_model

        return str(resolve_model(sched.preset, build=False, progress=False)), None
    except Exception as exc:  # not built, or the weights are not on this machine
        return f"<base:{sched.preset}>", (str(exc).splitlines() or [type(exc).__name__])[0]


def compile_plan(sched: Schedule, target: str, registry: Registry, runs_dir: Path,
                 python: str = sys.executable) -> list[list[str]]:
    """One argv per segment up to `target`, chained through the segments' last HF folders.

    Reads the registry (a finished segment's registered folder is used) and writes nothing.
    """
    run_dir = Path(runs_dir) / sched.run
    finals = {(c.stage, c.segment): c for c in registry.checkpoints() if c.run == sched.run and c.segment_final}
    model, _ = base_path_for_plan(sched, registry)
    commands = []
    for seg in plan(sched, target):
        out = segment_dir(run_dir, seg)
        commands.append([python, *MAIN_PPO, *compile_segment(sched, seg, model, segment_data_files(sched, seg), out)])
        done = finals.get((seg.stage, seg.index))
        model = str(registry.resolve(done)) if done else str(final_hf_dir(out, seg.steps).resolve())
    return commands


# --------------------------------------------------------------------------- checkpoints

def _metrics_files(out_dir: Path) -> list[Path]:
    """veRL's metric logs of a segment, oldest first (earlier launches were rotated aside)."""
    rotated = sorted(Path(out_dir).glob("metrics.*.jsonl"), key=lambda p: int(p.name.split(".")[1])
                     if p.name.split(".")[1].isdigit() else -1)
    return [*rotated, Path(out_dir) / METRICS_FILE]


def rotate_metrics(out_dir: Path) -> None:
    """veRL's file logger truncates its file on start: keep a resumed segment's earlier steps."""
    current = Path(out_dir) / METRICS_FILE
    if current.exists() and current.stat().st_size:
        os.replace(current, Path(out_dir) / f"metrics.{len(_metrics_files(out_dir))}.jsonl")


def read_verl_metrics(out_dir: Path) -> dict[int, dict]:
    """Per-step metrics from veRL's file logger, renamed to ours (missing keys are skipped)."""
    out: dict[int, dict] = {}
    for path in _metrics_files(out_dir):
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                step, data = int(rec["step"]), rec["data"]
            except (ValueError, KeyError, TypeError):
                continue  # a line being written, or not a step record
            m = {ours: _r(data[k]) for k, ours in VERL_METRICS.items() if isinstance(data.get(k), (int, float))}
            if m:
                out[step] = m
    return out


def register_verl_checkpoints(registry: Registry, sched: Schedule, seg: Segment, out_dir: Path,
                              parent_id: str, python: str = sys.executable) -> list[str]:
    """Register every finished `global_step_N` of one segment; returns the ids in step order.

    Idempotent: already registered steps are kept (their metrics filled in once veRL has
    logged them). A step counts once veRL's tracker names it or a later step.
    """
    out_dir = Path(out_dir)
    latest = verl_latest_step(out_dir)
    if latest is None:
        return []
    steps = sorted(int(m.group(1)) for p in out_dir.glob("global_step_*")
                   if (m := VERL_STEP_DIR.match(p.name)) and int(m.group(1)) <= min(latest, seg.steps))
    known = {c.id: c for c in registry.checkpoints()}
    metrics = read_verl_metrics(out_dir)
    ids, parent = [], parent_id
    for n in steps:
        step = seg.start_step + n
        ck_id = checkpoint_id(sched.run, seg.stage, step)
        m = metrics.get(n, {})
        if ck_id in known:
            if m and not known[ck_id].metrics:
                registry.update(ck_id, metrics=m)
        else:
            folder = verl_hf_folder(step_dir(out_dir, n) / "actor", python, log=out_dir / "merge.log")
            if folder is None:
                continue  # a non-FSDP layout or a partial copy: nothing we can load
            final = n == seg.steps
            registry.add(Checkpoint(
                id=ck_id, path=str(folder), run=sched.run, stage=seg.stage, global_step=step, parent=parent,
                segment=seg.index, segment_final=final, stage_final=final and seg.index == seg.n_segments - 1,
                sampling=seg.sampling, lr=seg.lr, metrics=m, preset=sched.preset,
                config_hash=sched.config_hash(seg.stage), engine=VerlEngine.name,
            ))
        ids.append(ck_id)
        parent = ck_id
    return ids


def compute_score_with_overrides(data_source: str, solution_str: str, ground_truth: Any,
                                 extra_info: Mapping[str, Any] | None = None, **kwargs: Any) -> dict:
    """veRL reward entry used when the schedule overrides reward values.

    veRL passes `reward.custom_reward_function.reward_kwargs` (the schedule's `reward:` mapping)
    as keyword arguments; they configure train.reward's scorer.
    """
    from train.reward import RewardConfig, _solution_from_ground_truth, score_response

    fields = {k: v for k, v in kwargs.items() if k in RewardConfig.model_fields}
    if fields.get("prefilled_think") is None and isinstance(extra_info, Mapping):
        fields["prefilled_think"] = bool(extra_info.get("prefilled_think", False))
    return score_response(solution_str, _solution_from_ground_truth(ground_truth), RewardConfig(**fields))


# --------------------------------------------------------------------------- running

class _Watcher(threading.Thread):
    """Registers a segment's checkpoints while veRL runs, and echoes its per-step metrics."""

    def __init__(self, registry: Registry, sched: Schedule, seg: Segment, out_dir: Path, parent_id: str,
                 poll_s: float, echo: Callable[[str], None] | None):
        super().__init__(daemon=True, name=f"verl-watch-{seg.stage}-{seg.index}")
        self.args = (registry, sched, seg, out_dir, parent_id)
        self.poll_s, self.echo = poll_s, echo
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.seen_steps: set[int] = set()
        self.ids: list[str] = []

    def poll(self) -> None:
        registry, sched, seg, out_dir, _ = self.args
        new_ids = register_verl_checkpoints(*self.args)
        for ck_id in new_ids:
            if ck_id not in self.ids and self.echo:
                self.echo(f"registered {ck_id}")
        self.ids = new_ids
        if self.echo:
            for n, m in sorted(read_verl_metrics(out_dir).items()):
                if n not in self.seen_steps:
                    self.seen_steps.add(n)
                    self.echo(f"step {seg.start_step + n:4d} | reward {m.get('reward', float('nan')):+.3f}"
                              f" | len {m.get('length_mean', 0):.0f} | kl {m.get('kl', 0):.4f} | T {seg.temperature:g}")

    def run(self) -> None:
        while not self.stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as exc:  # reported again by the main thread once the run ends
                self.error = exc
                if self.echo:
                    self.echo(f"checkpoint registration stopped: {str(exc).splitlines()[0] if str(exc) else exc!r}")
                return


def _append_run_metrics(run_dir: Path, seg: Segment, out_dir: Path) -> None:
    """Copy a finished segment's veRL metrics into the run's metrics.jsonl (our names)."""
    lines = [json.dumps({"global_step": seg.start_step + n, "stage": seg.stage, "segment": seg.index,
                         **m, "temperature": seg.temperature, "engine": "verl"})
             for n, m in sorted(read_verl_metrics(out_dir).items())]
    if lines:
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")


def launch_segment(argv: Sequence[str], registry: Registry, sched: Schedule, seg: Segment, out_dir: Path,
                   parent_id: str, poll_s: float = 10.0, echo: Callable[[str], None] | None = None) -> str:
    """Run veRL (`argv`) on one segment while registering its checkpoints; returns its final
    checkpoint id."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rotate_metrics(out_dir)
    watcher = _Watcher(registry, sched, seg, out_dir, parent_id, poll_s, echo)
    watcher.start()
    try:
        proc = subprocess.Popen(list(argv))
    except OSError as exc:
        watcher.stop.set()
        raise VerlError(f"cannot start {argv[0]}: {exc.strerror}") from None
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    finally:
        watcher.stop.set()
        watcher.join()
    ids = register_verl_checkpoints(registry, sched, seg, out_dir, parent_id)  # the last word
    if watcher.error is not None and not isinstance(watcher.error, UserError):
        raise watcher.error
    final = checkpoint_id(sched.run, seg.stage, seg.end_step)
    if rc != 0:
        raise VerlError(f"veRL exited with code {rc} in {seg.stage} segment {seg.index + 1}/{seg.n_segments} "
                        f"({len(ids)} checkpoint(s) registered; rerun to resume from {out_dir})")
    if final not in ids:
        if watcher.error is not None:
            raise watcher.error
        raise VerlError(f"veRL finished {seg.stage} segment {seg.index + 1}/{seg.n_segments} without a "
                        f"complete checkpoint at step {seg.steps} in {out_dir}")
    return final


class VerlEngine:
    """`train.engine.Engine` on veRL: each segment one `main_ppo` run from the segment's start
    (a relaunch resumes from veRL's own checkpoint files), its checkpoints registered as veRL
    saves them. `launcher` replaces `python -m verl.trainer.main_ppo` (the overrides follow it)."""

    name = "verl"

    def __init__(self, launcher: Sequence[str] | None = None, poll_s: float = 10.0):
        self.launcher, self.poll_s = (list(launcher) if launcher else None), poll_s

    def check(self, schedule: Schedule, segments: Sequence[Segment]) -> None:
        spec = verl_spec(schedule)
        for seg in segments:
            check_fit(spec, seg)

    def run_segment(self, job: SegmentJob) -> str:
        sched, seg = job.schedule, job.segment
        out = segment_dir(job.run_dir, seg)
        prefix = self.launcher or [sys.executable, *MAIN_PPO]
        argv = prefix + compile_segment(sched, seg, job.start_path, segment_data_files(sched, seg), out)
        if job.echo:
            job.echo(f"{seg.stage} segment {seg.index + 1}/{seg.n_segments}: veRL, {seg.steps} steps, "
                     f"T={seg.temperature:g}, lr={seg.lr:.3g}, logs under {out}")
        last = launch_segment(argv, job.registry, sched, seg, out, job.start_id, poll_s=self.poll_s, echo=job.echo)
        _append_run_metrics(job.run_dir, seg, out)
        return last


def print_commands(target: str, sched: Schedule, registry: Registry, runs_dir: Path) -> None:
    """--dry-run: one shell command per segment up to `target` on stdout (the base model's
    folder for target "base"); writes nothing."""
    from train.cli import err_console

    if target == "base":
        path, why = base_path_for_plan(sched, registry)
        print(path)
        if why:
            err_console.print(f"# {why}", highlight=False, markup=False)
        return
    segments = plan(sched, target)
    _, why = base_path_for_plan(sched, registry)
    if why:
        err_console.print(f"# base model not resolved ({why}); shown as <base:{sched.preset}>",
                          highlight=False, markup=False)
    done = {(c.stage, c.segment) for c in registry.checkpoints() if c.run == sched.run and c.segment_final}
    for seg, argv in zip(segments, compile_plan(sched, target, registry, runs_dir)):
        note = " (complete: skipped)" if (seg.stage, seg.index) in done else ""
        err_console.print(f"# {seg.stage} segment {seg.index + 1}/{seg.n_segments}: global steps "
                          f"{seg.start_step}->{seg.end_step}{note}", highlight=False, markup=False)
        print(shlex.join(argv), flush=True)


def _r(v: float) -> float:
    return round(float(v), 6) if math.isfinite(v) else v
