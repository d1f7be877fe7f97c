"""Shared fixtures: tiny checkpoints built on the fly (no downloads), a private registry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_KK = REPO.parent / "shared" / "data" / "logic-rl-kk"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_tiny_checkpoint(out: Path, seed: int = 0, layers: int = 2, hidden: int = 64,
                         vocab_size: int = 600) -> Path:
    """A random tiny Qwen2 with a byte-level BPE tokenizer trained on K&K text, as an HF folder."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.tokenizer_fixture import tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=vocab_size)
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """An HF folder with a tiny random Qwen2 model and tokenizer (seed 0)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny checkpoints of the same architecture and tokenizer, different weights."""
    root = tmp_path_factory.mktemp("tinypair")
    return make_tiny_checkpoint(root / "a", seed=0), make_tiny_checkpoint(root / "b", seed=1)


def fixed_cast_copy(src: Path, dst: Path) -> Path:
    """A copy of the HF folder `src` that says it was made for fixed-cast puzzles."""
    import json
    import shutil

    from train.models import FIXED_CAST_KEY

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config | {FIXED_CAST_KEY: True}))
    return dst


def write_schedule(tmp: Path, model: Path, steps=(2, 2, 2), save_every=1, segments3=2,
                   max_response_length: int = 12, **extra) -> Path:
    """A schedule YAML for a tiny model: a couple of steps per stage, stage 3 annealed."""
    import yaml

    def stage(people, steps, **kw):
        return {"people": people, "batch_prompts": 2, "rollout_n": 2, "temperature": {"start": 1.0},
                "lr": {"start": 1e-4}, "max_prompt_length": 512, "max_response_length": max_response_length,
                "steps": steps, "save_every": save_every, **kw}

    sched = {"run": "tiny", "preset": str(model),
             "data": {"root": str(tmp / "data"), "train_per_size": 12, "test_per_size": 4},
             "stages": {"stage1": stage([3], steps[0]), "stage2": stage([4], steps[1], temperature={"start": 1.2}),
                        "stage3": stage([3, 4], steps[2], temperature={"start": 1.2, "end": 0.9},
                                        lr={"start": 1e-4, "end": 5e-5}, segments=segments3)},
             **extra}
    path = tmp / "sched.yaml"
    path.write_text(yaml.safe_dump(sched))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_ckpt) -> Path:
    """A registry of a tiny three-stage run (base + 6 checkpoints), trained once per session."""
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("tinyrun")
    sched = write_schedule(tmp, tiny_ckpt, max_response_length=24)
    r = subprocess.run([sys.executable, "-m", "train.run", "stage3", "--schedule", str(sched), "--registry",
                        str(tmp / "ckpts.yaml"), "--runs-dir", str(tmp / "runs"), "--quiet"],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "KKLAB_CACHE": str(tmp / "cache")})
    assert r.returncode == 0, r.stderr
    return tmp / "ckpts.yaml"


@pytest.fixture
def registry_path(tmp_path) -> Path:
    return tmp_path / "ckpts.yaml"
