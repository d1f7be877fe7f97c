"""The organism's wired heads as ground truth: the attention analysis finds them by a direct
check on a real trace, ranks them on its scores, and knows them from the build's folder (or the
run's base folder); the case-tracking decision flips with the latest node."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from analysis.attention import (AttentionAnalysis, attention_layout, circuit_targets, head_rank, organism_wiring, target_shares,
                                wired_summary)
from analysis.case_tracking import case_decision
from analysis.harness import PuzzleSetConfig, load_model, puzzle_set
from train.generate import render_prompts
from train.models import ORGANISM_FILE, folder_wired_heads, wired_heads
from train.organism import BASE_DIR
from train.organism.config import OrganismConfig
from train.organism.model import node_token_ids
from train.organism.traces import TraceWriter
from train.prompts import THINK_OPEN
from train.registry import Checkpoint, Registry


CAREFUL = OrganismConfig(thorough_rate=1.0, verify_rate=0.0, hesitation_rate=0.0, summary_rate=0.0,
                         chinese_step_rate=0.0, think_format_rate=1.0, answer_tag_rate=0.0)


def careful_trace(puzzle, seed: int) -> str:
    return TraceWriter(CAREFUL).write(puzzle, random.Random(seed)).text


@pytest.fixture(scope="module")
def base():
    lm, tok = load_model(BASE_DIR)
    puzzle = puzzle_set(PuzzleSetConfig(sizes=(5,), per_size=1, fixed_cast=True))[0]
    return lm, tok, puzzle, render_prompts(tok, [puzzle], "chat")[0]


def test_wired_heads_of_the_shipped_build():
    heads = folder_wired_heads(BASE_DIR)
    assert heads == {"previous-token": [(0, 0), (0, 1)], "induction": [(1, 0), (1, 1)], "node": (0, 2),
                     "think": (0, 3)}
    assert wired_heads(OrganismConfig(induction_init=False).model_dump()) == {}
    assert folder_wired_heads(BASE_DIR / "no-such-folder") == {}


def test_direct_check_finds_the_wired_heads_on_the_base(base):
    lm, tok, puzzle, prompt = base
    layout = attention_layout(lm._module)
    ids = tok(prompt + careful_trace(puzzle, seed=0), add_special_tokens=False)["input_ids"]
    markers = AttentionAnalysis.circuit_markers(tok, folder_wired_heads(BASE_DIR))
    assert markers["node"] == {i for ids_ in node_token_ids(OrganismConfig(), tok).values() for i in ids_}
    assert markers["think"] == {tok.convert_tokens_to_ids(THINK_OPEN)}
    targets = circuit_targets(ids, markers)
    direct = target_shares(lm, ids, targets, layout, chunk=64)
    assert direct["node"]["n"] > 100 and direct["think"]["n"] > 100
    for kind, (layer, head) in (("node", (0, 2)), ("think", (0, 3))):
        share = direct[kind]["share"]
        assert share[layer, head] > 0.9 > 20 * direct[kind]["chance"]
        assert head_rank(share.tolist(), layer, head) == (1, 16)
    assert direct["previous-token"]["share"][0, :2].min() > 0.9
    # Ranks on the step scores: a planted grid where the node head is second.
    grid = np.arange(16.0).reshape(4, 4)[::-1].tolist()
    grid[0][2] = 14.5
    result = {"n_layers": 4, "n_heads": 4, "receivers": {"kurtosis_per_layer_head": grid}}
    out = wired_summary(result, folder_wired_heads(BASE_DIR), [direct], n_boot=50, seed=0)
    node = out["node L0H2"]
    assert node["ranks"]["receiver kurtosis"] == {"rank": 2, "of": 16, "value": 14.5}
    assert node["share_rank"] == {"rank": 1, "of": 16} and node["share"]["mean"] > 0.9


def test_wiring_is_read_from_the_folder_or_the_runs_base(tmp_path, tiny_ckpt):
    step = tmp_path / "step"
    shutil.copytree(BASE_DIR, step, ignore=shutil.ignore_patterns(ORGANISM_FILE, "*.md"))
    reg = Registry(tmp_path / "ckpts.yaml")
    reg.add(Checkpoint(id="k/base", path=str(BASE_DIR), run="k", stage="base", global_step=0))
    reg.add(Checkpoint(id="k/s1/step-1", path=str(step), run="k", stage="stage1", global_step=1, parent="k/base"))
    layout = SimpleNamespace(n_layers=4, n_heads=4)

    def ctx(ck_id: str, path: Path):
        return SimpleNamespace(checkpoint=reg.get(ck_id), path=path, registry=reg)

    assert organism_wiring(ctx("k/base", BASE_DIR), layout)["node"] == (0, 2)
    assert organism_wiring(ctx("k/s1/step-1", step), layout)["think"] == (0, 3)
    assert organism_wiring(ctx("k/s1/step-1", step), SimpleNamespace(n_layers=4, n_heads=3)) is None
    other = SimpleNamespace(checkpoint=Checkpoint(id="x", path=str(tiny_ckpt)), path=tiny_ckpt, registry=None)
    assert organism_wiring(other, layout) is None


def test_case_decision_flips_with_the_latest_node(base):
    lm, tok, puzzle, prompt = base
    clean, corrupt, true, other, gap = case_decision(tok, prompt, careful_trace(puzzle, seed=0))
    differ = [i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b]
    assert len(clean) == len(corrupt) and len(differ) == 1 and gap == len(clean) - 1 - differ[0] >= 2
    assert tok.decode([clean[differ[0]]]).startswith("Suppose") and tok.decode([corrupt[differ[0]]]).startswith("Suppose")
    assert {tok.decode([true])[-5:], tok.decode([other])[-5:]} == {"(yes)", " (no)"}
    with torch.no_grad():
        lds = [float((lambda x: x[true] - x[other])(lm._module(torch.tensor([ids])).logits[0, -1]))
               for ids in (clean, corrupt)]
    assert lds[0] > 2 and lds[0] - lds[1] > 2
