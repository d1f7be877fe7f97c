"""The multi-seed study: `python -m train.run --seeds` trains one run per seed, and
`python -m analysis seeds` evaluates each stage end and aggregates across seeds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, fixed_cast_copy, write_schedule
from train.registry import Registry


def test_interval_is_the_student_t_interval_and_changes_are_taken_per_seed():
    from scipy import stats

    from analysis.seeds import aggregate, interval

    values = [0.2, 0.5, 0.4]
    iv = interval(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 3, scale=stats.sem(values))
    assert iv["mean"] == pytest.approx(sum(values) / 3) and iv["lo"] == pytest.approx(lo) and iv["hi"] == pytest.approx(hi)
    assert interval([0.3]) == {"mean": 0.3, "lo": None, "hi": None, "min": 0.3, "n": 1}
    assert interval([])["mean"] is None
    per_seed = {s: {"base": {"acc": 0.1}, "stage1": {"acc": 0.1 + d}, "stage2": {"acc": 0.5},
                    "stage3": {"acc": 0.6}} for s, d in ((0, 0.3), (1, 0.5))}
    agg = aggregate(per_seed)
    assert agg["levels"]["acc"]["base"]["mean"] == pytest.approx(0.1)
    assert agg["changes"]["acc"]["stage1"]["mean"] == pytest.approx(0.4)
    assert agg["changes"]["acc"]["stage1"]["min"] == pytest.approx(0.3)


@pytest.mark.slow
def test_two_seeds_train_and_the_study_aggregates_their_evaluations(tmp_path, tiny_ckpt):
    """Two GRPO seeds of a tiny schedule, then the study: each seed's figures equal its own
    checkpoints' cached evaluations, the shared base is evaluated once, and the table, JSON
    and figure hold the mean and interval of those figures."""
    from analysis.cache import ResultCache
    from analysis.evaluate import evaluate_checkpoint
    from train.evaluate import make_config
    from analysis.seeds import STAGE_POINTS, SeedStudyConfig, interval

    model = fixed_cast_copy(tiny_ckpt, tmp_path / "model")
    sched = write_schedule(tmp_path, model, steps=(2, 1, 2), save_every=1, max_response_length=12)
    env = {**os.environ, "KKLAB_CACHE": str(tmp_path / "cache")}
    common = ["--registry", str(tmp_path / "ckpts.yaml"), "--runs-dir", str(tmp_path / "runs")]
    r = subprocess.run([sys.executable, "-m", "train.run", "stage3", "--schedule", str(sched), "--seeds", "0,1",
                        "--quiet", *common], capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr
    reg = Registry(tmp_path / "ckpts.yaml")
    runs = {c.run for c in reg.checkpoints()}
    assert runs == {"tiny-seed0", "tiny-seed1"}
    for seed in (0, 1):                 # every segment of seed N's run is seeded from N
        plan_ = json.loads((tmp_path / "runs" / f"tiny-seed{seed}" / "plan.json").read_text())
        assert [seg["seed"] % 1000 for seg in plan_] == [seed] * len(plan_)

    out, cache = tmp_path / "study", tmp_path / "cache-results"
    study = subprocess.run([sys.executable, "-m", "analysis", "seeds", "--run", "tiny", "--seeds", "0,1",
                            "--n-per-size", "2", "--people", "3", "--max-new-tokens", "8", "--out", str(out),
                            "--cache", str(cache), *common], capture_output=True, text=True, cwd=REPO, env=env)
    assert study.returncode == 0, study.stderr
    result = json.loads((out / "seeds.json").read_text())
    assert (out / "seeds.png").stat().st_size > 1000 and "| accuracy_3 |" in (out / "seeds.md").read_text()
    assert set(result["per_seed"]) == {"0", "1"}
    # Each figure is the checkpoint's own (cached) evaluation; the base once for both seeds.
    config = SeedStudyConfig(run="tiny", seeds=(0, 1), people=(3,), n_per_size=2, max_new_tokens=8)
    greedy = make_config(mode="greedy", people=[3], n_per_size=2, max_new_tokens=8, batch_size=32, fixed_cast=True)
    store = ResultCache(cache)
    for seed in ("0", "1"):
        for point in STAGE_POINTS:
            ck = reg.get(result["checkpoints"][seed][point])
            summary = evaluate_checkpoint(reg, ck, greedy, store, progress=False)
            if point == "base" and seed == "1":
                assert not summary["cached"]       # the study evaluated seed 0's base only
            else:
                assert summary["cached"]
            figures = result["per_seed"][seed][point]
            assert figures["accuracy_3"] == summary["accuracy_by_size"]["3"]
            assert figures["length"] == summary["mean_response_tokens"]
        tail = [json.loads(line) for line in (tmp_path / "runs" / f"tiny-seed{seed}" / "metrics.jsonl").open()]
        s1 = [row["format_error"] for row in tail if row["stage"] == "stage1"]
        assert result["per_seed"][seed]["stage1"]["train_format_error_last5"] == pytest.approx(sum(s1) / len(s1))
    for m in ("length", "sampled_accuracy", "verification"):
        for point in STAGE_POINTS:
            expect = interval([result["per_seed"][s][point][m] for s in ("0", "1")])
            got = result["aggregate"]["levels"][m][point]
            assert got["mean"] == pytest.approx(expect["mean"])
            assert (got["lo"] is None and expect["lo"] is None) or got["lo"] == pytest.approx(expect["lo"])
    assert config.n_per_size == 2 and not math.isnan(result["aggregate"]["levels"]["length"]["base"]["mean"])
    # A study of seeds that were not trained says so in one line.
    missing = subprocess.run([sys.executable, "-m", "analysis", "seeds", "--run", "tiny", "--seeds", "0,5",
                              "--out", str(tmp_path / "x"), "--cache", str(cache), *common],
                             capture_output=True, text=True, cwd=REPO, env=env)
    assert missing.returncode == 2 and "tiny-seed5" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
