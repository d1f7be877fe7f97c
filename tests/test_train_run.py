"""`python -m train.run`: plan, three stages end to end, resume after SIGKILL, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, fixed_cast_copy, write_schedule
from train.data import load_split
from train.registry import Registry


def cli(tmp: Path, *args: str, runs_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "KKLAB_CACHE": str(tmp / "cache")}
    return subprocess.run([sys.executable, "-m", "train.run", *args, "--registry", str(tmp / "ckpts.yaml"),
                           "--runs-dir", str(runs_dir or tmp / "runs"), "--quiet"], capture_output=True,
                          text=True, cwd=REPO, env=env)


def assert_registry_sound(tmp: Path) -> list:
    """No duplicate, no dangling entry, every checkpoint loads, the parent chain is intact."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reg = Registry(tmp / "ckpts.yaml")
    cks = reg.checkpoints()  # raises on duplicates
    ids = {c.id for c in cks}
    for c in cks:
        path = reg.resolve(c)
        assert (path / "config.json").exists(), c.id
        AutoModelForCausalLM.from_pretrained(path)
        AutoTokenizer.from_pretrained(path)
        assert c.parent is None or c.parent in ids, c.id
    leftovers = [p for p in (tmp / "runs").rglob("*.tmp")]
    assert not leftovers
    return cks


def test_dry_run_prints_every_segment_and_touches_nothing(tmp_path, tiny_ckpt):
    sched = write_schedule(tmp_path, tiny_ckpt, steps=(2, 2, 4), segments3=4)
    r = cli(tmp_path, "stage3", "--schedule", str(sched), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("stage3") >= 4 and "1.2" in r.stderr and "0.9" in r.stderr
    assert not (tmp_path / "ckpts.yaml").exists() and not (tmp_path / "runs").exists()
    assert not (tmp_path / "data").exists()


def test_three_stages_end_to_end_then_skip(tmp_path, tiny_ckpt):
    import json

    from train.kk import NAMES
    from train.models import fixed_cast

    # A base made for fixed-cast puzzles: the data follows it, and so does every checkpoint.
    base = fixed_cast_copy(tiny_ckpt, tmp_path / "base")
    sched = write_schedule(tmp_path, base)
    r = cli(tmp_path, "stage3", "--schedule", str(sched), "--set", "stages.stage1.eval_every=2")
    assert r.returncode == 0, r.stderr
    cks = assert_registry_sound(tmp_path)
    by_stage = {s: [c for c in cks if c.stage == s] for s in ("base", "stage1", "stage2", "stage3")}
    assert len(by_stage["base"]) == 1
    assert [c.global_step for c in by_stage["stage1"]] == [1, 2]
    assert [c.global_step for c in by_stage["stage3"]] == [5, 6]
    assert [c.sampling["temperature"] for c in by_stage["stage3"]] == [1.2, 0.9]
    assert all(by_stage[s][-1].stage_final for s in ("stage1", "stage2", "stage3"))
    assert by_stage["stage2"][0].parent == by_stage["stage1"][-1].id
    for c in cks[1:]:
        assert {"reward", "correct", "format_error", "length_mean", "kl", "entropy", "lr"} <= set(c.metrics)
        assert c.config_hash and c.preset == str(base) and c.timestamp
    assert all(fixed_cast(Registry(tmp_path / "ckpts.yaml").resolve(c)) for c in cks)
    assert json.loads((tmp_path / "data" / "summary.json").read_text())["fixed_cast"] is True
    assert all(p.names == NAMES[:3] for p in load_split(tmp_path / "data", [3], "train"))
    lines = (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    # Periodic validation (stage 1, every 2 steps) is logged and registered with the checkpoint.
    assert 0.0 <= by_stage["stage1"][-1].metrics["val_accuracy"] <= 1.0
    assert "val_accuracy" not in by_stage["stage1"][0].metrics
    for stage in ("stage1", "stage2", "stage3"):
        assert (tmp_path / "runs" / "tiny" / "figures" / f"training-{stage}.png").stat().st_size > 10_000
    # Everything is complete: a rerun trains nothing and changes nothing.
    before = (tmp_path / "ckpts.yaml").read_text()
    r = cli(tmp_path, "all", "--schedule", str(sched), "--set", "stages.stage1.eval_every=2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ckpts.yaml").read_text() == before
    # A changed schedule is refused for the same run, and nothing is overwritten.
    r = cli(tmp_path, "stage3", "--schedule", str(sched), "--set", "stages.stage1.eval_every=2",
            "--set", "stages.stage1.lr.start=0.5")
    assert r.returncode == 2 and "another schedule" in r.stderr
    assert (tmp_path / "ckpts.yaml").read_text() == before


def test_sigkill_mid_stage_then_resume(tmp_path, tiny_ckpt):
    sched = write_schedule(tmp_path, tiny_ckpt, steps=(12, 1, 2), save_every=2)
    env = {**os.environ, "KKLAB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "train.run", "stage1", "--schedule", str(sched),
                             "--registry", str(tmp_path / "ckpts.yaml"), "--runs-dir", str(tmp_path / "runs"),
                             "--quiet"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    reg = Registry(tmp_path / "ckpts.yaml")
    while time.time() < deadline:
        if (tmp_path / "ckpts.yaml").exists() and any(c.stage == "stage1" for c in reg.checkpoints()):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = [c.global_step for c in reg.checkpoints() if c.stage == "stage1"]
    assert killed_at and max(killed_at) < 12, "the run finished before it could be killed"
    r = cli(tmp_path, "stage1", "--schedule", str(sched))
    assert r.returncode == 0, r.stderr
    cks = assert_registry_sound(tmp_path)
    steps = [c.global_step for c in cks if c.stage == "stage1"]
    assert steps == [2, 4, 6, 8, 10, 12]
    assert [c for c in cks if c.stage == "stage1"][-1].stage_final


@pytest.mark.parametrize("case", ["unknown_preset", "bad_value", "unwritable", "stage_order", "bad_target",
                                  "missing_data", "reinforce_local"])
def test_bad_input_one_line_nothing_overwritten(tmp_path, tiny_ckpt, case):
    sched = write_schedule(tmp_path, tiny_ckpt)
    args = ["stage1", "--schedule", str(sched)]
    runs_dir = None
    reg_text = "# mine\ncheckpoints: []\n"
    if case == "unknown_preset":
        args += ["--set", f"preset={tmp_path / 'no-such-model'}"]
        msg = "no-such-model"
    elif case == "bad_value":
        args += ["--set", "stages.stage1.top_p=1.5"]
        msg = "top_p"
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        runs_dir = tmp_path / "file" / "runs"
        msg = "not writable"
    elif case == "stage_order":
        reg_text = (f"# mine\ncheckpoints:\n  - id: tiny/stage2/step-000004\n    path: {tiny_ckpt}\n"
                    f"    run: tiny\n    stage: stage2\n    global_step: 4\n    stage_final: true\n")
        args = ["stage3", "--schedule", str(sched)]
        msg = "stage order violation"
    elif case == "bad_target":
        args = ["stage9", "--schedule", str(sched)]
        msg = "unknown target"
    elif case == "missing_data":
        (tmp_path / "data").write_text("not a folder")
        msg = "not a folder"
    else:
        args += ["--set", "algorithm=reinforce_plus_plus"]
        msg = "veRL engine only"
    (tmp_path / "ckpts.yaml").write_text(reg_text)
    r = cli(tmp_path, *args, runs_dir=runs_dir)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], r.stderr
    assert (tmp_path / "ckpts.yaml").read_text() == reg_text


def test_a_base_registered_elsewhere_is_repointed_until_the_run_has_checkpoints(tmp_path, tiny_ckpt):
    from train.registry import Checkpoint

    # A ckpts.yaml brought from another machine: its base path does not exist here.
    sched = write_schedule(tmp_path, tiny_ckpt)
    reg = Registry(tmp_path / "ckpts.yaml")
    elsewhere = Checkpoint(id="tiny/base", path="/elsewhere/models/kk-tiny", run="tiny", stage="base",
                           global_step=0, preset=str(tiny_ckpt), engine="base")
    reg.add(elsewhere)
    r = cli(tmp_path, "base", "--schedule", str(sched))
    assert r.returncode == 0, r.stderr
    assert reg.resolve(reg.get("tiny/base")) == Path(tiny_ckpt).resolve()
    assert len(reg.checkpoints()) == 1
    # Once the run has trained from it, the base is their parent: moving it is refused.
    reg.add(Checkpoint(id="tiny/stage1/step-000001", path=str(tiny_ckpt), run="tiny", stage="stage1",
                       global_step=1, parent="tiny/base"))
    reg.add(elsewhere, replace=True)
    before = (tmp_path / "ckpts.yaml").read_text()
    r = cli(tmp_path, "stage1", "--schedule", str(sched))
    assert r.returncode == 2 and "tiny/base is registered at /elsewhere" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "ckpts.yaml").read_text() == before


def test_a_run_resumes_from_the_default_relative_registry(tmp_path, tiny_ckpt, monkeypatch):
    """`--registry ckpts.yaml` (the default) stores the base relative to the registry; resuming
    compares it with the preset's absolute folder, not its relative spelling."""
    import shutil

    from train.registry import Checkpoint
    from train.run import ensure_base
    from train.schedule import load_schedule

    shutil.copytree(tiny_ckpt, tmp_path / "base")
    sched = load_schedule(write_schedule(tmp_path, tmp_path / "base"))
    monkeypatch.chdir(tmp_path)
    reg = Registry("ckpts.yaml")
    base = ensure_base(sched, reg, path=tmp_path / "base")
    assert not Path(reg.get(base.id).path).is_absolute()
    reg.add(Checkpoint(id=f"{sched.run}/stage1/step-000001", path="base", run=sched.run, stage="stage1",
                       global_step=1, parent=base.id))
    assert ensure_base(sched, reg, path=tmp_path / "base").id == base.id
    assert len(reg.checkpoints()) == 2
