"""Steering vectors: a planted direction is found and steers, the intervention touches exactly
the decision positions, and the organism's base can be steered into the careful way."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis.cache import ResultCache
from analysis.harness import HarnessConfig, HarnessError, PuzzleSetConfig, analyse_checkpoints, get_analysis
from analysis.patching import decision_tokens
from analysis.steering import (Steering, opening_directions, opening_logit_differences, parse_alphas, shift_alpha,
                               steered)
from tests.conftest import REPO
from train.registry import Checkpoint, Registry

PREFIX, OPTION_A, OPTION_B = "Hello\n", "Check it.", "Take it."


def _planted(tiny_ckpt, out, scale: float = 0.5):
    """The tiny model with 'Check' and 'Take' given one embedding (tied: one unembedding too)
    that differs only along a planted unit direction u: +scale u for 'Check', -scale u for 'Take'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(tiny_ckpt, out)
    tok = AutoTokenizer.from_pretrained(out)
    _, a, b = decision_tokens(tok, PREFIX, OPTION_A, OPTION_B)
    sd = load_file(str(out / "model.safetensors"))
    emb = sd["model.embed_tokens.weight"]
    u = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(3))
    u = u / u.norm()
    shared = (emb[a] + emb[b]) / 2
    emb[a], emb[b] = shared + scale * u, shared - scale * u
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(out).eval(), tok, u.numpy()


def test_a_planted_direction_is_found_and_steers_the_decision(tmp_path, tiny_ckpt):
    model, tok, u = _planted(tiny_ckpt, tmp_path / "planted")
    prompts = [f"Puzzle {i}: who is a knight?\n" for i in range(6)]
    directions, norms = opening_directions(model, tok, prompts, PREFIX, OPTION_A, OPTION_B)
    assert directions.shape == (2, model.config.hidden_size) and norms.shape == (2,)
    first = directions[0] / np.linalg.norm(directions[0])
    assert abs(float(first @ u)) > 0.9                      # the planted direction, up to its sign
    assert float(first @ u) > 0                             # careful minus quick: +u

    ids, starts, a, b = [], [], None, None
    for p in prompts:
        x, a, b = decision_tokens(tok, p + PREFIX, OPTION_A, OPTION_B)
        ids.append(x)
        starts.append(len(tok(p, add_special_tokens=False)["input_ids"]))
    n_prefix = len(ids[0]) - starts[0]
    means = []
    for alpha in (-8.0, -2.0, 0.0, 2.0, 8.0):
        s = Steering(0, alpha * directions[0], "decision", n_prefix) if alpha else None
        means.append(float(np.mean(opening_logit_differences(model, ids, starts, a, b, s))))
    assert means == sorted(means) and means[-1] - means[0] > 1.0   # dose-response: monotone in alpha
    high = opening_logit_differences(model, ids, starts, a, b, Steering(0, 8 * directions[0], "decision", n_prefix))
    low = opening_logit_differences(model, ids, starts, a, b, Steering(0, -8 * directions[0], "decision", n_prefix))
    assert all(x > 0 for x in high) and all(x < 0 for x in low)
    # Outside the block the model is itself again.
    assert opening_logit_differences(model, ids, starts, a, b) == pytest.approx(
        opening_logit_differences(model, ids, starts, a, b, None))


class _OneLayer(torch.nn.Module):
    """A decoder-shaped stand-in whose one block is the identity, to see where steering adds."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([torch.nn.Identity()])
        self.w = torch.nn.Parameter(torch.zeros(1))


def _added(layer, calls):
    return [layer(torch.zeros(1, n, 2))[0, :, 0].tolist() for n in calls]


@pytest.mark.parametrize("positions, whole, incremental", [
    # a 7-token text whose response starts at 4 (prefix 2 tokens); a generation: prompt of 4, then 4 single tokens
    ("decision", [0, 0, 0, 1, 1, 1, 0], [[0, 0, 0, 1], [1], [1], [0], [0]]),
    ("response", [0, 0, 0, 1, 1, 1, 1], [[0, 0, 0, 1], [1], [1], [1], [1]]),
    ("all", [1, 1, 1, 1, 1, 1, 1], [[1, 1, 1, 1], [1], [1], [1], [1]]),
])
def test_steering_adds_at_the_decision_positions_of_a_text_and_of_a_generation(positions, whole, incremental):
    m = _OneLayer()
    s = Steering(0, np.array([1.0, 0.0]), positions, decision_len=2)
    with steered(m, s, start=4):
        assert _added(m.model.layers[0], [7]) == [whole]
    with steered(m, s):                                     # generation: the response starts after the prompt
        assert _added(m.model.layers[0], [4, 1, 1, 1, 1]) == incremental
        assert _added(m.model.layers[0], [4, 1]) == incremental[:2]     # a new batch starts again
    assert _added(m.model.layers[0], [3]) == [[0, 0, 0]]    # the hook is gone


def test_the_organism_base_is_steered_into_the_careful_way(tmp_path):
    reg = Registry(tmp_path / "ckpts.yaml")
    reg.add(Checkpoint(id="kk/base", path=str(REPO / "train" / "organism" / "base"), run="kk", stage="base",
                       global_step=0))
    a = get_analysis("steering", alphas="0,4", max_prompts=4, direction_prompts=8)
    cfg = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(3,), per_size=4))
    cfg = HarnessConfig(puzzles=cfg.puzzles, generation=type(cfg.generation)(max_new_tokens=24))
    [out] = analyse_checkpoints(reg, reg.select(run="kk"), [a], cache=ResultCache(tmp_path / "c"), config=cfg)
    assert out.error is None
    res = out.results["steering"]
    assert res["base"] is None and list(res["curves"]) == ["own"]
    curve = res["curves"]["own"]
    # The base opens the quick way greedily; alpha 4 along its own careful-minus-quick direction
    # makes it open the careful way.
    assert curve["opens_quick"][0]["mean"] == 1.0 and curve["opens_careful"][0]["mean"] == 0.0
    assert curve["opens_careful"][1]["mean"] >= 0.75
    assert curve["logit_difference"][1]["mean"] > curve["logit_difference"][0]["mean"]
    assert res["shifts"]["own"]["+0.2"]["alpha"] == 4.0 and res["shifts"]["own"]["-0.2"] is None
    md, figs = a.report_section(res)
    assert "Alpha 4 moves it by +0.2" in md and len(figs) == 1
    trends = a.trend_metrics(res)
    assert trends["steering: opens careful, alpha 4"] >= 0.75 and "steering: opens careful, unsteered@lo" in trends


def test_transfer_between_identical_checkpoints_is_the_identity(tmp_path, tiny_ckpt):
    base, step = tmp_path / "runs" / "base", tmp_path / "runs" / "s1"
    shutil.copytree(tiny_ckpt, base)
    shutil.copytree(tiny_ckpt, step)
    reg = Registry(tmp_path / "ckpts.yaml")
    reg.add(Checkpoint(id="r/base", path=str(base), run="r", stage="base", global_step=0))
    reg.add(Checkpoint(id="r/stage1/step-1", path=str(step), run="r", stage="stage1", global_step=1, parent="r/base"))
    a = get_analysis("steering", alphas="-1,1", max_prompts=2, direction_prompts=2, generate=False)
    cfg = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(3,), per_size=2))
    [out] = analyse_checkpoints(reg, [reg.get("r/stage1/step-1")], [a], cache=ResultCache(tmp_path / "c"), config=cfg)
    assert out.error is None
    res = out.results["steering"]
    assert res["base"] == "r/base" and res["cosine_with_base"] == pytest.approx([1.0, 1.0])
    assert res["layer"] == 1 and set(res["curves"]) == {"own", "base_on_this", "this_on_base"}
    own = [s["mean"] for s in res["curves"]["own"]["logit_difference"]]
    assert own == pytest.approx([s["mean"] for s in res["curves"]["this_on_base"]["logit_difference"]])
    assert own == sorted(own) and own[0] < own[2]           # alpha -1, 0, 1 along careful-minus-quick
    assert "shifts" not in res and res["curves"]["own"]["opens_careful"] == []
    a.report_section(res)


def test_shift_alpha_takes_the_smallest_alpha_that_moves_the_rate():
    rate = lambda m: {"mean": m, "lo": None, "hi": None}  # noqa: E731
    curve = {"alpha": [-2.0, -1.0, 0.0, 1.0, 2.0],
             "opens_careful": [rate(x) for x in (0.0, 0.3, 0.4, 0.5, 0.7)],
             "accuracy": [rate(x) for x in (0.1, 0.2, 0.3, 0.4, 0.9)]}
    assert shift_alpha(curve, 0.2) == {"alpha": 2.0, "rate": 0.7, "rate_at_0": 0.4, "accuracy": 0.9, "accuracy_at_0": 0.3}
    assert shift_alpha(curve, -0.2)["alpha"] == -2.0
    assert shift_alpha(curve, 0.5) is None


@pytest.mark.parametrize("options, message", [
    ({"alphas": "1,x"}, "expected numbers"),
    ({"positions": "everywhere"}, "use decision, response, all"),
    ({"max_prompts": 0}, "at least 1"),
])
def test_bad_steering_options_are_one_line(options, message):
    with pytest.raises(HarnessError, match=message):
        get_analysis("steering", **options)


def test_a_layer_the_model_lacks_is_one_line(tmp_path, tiny_ckpt):
    reg = Registry(tmp_path / "ckpts.yaml")
    reg.add(Checkpoint(id="r/base", path=str(tiny_ckpt), run="r", stage="base", global_step=0))
    a = get_analysis("steering", layer=5, generate=False)
    cfg = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(3,), per_size=1))
    [out] = analyse_checkpoints(reg, reg.select(run="r"), [a], cache=ResultCache(tmp_path / "c"), config=cfg)
    assert out.error == "r/base: --set steering.layer=5: the model has layers 0-1 (-1 = the middle one)"
    assert parse_alphas("2, -1,0") == [-1.0, 0.0, 2.0] and parse_alphas("1") == [0.0, 1.0]
