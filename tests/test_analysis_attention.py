"""Attention to earlier steps: fp32 patterns against eager attention and TransformerLens,
step reductions against brute force, memory of the reduction, metrics, the plug-in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import analysis.attention as att
from train.layout import DecoderLayout
from analysis.attention import (AttentionAnalysis, AttentionError, asserts_role, attention_layout, attention_probs, encode_trace,
                                lookback_scores, receiver_kurtosis, reduce_probs, role_assertion_pattern,
                                rotary_tables,
                                step_matrices, step_reduction, targeted_shares, verification_targets)
from analysis.cache import ResultCache
from analysis.harness import (AnalysisContext, GenerationConfig, HarnessConfig, PuzzleSetConfig, load_model,
                              puzzle_set)
from train.registry import Checkpoint


def make_tiny_llama(out: Path, seed: int = 0) -> Path:
    """A random tiny Llama (SmolLM2 layout: no attention bias, GQA) with the test tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tokenizer_fixture import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                      rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():              # larger weights: sharper, less uniform attention
        p.data.mul_(8.0) if p.dim() == 2 else None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model_dir(request, tiny_ckpt, tiny_llama) -> Path:
    return tiny_ckpt if request.param == "qwen2" else tiny_llama


def _ids(tok, n: int = 60) -> list[int]:
    text = ("Assume Zoey is a knight. Zoey says Ethan is a knave, which is true. So Ethan is a knave. "
            "Let me verify. Zoey says Ethan is a knave. 假设 Ethan 是骑士。 All statements are consistent. ") * 3
    return tok(text, add_special_tokens=False)["input_ids"][:n]


def _qk_and_eager(lm, ids):
    qs, ks, eager = [], [], []
    with torch.no_grad(), lm.trace(torch.tensor([ids])):
        for layer in lm.model.layers:
            qs.append(layer.self_attn.q_proj.output[0].save())
            ks.append(layer.self_attn.k_proj.output[0].save())
            eager.append(layer.self_attn.output[1][0].save())
    return qs, ks, eager


def test_fp32_patterns_match_eager_and_transformer_lens(model_dir):
    from transformers import AutoModelForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    lm, tok = load_model(model_dir)
    layout = attention_layout(lm._module)
    ids = _ids(tok)
    qs, ks, eager = _qk_and_eager(lm, ids)
    cos, sin = rotary_tables(lm._module, len(ids))
    ours = [attention_probs(q, k, layout, cos, sin) for q, k in zip(qs, ks)]

    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    bridge = TransformerBridge.boot_transformers(str(model_dir), hf_model=hf, tokenizer=tok)
    _, cache = bridge.run_with_cache(torch.tensor([ids]))
    for i, p in enumerate(ours):
        assert p.dtype == torch.float32 and p.shape == (layout.n_heads, len(ids), len(ids))
        torch.testing.assert_close(p, eager[i].float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p, cache[f"blocks.{i}.attn.hook_pattern"][0].float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5, rtol=0)
        assert torch.all(p.triu(1) == 0)


def brute_force(probs: torch.Tensor, bounds, sink: bool = True):
    """Step matrices from the full (H, T, T) matrix by explicit loops over blocks."""
    H, T, _ = probs.shape
    S = len(bounds)
    mass = torch.zeros(H, S, S, dtype=torch.float64)
    block = torch.zeros(H, S, S, dtype=torch.float64)
    p = probs.double()
    for a, (qa, qb) in enumerate(bounds):
        for b, (ka, kb) in enumerate(bounds):
            keys = [u for u in range(ka, kb) if not (sink and u == 0)]
            tot = torch.zeros(H, dtype=torch.float64)
            n = 0
            for t in range(qa, qb):
                for u in keys:
                    tot += p[:, t, u]
                    n += u <= t
            mass[:, a, b] = tot / (qb - qa)
            block[:, a, b] = tot / n if n else 0.0
    return mass, block


@pytest.mark.parametrize("bounds", [[(3, 7), (7, 8), (10, 20), (20, 33), (35, 60)],
                                    [(0, 5), (5, 9), (12, 30), (30, 31), (40, 58)]])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_step_reduction_equals_brute_force(tiny_llama, bounds, chunk):
    lm, tok = load_model(tiny_llama)
    layout = attention_layout(lm._module)
    ids = _ids(tok)
    qs, ks, _ = _qk_and_eager(lm, ids)
    cos, sin = rotary_tables(lm._module, len(ids))
    for q, k in zip(qs, ks):
        mass, block = step_reduction(q, k, layout, cos, sin, bounds, chunk=chunk)
        want_mass, want_block = brute_force(attention_probs(q, k, layout, cos, sin), bounds)
        torch.testing.assert_close(mass.double(), want_mass, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(block.double(), want_block, atol=1e-6, rtol=1e-5)
        assert torch.all(mass.triu(1) == 0)
        full_mass, full_block = reduce_probs(attention_probs(q, k, layout, cos, sin), bounds)
        torch.testing.assert_close(full_mass, mass, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(full_block, block, atol=1e-6, rtol=1e-5)
    # The reduction inside the nnsight pass gives the same matrices for every layer.
    m_all, b_all = step_matrices(lm, ids, bounds, chunk=chunk)
    assert m_all.shape == (layout.n_layers, layout.n_heads, len(bounds), len(bounds))
    for l, (q, k) in enumerate(zip(qs, ks)):
        want_mass, want_block = brute_force(attention_probs(q, k, layout, cos, sin), bounds)
        np.testing.assert_allclose(m_all[l], want_mass.numpy(), atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(b_all[l], want_block.numpy(), atol=1e-6, rtol=1e-5)


def test_reduction_never_materialises_a_full_matrix(monkeypatch):
    """The pure function works from q, k alone, in query chunks: no T x T probabilities."""
    H, Hkv, D, T, chunk = 4, 2, 16, 1024, 64
    layout = DecoderLayout(n_layers=1, d_model=H * D, n_heads=H, n_kv_heads=Hkv, d_head=D, d_mlp=None,
                           attn_scale=D ** -0.5)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(T, H * D, generator=g), torch.randn(T, Hkv * D, generator=g)
    pos = torch.arange(T, dtype=torch.float64)[:, None] / 10000 ** (torch.arange(0, D, 2) / D)[None]
    emb = torch.cat([pos, pos], -1)
    cos, sin = emb.cos().float(), emb.sin().float()
    bounds = [(s, s + 30) for s in range(8, T - 30, 40)]
    shapes = []
    real = att._probs_rows

    def spy(qh, kh, rows, scaling):
        out = real(qh, kh, rows, scaling)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(att, "_probs_rows", spy)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        mass, block = step_reduction(q, k, layout, cos, sin, bounds, chunk=chunk)
    assert shapes and all(s[1] <= chunk for s in shapes)
    full = H * T * T * 4
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < biggest < full / 4, (biggest, full)
    assert mass.shape == (H, len(bounds), len(bounds))


def test_lookback_and_distance_on_a_known_matrix():
    S, p = 6, 1
    mass = np.zeros((1, 1, S, S))
    for a in range(S):
        mass[0, 0, a, 0] = 0.5          # half of every step's step-attention to step 0
        mass[0, 0, a, a] += 0.5         # half to itself
    lb, dist = lookback_scores(mass, p)
    # Steps a >= 2 have steps more than 1 back; step 0 is more than 1 back for all of them.
    assert lb[0, 0] == pytest.approx(0.5)
    assert dist[0, 0] == pytest.approx(np.mean([0.5 * a / 1.0 for a in range(1, S)]))
    share, base = targeted_shares(mass, [(4, 0), (5, 2)])
    assert share[:, 0, 0] == pytest.approx([0.5, 0.0])
    assert base[0, 0, 0] == pytest.approx(0.0) and base[1, 0, 0] == pytest.approx(0.5 / 4)


def test_receiver_head_is_the_one_with_a_broadcast_step():
    rng = np.random.default_rng(0)
    S = 12
    block = rng.uniform(0.01, 0.02, size=(1, 3, S, S)) * np.tril(np.ones((S, S)))
    block[0, 2, 3:, 2] = 0.5                               # head 2: every later step looks at step 2
    k = receiver_kurtosis(block, p=1)
    assert np.argmax(k[0]) == 2 and k[0, 2] > 3


def test_verification_targets_and_role_assertions():
    text = ("<think>Assume Zoey is a knight. Zoey says Ethan is a knave, which is true.\n"
            "So Ethan is a knave.\n假设 Mia 是骑士。\nLet me verify. Ethan says Zoey is a knight, which is false.\n"
            "Let me check Mia: Mia says Zoey is a knight, which is true.</think><answer>(1) Zoey is a knight</answer>")
    assert asserts_role("Ethan", "So Ethan is a knave.") and asserts_role("Ethan", "Ethan must be a knight")
    assert not asserts_role("Ethan", "Ethan says Zoey is a knight")
    assert not asserts_role("Ethan", "Zoey says Ethan is a knave, which is true.")
    assert not asserts_role("Ethan", "Zoey 说 Ethan 是骗子，这是真的。")
    assert asserts_role("Mia", "假设 Mia 是骑士。") and role_assertion_pattern("Mia").search("Mia是骗子")
    from analysis.steps import split_steps, think_span

    steps = split_steps(text, span=think_span(text))
    pairs = verification_targets(text, steps, ["Zoey", "Ethan", "Mia"])
    texts = [(steps[v].text, steps[t].text) for v, t in pairs]
    assert ("Ethan says Zoey is a knight, which is false.", "So Ethan is a knave.") in texts
    assert ("Let me check Mia: Mia says Zoey is a knight, which is true.", "假设 Mia 是骑士。") in texts


def test_unsupported_layouts_are_user_errors():
    class NoRope(torch.nn.Module):
        pass

    with pytest.raises(AttentionError, match="Qwen2/Llama"):
        attention_layout(NoRope())
    with pytest.raises(AttentionError):
        AttentionAnalysis(p=-1)
    with pytest.raises(AttentionError, match="ordered"):
        att.step_index([(5, 3)], 10)


TRACE = ("<think>\nAssume {a} is a knight. {a} says {b} is a knave, which is true.\nSo {b} is a knave.\n"
         "Now we have determined that {a} is a knight and {b} is a knave.\n"
         "Let me verify. {b} says {a} is a knight, which is false. {a} says {b} is a knave, which is true.\n"
         "All statements are consistent.\n</think>\n<answer>\n(1) {a} is a knight\n(2) {b} is a knave\n</answer>")


def test_plugin_on_fixed_generations(tiny_llama, tmp_path):
    cfg = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(3, 4), per_size=2), generation=GenerationConfig(max_new_tokens=8))
    probe = puzzle_set(cfg.puzzles)
    lm, tok = load_model(tiny_llama)
    gens = [{"puzzle_id": p.id, "people": p.people, "names": list(p.names), "prompt_style": "chat",
             "text": TRACE.format(a=p.names[0], b=p.names[1]), "correct": True} for p in probe]
    ck = Checkpoint(id="t/llama", path=str(tiny_llama))
    ctx = AnalysisContext(checkpoint=ck, path=Path(tiny_llama), model=lm, tokenizer=tok, puzzles=probe, config=cfg,
                          cache=ResultCache(tmp_path / "cache"), fingerprint="x", _generations=gens)
    a = AttentionAnalysis(p=1, n_boot=200)
    res = a.run(ctx)
    assert res["n_traces"] == len(probe) and res["n_skipped"] == 0
    L, H = res["n_layers"], res["n_heads"]
    assert np.array(res["lookback"]["per_layer_head"], dtype=float).shape == (L, H)
    assert 0 <= res["lookback"]["overall"]["mean"] <= 1
    lo, hi = res["lookback"]["overall"]["lo"], res["lookback"]["overall"]["hi"]
    assert lo <= res["lookback"]["overall"]["mean"] <= hi
    assert res["targeted"]["n_pairs"] >= 2 * len(probe)
    assert len(res["receivers"]["top"]) == 5
    trace = encode_trace(tok, "", gens[0]["text"])
    assert len(res["example"]["steps"]) == len(trace.bounds)
    assert res["example"]["steps"][0].startswith("Assume")
    trends = a.trend_metrics(res)
    assert {"look-back score (> 1 steps)", "mean look-back distance (steps)",
            "targeted look-back lift (verification)", "receiver-head kurtosis"} <= set(trends)
    md, figs = a.report_section(res)
    assert "Receiver heads" in md and len(figs) == 2
    import json

    json.dumps(res)
