"""What the stage loop (`train.run.train`) asks of a training engine, and the names both
engines give their checkpoints.

The loop plans the segments of a schedule, builds the data, registers the base model and
walks the stages; for each segment still to train it hands an engine a `SegmentJob`: "train
this segment from this checkpoint, register a checkpoint every `save_every` steps, return the
id of the last". Two engines do that: `train.engine_trl.TrlEngine` (TRL's GRPOTrainer, on CPU
or one GPU) and `train.engine_verl.VerlEngine` (veRL on a Ray cluster).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from train.registry import Registry
from train.schedule import Schedule, Segment

# Names an engine was recorded under in older registries.
ENGINE_ALIASES = {"local": "trl"}


def engine_name(name: str | None) -> str | None:
    """The engine's current name (old registries say "local" for the TRL engine)."""
    return ENGINE_ALIASES.get(name, name) if name else name


def base_id(run: str) -> str:
    """Registry id of a run's base model."""
    return f"{run}/base"


def checkpoint_id(run: str, stage: str, step: int) -> str:
    """Registry id of the checkpoint a run saved at a global step."""
    return f"{run}/{stage}/step-{step:06d}"


@dataclass
class SegmentJob:
    """One segment to train (or to finish: `done_steps` > 0 resumes inside it)."""

    schedule: Schedule
    segment: Segment
    init_path: Path            # HF folder to train from: the segment's start, or its last checkpoint
    parent_id: str             # registry id of that checkpoint
    start_path: Path           # HF folder the segment started from (veRL resumes from its own files)
    start_id: str              # registry id of that checkpoint
    run_dir: Path
    registry: Registry
    config_hash: str
    done_steps: int = 0
    on_step: Callable[[int, dict], None] | None = None   # (global_step, metrics) for progress
    echo: Callable[[str], None] | None = None            # one line of news for the console


class Engine(Protocol):
    name: str

    def check(self, schedule: Schedule, segments: Sequence[Segment]) -> None:
        """Raise a one-line UserError for a plan this engine cannot run, before anything is written."""

    def run_segment(self, job: SegmentJob) -> str:
        """Train the job's segment, registering its checkpoints; the id of its last checkpoint."""
