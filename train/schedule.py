"""The three-stage schedule: a validated YAML file compiled into a plan of segments.

Neither TRL nor veRL anneals sampling temperature within a run, so a stage whose temperature
or lr moves from `start` to `end` is cut into `segments` consecutive pieces of constant
settings (linearly interpolated, the last one at `end`), each starting from the previous
piece's checkpoint. `python -m train.run <stage> --dry-run` prints the plan.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from train.errors import UserError, validation_problem

STAGES = ("stage1", "stage2", "stage3")
SCHEDULE_DIR = "schedules"


class ScheduleError(UserError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Ramp(_Strict):
    """A value held constant (`start` only) or annealed linearly from `start` to `end`."""

    start: float
    end: float | None = None

    def at(self, k: int, n: int) -> float:
        end = self.start if self.end is None else self.end
        return self.start if n <= 1 else self.start + (end - self.start) * k / (n - 1)

    @property
    def moves(self) -> bool:
        return self.end is not None and self.end != self.start


class KL(_Strict):
    """KL to the reference model as a loss term (k3 estimator = veRL's `low_var_kl`)."""

    type: Literal["low_var_kl", "k3"] = "low_var_kl"
    coef: float = Field(0.001, ge=0)


class Stage(_Strict):
    people: list[int] = Field(min_length=1, description="puzzle sizes in the data mix")
    batch_prompts: int = Field(gt=0, description="prompts per step (train batch size)")
    rollout_n: int = Field(ge=2, description="responses per prompt (GRPO group size)")
    temperature: Ramp
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    lr: Ramp
    kl: KL = KL()
    max_prompt_length: int = Field(gt=0)
    max_response_length: int = Field(gt=0)
    steps: int = Field(gt=0, description="optimizer steps in this stage")
    save_every: int = Field(gt=0, description="dense checkpoint interval, in steps")
    segments: int = Field(1, ge=1, description="constant-setting pieces used to anneal")
    eval_every: int = Field(0, ge=0, description="periodic validation interval (0 = off)")
    seed: int = 0

    @field_validator("people")
    @classmethod
    def _people_in_range(cls, v: list[int]) -> list[int]:
        from train.kk import MAX_PEOPLE, MIN_PEOPLE

        bad = [n for n in v if not MIN_PEOPLE <= n <= MAX_PEOPLE]
        if bad:
            raise ValueError(f"number of people {bad[0]} is outside {MIN_PEOPLE}..{MAX_PEOPLE}")
        return v

    @field_validator("temperature")
    @classmethod
    def _t_positive(cls, v: Ramp) -> Ramp:
        if v.start <= 0 or (v.end is not None and v.end <= 0):
            raise ValueError("temperature must be > 0")
        return v

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, v: Ramp) -> Ramp:
        if v.start <= 0 or (v.end is not None and v.end <= 0):
            raise ValueError("lr must be > 0")
        return v

    @model_validator(mode="after")
    def _segments_fit(self):
        if self.segments > self.steps:
            raise ValueError(f"segments ({self.segments}) cannot exceed steps ({self.steps})")
        if (self.temperature.moves or self.lr.moves) and self.segments < 2:
            raise ValueError("an annealed temperature or lr needs segments >= 2")
        return self


class DataSpec(_Strict):
    root: str = "data/kk"            # built on demand with train.data.build
    train_per_size: int = Field(900, gt=0)
    test_per_size: int = Field(100, ge=0)
    seed: int = 0
    prompt_style: Literal["chat", "raw"] = "chat"


class Logging(_Strict):
    tensorboard: bool = False
    wandb: bool = False              # offline mode; never contacts a server


class Schedule(_Strict):
    """A whole run: model preset, data, algorithm and the three stages."""

    run: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    preset: str
    algorithm: Literal["grpo", "reinforce_plus_plus"] = "grpo"
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "grpo"   # TRL's loss aggregation
    data: DataSpec = DataSpec()
    reward: dict = Field(default_factory=dict)   # RewardConfig overrides
    logging: Logging = Logging()
    # Cluster settings for `--engine verl` (validated by train/engine_verl.py).
    verl: dict = Field(default_factory=dict)
    stages: dict[str, Stage]

    @field_validator("stages", mode="before")
    @classmethod
    def _stage_names(cls, v: dict) -> dict:
        if not isinstance(v, dict):
            raise ValueError("stages must be a mapping of stage1, stage2, stage3")
        unknown = set(v) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; use {', '.join(STAGES)}")
        missing = [s for s in STAGES if s not in v]
        if missing:
            raise ValueError(f"missing stage(s) {missing}")
        return v

    def config_hash(self, upto: str) -> str:
        """Identity of everything that shapes the checkpoints up to a stage."""
        idx = STAGES.index(upto) + 1
        blob = {"preset": self.preset, "algorithm": self.algorithm, "loss_type": self.loss_type,
                "data": self.data.model_dump(), "reward": self.reward,
                "stages": {s: self.stages[s].model_dump() for s in STAGES[:idx]}}
        return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


class Segment(BaseModel):
    """A piece of a stage with constant sampling settings and lr."""

    stage: str
    index: int                     # within the stage
    n_segments: int
    steps: int
    start_step: int                # global step before this segment
    people: list[int]
    batch_prompts: int
    rollout_n: int
    temperature: float
    top_p: float
    top_k: int
    lr: float
    kl_type: str
    kl_coef: float
    max_prompt_length: int
    max_response_length: int
    save_every: int
    eval_every: int
    seed: int

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps

    @property
    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "rollout_n": self.rollout_n, "batch_prompts": self.batch_prompts}


def plan(schedule: Schedule, upto: str = "stage3") -> list[Segment]:
    """Every segment of every stage up to `upto`, with global step offsets."""
    if upto not in STAGES:
        raise ScheduleError(f"unknown stage {upto!r}; use {', '.join(STAGES)}")
    segments: list[Segment] = []
    step = 0
    for name in STAGES[: STAGES.index(upto) + 1]:
        st = schedule.stages[name]
        base, extra = divmod(st.steps, st.segments)
        for k in range(st.segments):
            n = base + (1 if k < extra else 0)
            segments.append(Segment(
                stage=name, index=k, n_segments=st.segments, steps=n, start_step=step,
                people=st.people, batch_prompts=st.batch_prompts, rollout_n=st.rollout_n,
                temperature=round(st.temperature.at(k, st.segments), 6), top_p=st.top_p,
                top_k=st.top_k, lr=float(f"{st.lr.at(k, st.segments):.6g}"), kl_type=st.kl.type,
                kl_coef=st.kl.coef, max_prompt_length=st.max_prompt_length,
                max_response_length=st.max_response_length, save_every=st.save_every,
                eval_every=st.eval_every, seed=st.seed + 1000 * k,
            ))
            step += n
    return segments


# --------------------------------------------------------------------------- loading

def available_presets() -> list[str]:
    files = resources.files("train").joinpath(SCHEDULE_DIR).iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))


def schedule_file(name_or_path: str | Path) -> Path:
    """A schedule preset name (see train/schedules/) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ScheduleError(f"{p}: no such schedule file")
        return p
    packaged = resources.files("train").joinpath(SCHEDULE_DIR, f"{name_or_path}.yaml")
    if not packaged.is_file():
        raise ScheduleError(f"unknown schedule preset {str(name_or_path)!r}; available: {', '.join(available_presets())}")
    return Path(str(packaged))


def load_schedule(name_or_path: str | Path, overrides: dict | None = None) -> Schedule:
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError

    path = schedule_file(name_or_path)
    try:
        raw = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise ScheduleError(f"{path}:{mark.line + 1 if mark else '?'}: malformed YAML ({exc.problem})") from None
    if not isinstance(raw, dict):
        raise ScheduleError(f"{path}: a schedule is a YAML mapping")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        return Schedule.model_validate(raw)
    except ValidationError as exc:
        where, msg = validation_problem(exc)
        raise ScheduleError(f"{path}: {where}: {msg}") from None


def _set_dotted(d: dict, key: str, value) -> None:
    """Apply an override like `stages.stage1.steps` = 5 (a value already parsed,
    `train.cli.parse_sets`)."""
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ScheduleError(f"--set {key}: {p} is not a mapping")
    d[parts[-1]] = value
