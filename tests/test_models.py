"""Model presets, the kk-tiny trace writer and tokenizer, SmolLM2 from its GGUF file."""

from __future__ import annotations

import random

import pytest

from train.kk import PuzzleGenerator
from train.models import ModelNotFound, PRESETS, resolve_model
from train.organism import OrganismConfig, write_trace
from train.reward import score_response


def test_presets_and_local_paths(tiny_ckpt, tmp_path, monkeypatch):
    assert {"kk-tiny", "smollm2-135m", "qwen2.5-7b-instruct-1m"} <= set(PRESETS)
    assert resolve_model(str(tiny_ckpt), build=False) == tiny_ckpt
    with pytest.raises(ModelNotFound, match="no-such-folder"):
        resolve_model(str(tmp_path / "no-such-folder"))
    monkeypatch.setenv("KKLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KKLAB_MODEL_QWEN2_5_7B_INSTRUCT_1M", raising=False)
    with pytest.raises(ModelNotFound, match="qwen2.5-7b-instruct-1m") as err:
        resolve_model("qwen2.5-7b-instruct-1m")
    assert "KKLAB_MODEL_QWEN2_5_7B_INSTRUCT_1M" in str(err.value) or str(tmp_path) in str(err.value)


def _traces(config: OrganismConfig, n: int = 300, seed: int = 0):
    gen, rng = PuzzleGenerator(seed), random.Random(seed)
    puzzles = [gen.generate(rng.choice([3, 4, 5])) for _ in range(n)]
    return puzzles, [write_trace(p, random.Random(i), config) for i, p in enumerate(puzzles)]


def test_trace_writer_is_deterministic():
    p = PuzzleGenerator(3).generate(4)
    assert write_trace(p, random.Random(5)).text == write_trace(p, random.Random(5)).text


def test_trace_writer_without_mistakes_is_always_right():
    puzzles, traces = _traces(OrganismConfig(step_mistake_rate=0.0))
    assert all(t.correct and t.answer == p.solution for p, t in zip(puzzles, traces))


def test_trace_writer_rates_and_reward_agreement():
    cfg = OrganismConfig()
    puzzles, traces = _traces(cfg, n=600)
    think = [t for t in traces if t.answer_style == "think"]
    assert abs(len(think) / len(traces) - cfg.think_format_rate) < 0.06
    assert abs(sum(t.verified for t in traces) / len(traces) - cfg.verify_rate) < 0.04
    assert 0 < sum(t.chinese_steps > 0 for t in traces) < len(traces)
    # The reward agrees with the writer: think-style traces are well formed and scored by their roles.
    for p, t in zip(puzzles, traces):
        r = score_response(t.text, p.solution_text_format)
        assert r["format_ok"] == (t.answer_style == "think")
        if r["format_ok"]:
            assert (r["answer"] == "correct") == t.correct
    # Verified traces are right more often than the rest: RL has a reason to verify.
    ver = [t.correct for t in traces if t.verified]
    rest = [t.correct for t in traces if not t.verified]
    assert sum(ver) / len(ver) > sum(rest) / len(rest)


@pytest.mark.slow
def test_smollm2_converts_to_a_loadable_hf_folder(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("KKLAB_CACHE", str(tmp_path))
    path = resolve_model("smollm2-135m", progress=False)
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    text = tok.apply_chat_template([{"role": "user", "content": "Is a knight honest?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert resolve_model("smollm2-135m", progress=False) == path  # cached: no rebuild
