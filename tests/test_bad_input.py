"""Bad input across the command lines: every case exits 2 with exactly one line on stderr that
names the file or option and the problem, prints no traceback, and changes no file (checksums
and modes before and after). Then the cases that are not errors but used to lose or misreport
data: a smaller evaluation, a smaller report, a read-only registry, a resumed segment."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, fixed_cast_copy, write_schedule
from train.registry import Checkpoint, Registry

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**ENV, "KKLAB_CACHE": str(cwd.parent / "kklab-cache")}, timeout=600)


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """sha1 and mode of every file under `root` (and the set of folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_file():
            out[rel] = (hashlib.sha1(p.read_bytes()).hexdigest(), stat.S_IMODE(p.stat().st_mode))
        elif p.is_dir():
            out[rel + "/"] = ("dir", 0)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_ckpt) -> Path:
    """A workspace: a fixed-cast tiny checkpoint registered twice, a data root, a schedule."""
    root = tmp_path_factory.mktemp("world")
    model = fixed_cast_copy(tiny_ckpt, root / "models" / "a")
    shutil.copytree(model, root / "models" / "b")
    reg = Registry(root / "ckpts.yaml")
    reg.add(Checkpoint(id="w/base", path=str(model), run="w", stage="base"))
    reg.add(Checkpoint(id="w/stage1/step-1", path=str(root / "models" / "b"), run="w", stage="stage1",
                       global_step=1, parent="w/base"))
    r = cli("train.data", "build", "--out", root / "data", "--people", "3", "--train", "6", "--test", "2",
            "--fixed-cast", cwd=root)
    assert r.returncode == 0, r.stderr
    write_schedule(root, model)          # root/sched.yaml, data under root/data
    (root / "a-file").write_text("not a folder\n")
    (root / "dup.yaml").write_text("checkpoints:\n  - {id: x, path: models/a}\n  - {id: x, path: models/b}\n")
    (root / "binary.yaml").write_bytes(b"\x80\x81\xfe\xff" * 16)
    (root / "unsafe.yaml").write_text("checkpoints:\n  - {id: '..', path: models/a}\n")
    empty = root / "models" / "empty"
    empty.mkdir()
    torn = shutil.copytree(model, root / "models" / "torn")
    data = (torn / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(data[: len(data) // 3])
    foreign = shutil.copytree(model, root / "models" / "foreign")
    from train.organism import BASE_DIR

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BASE_DIR / f, foreign / f)
    (root / "nonempty").mkdir()
    (root / "nonempty" / "x").write_text("x")
    return root


@dataclass
class Case:
    id: str
    module: str
    args: tuple[str, ...]
    expect: str                 # a piece of the one error line


REG = ("--registry", "ckpts.yaml")
CASES = [
    # data lost or overwritten (issue items 1, 13, 17)
    Case("data-build-over-existing-root", "train.data", ("build", "--out", "data", "--people", "3", "--train", "2",
                                                         "--test", "1"), "already holds a data root"),
    Case("data-import-into-generated-root", "train.data", ("import", "data/3ppl/test.parquet", "--out", "data"),
         "generated data root"),
    Case("data-import-out-is-a-file", "train.data", ("import", "data/3ppl/test.parquet", "--out", "a-file"),
         "is a file"),
    Case("data-build-out-under-a-file", "train.data", ("build", "--out", "a-file/sub"), "is a file"),
    Case("data-build-nothing", "train.data", ("build", "--out", "new-data", "--train", "0", "--test", "0"),
         "nothing to build"),
    # unsafe ids (5), bad registries (8, 16)
    Case("unsafe-checkpoint-id", "analysis", ("eval", "--registry", "unsafe.yaml", "--people", "3",
                                              "--n-per-size", "1"), "not a safe checkpoint id"),
    Case("registry-is-a-folder", "analysis", ("eval", "--registry", "models", "--people", "3"), "is a folder"),
    Case("registry-is-binary", "analysis", ("report", "--registry", "binary.yaml"), "not a text file"),
    Case("registry-under-a-file", "analysis", ("report", "--registry", "a-file/ckpts.yaml"), "is a file"),
    Case("registry-duplicate-ids", "analysis", ("report", "--registry", "dup.yaml"), "duplicate checkpoint id"),
    # outputs that are files, checked before the work (9)
    Case("report-out-is-a-file", "analysis", ("report", *REG, "--out", "a-file"), "--out"),
    Case("report-cache-is-a-file", "analysis", ("report", *REG, "--cache", "a-file"), "--cache"),
    Case("eval-out-is-a-file", "analysis", ("eval", *REG, "--people", "3", "--out", "a-file"), "--out"),
    Case("eval-cache-is-a-file", "analysis", ("eval", *REG, "--people", "3", "--cache", "a-file"), "--cache"),
    Case("probes-out-is-a-file", "probes", ("run", *REG, "--out", "a-file"), "--out"),
    Case("seeds-out-is-a-file", "analysis", ("seeds", *REG, "--out", "a-file"), "--out"),
    # option values validated by type and range (10, 11)
    Case("set-not-a-number", "analysis", ("report", *REG, "--analyses", "verify_prob", "--set",
                                          "verify_prob.max_points=abc"), "verify_prob.max_points"),
    Case("set-negative-count", "analysis", ("report", *REG, "--analyses", "verify_prob", "--set",
                                            "verify_prob.max_points=-5"), "0 or more"),
    Case("set-behaviours-not-a-number", "analysis", ("report", *REG, "--analyses", "behaviours", "--set",
                                                     "behaviours.n_examples=abc"), "behaviours.n_examples"),
    Case("set-claims-grammar-missing", "analysis", ("report", *REG, "--analyses", "claims", "--set",
                                                    "claims.grammar=nope.yaml"), "nope.yaml does not exist"),
    Case("set-unknown-option", "analysis", ("report", *REG, "--analyses", "verify_prob", "--set",
                                            "verify_prob.nope=1"), "no such option"),
    Case("set-without-value", "analysis", ("report", *REG, "--set", "verify_prob"), "--set"),
    Case("set-malformed-yaml", "train.run", ("stage1", "--schedule", "sched.yaml", *REG, "--set",
                                             "stages.stage1.people=[3"), "not valid YAML"),
    # dry runs check what real runs check (15)
    Case("dry-run-one-person", "train.run", ("stage1", "--schedule", "sched.yaml", *REG, "--dry-run", "--set",
                                             "stages.stage1.people=[1]"), "outside"),
    Case("dry-run-twenty-people", "train.run", ("stage1", "--schedule", "sched.yaml", *REG, "--dry-run", "--set",
                                                "stages.stage1.people=[20]"), "outside"),
    Case("dry-run-duplicate-registry", "train.run", ("stage1", "--schedule", "sched.yaml", "--registry",
                                                     "dup.yaml", "--dry-run"), "duplicate checkpoint id"),
    # models that cannot be loaded (7)
    Case("measure-empty-folder", "train.organism", ("measure", "models/empty"), "no config.json"),
    Case("measure-torn-weights", "train.organism", ("measure", "models/torn", "--n", "1"), "cannot load the weights"),
    Case("measure-foreign-tokenizer", "train.organism", ("measure", "models/foreign", "--n", "1"),
         "do not belong together"),
    # more of the same kind
    Case("run-unknown-target", "train.run", ("stage9", *REG), "stage9"),
    Case("run-unknown-engine", "train.run", ("stage1", "--schedule", "sched.yaml", *REG, "--engine", "foo",
                                             "--dry-run"), "--engine"),
    Case("run-bad-seeds", "train.run", ("stage1", "--schedule", "sched.yaml", *REG, "--seeds", "a,b",
                                        "--dry-run"), "--seeds"),
    Case("run-missing-schedule", "train.run", ("stage1", "--schedule", "nope.yaml", *REG), "nope.yaml"),
    Case("seeds-not-trained", "analysis", ("seeds", *REG, "--run", "w", "--seeds", "0,5"), "w-seed0"),
    Case("report-unknown-analysis", "analysis", ("report", *REG, "--analyses", "nope"), "nope"),
    Case("report-bad-dtype", "analysis", ("report", *REG, "--dtype", "float8"), "--dtype"),
    Case("eval-one-person", "analysis", ("eval", *REG, "--people", "1"), "number of people 1"),
    Case("eval-greedy-k", "analysis", ("eval", *REG, "--people", "3", "--k", "3"), "k > 1"),
    Case("eval-unknown-id", "analysis", ("eval", *REG, "--ids", "nope"), "nope"),
    Case("organism-bad-setting", "train.organism", ("build", "--out", "org", "--set", "hidden_size=-1"),
         "hidden_size"),
    Case("organism-out-not-empty", "train.organism", ("build", "--out", "nonempty"), "nonempty"),
    Case("probes-unknown-target", "probes", ("run", *REG, "--targets", "nope"), "nope"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, case):
    before = snapshot(world)
    r = cli(case.module, *case.args, cwd=world)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr
    assert case.expect in lines[0], lines[0]
    after = snapshot(world)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:5]


def test_the_battery_covers_every_command_line():
    assert len(CASES) >= 28
    assert {c.module for c in CASES} == {"train.data", "train.run", "train.organism", "analysis", "probes"}


# --------------------------------------------------------------------------- data that used to be lost

def _registry_with(tmp: Path, entries: dict[str, Path]) -> Path:
    reg = Registry(tmp / "ckpts.yaml")
    for i, (ck_id, path) in enumerate(entries.items()):
        reg.add(Checkpoint(id=ck_id, path=str(path), run="t", stage="stage1", global_step=i + 1))
    return reg.path


def test_a_smaller_evaluation_never_replaces_a_larger_one_in_the_registry(tmp_path, tiny_ckpt):
    reg_path = _registry_with(tmp_path, {"t/a": tiny_ckpt})
    common = ("eval", "--registry", reg_path, "--people", "3", "--max-new-tokens", "4", "--cache", tmp_path / "c")
    big = cli("analysis", *common, "--n-per-size", "3", "--out", tmp_path / "e1", cwd=REPO)
    assert big.returncode == 0, big.stderr
    small = cli("analysis", *common, "--n-per-size", "1", "--out", tmp_path / "e2", cwd=REPO)
    assert small.returncode == 0, small.stderr
    entry = Registry(reg_path).get("t/a").eval
    assert entry["n_per_size"] == 3 and entry["n_puzzles"] == 3 and entry["people"] == [3]
    assert "keeps t/a's larger evaluation (3 answers)" in small.stderr


def test_a_smaller_report_or_evaluation_keeps_the_earlier_rows(tmp_path, tiny_ckpt_pair):
    a, b = tiny_ckpt_pair
    reg_path = _registry_with(tmp_path, {"t/a": a, "t/b": b})
    report = ("report", "--registry", reg_path, "--analyses", "behaviours", "--puzzle-sizes", "3",
              "--puzzles-per-size", "1", "--max-new-tokens", "4", "--out", tmp_path / "rep", "--cache", tmp_path / "c")
    assert cli("analysis", *report, cwd=REPO).returncode == 0
    again = cli("analysis", *report, "--ids", "t/b", cwd=REPO)
    assert again.returncode == 0, again.stderr
    index = (tmp_path / "rep" / "index.md").read_text()
    assert "t/a" in index and "t/b" in index and "keeps 1 checkpoint" in again.stderr
    trends = (tmp_path / "rep" / "trends.csv").read_text()
    assert "t/a" in trends and "t/b" in trends
    evaluation = ("eval", "--registry", reg_path, "--people", "3", "--n-per-size", "1", "--max-new-tokens", "4",
                  "--out", tmp_path / "ev", "--cache", tmp_path / "c")
    assert cli("analysis", *evaluation, "--ids", "t/a", cwd=REPO).returncode == 0
    assert cli("analysis", *evaluation, "--ids", "t/b", cwd=REPO).returncode == 0
    rows = json.loads((tmp_path / "ev" / "eval.json").read_text())["checkpoints"]
    assert sorted(r["checkpoint"] for r in rows) == ["t/a", "t/b"]
    assert "t/a" in (tmp_path / "ev" / "comparison.md").read_text()


def test_a_rewritten_registry_keeps_its_mode_and_a_read_only_one_is_refused_before_the_work(
        tmp_path, tiny_ckpt, monkeypatch):
    from train.registry import RegistryError

    reg_path = _registry_with(tmp_path, {"t/a": tiny_ckpt})
    reg_path.chmod(0o640)
    Registry(reg_path).update("t/a", lr=0.5)
    assert stat.S_IMODE(reg_path.stat().st_mode) == 0o640 and Registry(reg_path).get("t/a").lr == 0.5
    # Whoever may not write the file (or its folder) gets one line before any work.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == reg_path else real_access(p, mode))
    with pytest.raises(RegistryError, match="read-only"):
        Registry(reg_path).check_writable()
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(RegistryError, match="not writable"):
        Registry(reg_path).check_writable()


def test_one_bad_checkpoint_is_one_line_and_the_others_are_evaluated(tmp_path, tiny_ckpt):
    from train.organism import BASE_DIR

    fixed = fixed_cast_copy(tiny_ckpt, tmp_path / "fixed")
    foreign = shutil.copytree(fixed, tmp_path / "foreign")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BASE_DIR / f, foreign / f)
    broken = shutil.copytree(fixed, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    reg_path = _registry_with(tmp_path, {"t/foreign": foreign, "t/good": fixed, "t/broken": broken})
    for cmd in (("eval", "--people", "3", "--n-per-size", "1", "--max-new-tokens", "4", "--out", tmp_path / "ev"),
                ("report", "--analyses", "behaviours", "--puzzle-sizes", "3", "--puzzles-per-size", "1",
                 "--max-new-tokens", "4", "--out", tmp_path / "rep")):
        r = cli("analysis", *cmd, "--registry", reg_path, "--cache", tmp_path / "c", cwd=REPO)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "t/foreign" in r.stderr and "do not belong together" in r.stderr
        assert "t/broken" in r.stderr and "mixes" not in r.stderr
    assert [c["checkpoint"] for c in json.loads((tmp_path / "ev" / "eval.json").read_text())["checkpoints"]] == ["t/good"]


# --------------------------------------------------------------------------- faults

def test_each_torn_cache_file_is_recomputed_alone_with_the_same_numbers(tmp_path, tiny_ckpt):
    """Corrupt one cache file of each kind (an evaluation's JSON and its parquet generations, an
    analysis result, the generations of the puzzle set) in each way (not UTF-8, a JSON list,
    truncated): the rerun recomputes exactly that unit and gets the same numbers."""
    from analysis.behaviours import BehavioursAnalysis
    from analysis.cache import ResultCache, safe_id
    from analysis.evaluate import evaluate_checkpoint
    from analysis.harness import GenerationConfig, HarnessConfig, PuzzleSetConfig, analyse_checkpoints
    from train.evaluate import make_config

    reg = Registry(_registry_with(tmp_path, {"t/a": tiny_ckpt}))
    ck = reg.get("t/a")
    cache = ResultCache(tmp_path / "c")
    config = make_config(people=[3], n_per_size=2, max_new_tokens=6)
    first = evaluate_checkpoint(reg, ck, config, cache, progress=False)
    harness = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(3,), per_size=2),
                            generation=GenerationConfig(max_new_tokens=5))
    (out,) = analyse_checkpoints(reg, [ck], [BehavioursAnalysis()], cache=cache, config=harness)
    folder = tmp_path / "c" / safe_id("t/a")
    files = {p.name: p for p in folder.iterdir()}
    eval_json = next(p for n, p in files.items() if n.startswith("eval-") and n.endswith(".json"))
    eval_parquet = eval_json.with_suffix(".parquet")
    beh_json = next(p for n, p in files.items() if n.startswith("behaviours-"))
    gen_json = next(p for n, p in files.items() if n.startswith("generations-"))

    def corrupt(path: Path, how: str) -> None:
        data = path.read_bytes()
        path.write_bytes({"bytes": b"\xff\xfe\x00garbage", "list": b"[1, 2, 3]\n",
                          "truncated": data[: len(data) // 2]}[how])

    for how in ("bytes", "list", "truncated"):
        for path in (eval_json, eval_parquet):
            corrupt(path, how)
            again = evaluate_checkpoint(reg, ck, config, cache, progress=False)
            assert not again["cached"] and again["accuracy_by_size"] == first["accuracy_by_size"]
            assert again["mean_response_tokens"] == first["mean_response_tokens"]
            assert evaluate_checkpoint(reg, ck, config, cache, progress=False)["cached"]
        for path, unit in ((beh_json, ["behaviours"]), (gen_json, [])):
            corrupt(path, how)
            (redo,) = analyse_checkpoints(reg, [ck], [BehavioursAnalysis()], cache=cache, config=harness)
            assert redo.error is None and redo.results["behaviours"] == out.results["behaviours"]
            # a torn generations file alone leaves the behaviours result cached: nothing is recomputed
            assert redo.computed == unit


def test_a_resumed_segment_logs_each_step_once(tmp_path, tiny_ckpt):
    """The segment's last checkpoint lost from the registry (as a malformed registry would):
    the rerun replays that step, and metrics.jsonl holds every step once."""
    sched = write_schedule(tmp_path, tiny_ckpt, steps=(3, 1, 2), save_every=1, max_response_length=8)
    args = ("stage1", "--schedule", sched, "--registry", tmp_path / "ckpts.yaml", "--runs-dir", tmp_path / "runs",
            "--quiet")
    assert cli("train.run", *args, cwd=REPO).returncode == 0
    reg = Registry(tmp_path / "ckpts.yaml")
    assert reg.remove({"tiny/stage1/step-000003"}) == 1
    r = cli("train.run", *args, cwd=REPO)
    assert r.returncode == 0, r.stderr
    steps = [json.loads(line)["global_step"] for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3]
