"""`python -m analysis add PATH...`: register checkpoint folders in ckpts.yaml, no YAML editing.

    python -m analysis add /ckpt/qwen-rl                       # global_step_*/ (veRL) or checkpoint-*/ (TRL)
    python -m analysis add /data/Qwen2.5-7B-Instruct --run qwen-rl --stage base
    python -m analysis add /ckpt/trl-out --store-bf16 /ckpt/bf16 # fp32 saves kept as bf16 copies

Each path is an HF folder, a folder of `step-<N>`/`checkpoint-<N>` folders, or a veRL experiment
or step (`train.checkpoint_folders`). The run is the path's folder name unless `--run` names it;
the step comes from the folder names (a plain HF folder is step 0); ids are `<run>/step-<N>`, or
`<run>/<folder>` for a plain folder. Every folder is checked before anything is written (config,
tokenizer, weights whose headers read); one that fails is one line, and then nothing is
registered.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from train.checkpoint_folders import CheckpointFolderError, FoundCheckpoint, find_checkpoints, verl_step_dir
from train.cli import check_output_folder, err_console
from train.errors import UserError
from train.models import ModelLoadError, check_tokenizer_fits, first_line, load_tokenizer
from train.registry import Checkpoint, Registry


@dataclass(frozen=True)
class Addition:
    id: str
    run: str
    step: int
    found: FoundCheckpoint
    dtype: str            # the weights' dtype as stored ("F32", "BF16", ...; "?" for .bin files)


def run_name(path: Path) -> str:
    """The run a path's checkpoints belong to: a veRL step's experiment, else the folder's name."""
    path = path.resolve()
    step = verl_step_dir(path)
    return step.parent.name if step is not None else path.name


def stored_dtype(folder: Path) -> str:
    """The weights' dtype ("F32" when any tensor is, else "BF16", ...), read from the safetensors
    headers; ModelLoadError (one line) when a header cannot be read or a file is shorter than it says."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return "?"
    dtypes = set()
    for file in files:
        try:
            with open(file, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            tensors = [v for k, v in header.items() if k != "__metadata__"]
            end = 8 + size + max((t["data_offsets"][1] for t in tensors), default=0)
        except (OSError, struct.error, ValueError, MemoryError, OverflowError, TypeError, KeyError,
                IndexError, AttributeError) as exc:
            raise ModelLoadError(f"{file}: the weights' header cannot be read ({first_line(exc)})") from None
        if file.stat().st_size < end:
            raise ModelLoadError(f"{file}: torn weights ({file.stat().st_size} bytes, the header needs {end})")
        dtypes |= {t["dtype"] for t in tensors}
    return "F32" if "F32" in dtypes else (sorted(dtypes)[0] if dtypes else "?")


def check_loadable(folder: Path) -> str:
    """The stored dtype of a folder that has config, tokenizer and readable weights; else one line."""
    tokenizer = load_tokenizer(folder)          # checks config.json, weights and tokenizer files
    check_tokenizer_fits(folder, tokenizer)
    return stored_dtype(folder)


def plan_additions(paths: list[Path], run: Optional[str]) -> tuple[list[Addition], list[str]]:
    """What each path adds, and one line per path or folder that cannot be added."""
    additions, problems = [], []
    for path in paths:
        try:
            found = find_checkpoints(path)
        except CheckpointFolderError as exc:
            problems.append(str(exc))
            continue
        name = run or run_name(path)
        for f in found:
            try:
                dtype = check_loadable(f.folder)
            except UserError as exc:
                problems.append(str(exc))
                continue
            ck_id = f"{name}/step-{f.step:06d}" if f.step is not None else f"{name}/{f.folder.name}"
            additions.append(Addition(ck_id, name, f.step or 0, f, dtype))
    seen: dict[str, Path] = {}
    for a in additions:
        if a.id in seen and seen[a.id] != a.found.folder:
            problems.append(f"{a.found.folder}: id {a.id!r} is also {seen[a.id]}; add them under different --run names")
        seen.setdefault(a.id, a.found.folder)
    return additions, problems


def store_bf16(folder: Path, target: Path) -> None:
    """Write a bf16 copy of an HF folder (weights and tokenizer) to `target`, which must not exist."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    load_tokenizer(folder).save_pretrained(tmp)
    tmp.rename(target)


def add_command(
    paths: list[Path] = typer.Argument(..., help="HF folders, folders of step-*/checkpoint-* folders, veRL experiments"),
    run: Optional[str] = typer.Option(None, help="run name (default: each path's folder name)"),
    stage: str = typer.Option("external", help="stage recorded for the checkpoints (e.g. base, stage1)"),
    registry: Path = typer.Option(Path("ckpts.yaml"), help="checkpoint registry"),
    store_bf16_in: Optional[Path] = typer.Option(None, "--store-bf16",
                                                 help="folder for bf16 copies of fp32 checkpoints (registered instead)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show what would be registered; write nothing"),
) -> None:
    """Register checkpoint folders in the registry (run, step and order inferred)."""
    reg = Registry(registry)
    reg.check_writable()
    if store_bf16_in is not None:
        check_output_folder(store_bf16_in, "--store-bf16")
    known = {c.id: c for c in reg.checkpoints()}
    additions, problems = plan_additions(paths, run)
    for a in additions:
        if a.id in known:
            registered = reg.resolve(known[a.id]).resolve()
            copies = {a.found.folder.resolve()} | ({(store_bf16_in / a.id).resolve()} if store_bf16_in else set())
            if registered not in copies:
                problems.append(f"{a.found.folder}: {reg.path} already has {a.id!r} at {known[a.id].path}; "
                                f"choose another --run")
        elif store_bf16_in is not None and a.dtype == "F32" and (store_bf16_in / a.id).exists():
            problems.append(f"--store-bf16 {store_bf16_in}: {store_bf16_in / a.id} exists; nothing is overwritten")
    if problems:
        for line in problems[:-1]:
            err_console.print(f"[bold red]error:[/] {line}", soft_wrap=True)
        raise UserError(problems[-1] + ("" if len(problems) == 1 else f" ({len(problems)} problems; nothing registered)"))

    table = Table("id", "step", "layout", "dtype", "folder", title=f"{reg.path}{' (dry run)' if dry_run else ''}")
    # each checkpoint's parent: the one before it in its run, registered or added now
    steps: dict[str, list[tuple[int, str]]] = {}
    for c in known.values():
        steps.setdefault(c.run, []).append((c.global_step, c.id))
    for a in additions:
        if a.id not in known:
            steps.setdefault(a.run, []).append((a.step, a.id))
    parents = {}
    for run_steps in steps.values():
        ordered = [ck_id for _, ck_id in sorted(run_steps)]
        parents.update(zip(ordered[1:], ordered[:-1]))
    for a in sorted(additions, key=lambda a: (a.run, a.step, a.id)):
        folder = a.found.folder
        if a.id in known:
            table.add_row(a.id, str(a.step), a.found.layout, a.dtype, f"{folder} (already registered)")
            continue
        if store_bf16_in is not None and a.dtype == "F32":
            target = store_bf16_in / a.id
            if not dry_run:
                target.parent.mkdir(parents=True, exist_ok=True)
                with err_console.status(f"storing {a.id} as bf16"):
                    store_bf16(folder, target)
            folder = target
        if not dry_run:
            reg.add(Checkpoint(id=a.id, path=str(folder.resolve()), run=a.run, stage=stage, global_step=a.step,
                               parent=parents.get(a.id)))
        table.add_row(a.id, str(a.step), a.found.layout, "BF16" if folder != a.found.folder else a.dtype, str(folder))
    err_console.print(table)
