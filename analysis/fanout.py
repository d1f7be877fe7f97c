"""Checkpoints analysed as Ray tasks: `python -m analysis report ... --ray [ADDRESS]`.

Each checkpoint is one independent task (`analysis.harness.analyse_checkpoint`) with its
resource request: one GPU when the analyses run on CUDA, `--ray-cpus` CPUs otherwise. A task
runs with the driver's torch thread count, so its numbers equal the sequential run's exactly. Every
task writes the same result cache (each checkpoint's results go to its own folder, and every
write is atomic), and the driver writes the index once at the end, exactly as a sequential run
does. A task that fails (a bad checkpoint, or a worker that dies) is one line; the rest go on.

    python -m analysis report --run qwen-rl --ray auto --device cuda      # a running cluster
    python -m analysis report --run kk-tiny --ray local --ray-cpus 1      # a local instance

The project must be importable on every node (installed, or on a shared file system); the
registry's checkpoint paths and the cache folder must be visible to every node.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Callable, Sequence

from analysis.cache import ResultCache
from analysis.harness import (CheckpointOutcome, HarnessConfig, analyse_checkpoint, get_analysis, load_plugins)
from train.errors import UserError
from train.models import first_line
from train.registry import Checkpoint, Registry


def _analyse_on_worker(registry_path: str, ck: Checkpoint, specs: Sequence[tuple[str, dict]],
                       plugins: Sequence[str], cache_root: str, config: HarnessConfig,
                       threads: int) -> CheckpointOutcome:
    import torch

    # The driver's thread count: matmul and SVD sum in the same order, so every number equals
    # the sequential run's bit for bit (a different count changes the last digits).
    torch.set_num_threads(threads)
    load_plugins(plugins)
    analyses = [get_analysis(name, **options) for name, options in specs]
    return analyse_checkpoint(Registry(registry_path), ck, analyses, cache=ResultCache(cache_root), config=config)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """One line when a "host:port" or "ray://host:port" address does not answer (Ray itself would
    keep retrying for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address in ("local", "auto") or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(f"--ray {address}: cannot start or join Ray (nothing answers at {host}:{port}: "
                        f"{exc.strerror or exc})") from None


def analyse_on_ray(registry: Registry, checkpoints: Sequence[Checkpoint], specs: Sequence[tuple[str, dict]], *,
                   plugins: Sequence[str], cache: ResultCache, config: HarnessConfig, address: str,
                   cpus_per_task: int = 1, progress: Any = None,
                   on_outcome: Callable[[CheckpointOutcome], None] | None = None) -> list[CheckpointOutcome]:
    """`analyse_checkpoints` with one Ray task per checkpoint; outcomes in the checkpoints' order.

    address: "local" starts a Ray instance on this machine (stopped at the end); anything else
    ("auto", "ray://host:10001", "host:6379") joins that cluster."""
    import ray

    check_reachable(address)
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UserError(f"--ray {address}: cannot start or join Ray ({first_line(exc)})") from None
    try:
        gpus = 1 if config.device.startswith("cuda") else 0
        task = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus, max_retries=0)(_analyse_on_worker)
        bar = progress.add_task(f"analysing on Ray ({len(checkpoints)} tasks)", total=len(checkpoints)) \
            if progress is not None else None
        import torch

        threads = torch.get_num_threads()
        refs = {task.remote(str(registry.path.resolve()), ck, list(specs), list(plugins),
                            str(Path(cache.root).resolve()), config, threads): ck for ck in checkpoints}
        outcomes: dict[str, CheckpointOutcome] = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ck = refs[done[0]]
            try:
                outcome = ray.get(done[0])
            except Exception as exc:          # the task itself died (worker crash, OOM kill, ...)
                outcome = CheckpointOutcome(checkpoint=ck, error=f"{ck.id}: Ray task failed ({first_line(exc)})")
            outcomes[ck.id] = outcome
            if on_outcome is not None:
                on_outcome(outcome)
            if bar is not None:
                progress.advance(bar)
        return [outcomes[ck.id] for ck in checkpoints]
    finally:
        ray.shutdown()
