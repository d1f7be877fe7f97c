"""`python -m analysis report --ray local`: one Ray task per checkpoint gives the sequential
run's results, and a failing checkpoint is one line while the others finish."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from train.registry import Checkpoint, Registry

SETTINGS = ["--puzzle-sizes", "3", "--puzzles-per-size", "2", "--max-new-tokens", "16",
            "--analyses", "behaviours,drift,verify_prob", "--set", "verify_prob.n_boot=50"]


def report(registry, out, cache, *extra, cwd):
    return subprocess.run([sys.executable, "-m", "analysis", "report", "--registry", str(registry), "--out", str(out),
                           "--cache", str(cache), *SETTINGS, *extra], capture_output=True, text=True, cwd=cwd,
                          timeout=900)


def cached_results(cache) -> dict[str, dict]:
    """relative path -> the cached result, for every result file under a cache folder."""
    return {str(p.relative_to(cache)): json.loads(p.read_text())["result"] for p in sorted(cache.rglob("*.json"))}


@pytest.mark.slow
def test_ray_fan_out_equals_the_sequential_run(tmp_path, tiny_run):
    reg_path = tmp_path / "ckpts.yaml"
    shutil.copy(tiny_run, reg_path)
    reg = Registry(reg_path)
    for ck in reg.checkpoints():                     # the copy points at the same folders
        reg.update(ck.id, path=str(Registry(tiny_run).resolve(ck)))
    ids = [c.id for c in reg.checkpoints()][:4]
    reg.add(Checkpoint(id="tiny/gone", path=str(tmp_path / "gone"), run="tiny", stage="stage3", global_step=99))
    chosen = ["--ids", ",".join(ids + ["tiny/gone"])]

    seq = report(reg_path, tmp_path / "seq", tmp_path / "cache-seq", *chosen, cwd=tmp_path)
    par = report(reg_path, tmp_path / "par", tmp_path / "cache-par", *chosen, "--ray", "local", cwd=tmp_path)
    for r in (seq, par):
        assert r.returncode == 1, r.stderr[-3000:]    # the missing checkpoint fails, alone
        assert "4 analysed, 1 failed" in r.stderr
        assert sum("tiny/gone" in line and "does not exist" in line for line in r.stderr.splitlines()) == 1
    results = cached_results(tmp_path / "cache-seq")
    assert len(results) >= 4 * 3 and results == cached_results(tmp_path / "cache-par")
    assert (tmp_path / "seq" / "trends.csv").read_text() == (tmp_path / "par" / "trends.csv").read_text()


def test_an_unreachable_cluster_is_one_line(tmp_path, tiny_ckpt):
    Registry(tmp_path / "ckpts.yaml").add(Checkpoint(id="tiny/base", path=str(tiny_ckpt)))
    r = report(tmp_path / "ckpts.yaml", tmp_path / "out", tmp_path / "cache", "--ray", "127.0.0.1:1", cwd=tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and lines[-1].startswith("error: --ray 127.0.0.1:1: cannot start or join Ray"), r.stderr
    assert not (tmp_path / "out" / "index.html").exists()
