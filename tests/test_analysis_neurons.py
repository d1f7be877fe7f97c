"""Language-switch neurons: token scripts, switch points, a planted CJK neuron found by LAPE,
the ablation check and the plug-in with cross-checkpoint overlap."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis.cache import ResultCache
from analysis.harness import (AnalysisContext, GenerationConfig, HarnessConfig, PuzzleSetConfig, analyse_checkpoints,
                              load_model, puzzle_set)
from analysis.neurons import (EN, NONE, ZH, Context, NeuronsAnalysis, NeuronsError, ablation_plan, auroc,
                              build_fixed_contexts, cohens_d, collect_stats, jaccard, lape_scores, make_context,
                              mixed_trace, rank_lape, script_of_bytes, switch_points, switch_probability,
                              token_scripts)
from train.registry import Checkpoint, Registry

PLANT_LAYER, PLANT_NEURON = 0, 17
SMALL = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(3, 4), per_size=3),
                      generation=GenerationConfig(max_new_tokens=16, temperature=1.0, seed=1))


def test_script_of_bytes_and_token_scripts(tiny_ckpt):
    assert script_of_bytes("假设".encode()) == ZH
    assert script_of_bytes("。".encode()) == ZH
    assert script_of_bytes("假".encode()[:2]) == ZH            # leading fragment of a CJK character
    assert script_of_bytes("假".encode()[2:]) == NONE          # a trailing fragment carries no script
    assert script_of_bytes(b" knight") == EN
    assert script_of_bytes(b" 12.") == NONE
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    scripts = token_scripts(tok)
    assert len(scripts) == len(tok)
    for word, want in ((" knight", EN), ("假设", ZH), (" 验证", ZH)):
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert scripts[ids[0]] == want, word
    assert scripts[tok.convert_tokens_to_ids("<think>")] == NONE


def test_switch_points_skip_names_and_match_english_boundaries(tiny_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    scripts = token_scripts(tok)
    response = ("Assume Zoey is a knight.\n假设 Ethan 是骑士。\nSo Ethan is a knave.\nLet me verify.\n"
                "Ethan 说 Zoey 是骗子。\nAll statements hold.")
    c = make_context(tok, "You meet Zoey and Ethan.", response, ["Zoey", "Ethan"])
    sw, matched = switch_points(c, scripts, match="boundary")
    nxt = [tok.decode(c.ids[t + 1:t + 5]) for t in sw]
    # Two switches: the first Chinese line, and "说" after an English line (the name does not count);
    # "是" after the names inside Chinese lines is no switch.
    assert len(sw) == 2 and nxt[0].startswith("假") and nxt[1].lstrip().startswith("说"), nxt
    assert len(matched) == 2 and set(matched).isdisjoint(sw)
    for t in matched:   # English continues after the matched positions
        assert scripts[c.ids[t + 1]] == EN and t + 1 not in c.names
    # Step starts come first: "Let me verify." follows English ("So" follows a Chinese line: a switch back).
    assert any(t + 1 in c.step_starts and tok.decode(c.ids[t + 1:t + 4]).startswith("Let") for t in matched)
    # Without the boundary preference each switch gets the nearest English-to-English position.
    sw2, nearest = switch_points(c, scripts)
    assert sw2 == sw and len(nearest) == 2
    assert all(abs(n - t) <= abs(m - t) for n, m, t in zip(nearest, matched, sw))
    assert all(scripts[c.ids[t + 1]] == EN for t in nearest)


def test_auroc_and_effect_size():
    pos = np.array([[3.0, 1.0], [4.0, 1.0], [5.0, 1.0]])
    neg = np.array([[0.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(auroc(pos, neg), [1.0, 0.5])
    d = cohens_d(pos, neg)
    assert d[0] > 3 and d[1] == 0.0
    assert jaccard([[1, 2], []], [[2], [5]]) == pytest.approx(1 / 3)
    assert jaccard([[]], [[]]) is None


def plant_cjk_neuron(src: Path, dst: Path, scripts: np.ndarray, scale: float = 0.1) -> Path:
    """Copy a tiny checkpoint and make one gate neuron of layer 0 fire exactly on CJK tokens:
    every token embedding gets +scale (CJK) or -scale (others) along a fresh direction e, the
    neuron's gate row reads e, and the other gate rows of the layer are made blind to e."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    emb = sd["model.embed_tokens.weight"]
    g = torch.Generator().manual_seed(7)
    e = torch.randn(emb.shape[1], generator=g)
    e /= e.norm()
    sign = torch.where(torch.from_numpy(scripts[:emb.shape[0]] == ZH), 1.0, -1.0)
    emb += scale * sign[:, None] * e[None, :]
    gate = sd[f"model.layers.{PLANT_LAYER}.mlp.gate_proj.weight"]
    gate -= (gate @ e)[:, None] * e[None, :]
    gate[PLANT_NEURON] = 20.0 * e
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def planted(tiny_ckpt, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    scripts = token_scripts(AutoTokenizer.from_pretrained(tiny_ckpt))
    return plant_cjk_neuron(tiny_ckpt, tmp_path_factory.mktemp("planted") / "model", scripts)


def test_lape_finds_the_planted_cjk_neuron(planted):
    lm, tok = load_model(planted)
    scripts = token_scripts(tok)
    probe = puzzle_set(SMALL.puzzles)
    contexts = [Context(**c) for c in build_fixed_contexts(tok, probe, "chat")]
    st = collect_stats(lm, contexts, scripts)
    assert st.n_en > 100 and st.n_zh > 50
    lape = lape_scores(st)
    assert lape["p_zh"][PLANT_LAYER, PLANT_NEURON] == 1.0
    assert lape["p_en"][PLANT_LAYER, PLANT_NEURON] == 0.0
    assert lape["entropy"][PLANT_LAYER, PLANT_NEURON] == pytest.approx(0.0, abs=1e-9)
    ranked = rank_lape(lape, min_prob=0.5)
    assert ranked[0] == (PLANT_LAYER, PLANT_NEURON)
    # Every other neuron is far less specific: it fires on English too, or rarely on CJK.
    others = np.delete(lape["entropy"][PLANT_LAYER], PLANT_NEURON)
    p_zh = np.delete(lape["p_zh"][PLANT_LAYER], PLANT_NEURON)
    assert np.all((others > 0.1) | (p_zh < 0.5) | np.isnan(others))


def test_ablation_with_k_zero_changes_nothing_and_ablation_acts(planted):
    lm, tok = load_model(planted)
    scripts = token_scripts(tok)
    zh_ids = np.nonzero(scripts == ZH)[0].tolist()
    probe = puzzle_set(SMALL.puzzles)
    contexts = [Context(**c) for c in build_fixed_contexts(tok, probe, "chat")][:3]
    points = [switch_points(c, scripts)[0] for c in contexts]
    assert all(points)
    base = switch_probability(lm, contexts, points, zh_ids)
    assert np.all((base > 0) & (base < 1))
    assert ablation_plan([], np.zeros((2, 128))) == {}
    np.testing.assert_array_equal(switch_probability(lm, contexts, points, zh_ids, ablation_plan([], None)), base)
    # Pinning half of the last layer's neurons to a large value moves the prediction.
    plan = ablation_plan([(1, n) for n in range(64)], np.full((2, 128), 3.0))
    moved = switch_probability(lm, contexts, points, zh_ids, plan)
    assert np.abs(moved - base).max() > 1e-3


def test_mixed_trace_alternates_languages():
    p = puzzle_set(SMALL.puzzles)[0]
    lines = mixed_trace(p).splitlines()
    assert any(l.startswith("假设 ") for l in lines) and any(l.startswith("Assume ") for l in lines)


def test_plugin_on_fixed_contexts_tracks_overlap(planted, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(planted, runs / "base")
    shutil.copytree(planted, runs / "step-5")
    reg = Registry(tmp_path / "ckpts.yaml")
    reg.add(Checkpoint(id="p/base", path=str(runs / "base"), run="p", stage="base", global_step=0))
    reg.add(Checkpoint(id="p/stage1/step-5", path=str(runs / "step-5"), run="p", stage="stage1", global_step=5,
                       parent="p/base"))
    a = NeuronsAnalysis(ks=(0, 2), n_random=2, top_per_layer=5, source="fixed")
    cfg = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(3, 4), per_size=2))
    outcomes = analyse_checkpoints(reg, reg.select(run="p"), [a], cache=ResultCache(tmp_path / "cache"), config=cfg)
    assert [o.error for o in outcomes] == [None, None]
    base, step = (o.results["neurons"] for o in outcomes)
    json.dumps(step)
    assert step["source"] == "fixed"
    assert step["n_contexts"]["heldout"] >= 2 and step["n_switch_points"]["heldout"] > 0
    assert step["lape"]["top"][0]["layer"] == PLANT_LAYER and step["lape"]["top"][0]["neuron"] == PLANT_NEURON
    for method in ("lape", "switch"):
        zero = step["causal"][method]["0"]
        assert zero["delta"] == 0.0 and zero["random"] == [0.0, 0.0] and not zero["beats_random"]
        two = step["causal"][method]["2"]
        assert two["k"] == 2 and len(two["random"]) == 2 and len(two["neurons"]) == 2
        assert two["beats_random"] == (two["delta"] < min(two["random"]))
    # Same weights, same contexts: identical top sets, so full overlap with base and parent.
    assert base["jaccard"]["base"]["lape"] == 1.0 and base["jaccard"]["parent"] is None
    assert step["jaccard"]["base"] == {"id": "p/base", "lape": 1.0, "switch": 1.0}
    assert step["jaccard"]["parent"]["id"] == "p/base"
    trends = a.trend_metrics(step)
    assert trends["top lape neurons: Jaccard vs base"] == 1.0
    assert "P(switch to CJK) at switch points" in trends
    md, figs = a.report_section(step)
    assert f"L{PLANT_LAYER}.N{PLANT_NEURON}" in md and len(figs) == 1


def test_own_generations_are_used_only_when_they_switch_to_chinese(planted, tmp_path):
    lm, tok = load_model(planted)
    scripts = token_scripts(tok)
    probe = puzzle_set(SMALL.puzzles)

    def ctx_with(texts):
        gens = [{"puzzle_id": p.id, "text": t, "prompt_style": "chat"} for p, t in zip(probe, texts)]
        return AnalysisContext(checkpoint=Checkpoint(id="x", path=str(planted)), path=planted, model=lm,
                               tokenizer=tok, puzzles=probe, config=SMALL, cache=ResultCache(tmp_path / "c"),
                               fingerprint="f", _generations=gens)

    a = NeuronsAnalysis(min_switch_points=4, min_switch_contexts=4, samples=2)
    english = ctx_with([f"Assume {p.names[0]} is a knight. So {p.names[1]} is a knave." for p in probe])
    # Generations that never switch: the model's own samples at T=1 if they switch, else fixed contexts.
    sampled = a.sampled_contexts(english)
    assert len(sampled) == 2 * len(probe) and sampled[1].key == f"{probe[0].id}#1"
    assert [c.ids for c in a.sampled_contexts(english)] == [c.ids for c in sampled]      # seeded
    source, contexts = a.choose_contexts(english, scripts)
    assert source == ("sampled" if a._enough(sampled, scripts) else "fixed")
    source, contexts = NeuronsAnalysis(source="fixed").choose_contexts(english, scripts)
    assert source == "fixed" and len(contexts) == len(probe)
    mixed = ctx_with([mixed_trace(p) for p in probe])
    source, contexts = a.choose_contexts(mixed, scripts)
    assert source == "own" and contexts[0].key == probe[0].id
    select, heldout = a.split(contexts, scripts)
    assert len(heldout) == len(probe) // 2 and not {c.key for c in select} & {c.key for c in heldout}
    with pytest.raises(NeuronsError, match="switch to Chinese"):
        a.split(a.choose_contexts(english, scripts)[1][:0], scripts)


def test_bad_options_are_user_errors():
    with pytest.raises(NeuronsError):
        NeuronsAnalysis(source="web")
    with pytest.raises(NeuronsError):
        NeuronsAnalysis(ks=(-1,))
    with pytest.raises(NeuronsError, match="match"):
        NeuronsAnalysis(match="closest")
    assert NeuronsAnalysis(ks="1,5").ks == (1, 5)
