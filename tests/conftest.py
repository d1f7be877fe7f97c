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


@pytest.fixture
def registry_path(tmp_path) -> Path:
    return tmp_path / "ckpts.yaml"
