"""`python -m train.run`: build the base model, then train stage 1, 2 and 3.

    python -m train.run base                 # build/locate the preset's base model
    python -m train.run stage3               # everything needed up to stage 3
    python -m train.run stage2 --dry-run     # print the plan of segments, touch nothing
    python -m train.run all --schedule smollm2-135m --set stages.stage1.steps=4

A stage is complete when its final checkpoint is registered with the schedule's config hash;
complete stages are skipped and an interrupted one resumes from its last registered
checkpoint (the optimizer state restarts there; the data order continues).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer

from train.cli import err_console, parse_sets, run_app
from train.errors import UserError
from train.engine import Engine, SegmentJob, base_id, engine_name
from train.registry import Checkpoint, Registry, parse_seeds, seed_run
from train.schedule import STAGES, Schedule, ScheduleError, Segment, load_schedule, plan

DEFAULT_SCHEDULE = "kk-tiny"


def ensure_base(sched: Schedule, registry: Registry, progress: bool = True,
                path: Path | None = None) -> Checkpoint:
    """Register the preset's model (at `path` when the caller has resolved it) as the run's base."""
    from train.models import resolve_model

    path = Path(path or resolve_model(sched.preset, progress=progress))
    base = Checkpoint(id=base_id(sched.run), path=str(path), run=sched.run, stage="base",
                      global_step=0, preset=sched.preset, engine="base")
    cks = registry.checkpoints()
    old = next((c for c in cks if c.id == base.id), None)
    if old is None or registry.resolve(old).resolve() == path.resolve():
        return registry.add(base)
    # The base entry points elsewhere (another machine's model cache, a rebuilt organism).
    # Re-point it while the run has no trained checkpoint; after that it is their parent.
    if any(c.run == sched.run and c.stage != "base" for c in cks):
        raise ScheduleError(
            f"{registry.path}: {base.id} is registered at {old.path}, but preset {sched.preset} is "
            f"{path}, and run {sched.run}'s checkpoints were trained from the former; give the "
            "schedule another `run:` name or remove the run's entries")
    return registry.add(base, replace=True)


def _stage_entries(cks: list[Checkpoint], run: str, stage: str) -> list[Checkpoint]:
    return sorted((c for c in cks if c.run == run and c.stage == stage), key=lambda c: c.global_step)


def check_state(sched: Schedule, registry: Registry, target: str) -> dict[str, Checkpoint | None]:
    """The final checkpoint of each stage up to `target` (None if not complete).

    Refuses to mix schedules inside a run and to continue past a missing earlier stage.
    """
    cks = registry.checkpoints()
    finals: dict[str, Checkpoint | None] = {}
    for stage in STAGES:
        entries = _stage_entries(cks, sched.run, stage)
        want = sched.config_hash(stage)
        stale = [c for c in entries if c.config_hash and c.config_hash != want]
        if stale and stage in STAGES[: STAGES.index(target) + 1]:
            raise ScheduleError(
                f"run {sched.run!r} {stage} was trained with another schedule (config hash "
                f"{stale[0].config_hash}, now {want}); choose another --run or remove its entries from {registry.path}")
        finals[stage] = next((c for c in entries if c.stage_final), None)
    for i, stage in enumerate(STAGES[1:], 1):
        if finals[stage] is not None and finals[STAGES[i - 1]] is None:
            raise ScheduleError(f"stage order violation in {registry.path}: {stage} of run {sched.run!r} "
                                f"is complete but {STAGES[i - 1]} is not")
    return finals


def print_plan(sched: Schedule, segments: list[Segment]) -> None:
    from rich.table import Table

    t = Table(title=f"run {sched.run} · preset {sched.preset} · {sched.algorithm}", show_lines=False)
    for col in ("stage", "seg", "steps", "global", "people", "batch×n", "T", "top_p", "top_k", "lr", "kl", "resp len", "save"):
        t.add_column(col)
    for s in segments:
        t.add_row(s.stage, f"{s.index + 1}/{s.n_segments}", str(s.steps), f"{s.start_step}→{s.end_step}",
                  ",".join(map(str, s.people)), f"{s.batch_prompts}×{s.rollout_n}", f"{s.temperature:g}",
                  f"{s.top_p:g}", str(s.top_k), f"{s.lr:.3g}", f"{s.kl_type} {s.kl_coef:g}",
                  str(s.max_response_length), str(s.save_every))
    err_console.print(t)


def check_writable(path: Path) -> None:
    """Create `path` if needed and make sure a file can be written in it (one-line error)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{path}: output folder is not writable ({exc.strerror})") from None


def train(target: str, sched: Schedule, registry: Registry, runs_dir: Path, engine: Engine | None = None,
          progress: bool = True) -> Checkpoint:
    """The one stage loop: every pending segment up to `target`, each trained by `engine`
    (default: TRL); returns the target stage's final checkpoint."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from train.data import ensure_built
    from train.models import fixed_cast, resolve_model
    from train.plots import training_figure

    if engine is None:
        from train.engine_trl import TrlEngine

        engine = TrlEngine()
    segments = plan(sched, target)
    engine.check(sched, segments)
    run_dir = runs_dir / sched.run
    check_writable(run_dir)
    check_writable(registry.path.parent.resolve())
    finals = check_state(sched, registry, target)
    d = sched.data
    # The base model says which puzzle world it was made for; the training data follows it.
    base_path = resolve_model(sched.preset, progress=progress)
    ensure_built(d.root, sorted({n for s in segments for n in s.people}), d.train_per_size, d.test_per_size,
                 d.seed, d.prompt_style, progress=progress, fixed_cast=fixed_cast(base_path))
    parent = ensure_base(sched, registry, path=base_path)
    (run_dir / "plan.json").write_text(json.dumps([s.model_dump() for s in segments], indent=1) + "\n")

    cks = registry.checkpoints()
    pending = [s for s in segments if finals[s.stage] is None]
    total = sum(s.steps for s in pending)
    done_before = sum(
        max((c.global_step for c in _stage_entries(cks, sched.run, s.stage)
             if c.segment == s.index), default=s.start_step) - s.start_step
        for s in pending)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                  disable=not progress or total == 0) as bar:
        task = bar.add_task("training", total=total, completed=done_before)

        def on_step(step: int, m: dict) -> None:
            bar.advance(task)
            bar.console.print(
                f"step {step:4d} | reward {m.get('reward', float('nan')):+.3f} | correct {m.get('correct', 0):.2f}"
                f" | format err {m.get('format_error', 0):.2f} | wrong {m.get('wrong', 0):.2f}"
                f" | len {m.get('length_mean', 0):.0f} | kl {m.get('kl', 0):.4f} | T {m.get('temperature', 0):g}")

        def echo(line: str) -> None:
            if progress:
                bar.console.print(line, highlight=False, markup=False)

        for stage in STAGES[: STAGES.index(target) + 1]:
            if finals[stage] is not None:
                parent = finals[stage]
                continue
            for seg in (s for s in segments if s.stage == stage):
                entries = [c for c in _stage_entries(registry.checkpoints(), sched.run, stage) if c.segment == seg.index]
                if any(c.segment_final for c in entries):
                    parent = next(c for c in entries if c.segment_final)
                    continue
                other = [c for c in entries if engine_name(c.engine) not in (None, engine.name)]
                if other:
                    raise ScheduleError(f"run {sched.run!r} {stage} segment {seg.index + 1} has checkpoints from "
                                        f"engine {engine_name(other[0].engine)!r}; finish it there or choose another --run")
                start = entries[-1] if entries else parent
                bar.update(task, description=f"{stage} {seg.index + 1}/{seg.n_segments} T={seg.temperature:g}")
                last_id = engine.run_segment(SegmentJob(
                    schedule=sched, segment=seg, init_path=registry.resolve(start), parent_id=start.id,
                    start_path=registry.resolve(parent), start_id=parent.id, run_dir=run_dir, registry=registry,
                    config_hash=sched.config_hash(stage),
                    done_steps=start.global_step - seg.start_step if entries else 0, on_step=on_step, echo=echo))
                parent = registry.get(last_id)
            figure = training_figure(run_dir / "metrics.jsonl", run_dir / "figures" / f"training-{stage}.png",
                                     title=f"{sched.run}: up to {stage}")
            echo(f"{stage} done: {parent.id}  figure: {figure}")
    return parent


# --------------------------------------------------------------------------- CLI

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train the three-stage GRPO schedule and register checkpoints in ckpts.yaml.")

TARGETS = ("base", *STAGES, "all")


@app.command()
def main(
    target: str = typer.Argument(..., help="base | stage1 | stage2 | stage3 | all"),
    schedule: str = typer.Option(DEFAULT_SCHEDULE, "--schedule", "-s", help="schedule preset or YAML path"),
    engine: str = typer.Option("trl", help="trl (TRL's GRPOTrainer, CPU or one GPU) or verl (Ray, GPU cluster)"),
    registry: Path = typer.Option(Path("ckpts.yaml"), help="checkpoint registry"),
    runs_dir: Path = typer.Option(Path("runs"), help="where checkpoints and metrics go"),
    run: str = typer.Option(None, help="run name (default: the schedule's)"),
    set_: list[str] = typer.Option([], "--set", help="schedule override, e.g. stages.stage1.steps=5"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and touch nothing"),
    quiet: bool = typer.Option(False, help="no progress bars"),
    seeds: str = typer.Option(None, help="train one run per GRPO seed, e.g. 0,1,2: run <run>-seed<N>, "
                              "every stage seeded N, the same base and data (then: python -m analysis seeds)"),
):
    """Train up to TARGET (earlier stages as needed), skipping what is complete."""
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    overrides = dict(parse_sets(set_))
    if run:
        overrides["run"] = run
    if seeds is not None:
        base = load_schedule(schedule, overrides)
        for seed in parse_seeds(seeds):
            seeded = {**overrides, "run": seed_run(base.run, seed),
                      **{f"stages.{stage}.seed": seed for stage in STAGES}}
            err_console.print(f"[bold]seed {seed}[/]: run {seeded['run']}")
            _main(target, load_schedule(schedule, seeded), Registry(registry), engine, runs_dir, dry_run, quiet)
        return
    _main(target, load_schedule(schedule, overrides), Registry(registry), engine, runs_dir, dry_run, quiet)


ENGINES = ("trl", "verl")


def make_engine(name: str) -> Engine:
    """The engine an --engine value names ("local" is the TRL engine's earlier name)."""
    name = engine_name(name)
    if name == "trl":
        from train.engine_trl import TrlEngine

        return TrlEngine()
    if name == "verl":
        from train.engine_verl import VerlEngine

        return VerlEngine()
    raise UserError(f"--engine {name!r}: use {' or '.join(ENGINES)}")


def _main(target: str, sched: Schedule, reg: Registry, engine_choice: str, runs_dir: Path, dry_run: bool,
          quiet: bool) -> None:
    engine = make_engine(engine_choice)
    stage = "stage3" if target == "all" else target
    if stage != "base":
        # What the real run checks before its first write, a dry run checks too.
        engine.check(sched, plan(sched, stage))
        check_state(sched, reg, stage)
    if dry_run:
        if engine.name == "verl":
            from train.engine_verl import print_commands

            print_commands(stage, sched, reg, runs_dir)
            return
        if stage != "base":
            print_plan(sched, plan(sched, stage))
        err_console.print(f"base model: preset {sched.preset}; registry {reg.path}; outputs {runs_dir / sched.run}")
        return
    reg.check_writable()              # fail now, not after the data build or the first segment
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.time()
    if stage == "base":
        ck = ensure_base(sched, reg, progress=not quiet)
        err_console.print(f"base model {ck.id}: {reg.resolve(ck)}")
        return
    ck = train(stage, sched, reg, runs_dir, engine, progress=not quiet)
    err_console.print(f"{stage} complete: {ck.id} ({reg.resolve(ck)}) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    run_app(app)
