"""Change points on the step axis: planted level shifts found at their steps, none in noise,
aligned with the reward's shifts, and drawn and tabled in the index report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis.changepoints import ChangePointError, change_point_table, level_shifts, training_frame
from analysis.harness import Analysis, CheckpointOutcome
from analysis.report import write_reports
from train.registry import Checkpoint, Registry


def planted(levels: list[tuple[int, float]], n: int, sd: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1..n; the level is each (first step, value)'s value from its first step on, plus noise."""
    steps = np.arange(1, n + 1)
    level = np.zeros(n)
    for first, value in levels:
        level[steps >= first] = value
    return steps, level + np.random.default_rng(seed).normal(0, sd, n)


def test_planted_shifts_are_found_at_their_steps():
    steps, values = planted([(1, 0.0), (16, 1.0), (31, 0.3)], 40, sd=0.1)
    found = level_shifts(steps, values)
    assert [s["step"] for s in found] == [16, 31]
    assert found[0]["before"] == pytest.approx(0.0, abs=0.1) and found[0]["after"] == pytest.approx(1.0, abs=0.1)
    # Sparse steps (every 4th, as checkpoints are): the shift is the first step of the new level.
    assert [s["step"] for s in level_shifts(steps[::4], values[::4])] == [17, 33]


def test_noise_and_constants_rarely_or_never_shift():
    # The penalty keeps false shifts in pure noise rare (about 1 series in 100 of 40 steps).
    noisy = [bool(level_shifts(*planted([(1, 0.5)], 40, sd=0.2, seed=seed))) for seed in range(50)]
    assert sum(noisy) <= 3
    assert level_shifts(range(40), np.full(40, 2.0)) == []
    assert level_shifts([1, 2, 3], [0.0, 5.0, 5.0]) == []             # too short for two segments of 2


def test_noiseless_step_and_bad_settings():
    assert [s["step"] for s in level_shifts(range(10), [0] * 5 + [1] * 5)] == [5]
    # Rounding-level wiggles of a flat series are no shift.
    assert level_shifts(range(14), 0.9687 + 1e-7 * np.resize([0, 1, 0, 0, 2, 1, 0], 14)) == []
    with pytest.raises(ChangePointError, match="penalty"):
        level_shifts(range(10), range(10), penalty=0)


def test_table_aligns_analysis_shifts_with_the_reward():
    steps, reward = planted([(1, -1.0), (12, 2.0)], 30, sd=0.1)
    training = pd.DataFrame({"run": "r", "global_step": steps, "metric": "reward", "value": reward})
    ck_steps = np.arange(2, 31, 2)
    _, probe = planted([(1, 0.2), (10, 0.8)], 30, sd=0.02, seed=1)
    trends = pd.DataFrame({"run": "r", "global_step": ck_steps, "metric": "probe", "value": probe[ck_steps - 1]})
    table = change_point_table(trends, training)
    rows = {r["metric"]: r for _, r in table.iterrows()}
    assert rows["reward"]["step"] == 12 and rows["reward"]["vs reward shift"] == 0
    assert rows["probe"]["step"] == 10 and rows["probe"]["vs reward shift"] == -2   # before the reward jump


class _Planted(Analysis):
    name = "planted"

    def run(self, ctx):  # pragma: no cover - results are given
        raise NotImplementedError

    def report_section(self, result):
        return "", []

    def trend_metrics(self, result):
        return {"probe": result["probe"]}


def test_index_report_draws_and_tables_the_shifts(tmp_path):
    steps, reward = planted([(1, -1.0), (12, 2.0)], 30, sd=0.1)
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "stage1").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"global_step": int(s), "stage": "stage1", "reward": float(v), "kl": 0.0}) + "\n"
        for s, v in zip(steps, reward)))
    reg = Registry(tmp_path / "ckpts.yaml")
    outcomes = []
    for step in range(2, 31, 2):
        ck = Checkpoint(id=f"r/stage1/step-{step}", path=str(run_dir / "stage1" / f"step-{step}"), run="r",
                        stage="stage1", global_step=step)
        reg.add(ck)
        outcomes.append(CheckpointOutcome(checkpoint=ck, results={"planted": {"probe": 0.8 if step >= 10 else 0.2}}))
    training = training_frame(reg, ["r", "absent"])
    assert set(training["metric"]) == {"reward", "kl"} and set(training["run"]) == {"r"}
    files = write_reports(outcomes, [_Planted()], tmp_path / "reports", training=training)
    md = files.index_md.read_text()
    assert "## Change points" in md and "| training | r | reward | 12 |" in md
    assert "| analysis | r | probe | 10 | 0.2 → 0.8 | -2 |" in md
    assert (tmp_path / "reports" / "figures" / "training.png").is_file()
    assert "Change points" in files.index_html.read_text()
