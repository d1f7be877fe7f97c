"""Notebook conveniences: one call runs an analysis over a run's checkpoints (cached) and
hands back what a notebook draws. Nothing here computes anything the harness does not.

    study = run_analysis("behaviours", registry="../ckpts.yaml", run="kk-tiny")
    study.trends            # long table: checkpoint, stage, global_step, metric, value, lo, hi
    study.figure()          # one panel per trend metric, stage boundaries marked
    study.section(-1)       # the report section of the last checkpoint: (markdown, figures)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from analysis.cache import ResultCache
from analysis.harness import (Analysis, CheckpointOutcome, GenerationConfig, HarnessConfig, PuzzleSetConfig,
                              analyse_checkpoints, get_analysis)
from analysis.selection import checkpoints_cast, select_checkpoints
from analysis.report import stage_boundaries, trend_figure, trend_frame
from train.registry import Registry


def settings_from_env() -> dict[str, Any]:
    """Notebook parameters that a test run overrides through the environment."""
    return {
        "registry": os.environ.get("KKLAB_CKPTS", "../ckpts.yaml"),
        "run": os.environ.get("KKLAB_RUN") or None,
        "cache": os.environ.get("KKLAB_ANALYSIS_CACHE", "../reports/cache"),
        "quick": os.environ.get("KKLAB_QUICK") == "1",
    }


@dataclass
class Study:
    analysis: Analysis
    outcomes: list[CheckpointOutcome]

    @property
    def trends(self):
        return trend_frame(self.outcomes, [self.analysis])

    @property
    def results(self) -> dict[str, dict]:
        return {o.checkpoint.id: o.results[self.analysis.name] for o in self.outcomes
                if self.analysis.name in o.results}

    @property
    def errors(self) -> dict[str, str]:
        return {o.checkpoint.id: o.error for o in self.outcomes if o.error}

    def figure(self, metrics: Sequence[str] | None = None, ncols: int = 3):
        frame = self.trends
        if metrics is not None:
            frame = frame[frame["metric"].isin(list(metrics))]
        return trend_figure(frame, stage_boundaries(self.outcomes), ncols=ncols)

    def section(self, index: int = -1) -> tuple[str, list]:
        """(markdown, [(caption, figure)]) of one checkpoint's report section."""
        ok = [o for o in self.outcomes if self.analysis.name in o.results]
        return self.analysis.report_section(ok[index].results[self.analysis.name])


def run_analysis(name: str, *, registry: str | Path = "ckpts.yaml", run: str | None = None,
                 stage: str | None = None, every: int = 1, cache: str | Path = "reports/cache",
                 puzzle_sizes: Sequence[int] = PuzzleSetConfig.sizes, per_size: int = PuzzleSetConfig.per_size,
                 max_new_tokens: int = GenerationConfig.max_new_tokens, options: dict | None = None) -> Study:
    """Run one registered analysis over the selected checkpoints (a rerun reads the cache)."""
    reg = Registry(registry)
    analysis = get_analysis(name, **(options or {}))
    cks = select_checkpoints(reg, run=run, stage=stage, every=every)
    config = HarnessConfig(puzzles=PuzzleSetConfig(sizes=tuple(puzzle_sizes), per_size=per_size,
                                             fixed_cast=checkpoints_cast(reg, cks)),
                           generation=GenerationConfig(max_new_tokens=max_new_tokens))
    outcomes = analyse_checkpoints(reg, cks, [analysis], cache=ResultCache(cache), config=config)
    return Study(analysis, outcomes)


def show_section(markdown: str, figures: Sequence) -> None:
    """Display a report section inside Jupyter."""
    from IPython.display import Markdown, display

    display(Markdown(markdown))
    for item in figures:
        fig = item[1] if isinstance(item, tuple) else item
        display(fig)
