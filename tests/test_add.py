"""`python -m analysis add`: a TRL output folder, a veRL experiment written by veRL's own
checkpoint manager, bf16 copies of fp32 saves, and broken folders (one line, nothing written)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from train.registry import Registry


def add(*args, cwd):
    return subprocess.run([sys.executable, "-m", "analysis", "add", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def trl_output(tmp_path_factory, tiny_ckpt):
    """What TRL's GRPOTrainer writes with save_steps=1: output/checkpoint-1, checkpoint-2."""
    out = tmp_path_factory.mktemp("trl") / "grpo-out"
    script = f"""
import datasets
from trl import GRPOConfig, GRPOTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(tiny_ckpt)!r})
tok = AutoTokenizer.from_pretrained({str(tiny_ckpt)!r})
data = datasets.Dataset.from_dict({{"prompt": ["Zoey says Ethan is a knave."] * 4}})
args = GRPOConfig(output_dir={str(out)!r}, per_device_train_batch_size=4, num_generations=2, max_steps=2,
                  max_completion_length=8, save_strategy="steps", save_steps=1, report_to="none",
                  use_cpu=True, disable_tqdm=True, logging_steps=1)
GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [float(len(c)) for c in completions]],
            args=args, train_dataset=data, processing_class=tok).train()
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-1", "checkpoint-2"]
    return out


def test_trl_output_folder_registers_in_step_order(tmp_path, trl_output, tiny_ckpt):
    r = add(tiny_ckpt, "--run", "grpo-out", "--stage", "base", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = add(trl_output, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cks = {c.id: c for c in Registry(tmp_path / "ckpts.yaml").checkpoints()}
    assert list(cks) == ["grpo-out/model", "grpo-out/step-000001", "grpo-out/step-000002"]
    assert [c.global_step for c in cks.values()] == [0, 1, 2]
    assert cks["grpo-out/step-000001"].parent == "grpo-out/model"
    assert cks["grpo-out/step-000002"].parent == "grpo-out/step-000001"
    assert Registry(tmp_path / "ckpts.yaml").resolve(cks["grpo-out/step-000002"]) == (trl_output / "checkpoint-2").resolve()
    assert {c.stage for c in cks.values()} == {"base", "external"}
    before = (tmp_path / "ckpts.yaml").read_text()
    r = add(trl_output, cwd=tmp_path)                       # again: nothing changes
    assert r.returncode == 0 and (tmp_path / "ckpts.yaml").read_text() == before
    assert "already registered" in r.stderr


def test_added_checkpoints_are_analysed(tmp_path, trl_output):
    assert add(trl_output, cwd=tmp_path).returncode == 0
    r = subprocess.run([sys.executable, "-m", "analysis", "report", "--run", "grpo-out", "--analyses", "drift",
                        "--out", str(tmp_path / "reports"), "--cache", str(tmp_path / "cache")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 analysed, 0 failed" in r.stderr


@pytest.mark.slow
def test_verl_experiment_with_hf_and_sharded_steps(tmp_path, tiny_ckpt):
    import torch
    from transformers import AutoModelForCausalLM

    from tests.test_verl_engine import write_fsdp_checkpoints

    exp = tmp_path / "checkpoints" / "kk-qwen"
    exp.mkdir(parents=True)
    write_fsdp_checkpoints(tmp_path, tiny_ckpt, exp)
    r = add(exp, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    reg = Registry(tmp_path / "ckpts.yaml")
    cks = {c.id: reg.resolve(c) for c in reg.checkpoints()}
    # step 3 is past veRL's tracker (still being written): left out
    assert list(cks) == ["kk-qwen/step-000001", "kk-qwen/step-000002"]
    assert cks["kk-qwen/step-000001"] == exp / "global_step_1" / "actor" / "huggingface"
    assert cks["kk-qwen/step-000002"] == exp / "global_step_2" / "actor" / "hf_merged"  # merged
    for step in (1, 2):
        model = AutoModelForCausalLM.from_pretrained(cks[f"kk-qwen/step-00000{step}"], dtype=torch.float32)
        expected = torch.load(exp / f"expected_{step}.pt")
        for k, v in expected.items():
            assert torch.allclose(model.state_dict()[k].float(), v.float(), atol=1e-2, rtol=1e-2), k
    # one step given directly, at its actor level, under another run name
    r = add(exp / "global_step_1" / "actor", "--run", "one", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Registry(tmp_path / "ckpts.yaml").get("one/step-000001").global_step == 1


def test_fp32_saves_are_stored_as_bf16_copies(tmp_path, tiny_ckpt):
    from safetensors import safe_open

    src = tmp_path / "fp32-run" / "step-5"
    shutil.copytree(tiny_ckpt, src)
    original = (src / "model.safetensors").read_bytes()
    r = add(tmp_path / "fp32-run", "--store-bf16", tmp_path / "bf16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    reg = Registry(tmp_path / "ckpts.yaml")
    copy = tmp_path / "bf16" / "fp32-run" / "step-000005"
    assert reg.resolve(reg.get("fp32-run/step-000005")) == copy
    with safe_open(copy / "model.safetensors", "pt") as fh:
        assert {str(fh.get_slice(k).get_dtype()) for k in fh.keys()} == {"BF16"}
    assert (copy / "model.safetensors").stat().st_size < 0.6 * len(original)
    assert (src / "model.safetensors").read_bytes() == original        # the fp32 save is kept
    assert json.loads((copy / "config.json").read_text())["hidden_size"] == 64


BROKEN = {
    "missing": (lambda root, ckpt: root / "nope", "does not exist"),
    "empty": (lambda root, ckpt: (root / "empty").mkdir() or root / "empty", "no checkpoint here"),
    "no-weights": (lambda root, ckpt: _without(root, ckpt, "model.safetensors"), "no weights"),
    "no-tokenizer": (lambda root, ckpt: _without(root, ckpt, "tokenizer.json", "tokenizer_config.json"),
                     "no tokenizer files"),
    "garbage-weights": (lambda root, ckpt: _torn(root, ckpt, keep=0), "header cannot be read"),
    "torn-weights": (lambda root, ckpt: _torn(root, ckpt, keep=2), "torn weights"),
    "verl-step-without-weights": (lambda root, ckpt: _verl_empty(root), "without weights"),
}


def _without(root, ckpt, *names):
    folder = root / "run" / "checkpoint-3"
    shutil.copytree(ckpt, folder)
    for name in names:
        (folder / name).unlink()
    return root / "run"


def _torn(root, ckpt, keep):
    """keep=0: 16 bytes of garbage; else the first 1/keep of the real file."""
    folder = root / "torn"
    shutil.copytree(ckpt, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // keep] if keep else b"\xff" * 16)
    return folder


def _verl_empty(root):
    (root / "exp" / "global_step_4" / "actor" / "huggingface").mkdir(parents=True)
    return root / "exp"


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_folder_is_one_line_and_nothing_is_registered(tmp_path, tiny_ckpt, case):
    make, expect = BROKEN[case]
    shutil.copytree(tiny_ckpt, tmp_path / "good")
    bad = make(tmp_path, tiny_ckpt)
    r = add(tmp_path / "good", bad, cwd=tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and expect in lines[0] and str(bad) in lines[0], r.stderr
    assert not (tmp_path / "ckpts.yaml").exists()                          # the good one waits too


def test_an_id_taken_by_another_folder_is_refused(tmp_path, tiny_ckpt):
    shutil.copytree(tiny_ckpt, tmp_path / "a" / "model")
    shutil.copytree(tiny_ckpt, tmp_path / "b" / "model")
    assert add(tmp_path / "a" / "model", "--run", "x", cwd=tmp_path).returncode == 0
    before = (tmp_path / "ckpts.yaml").read_text()
    r = add(tmp_path / "b" / "model", "--run", "x", cwd=tmp_path)
    assert r.returncode == 2 and "already has 'x/model'" in r.stderr
    assert (tmp_path / "ckpts.yaml").read_text() == before
