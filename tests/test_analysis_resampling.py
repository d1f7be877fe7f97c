"""Resampling importance: boundary probabilities against brute-force greedy continuations on the
shipped organism, planted budgets and aggregates, step kinds in English and Chinese, the
plug-in end to end through the harness, and a bad option as one line."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from analysis.cache import ResultCache
from analysis.claims import step_kind, step_kinds
from analysis.harness import (GenerationConfig, HarnessConfig, HarnessError, PuzzleSetConfig, analyse_checkpoints,
                              get_analysis, puzzle_set)
from analysis.resampling import boundary_cuts, importances, kind_table, pooled_spearman, prefix_probabilities
from analysis.steps import split_steps, think_span, token_offsets
from tests.conftest import REPO
from train.generate import generate, render_prompts
from train.prompts import QUICK_OPEN, THINK_OPEN, THOROUGH_OPEN
from train.registry import Checkpoint, Registry
from train.reward import score_response

BASE = REPO / "train" / "organism" / "base"
NAMES = ("Zoey", "Ethan", "Oliver")


@pytest.fixture(scope="module")
def organism():
    from train.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(BASE).eval(), load_tokenizer(BASE, "organism")


@pytest.mark.parametrize("text,kind", [
    (THOROUGH_OPEN, "answer-way opening"), (QUICK_OPEN, "answer-way opening"),
    ("Suppose Zoey is a knight, Ethan is a knave.", "case header"),
    ("假设 Zoey 是骑士， Ethan 是骗子。", "case header"),
    ("Case 2: Zoey is a knave.", "case header"),
    ("Ethan says Zoey is a knave (no), which is false.", "statement check"),
    ("Ethan 说 Zoey 是骗子（错），这是假的。", "statement check"),
    ("Contradiction.", "contradiction"), ("矛盾。", "contradiction"),
    ("Let me verify.", "verification"), ("This case fits.", "verification"), ("所有陈述都一致。", "verification"),
    ("Now we have determined that Zoey is a knight.", "summary"), ("综上，Zoey 是骑士。", "summary"),
    ("Back to Zoey.", "other"), ("Hmm, I am not sure about this.", "other"),
])
def test_step_kind_in_english_and_chinese(text, kind):
    assert step_kind(text, NAMES) == kind


def test_step_kinds_carry_verification_and_stop_at_the_answer():
    response = ("<think>\nSuppose Zoey is a knight.\nLet me verify. Ethan says Zoey is a knave (no), which is false.\n"
                "</think>\n<answer>\n(1) Zoey is a knight\n</answer>")
    got = [(st.text, kind) for st, kind in step_kinds(response, NAMES)]
    assert got == [("Suppose Zoey is a knight.", "case header"), ("Let me verify.", "verification"),
                   ("Ethan says Zoey is a knave (no), which is false.", "verification")]
    plain = "Suppose Zoey is a knight.\nAnswer:\n(1) Zoey is a knight"     # no think tags: the answer is cut
    assert [st.text for st, _ in step_kinds(plain, NAMES)] == ["Suppose Zoey is a knight."]


def test_boundary_probabilities_equal_brute_force_greedy_continuations(organism):
    """At temperature 0 all N continuations of a prefix are the greedy one, so P(correct |
    prefix) is 0 or 1 and equals scoring the greedy continuation written separately. Planted:
    the trace is the organism's greedy careful search (right); every later prefix continues it
    as it stands, so only the opening can matter."""
    model, tok = organism
    puzzle = puzzle_set(PuzzleSetConfig(sizes=(3,), per_size=4, fixed_cast=True))[3]
    prompt = render_prompts(tok, [puzzle], "chat")[0]
    opened = f"{THINK_OPEN}{THOROUGH_OPEN}\n"
    response = opened + generate(model, tok, [prompt + opened], max_new_tokens=120, progress=False)[0][0].text
    assert score_response(response, puzzle.solution_text_format)["answer"] == "correct"
    steps = [st for st, _ in step_kinds(response, puzzle.names)][:4]
    offsets = token_offsets(response, tok)
    steps = split_steps(response, offsets=offsets, span=think_span(response))[:len(steps)]
    cuts = boundary_cuts(steps, offsets)
    assert len(cuts) == len(steps) + 1 and response[steps[-1].char_end:cuts[-1][0]].strip() == ""
    for (c, n), st in zip(cuts, steps):       # between tokens: the step's opening space stays after the cut
        assert response[c:st.char_start].strip() == "" and tok(response[:c], add_special_tokens=False)["input_ids"] \
            == tok(response, add_special_tokens=False)["input_ids"][:n]
    max_new = 160
    jobs = [(prompt, response[:c], max_new - n, puzzle) for c, n in cuts]
    wrong = response[:response.index("<answer>")] + "<answer>\n" + "\n".join(
        f"({i + 1}) {n} is a {'knave' if r else 'knight'}" for i, (n, r) in enumerate(zip(puzzle.names, puzzle.solution)))
    jobs += [(prompt, response, 0, puzzle), (prompt, wrong + "\n</answer>", 0, puzzle)]
    probs, n_tokens = prefix_probabilities(model, tok, jobs, prompt_style="chat", n_samples=2, temperature=0.0,
                                           top_p=1.0, top_k=0, seed=0, batch_size=16)
    brute = []
    for (_, prefix, budget, _) in jobs[:-2]:
        cont = generate(model, tok, [prompt + prefix], max_new_tokens=budget, progress=False)[0][0].text
        brute.append(float(score_response(prefix + cont, puzzle.solution_text_format)["answer"] == "correct"))
    assert probs[:-2] == brute and n_tokens > 0
    assert probs[1:-2] == [1.0] * len(steps) and probs[-2:] == [1.0, 0.0]    # no budget left: scored as it stands
    imp = importances(probs[:-2])
    assert imp.tolist() == [1.0 - brute[0]] + [0.0] * (len(steps) - 1)
    # Sampling is seeded: the same call gives the same probabilities.
    kw = dict(prompt_style="chat", n_samples=2, temperature=1.0, top_p=1.0, top_k=0, batch_size=16)
    assert prefix_probabilities(model, tok, jobs[:1], seed=3, **kw) == prefix_probabilities(model, tok, jobs[:1], seed=3, **kw)


def test_kind_table_and_receiver_correlation_on_planted_numbers():
    traces = [{"kinds": ["case header", "contradiction", "case header"], "p": [0.0, 0.5, 0.25, 1.0]},
              {"kinds": ["contradiction", "other"], "p": [1.0, 0.0, 0.0]}]
    table = kind_table(traces, n_boot=200, seed=0)
    # case header: +0.5 and +0.75; contradiction: -0.25 and -1.0; other: 0.
    assert table["case header"]["importance"]["mean"] == pytest.approx(0.625)
    assert table["contradiction"]["importance"]["mean"] == pytest.approx(-0.625)
    assert table["contradiction"]["abs_importance"]["mean"] == pytest.approx(0.625)
    assert table["contradiction"]["n_steps"] == 2 and table["case header"]["n_traces"] == 1
    assert table["other"]["importance"]["mean"] == 0.0 and "summary" not in table
    lo, hi = table["contradiction"]["importance"]["lo"], table["contradiction"]["importance"]["hi"]
    assert lo == pytest.approx(-1.0) and hi == pytest.approx(-0.25)       # bootstrap over the two traces
    rng = np.random.default_rng(0)
    pairs = [(x, 2 * x + 1) for x in (rng.random(6) for _ in range(5))]
    assert pooled_spearman(pairs, n_boot=100, seed=0)["mean"] == pytest.approx(1.0)
    anti = pooled_spearman([(x, -x) for x, _ in pairs], n_boot=100, seed=0)
    assert anti["mean"] == pytest.approx(-1.0) and anti["hi"] == pytest.approx(-1.0)
    assert pooled_spearman([([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])], n_boot=10, seed=0)["mean"] is None


def test_resampling_plugin_end_to_end_on_the_organism(tmp_path):
    reg = Registry(tmp_path / "ckpts.yaml")
    reg.add(Checkpoint(id="o/base", path=str(BASE), run="o", stage="base", global_step=0))
    a = get_analysis("resampling", n_samples=2, max_traces=1, max_steps=6, n_boot=50, n_receivers=2, p=0)
    cfg = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(3,), per_size=1, fixed_cast=True),
                        generation=GenerationConfig(max_new_tokens=160))
    [out] = analyse_checkpoints(reg, reg.select(run="o"), [a], cache=ResultCache(tmp_path / "c"), config=cfg)
    assert out.error is None
    res = out.results["resampling"]
    assert res["n_traces"] == 1 and res["n_steps"] == 6 and res["n_continuations"] == 2 * 7
    assert res["seconds"] > 0 and sum(d["n_steps"] for d in res["by_kind"].values()) == 6
    assert len(res["traces"][0]["p"]) == 7 and set(res["traces"][0]["p"]) <= {0.0, 0.5, 1.0}
    assert res["traces"][0]["kinds"][:2] == ["answer-way opening", "case header"]
    assert len(res["receivers"]["heads"]) == 2 and len(res["traces"][0]["received"]) == 6
    md, figs = a.report_section(res)
    assert "| answer-way opening |" in md and "Receiver heads" in md and len(figs) == 1
    trends = a.trend_metrics(res)
    assert {"resampling: importance of case header", "resampling: importance of case header@lo"} <= set(trends)
    from analysis.report import trend_frame
    assert "resampling: importance of case header" in set(trend_frame([out], [a])["metric"])


def test_bad_option_is_one_line(tmp_path):
    with pytest.raises(HarnessError, match="n_samples"):
        get_analysis("resampling", n_samples=0)
    reg = Registry(tmp_path / "ckpts.yaml")
    reg.add(Checkpoint(id="o/base", path=str(BASE), run="o", stage="base", global_step=0))
    r = subprocess.run([sys.executable, "-m", "analysis", "report", "--registry", str(reg.path), "--analyses",
                        "resampling", "--set", "resampling.temperature=-1"], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "temperature" in r.stderr, r.stderr
