"""SmolLM2-135M end to end on its real tokenizer: `analysis add` on the base folder and on the
folder of a few GRPO steps, `analysis eval`, `analysis report` (every analysis, tiny settings)
and `probes run`, so the real-model path cannot break unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, write_schedule
from train.registry import Registry

TINY = ["--puzzle-sizes", "3", "--puzzles-per-size", "2", "--max-new-tokens", "24"]
# Every analysis at its smallest useful size: the point is the real tokenizer's path, not figures.
SMALL = {"verify_prob": "max_points=4 phrase_points=1 n_boot=50 max_tokens=1024",
         "attention": "max_traces=2 n_boot=50 max_tokens=1024",
         "neurons": "source=fixed max_contexts=4 n_random=1 ks=5 top_per_layer=2 max_tokens=512 min_switch_points=1"}


@pytest.mark.slow
def test_smollm2_add_train_eval_report_probes(tmp_path, monkeypatch):
    monkeypatch.setenv("KKLAB_CACHE", str(tmp_path / "cache"))
    env = dict(os.environ)

    def run(module, *args, cwd=tmp_path):
        r = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                           cwd=cwd, env=env, timeout=1200)
        assert r.returncode == 0, f"{module} {args}: {r.stderr[-3000:]}"
        return r

    from train.models import resolve_model

    base = resolve_model("smollm2-135m", progress=False)
    sched = write_schedule(tmp_path, base, steps=(2, 2, 2), save_every=2, max_response_length=32)
    run("train.run", "stage1", "--schedule", sched, "--registry", tmp_path / "train.yaml",
        "--runs-dir", tmp_path / "runs", "--quiet", cwd=REPO)

    run("analysis", "add", base, "--run", "smol", "--stage", "base")
    run("analysis", "add", tmp_path / "runs" / "tiny" / "stage1", "--run", "smol", "--stage", "stage1")
    cks = Registry(tmp_path / "ckpts.yaml").checkpoints()
    assert [(c.id, c.global_step) for c in cks] == [("smol/smollm2-135m", 0), ("smol/step-000002", 2)]

    run("analysis", "eval", "--run", "smol", "--people", "3", "--n-per-size", "2", "--max-new-tokens", "48",
        "--out", tmp_path / "eval")
    evals = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert {row["checkpoint"] for row in evals["checkpoints"]} == {c.id for c in cks} and not evals["failed"]

    r = run("analysis", "report", "--run", "smol", *TINY, "--out", tmp_path / "reports",
            *[arg for name, opts in SMALL.items() for opt in opts.split() for arg in ("--set", f"{name}.{opt}")])
    assert "2 analysed, 0 failed" in r.stderr
    trends = (tmp_path / "reports" / "trends.csv").read_text()
    assert "accuracy" in trends and "smol/step-000002" in (tmp_path / "reports" / "index.md").read_text()
    for analysis in ("behaviours", "verify_prob", "attention", "neurons", "drift", "probes"):
        assert len(list((tmp_path / "reports" / "cache").rglob(f"{analysis}-*.json"))) == 2, analysis

    run("probes", "run", "--run", "smol", *TINY, "--out", tmp_path / "probes", "--folds", "2",
        "--permutations", "0", "--control-draws", "1", "--max-points", "8")
    assert (tmp_path / "probes" / "summary.md").is_file() and (tmp_path / "probes" / "results.json").is_file()
