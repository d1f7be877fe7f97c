"""pass@k to large k: the estimator against brute-force enumeration, planted curves for the
crossover and new solutions, the plug-in with the base's result cached under its own key."""

from __future__ import annotations

import shutil
from itertools import combinations

import numpy as np
import pytest

from analysis.cache import ResultCache
from analysis.harness import HarnessConfig, PuzzleSetConfig, analyse_checkpoints, get_analysis
from analysis.passk import PassAtKError, compare_with_base, crossover, curve_band, pass_curve
from train.evaluate import pass_at_k
from train.registry import Checkpoint, Registry


@pytest.mark.parametrize("n", [1, 5, 9])
def test_estimator_equals_enumeration_over_subsets(n):
    """pass@k = share of the k-subsets of n samples that hold at least one correct one."""
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(combinations(range(n), k))
            brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert pass_curve(n, 0, n).tolist() == [0.0] * n


def test_crossover_and_new_solutions_on_planted_counts():
    # "rl" solves puzzles a and b nearly always and never c; "base" solves a and b rarely and c
    # in 4 of 64: at k = 1 rl leads, at large k the base catches up (it solves three puzzles).
    rl = {"k": 64, "counts": {"a": {"people": 3, "n": 64, "c": 60}, "b": {"people": 3, "n": 64, "c": 60},
                              "c": {"people": 5, "n": 64, "c": 0}, "d": {"people": 5, "n": 64, "c": 8}}}
    base = {"k": 64, "counts": {"a": {"people": 3, "n": 64, "c": 2}, "b": {"people": 3, "n": 64, "c": 2},
                                "c": {"people": 5, "n": 64, "c": 4}, "d": {"people": 5, "n": 64, "c": 0}}}
    out = compare_with_base(rl, base, n_boot=200, seed=0)["by_size"]
    mine = np.mean([pass_curve(64, c, 64) for c in (60, 60, 0, 8)], axis=0)
    theirs = np.mean([pass_curve(64, c, 64) for c in (2, 2, 4, 0)], axis=0)
    expected = int(np.nonzero(theirs >= mine)[0][0]) + 1
    assert out["all"]["crossover"] == expected and 1 < expected <= 64
    # 3 people: the base (2 correct of 64) is certain to solve both once k > 62, as rl is.
    assert out["3"]["crossover"] == 63
    assert out["all"]["new_solutions"]["mean"] == 0.25 and out["all"]["lost_solutions"]["mean"] == 0.25
    assert out["5"]["new_solutions"]["mean"] == 0.5 and out["5"]["n_puzzles"] == 2
    assert out["all"]["difference"]["mean"][0] == pytest.approx(mine[0] - theirs[0])
    assert crossover(np.array([0.2, 0.3]), np.array([0.5, 0.6])) is None   # never ahead
    band = curve_band([(4, 1), (4, 3)], 4, n_boot=100, seed=0)
    assert band["mean"][0] == pytest.approx(0.5) and band["lo"][0] <= 0.5 <= band["hi"][0]


def test_passk_plugin_reads_or_caches_the_base_result(tmp_path, tiny_ckpt):
    base, step = tmp_path / "runs" / "base", tmp_path / "runs" / "s2"
    shutil.copytree(tiny_ckpt, base)
    shutil.copytree(tiny_ckpt, step)              # same weights: sampled answers must be the same
    reg = Registry(tmp_path / "ckpts.yaml")
    reg.add(Checkpoint(id="r/base", path=str(base), run="r", stage="base", global_step=0))
    reg.add(Checkpoint(id="r/stage1/step-2", path=str(step), run="r", stage="stage1", global_step=2,
                       parent="r/base"))
    a = get_analysis("passk", k=3, max_new_tokens=6, n_boot=50, batch_size=8)
    cfg = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(3, 4), per_size=1))
    cache = ResultCache(tmp_path / "cache")
    [out] = analyse_checkpoints(reg, [reg.get("r/stage1/step-2")], [a], cache=cache, config=cfg)
    assert out.error is None
    res = out.results["passk"]
    assert res["base"] == "r/base" and set(res["curves"]) == {"all", "3", "4"}
    assert all(v["n"] == 3 for v in res["counts"].values()) and len(res["curves"]["all"]["mean"]) == 3
    vs = res["vs_base"]["by_size"]["all"]
    assert vs["difference"]["mean"] == [0.0] * 3 and vs["new_solutions"]["mean"] == 0.0
    # The base's result was cached under the key the harness gives it: not computed again.
    [b] = analyse_checkpoints(reg, [reg.get("r/base")], [a], cache=cache, config=cfg)
    assert b.computed == [] and b.results["passk"]["counts"] == res["counts"] and "vs_base" not in b.results["passk"]
    md, figs = a.report_section(res)
    assert "crossover" in md and len(figs) == 1
    trends = a.trend_metrics(res)
    assert {"pass at k=1", "pass at k=3", "pass at k=3@lo", "pass at k=1, 3 people"} <= set(trends)
    # Every label reaches the trend table (an "@" inside a label would hide it).
    from analysis.report import trend_frame
    frame = trend_frame([out], [a])
    assert {"pass at k=1", "pass at k=3, 4 people"} <= set(frame["metric"])
    with pytest.raises(PassAtKError, match="temperature"):
        get_analysis("passk", temperature=0.0)
