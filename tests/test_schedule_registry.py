"""Schedule validation and segment plans; the ckpts.yaml registry."""

from __future__ import annotations

import pytest

from train.registry import Checkpoint, Registry, RegistryError
from train.schedule import ScheduleError, available_presets, load_schedule, plan


def test_presets_load_and_follow_the_seed():
    assert {"kk-tiny", "smollm2-135m", "qwen2.5-7b-instruct-1m"} <= set(available_presets())
    q = load_schedule("qwen2.5-7b-instruct-1m")
    s1, s2, s3 = (q.stages[k] for k in ("stage1", "stage2", "stage3"))
    assert s1.people == [3] and s2.people == [5] and s1.temperature.start == 1.0
    assert s2.temperature.start == 1.2 and (s3.temperature.start, s3.temperature.end) == (1.2, 0.9)
    assert s3.lr.end == 2e-7 and s1.lr.start == 4e-7 and s1.batch_prompts == 8
    assert (s1.rollout_n, s2.rollout_n, s3.rollout_n) == (32, 64, 16)
    assert s1.kl.type == "low_var_kl" and s1.kl.coef == 0.001
    for name in available_presets():
        load_schedule(name)


def test_plan_anneals_in_segments():
    q = load_schedule("qwen2.5-7b-instruct-1m")
    segs = plan(q, "stage3")
    s3 = [s for s in segs if s.stage == "stage3"]
    assert [s.temperature for s in s3] == pytest.approx([1.2, 1.1, 1.0, 0.9])
    assert s3[0].lr == pytest.approx(4e-7) and s3[-1].lr == pytest.approx(2e-7)
    # Global steps are contiguous across stages and segments.
    for a, b in zip(segs, segs[1:]):
        assert b.start_step == a.end_step
    assert segs[-1].end_step == sum(q.stages[k].steps for k in q.stages)
    assert [s.stage for s in plan(q, "stage1")] == ["stage1"]


@pytest.mark.parametrize("override,msg", [
    ({"stages.stage1.steps": "0"}, "stages.stage1.steps"),
    ({"stages.stage2.temperature.start": "-1"}, "temperature must be > 0"),
    ({"stages.stage3.segments": "1"}, "needs segments >= 2"),
    ({"stages.stage1.rollout_n": "1"}, "rollout_n"),
    ({"stages.stage1.bogus": "1"}, "bogus"),
    ({"stages.stage4": "{}"}, "unknown stage"),
    ({"run": "bad name!"}, "run"),
])
def test_bad_schedule_values(override, msg):
    with pytest.raises(ScheduleError, match=msg):
        load_schedule("kk-tiny", override)


def test_unknown_and_malformed_schedule(tmp_path):
    with pytest.raises(ScheduleError, match="unknown schedule preset"):
        load_schedule("nope")
    bad = tmp_path / "s.yaml"
    bad.write_text("run: x\nstages: [\n")
    with pytest.raises(ScheduleError, match=r"s.yaml:\d+: malformed YAML"):
        load_schedule(bad)


def test_config_hash_tracks_earlier_stages_only():
    a = load_schedule("kk-tiny")
    b = load_schedule("kk-tiny", {"stages.stage3.steps": "99"})
    assert a.config_hash("stage2") == b.config_hash("stage2")
    assert a.config_hash("stage3") != b.config_hash("stage3")


def test_registry_roundtrip_keeps_comments_and_is_idempotent(registry_path):
    reg = Registry(registry_path)
    reg.add(Checkpoint(id="r/base", path=str(registry_path.parent / "m"), run="r", stage="base"))
    registry_path.write_text(registry_path.read_text() + "  # hand note kept\n"
                             "  - id: ext/model\n    path: /elsewhere/model  # external\n")
    reg.add(Checkpoint(id="r/stage1/step-000002", path=str(registry_path.parent / "m2"), run="r",
                       stage="stage1", global_step=2, parent="r/base", metrics={"reward": 1.5}))
    reg.add(Checkpoint(id="r/stage1/step-000002", path="other", run="r"))  # same id: ignored
    text = registry_path.read_text()
    assert "# hand note kept" in text and "# external" in text and text.startswith("# Checkpoint registry")
    cks = reg.checkpoints()
    assert [c.id for c in cks] == ["r/base", "ext/model", "r/stage1/step-000002"]
    assert cks[2].path == "m2" and reg.resolve(cks[2]) == registry_path.parent / "m2"
    assert cks[1].stage == "external"
    assert [c.id for c in reg.select(run="r", stage="stage1")] == ["r/stage1/step-000002"]
    reg.update("r/stage1/step-000002", eval={"accuracy": 0.5})
    assert reg.get("r/stage1/step-000002").eval == {"accuracy": 0.5}


@pytest.mark.parametrize("text,msg", [
    ("checkpoints:\n  - id: a\n    path: [x\n", r"ckpts.yaml:\d+: malformed YAML"),
    ("checkpoints:\n  - id: a\n    path: x\n  - path: y\n", r"ckpts.yaml:4: checkpoint field 'id'"),
    ("checkpoints:\n  - id: a\n    path: x\n  - id: a\n    path: y\n", r"ckpts.yaml:4: duplicate checkpoint id 'a' \(first at line 2\)"),
    ("checkpoints:\n  - id: a\n    path: x\n    global_step: ten\n", r"ckpts.yaml:2: checkpoint field 'global_step'"),
    ("- a\n- b\n", r"ckpts.yaml:1: expected a mapping"),
])
def test_malformed_registry_names_the_line(registry_path, text, msg):
    registry_path.write_text(text)
    with pytest.raises(RegistryError, match=msg):
        Registry(registry_path).checkpoints()
    assert registry_path.read_text() == text  # nothing rewritten


def test_selection(registry_path):
    reg = Registry(registry_path)
    for step in range(0, 50, 10):
        reg.add(Checkpoint(id=f"r/s/{step}", path=f"m{step}", run="r", stage="stage1" if step < 30 else "stage2",
                           global_step=step))
    assert [c.global_step for c in reg.select(run="r", steps=(10, 30))] == [10, 20, 30]
    assert [c.global_step for c in reg.select(run="r", every=2)] == [0, 20, 40]
    assert [c.global_step for c in reg.select(stage="stage2")] == [30, 40]
    with pytest.raises(RegistryError, match="unknown checkpoint id"):
        reg.select(ids=["nope"])
    with pytest.raises(RegistryError, match="no checkpoint matches"):
        reg.select(run="other")


def test_the_committed_registry_is_the_empty_template(tmp_path):
    """ckpts.yaml is tracked and every local run writes to it: the committed version must hold
    no checkpoint, or a fresh clone would start from paths of another machine."""
    import shutil
    import subprocess

    from tests.conftest import REPO

    committed = subprocess.run(["git", "show", "HEAD:ckpts.yaml"], cwd=REPO, capture_output=True,
                               text=True) if shutil.which("git") else None
    if committed is None or committed.returncode != 0:      # not a git checkout: the file itself
        text = (REPO / "ckpts.yaml").read_text()
    else:
        text = committed.stdout
    (tmp_path / "ckpts.yaml").write_text(text)
    assert Registry(tmp_path / "ckpts.yaml").checkpoints() == []
    assert "Add an external checkpoint by hand" in text        # the how-to comment is kept
