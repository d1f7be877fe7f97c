"""Checkpoint folders on disk: which loadable HF folders a path holds, and at which step.

The layouts recognised, for a path given to `python -m analysis add`:

    an HF folder            config.json, weights (*.safetensors or *.bin), tokenizer files
    a folder of steps       step-<N>/ or checkpoint-<N>/ HF folders (TRL, HF Trainer)
    a veRL experiment       global_step_<N>/actor/ per saved step, and
                            latest_checkpointed_iteration.txt once a save has finished
    a veRL step             global_step_<N>/ or global_step_<N>/actor/ or .../actor/huggingface/

A veRL step's HF folder is `actor/huggingface` when it holds weights (save_contents hf_model),
else `actor/hf_merged`, produced once from the FSDP shards by `python -m verl.model_merger`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from train.errors import UserError

VERL_TRACKER = "latest_checkpointed_iteration.txt"   # verl/trainer/ppo/v1/trainer_base.py::_save_checkpoint
VERL_STEP_DIR = re.compile(r"^global_step_(\d+)$")
VERL_SHARD = "model_world_size_{w}_rank_{r}.pt"       # verl/utils/checkpoint/fsdp_checkpoint_manager.py
VERL_MERGED = "hf_merged"
TRAINER_STEP_DIR = re.compile(r"^(?:checkpoint|step)-(\d+)$")


class CheckpointFolderError(UserError):
    """A path that holds no loadable checkpoint; the message is one line naming it."""


@dataclass(frozen=True)
class FoundCheckpoint:
    folder: Path          # the HF folder to load
    step: int | None      # the step its name carries (None for a plain HF folder)
    layout: str           # "hf", "trainer" or "verl"


def has_weights(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / "config.json").is_file() and (
        any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
        or any(folder.glob("pytorch_model*.bin")))


def verl_shards_complete(actor: Path) -> bool:
    try:
        world = json.loads((Path(actor) / "fsdp_config.json").read_text())["world_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((Path(actor) / VERL_SHARD.format(w=world, r=r)).is_file() for r in range(world))


def verl_hf_folder(actor: Path, python: str = sys.executable, log: Path | None = None) -> Path | None:
    """The HF folder of a finished `global_step_N/actor`: veRL's own, else merged from the
    shards (once; the merge is kept beside them). None when neither is there."""
    actor = Path(actor)
    if has_weights(actor / "huggingface"):
        return actor / "huggingface"
    merged = actor / VERL_MERGED
    if has_weights(merged):
        return merged
    if not verl_shards_complete(actor):
        return None
    tmp = actor / (VERL_MERGED + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [python, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
           "--local_dir", str(actor), "--target_dir", str(tmp)]
    with open(log or os.devnull, "a") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not has_weights(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointFolderError(f"{actor}: veRL's model merger failed (exit {proc.returncode})"
                                    + (f"; see {log}" if log else ""))
    os.replace(tmp, merged)
    return merged


def verl_latest_step(out_dir: Path) -> int | None:
    """The step veRL last finished saving (its tracker file), or None."""
    try:
        return int((Path(out_dir) / VERL_TRACKER).read_text().strip())
    except (OSError, ValueError):
        return None


def _verl_step(step_dir: Path, step: int, python: str) -> FoundCheckpoint:
    actor = step_dir / "actor"
    folder = verl_hf_folder(actor, python)
    if folder is None:
        raise CheckpointFolderError(f"{step_dir}: a veRL step without weights (no actor/huggingface weights "
                                    f"and no complete FSDP shards in {actor})")
    return FoundCheckpoint(folder, step, "verl")


def verl_step_dir(path: Path) -> Path | None:
    """The global_step_N folder when `path` is it, its actor/ or its actor/huggingface/."""
    if path.name == "huggingface" and path.parent.name == "actor":
        path = path.parent.parent
    elif path.name == "actor":
        path = path.parent
    return path if VERL_STEP_DIR.match(path.name) else None


def find_checkpoints(path: str | os.PathLike, python: str = sys.executable) -> list[FoundCheckpoint]:
    """The checkpoints `path` holds, in step order (see the module docstring for the layouts).

    A veRL experiment's steps past its tracker are still being written and are left out.
    Raises CheckpointFolderError (one line) when the path holds none."""
    path = Path(path)
    if not path.exists():
        raise CheckpointFolderError(f"{path}: does not exist")
    if not path.is_dir():
        raise CheckpointFolderError(f"{path}: is a file, not a checkpoint folder")
    given_step = verl_step_dir(path)
    if given_step is not None:
        return [_verl_step(given_step, int(VERL_STEP_DIR.match(given_step.name).group(1)), python)]
    if (path / "config.json").is_file():
        return [FoundCheckpoint(path, None, "hf")]
    verl_steps = sorted((int(m.group(1)), p) for p in path.iterdir() if p.is_dir() and (m := VERL_STEP_DIR.match(p.name)))
    if verl_steps:
        latest = verl_latest_step(path)
        done = [(n, p) for n, p in verl_steps if latest is None or n <= latest]
        return [_verl_step(p, n, python) for n, p in done]
    trainer_steps = sorted((int(m.group(1)), p) for p in path.iterdir()
                           if p.is_dir() and (m := TRAINER_STEP_DIR.match(p.name)))
    if trainer_steps:
        return [FoundCheckpoint(p, n, "trainer") for n, p in trainer_steps]
    raise CheckpointFolderError(f"{path}: no checkpoint here (expected config.json, step-<N>/ or checkpoint-<N>/ "
                                f"folders, or veRL global_step_<N>/ folders)")
