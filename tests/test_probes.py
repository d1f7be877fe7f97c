"""Linear probes: fitting and controls on synthetic features, targets on hand-written traces,
features against a plain transformers forward, and the CLI on two tiny checkpoints."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from probes.fit import (FitConfig, LinearProbe, ProbeError, binary_metrics, brier_score, control_labels,
                        cross_validate, expected_calibration_error, fit_probe, load_probe, permutation_test,
                        probe_target, puzzle_fold_map, puzzle_folds, save_probe, selectivity)
from probes.targets import (TargetError, answer_correct, answer_start, assumed_role_true, check_targets,
                            context_labels, is_chinese, latest_assumption, think_block)
from tests.conftest import REPO

FAST = FitConfig(n_splits=4, inner_splits=3, Cs=(0.01, 0.1, 1.0), n_permutations=19, seed=0)


def synthetic(n_puzzles: int = 40, per: int = 8, d: int = 12, layers: int = 3, seed: int = 0):
    """Rows grouped by puzzle (sizes 3..6); layer 1 carries a planted linear signal of y."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"p{i:03d}" for i in range(n_puzzles)], per)
    sizes = np.repeat([3 + i % 4 for i in range(n_puzzles)], per)
    X = rng.normal(size=(len(groups), layers, d)).astype(np.float32)
    w = rng.normal(size=d)
    y = (X[:, 1, :] @ w + 0.3 * rng.normal(size=len(groups)) > 0).astype(int)
    types = rng.integers(0, 30, size=len(groups))
    return X, y, groups, sizes, types


# --------------------------------------------------------------------------- fitting

def test_planted_signal_is_found_and_noise_is_at_chance():
    X, y, groups, sizes, types = synthetic()
    folds = puzzle_folds(groups, sizes, FAST.n_splits, FAST.seed)
    res = probe_target(X, y, groups=groups, folds=folds, controls={"token": types}, config=FAST, strata=sizes)
    by_layer = {r["layer"]: r for r in res["layers"]}
    assert res["best_layer"] == 1
    assert by_layer[1]["auroc"] > 0.97 and by_layer[1]["accuracy"] > 0.85
    assert by_layer[0]["auroc"] < 0.7 and by_layer[2]["auroc"] < 0.7     # other layers hold no signal
    assert res["permutation"]["p_value"] == pytest.approx(1 / 20)          # nothing in the null beats it
    assert by_layer[1]["selectivity"] > 0.3

    noise = np.random.default_rng(1).integers(0, 2, size=len(y))
    res = probe_target(X, noise, groups=groups, folds=folds, controls={"token": types}, config=FAST, strata=sizes,
                       layers=[1])
    assert abs(res["layers"][0]["auroc"] - 0.5) < 0.1
    assert res["permutation"]["p_value"] > 0.05


def test_fitting_is_deterministic_for_a_seed():
    X, y, groups, sizes, types = synthetic(n_puzzles=16, per=5)
    folds = puzzle_folds(groups, sizes, FAST.n_splits, FAST.seed)
    a = probe_target(X, y, groups=groups, folds=folds, controls={"token": types}, config=FAST, strata=sizes)
    b = probe_target(X, y, groups=groups, folds=folds, controls={"token": types}, config=FAST, strata=sizes)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_folds_never_split_a_puzzle_and_are_stratified_by_size():
    rng = np.random.default_rng(3)
    pids = [f"q{i}" for i in range(30)]
    size = {p: 3 + i % 3 for i, p in enumerate(pids)}
    groups = np.array([p for p in pids for _ in range(rng.integers(1, 9))])
    sizes = np.array([size[g] for g in groups])
    folds = puzzle_folds(groups, sizes, 5, seed=0)
    for k in range(5):
        assert not set(groups[folds == k]) & set(groups[folds != k])
        # 10 puzzles of each size over 5 folds: exactly 2 of each size per fold
        assert sorted({g: size[g] for g in groups[folds == k]}.values()) == [3, 3, 4, 4, 5, 5]
    # The fold of a puzzle does not depend on how many rows it has (shared across checkpoints).
    other = np.array([p for p in pids for _ in range(2)])
    assert puzzle_fold_map(other, [size[g] for g in other], 5, 0) == puzzle_fold_map(groups, sizes, 5, 0)
    assert puzzle_fold_map(groups, sizes, 5, 1) != puzzle_fold_map(groups, sizes, 5, 0)
    # cross_validate refuses folds that put one puzzle on both sides
    bad = np.arange(len(groups)) % 2
    with pytest.raises(ProbeError, match="both the training and the test"):
        cross_validate(rng.normal(size=(len(groups), 3)), rng.integers(0, 2, len(groups)), groups, bad, FAST)
    with pytest.raises(ProbeError, match="at least 2 puzzles"):
        puzzle_folds(["a", "a"], [3, 3], 5, 0)


def test_control_task_and_selectivity_on_constructed_examples():
    rng = np.random.default_rng(0)
    n_puz, per = 40, 10
    groups = np.repeat(np.arange(n_puz), per)
    types = rng.integers(0, 12, size=len(groups))
    y = rng.integers(0, 2, size=len(groups))
    # control labels: one per token type, seeded, with about the task's base rate
    yc = control_labels(types, y, seed=5)
    for t in np.unique(types):
        assert len(set(yc[types == t])) == 1
    assert np.array_equal(yc, control_labels(types, y, seed=5))
    assert np.array_equal(yc[::-1], control_labels(types[::-1], y[::-1], seed=5))   # row order does not matter
    assert selectivity({"accuracy": 0.9}, {"accuracy": 0.6}) == pytest.approx(0.3)

    folds = puzzle_folds(groups, np.zeros(len(groups)), 4, 0)
    # (a) the features encode the label and nothing about the token: high selectivity
    X = np.stack([y + 0.1 * rng.normal(size=len(y)), rng.normal(size=len(y))], axis=1)[:, None, :]
    res = probe_target(X, y, groups=groups, folds=folds, controls={"token": types}, config=FAST)
    r = res["layers"][0]
    task_C = dict(enumerate(r["C"]))         # the control probe gets the task probe's C per fold
    draws = [cross_validate(X[:, 0], control_labels(types, y, seed), groups, folds, FAST, Cs=task_C).metrics
             for seed in range(FAST.seed, FAST.seed + FAST.control_draws)]   # averaged over seeded labellings
    ctrl = {k: np.mean([d[k] for d in draws]) for k in ("accuracy", "balanced_accuracy")}
    assert len({d["accuracy"] for d in draws}) > 1
    assert r["control"]["accuracy"] == pytest.approx(ctrl["accuracy"])
    assert r["selectivity"] == pytest.approx(r["accuracy"] - ctrl["accuracy"])
    assert r["selectivity_balanced"] == pytest.approx(r["balanced_accuracy"] - ctrl["balanced_accuracy"])
    assert r["accuracy"] > 0.95 and r["selectivity"] > 0.3
    # (b) the features are the token identity and the label a function of it: the control task
    # is as easy as the task, so selectivity is about zero
    onehot = np.eye(12)[types][:, None, :]
    y_tok = (types % 2).astype(int)
    res = probe_target(onehot, y_tok, groups=groups, folds=folds, controls={"token": types}, config=FAST)
    r = res["layers"][0]
    assert r["accuracy"] > 0.95 and r["control"]["accuracy"] > 0.95 and abs(r["selectivity"]) < 0.05


def test_response_level_control_for_a_response_level_label():
    """A label constant along each response, read from features that also carry the token
    identity: the token-type control is as easy as the task (selectivity about zero), the
    per-response control is at chance (selectivity = the task's margin over memorisation); with
    no label signal in the features, selectivity against both is about zero or below."""
    rng = np.random.default_rng(2)
    n_resp, per = 60, 12
    groups = np.repeat(np.arange(n_resp), per)
    types = rng.integers(0, 12, size=len(groups))
    y_resp = rng.random(n_resp) < 0.4
    y = y_resp[groups].astype(int)
    folds = puzzle_folds(groups, np.zeros(len(groups)), 4, 0)
    onehot = np.eye(12)[types]
    controls = {"response": groups, "token": types}
    signal = np.concatenate([onehot, (y + 0.3 * rng.normal(size=len(y)))[:, None]], axis=1)[:, None, :]
    res = probe_target(signal, y, groups=groups, folds=folds, controls=controls, config=FAST)
    r = res["layers"][0]
    assert res["control_task"] == "response" and set(r["controls"]) == {"response", "token"}
    assert r["accuracy"] > 0.9
    assert r["controls"]["token"]["accuracy"] > 0.9 and r["controls"]["token"]["selectivity"] < 0.1
    assert abs(r["controls"]["response"]["balanced_accuracy"] - 0.5) < 0.12
    assert r["selectivity"] == r["controls"]["response"]["selectivity"] > 0.3
    assert r["control"]["accuracy"] == r["controls"]["response"]["accuracy"]
    noise = onehot[:, None, :] + 0.1 * rng.normal(size=(len(y), 1, 12))
    r = probe_target(noise, y, groups=groups, folds=folds, controls=controls, config=FAST)["layers"][0]
    assert abs(r["selectivity"]) < 0.15 and r["controls"]["token"]["selectivity"] < -0.2
    with pytest.raises(ProbeError, match="at least one control"):
        probe_target(noise, y, groups=groups, folds=folds, controls={}, config=FAST)


def test_auroc_ignores_the_training_base_rate_of_each_fold():
    # Whole puzzles share a label and the features are noise: the held-out fold holding a rare
    # negative puzzle trains on a higher positive rate, so pooled probabilities rank negatives first.
    groups = np.repeat(np.arange(20), 10)
    y = (groups >= 3).astype(int)
    folds = puzzle_folds(groups, np.zeros(len(y)), 5, 0)
    pooled_proba, ours, bacc = [], [], []
    for seed in range(4):
        X = np.random.default_rng(seed).normal(size=(len(y), 5))
        res = cross_validate(X, y, groups, folds, FitConfig(Cs=(1e-4,)))
        pooled_proba.append(binary_metrics(y, res.proba)["auroc"])
        ours.append(res.metrics["auroc"])
        bacc.append(res.metrics["balanced_accuracy"])
    assert np.mean(pooled_proba) < 0.3
    assert abs(np.mean(ours) - 0.5) < 0.08
    assert abs(np.mean(bacc) - 0.5) < 0.1      # the balanced decision does not follow the base rate


def test_ece_and_brier_match_hand_computation():
    y, p = [0, 1, 1, 0], [0.1, 0.8, 0.65, 0.35]
    # bins [0, .5) and [.5, 1]: |0 - .225| * .5 + |1 - .725| * .5
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.25)
    assert brier_score(y, p) == pytest.approx((0.01 + 0.04 + 0.1225 + 0.1225) / 4)
    # 10 bins: p = 1.0 shares the last bin with 0.95
    y3, p3 = np.array([1, 0, 1]), np.array([1.0, 0.95, 0.05])
    hand = (2 / 3) * abs(0.5 - 0.975) + (1 / 3) * abs(1 - 0.05)
    assert expected_calibration_error(y3, p3, n_bins=10) == pytest.approx(hand)
    m = binary_metrics(y, p, n_bins=2)
    assert m["auroc"] == 1.0 and m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["n"] == 4
    assert np.isnan(binary_metrics([1, 1], [0.2, 0.9])["auroc"])


def test_saved_probe_loads_with_identical_predictions(tmp_path):
    X, y, groups, sizes, _ = synthetic(n_puzzles=20, per=6)
    probe = fit_probe(X[:, 1], y, groups, FAST, strata=sizes, meta={"target": "t", "layer": 1})
    assert probe.C in FAST.Cs
    path = save_probe(probe, tmp_path / "probes" / "t" / "layer-01")
    assert path.name == "layer-01.npz" and path.with_suffix(".json").is_file()
    for ref in (path, path.with_suffix(".json"), tmp_path / "probes" / "t" / "layer-01"):
        back = load_probe(ref)
        assert np.array_equal(back.predict_proba(X[:, 1]), probe.predict_proba(X[:, 1]))
        assert back.C == probe.C and back.prior == probe.prior == y.mean() and back.meta == {"target": "t", "layer": 1}
    assert np.array_equal(back.predict(X[:, 1]), probe.predict(X[:, 1]))
    # the probe is the sklearn pipeline's function
    assert binary_metrics(y, probe.predict_proba(X[:, 1]))["auroc"] > 0.97
    assert np.allclose(back.direction, probe.coef / probe.scale)
    with pytest.raises(ProbeError, match="no saved probe"):
        load_probe(tmp_path / "nothing")


def test_permutation_between_puzzles_for_puzzle_level_labels():
    from probes.fit import permute_labels

    groups = np.repeat(np.arange(10), [1, 2, 3, 4, 5, 1, 2, 3, 4, 5])
    y = (groups % 3 == 0).astype(int)
    perm = permute_labels(y, groups, np.random.default_rng(0))
    for g in np.unique(groups):
        assert len(set(perm[groups == g])) == 1          # still constant within each puzzle
    X, yy, gg, ss, _ = synthetic(n_puzzles=12, per=4)
    folds = puzzle_folds(gg, ss, 3, 0)
    cv = cross_validate(X[:, 1], yy, gg, folds, FAST, strata=ss)
    a = permutation_test(X[:, 1], yy, gg, folds, FAST, cv.Cs, cv.metrics["auroc"], n_permutations=5)
    b = permutation_test(X[:, 1], yy, gg, folds, FAST, cv.Cs, cv.metrics["auroc"], n_permutations=5)
    assert a == b and a["n"] == 5


def test_transfer_matrix_and_direction_cosines():
    from probes.compare import cosine_matrix, diff_of_means, metric_frame, transfer_matrix

    X, y, groups, sizes, _ = synthetic(n_puzzles=24, per=6, layers=2)
    Xa = X[:, 1]
    rng = np.random.default_rng(9)
    Xb = Xa + 0.1 * rng.normal(size=Xa.shape)      # same direction
    Xc = -Xa                                        # flipped direction
    Xn = rng.normal(size=Xa.shape)                  # no signal
    data = {"a": (Xa, y, groups, sizes), "b": (Xb, y, groups, sizes), "c": (Xc, y, groups, sizes),
            "n": (Xn, y, groups, sizes)}
    T = transfer_matrix(data, puzzle_fold_map(groups, sizes, 4, 0), FAST)
    assert list(T.index) == list(T.columns) == ["a", "b", "c", "n"]
    assert T.loc["a", "a"] > 0.95 and T.loc["a", "b"] > 0.95 and T.loc["a", "c"] < 0.05
    assert T.loc["c", "c"] > 0.95 and abs(T.loc["a", "n"] - 0.5) < 0.15
    C = cosine_matrix({k: diff_of_means(v[0], y) for k, v in data.items()})
    assert C.loc["a", "b"] > 0.95 and C.loc["a", "c"] == pytest.approx(-1.0) and abs(C.loc["a", "n"]) < 0.5
    results = {"ck1": {"targets": {"t": {"layers": [{"layer": 0, "auroc": 0.6}, {"layer": 1, "auroc": 0.9}]}}},
               "ck2": {"targets": {"t": {"skipped": "x", "layers": []}}}}
    frame = metric_frame(results, "t")
    assert frame.loc[1, "ck1"] == 0.9 and frame["ck2"].isna().all()


# --------------------------------------------------------------------------- targets

NAMES = ("Zoey", "Ethan", "Mia")
SOLUTION = (True, False, True)
SOLUTION_TEXT = "(1) Zoey is a knight\n(2) Ethan is a knave\n(3) Mia is a knight"
TRACE = ("<think>\nZoey says Ethan is a knave. Ethan says if Mia is a knight then Zoey is a knave.\n"
         "Assume Zoey is a knight. Zoey says Ethan is a knave, which is true.\n"
         "Assume Ethan is a knight. Contradiction.\n"
         "So Ethan is a knave.\n"
         "假设 Mia 是骗子。矛盾。\n"
         "Let me verify. Zoey says Ethan is a knave, which is true. All statements are consistent.\n"
         "</think>\n<answer>\n" + SOLUTION_TEXT + "\n</answer>")


def test_answer_regions():
    assert answer_start(TRACE) == TRACE.index("</think>")
    lo, hi = think_block(TRACE)
    assert TRACE[lo:hi].strip().startswith("Zoey says") and TRACE[lo:hi].rstrip().endswith("consistent.")
    plain = "Assume Zoey is a knight.\nSo the answer is:\n(1) Zoey is a knight"
    assert answer_start(plain) == plain.index("So the answer")
    assert think_block(plain) is None
    assert think_block(plain, prefilled=True) == (0, plain.index("So the answer"))


def test_latest_assumption_and_its_truth():
    upto_ethan = TRACE[:TRACE.index("Contradiction")]
    assert latest_assumption(upto_ethan, NAMES) == ("Ethan", True)
    assert assumed_role_true(upto_ethan, NAMES, SOLUTION) is False
    upto_zoey = TRACE[:TRACE.index("Assume Ethan")]
    assert assumed_role_true(upto_zoey, NAMES, SOLUTION) is True
    # reported speech ("Ethan says if Mia is a knight ...") is not an assumption
    assert latest_assumption(TRACE[:TRACE.index("Assume Zoey")], NAMES) is None
    upto_mia = TRACE[:TRACE.index("矛盾")]
    assert latest_assumption(upto_mia, NAMES) == ("Mia", False)
    assert assumed_role_true(upto_mia, NAMES, SOLUTION) is False
    assert latest_assumption("Suppose Oliver is a knave.", NAMES) is None            # not in the puzzle
    assert latest_assumption("Now, let's assume Mia is a knave.", NAMES) == ("Mia", False)
    assert latest_assumption('He said "if Mia is a knight, then".', NAMES) is None
    assert latest_assumption("If Zoey were a knave, then", NAMES) == ("Zoey", False)


def test_assumed_role_follows_the_nodes_of_the_organisms_search():
    """In kk-tiny's traces (English and Chinese nodes) the assumed role is the one the latest
    node ("Suppose A is a knight, B is a knave.") gives the person being checked: the node's
    last person until a speaker is named, then the latest speaker."""
    import random
    import re

    from train.kk import GeneratorConfig, PuzzleGenerator
    from train.organism import OrganismConfig, write_trace

    cfg = OrganismConfig(thorough_rate=1.0, chinese_step_rate=0.5, hesitation_rate=0.0,
                         verify_rate=0.0, think_format_rate=1.0)
    header = re.compile(r"(?:Suppose|假设)([^.。]*)[.。]")
    speaker = re.compile(r"(\w+) (?:says|说)")
    checked = {"en": 0, "zh": 0}
    for seed in range(8):
        p = PuzzleGenerator(seed, GeneratorConfig(fixed_cast=True)).generate(3)
        text = write_trace(p, random.Random(seed), cfg).text
        for h in header.finditer(text):
            roles = dict(re.findall(r"(\w+) (?:is a |是)(knight|knave|骑士|骗子)", h.group(1)))
            knight = {n: r in ("knight", "骑士") for n, r in roles.items()}
            last = list(roles)[-1]
            assert latest_assumption(text[:h.end()], p.names) == (last, knight[last])
            line_end = text.find("\n", h.end())
            for m in speaker.finditer(text, h.end(), line_end):
                who = m.group(1)
                assert latest_assumption(text[:m.end()], p.names) == (who, knight[who])
                truth = p.solution[list(p.names).index(who)] == knight[who]
                assert assumed_role_true(text[:m.end()], p.names, p.solution) is truth
                checked["zh" if "说" in m.group(0) else "en"] += 1
    assert min(checked.values()) > 10
    # a case header gives its first person until a speaker is named
    assert latest_assumption("Case 2: Mia is a knight, Zoey is a knave.", NAMES) == ("Mia", True)
    # an "Assume" after the header takes over; a header after an "Assume" takes over again
    assert latest_assumption("Case 2: Mia is a knight, Zoey is a knave. Assume Zoey is a knight.", NAMES) \
        == ("Zoey", True)
    assert latest_assumption("Assume Zoey is a knight. case 2: Mia is a Knave, Zoey is a knave.", NAMES) \
        == ("Mia", False)


def test_next_token_script_and_answer_label():
    assert is_chinese("假设") and is_chinese("\n假") and is_chinese(" 矛")
    assert not is_chinese(" Assume") and not is_chinese("\n") and not is_chinese("") and not is_chinese("Mia")
    assert answer_correct({"answer": "correct"}) and not answer_correct({"answer": "wrong"})
    assert answer_correct({"text": TRACE, "prompt_style": "chat"}, SOLUTION_TEXT)
    wrong = TRACE.replace("(2) Ethan is a knave", "(2) Ethan is a knight")
    assert not answer_correct({"text": wrong, "prompt_style": "chat"}, SOLUTION_TEXT)
    with pytest.raises(TargetError, match="unknown probe target"):
        check_targets(["answer_correct", "bogus"])


def test_context_labels_on_a_hand_written_trace():
    ctx = {"text": TRACE, "names": list(NAMES), "solution": list(SOLUTION), "solution_text": SOLUTION_TEXT,
           "prompt_style": "chat"}
    at = {  # prefix ends -> (next token text)
        "after_think": (TRACE.index("Zoey says"), "Zoey"),
        "before_assume_ethan": (TRACE.index("Assume Ethan"), "Assume"),
        "before_mia": (TRACE.index("假设"), "假设"),
        "before_verify": (TRACE.index("Let me verify"), "Let"),
        "before_close": (TRACE.index("</think>") - 1, "</think>"),
    }
    rows = [{"char": c, "next_text": t} for c, t in at.values()]
    labels = {t: context_labels(ctx, rows, t).tolist() for t in
              ("answer_correct", "next_verification", "next_token_chinese", "assumed_role_true")}
    assert labels["answer_correct"] == [1, 1, 1, 1, 1]
    assert labels["next_verification"] == [0, 0, 0, 1, 0]
    assert labels["next_token_chinese"] == [0, 0, 1, 0, 0]
    # a position at the very end of a response has no next token (None, or NaN through pandas)
    ends = [dict(rows[0], next_text=None), dict(rows[0], next_text=float("nan"))]
    assert context_labels(ctx, ends, "next_token_chinese").tolist() == [-1, -1]
    # no assumption yet; Zoey a knight (true); Ethan a knight (false); Mia a knave (false) twice
    assert labels["assumed_role_true"] == [-1, 1, 0, 0, 0]
    # a response without a think block has no answer_correct rows; one scored wrong is 0
    plain = dict(ctx, text=TRACE.replace("<think>", "").replace("</think>", ""))
    assert context_labels(plain, rows[:2], "answer_correct").tolist() == [-1, -1]
    assert context_labels(dict(ctx, answer="wrong"), rows[:1], "answer_correct").tolist() == [0]


# --------------------------------------------------------------------------- features

def test_features_equal_a_plain_transformers_forward(tiny_ckpt, tmp_path):
    import torch

    from analysis.cache import ResultCache
    from analysis.harness import PuzzleSetConfig, load_model, puzzle_set
    from probes.features import extract_features, load_features, save_features

    lm, tok = load_model(tiny_ckpt)
    puzzles = puzzle_set(PuzzleSetConfig(sizes=(3,), per_size=2))
    gens = []
    for p in puzzles:
        a, b, c = p.names
        text = (f"<think>\nAssume {a} is a knight. {a} says {b} is a knave, which is true. So {b} is a knave.\n"
                f"Let me verify. All statements are consistent.\n</think>\n<answer>\n{p.solution_text_format}\n</answer>")
        gens.append({"puzzle_id": p.id, "text": text, "answer": "correct", "correct": True, "prompt_style": "chat"})
    fs = extract_features(lm, tok, puzzles, gens, prompt_style="chat")
    hf = lm._module
    n_layers, hidden = hf.config.num_hidden_layers, hf.config.hidden_size
    assert fs.X.shape == (len(fs.rows), n_layers + 1, hidden) and fs.X.dtype == np.float32
    assert set(fs.rows["puzzle_id"]) == {p.id for p in puzzles}
    kinds = {k for ks in fs.rows["kinds"] for k in ks}
    assert kinds == {"step_start", "before_think_end", "after_conclusion"}
    for c, ctx in enumerate(fs.contexts):
        sel = (fs.rows["context"] == c).to_numpy()
        pos = fs.rows.loc[sel, "pos"].to_numpy().copy()
        # every position lies before the answer, inside the think block
        cut = len(tok(ctx["text"][:ctx["text"].index("</think>")], add_special_tokens=False)["input_ids"])
        assert (pos < ctx["prompt_len"] + cut).all()
        assert (fs.rows.loc[sel, "token_id"].to_numpy() == np.array(ctx["ids"])[pos]).all()
        with torch.no_grad():
            hs = hf(torch.tensor([ctx["ids"]]), output_hidden_states=True).hidden_states
        for layer in range(n_layers):
            np.testing.assert_allclose(fs.X[sel, layer], hs[layer][0, pos].numpy(), rtol=1e-5, atol=1e-5)
        # HF's last hidden state is the final norm of the last decoder layer's output
        with torch.no_grad():
            normed = hf.model.norm(torch.tensor(fs.X[sel, n_layers])).numpy()
        np.testing.assert_allclose(normed, hs[n_layers][0, pos].numpy(), rtol=1e-4, atol=1e-4)
    assert len({len(i) for i in (c["ids"] for c in fs.contexts)}) > 1      # the batch was padded

    # batched reading (right padding) equals one sequence at a time
    from probes.features import read_residuals, read_residuals_batch

    ids = [c["ids"] for c in fs.contexts]
    pos = [fs.rows.loc[fs.rows["context"] == c, "pos"].tolist() for c in range(len(ids))]
    batched = read_residuals_batch(lm, ids, pos, pad_id=tok.pad_token_id)
    for c in range(len(ids)):
        np.testing.assert_allclose(batched[c], read_residuals(lm, ids[c], pos[c]), rtol=1e-5, atol=1e-5)

    cache = ResultCache(tmp_path / "cache")
    save_features(cache, "ck", {"k": 1}, fs)
    back = load_features(cache, "ck", {"k": 1})
    assert np.array_equal(np.asarray(back.X), fs.X)
    assert back.rows.to_dict("list") == fs.rows.to_dict("list")
    assert load_features(cache, "ck", {"k": 2}) is None
    y = back.labels("next_verification")
    assert y.max() == 1 and (back.labels("answer_correct") == 1).all()


# --------------------------------------------------------------------------- CLI

SIZES, PER_SIZE, MAX_NEW = (3, 4), 6, 64


def seed_generations(reg, cache_root: Path, seed: int, ck_id: str) -> None:
    """Cache organism-written responses as the checkpoint's puzzle-set generations, so the
    probes see varied, labelled traces (a random tiny model writes no steps)."""
    from analysis.cache import ResultCache, weights_fingerprint
    from train.generate import GenerationOut
    from analysis.harness import (GENERATIONS, GenerationConfig, HarnessConfig, PuzzleSetConfig, generation_params,
                                  generation_records, puzzle_set)
    from train.organism import OrganismConfig, TraceWriter

    config = HarnessConfig(puzzles=PuzzleSetConfig(sizes=SIZES, per_size=PER_SIZE),
                           generation=GenerationConfig(max_new_tokens=MAX_NEW))
    puzzles = puzzle_set(config.puzzles)
    writer = TraceWriter(OrganismConfig(think_format_rate=1.0, thorough_rate=0.5, verify_rate=0.5,
                                        chinese_step_rate=0.3))
    rng = random.Random(seed)
    outs = [GenerationOut(text=writer.write(p, rng).text, n_tokens=100, finished=True) for p in puzzles]
    records = generation_records(puzzles, outs, "chat")
    path = reg.resolve(reg.get(ck_id))
    ResultCache(cache_root).put(ck_id, GENERATIONS, generation_params(weights_fingerprint(path), config), records)


def test_batch_tokens_bounds_the_pass_not_the_features(tiny_ckpt, monkeypatch):
    """`batch_tokens` sets how many sequences share a forward pass (its memory); the features
    are those of one sequence at a time whatever it is."""
    from analysis.harness import PuzzleSetConfig, load_model, puzzle_set
    from probes import features

    lm, tok = load_model(tiny_ckpt)
    puzzles = puzzle_set(PuzzleSetConfig(sizes=(3,), per_size=3))
    gens = [{"puzzle_id": p.id, "prompt_style": "chat", "answer": "correct", "correct": True,
             "text": f"<think>\nAssume {p.names[0]} is a knight. So {p.names[1]} is a knave.\n</think>\n"
                     f"<answer>\n{p.solution_text_format}\n</answer>"} for p in puzzles]
    widths = []
    real = features.read_residuals_batch

    def counting(lm_, seqs, positions, pad_id=0):
        widths.append(len(seqs))
        return real(lm_, seqs, positions, pad_id=pad_id)

    monkeypatch.setattr(features, "read_residuals_batch", counting)
    together = features.extract_features(lm, tok, puzzles, gens)
    assert widths == [3]
    widths.clear()
    longest = max(len(c["ids"]) for c in together.contexts)
    apart = features.extract_features(lm, tok, puzzles, gens, batch_tokens=longest)
    assert widths == [1, 1, 1]
    np.testing.assert_allclose(apart.X, together.X, rtol=1e-5, atol=1e-5)


def test_cli_on_two_tiny_checkpoints_writes_its_outputs(tiny_ckpt_pair, registry_path, tmp_path):
    from typer.testing import CliRunner

    from probes.cli import app
    from train.registry import Checkpoint, Registry

    reg = Registry(registry_path)
    ids = ("tiny/stage1/step-000010", "tiny/stage2/step-000020")
    for i, (ck_id, path) in enumerate(zip(ids, tiny_ckpt_pair)):
        reg.add(Checkpoint(id=ck_id, path=str(path), run="tiny", stage=ck_id.split("/")[1], global_step=10 * (i + 1)))
        seed_generations(reg, tmp_path / "cache", seed=i, ck_id=ck_id)
    out = tmp_path / "probes"
    args = ["run", "--registry", str(registry_path), "--run", "tiny", "--out", str(out), "--cache",
            str(tmp_path / "cache"), "--puzzle-sizes", "3,4", "--puzzles-per-size", str(PER_SIZE), "--max-new-tokens", str(MAX_NEW),
            "--folds", "3", "--permutations", "3", "--cs", "0.01,1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = (out / "summary.md").read_text()
    for target in ("answer_correct", "next_verification", "next_token_chinese", "assumed_role_true"):
        assert f"## {target}" in summary
        assert (out / "figures" / f"auroc-{target}.png").is_file()
        assert (out / "figures" / f"transfer-{target}.png").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoints"] == list(ids)
    tr = results["targets"]["answer_correct"]["transfer"]
    assert set(tr) == set(ids) and all(set(col) == set(ids) for col in tr.values())
    per = results["per_checkpoint"][ids[0]]["targets"]["answer_correct"]
    assert "skipped" not in per and len(per["layers"]) == 3
    assert per["control_task"] == "response" and set(per["layers"][0]["controls"]) == {"response", "token"}
    assert per["layers"][0]["selectivity"] == pytest.approx(per["layers"][0]["accuracy"]
                                                           - per["layers"][0]["controls"]["response"]["accuracy"])
    other = results["per_checkpoint"][ids[0]]["targets"]["next_token_chinese"]
    assert other.get("skipped") or set(other["layers"][0]["controls"]) == {"token"}
    # the saved probes load and score that checkpoint's features
    saved = sorted((out / "probes").rglob("layer-*.npz"))
    assert len(saved) == 2 * 4 * 3
    probe = load_probe(saved[0])
    assert isinstance(probe, LinearProbe) and probe.coef.shape == (64,)
    # the harness plug-in: registered, a report section with a figure, trend metrics
    from analysis.harness import load_plugins
    from probes.plugin import ProbesAnalysis

    assert load_plugins()["probes"] is ProbesAnalysis
    md, figs = ProbesAnalysis().report_section(results["per_checkpoint"][ids[0]])
    assert "| answer_correct |" in md and "AUROC (selectivity) per layer" in md and len(figs) == 1
    trends = ProbesAnalysis().trend_metrics(results["per_checkpoint"][ids[0]])
    assert trends["probe AUROC answer_correct (best layer)"] == per["layers"][per["best_layer"]]["auroc"]
    assert "probe selectivity answer_correct (best layer)" in trends
    # a rerun is served from the cache
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "cached" in again.stderr
    # probing only before </think>: every probed row is one, and the features are reused
    end = tmp_path / "probes-end"
    only = CliRunner().invoke(app, [*args[:args.index("--out") + 1], str(end), *args[args.index("--out") + 2:],
                                    "--at", "before_think_end", "--targets", "answer_correct"])
    assert only.exit_code == 0, only.output
    res_end = json.loads((end / "results.json").read_text())["per_checkpoint"][ids[0]]
    assert res_end["at"] == ["before_think_end"]
    r_end = res_end["targets"]["answer_correct"]
    assert 0 < r_end["n_rows"] <= res_end["n_contexts"] < per["n_rows"]   # at most one per response
    assert "probed at: before_think_end" in (end / "summary.md").read_text()


def test_module_entry_point_one_line_user_errors(tmp_path, registry_path, tiny_ckpt):
    from train.registry import Checkpoint, Registry

    py = [sys.executable, "-m", "probes"]
    missing = subprocess.run(py + ["run", "--registry", str(tmp_path / "none.yaml")], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: registry {tmp_path / 'none.yaml'} does not exist"]
    Registry(registry_path).add(Checkpoint(id="x", path=str(tiny_ckpt)))
    bad = subprocess.run(py + ["run", "--registry", str(registry_path), "--targets", "answer_correct,bogus"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "unknown probe target(s) bogus" in bad.stderr
    bad_at = subprocess.run(py + ["run", "--registry", str(registry_path), "--at", "before_think_end,middle"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad_at.returncode == 2
    assert len(bad_at.stderr.strip().splitlines()) == 1 and "unknown decision-point kind(s) middle" in bad_at.stderr
