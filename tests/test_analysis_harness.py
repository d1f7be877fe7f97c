"""The checkpoint harness, verify-token probability and reports, on tiny random checkpoints."""

from __future__ import annotations

import gc
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import train.generate as generate_mod
from analysis import harness
from analysis.behaviours import BehavioursAnalysis
from analysis.cache import ResultCache, safe_id
from analysis.harness import (Analysis, AnalysisContext, GenerationConfig, HarnessConfig, HarnessError, PuzzleSetConfig,
                              analyse_checkpoints, get_analysis, load_model, puzzle_set,
                              tokenizer_identity)
from analysis.selection import parse_steps, select_checkpoints
from analysis.verify_prob import (DecisionPoint, VerifyProbAnalysis, bootstrap_ci, build_fixed_contexts,
                                  decision_points, logit_lens, phrase_logprobs, token_sets)
from tests.conftest import REPO
from train.errors import UserError
from train.registry import Checkpoint, Registry

A_ID, B_ID = "tiny/stage1/step-000010", "tiny/stage2/step-000020"
# Sampling makes the random models write words, so their own generations have decision points.
SMALL = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(3, 4), per_size=2),
                      generation=GenerationConfig(max_new_tokens=24, temperature=1.0, seed=3))


def make_registry(path: Path, a: Path, b: Path, extra: list[Checkpoint] = ()) -> Registry:
    reg = Registry(path)
    reg.add(Checkpoint(id=A_ID, path=str(a), run="tiny", stage="stage1", global_step=10))
    reg.add(Checkpoint(id=B_ID, path=str(b), run="tiny", stage="stage2", global_step=20))
    for ck in extra:
        reg.add(ck)
    return reg


@pytest.fixture
def reg(tiny_ckpt_pair, registry_path) -> Registry:
    return make_registry(registry_path, *tiny_ckpt_pair)


class Counting(Analysis):
    """Counts its runs; reads the model and the generations."""

    name = "test_counting"
    title = "Counting"
    uses_generations = True
    calls = 0

    def run(self, ctx):
        type(self).calls += 1
        return {"n": len(ctx.generations), "layers": len(ctx.hf_model.model.layers)}

    def trend_metrics(self, result):
        return {"generations": result["n"]}


@pytest.fixture
def counters(monkeypatch):
    """Count generate() calls and model loads; register the Counting analysis."""
    counts = {"generate": 0, "load": 0}
    real_generate, real_load = generate_mod.generate, harness.load_model

    def counting_generate(*args, **kwargs):
        counts["generate"] += 1
        return real_generate(*args, **kwargs)

    def counting_load(*args, **kwargs):
        counts["load"] += 1
        return real_load(*args, **kwargs)

    monkeypatch.setattr(generate_mod, "generate", counting_generate)
    monkeypatch.setattr(harness, "load_model", counting_load)
    monkeypatch.setitem(harness._ANALYSES, Counting.name, Counting)
    Counting.calls = 0
    return counts


def context_for(reg: Registry, ck_id: str, cache: ResultCache, config: HarnessConfig = SMALL) -> AnalysisContext:
    ck = reg.get(ck_id)
    path = reg.resolve(ck)
    lm, tok = load_model(path, ckpt_id=ck.id)
    return AnalysisContext(checkpoint=ck, path=path, model=lm, tokenizer=tok, puzzles=puzzle_set(config.puzzles),
                           config=config, cache=cache, fingerprint=harness.weights_fingerprint(path))


# --------------------------------------------------------------------------- selection

def test_select_by_run_stage_steps_every_and_ids(reg):
    assert [c.id for c in select_checkpoints(reg)] == [A_ID, B_ID]
    assert [c.id for c in select_checkpoints(reg, stage="stage2")] == [B_ID]
    assert [c.id for c in select_checkpoints(reg, steps="15-")] == [B_ID]
    assert [c.id for c in select_checkpoints(reg, steps=(None, 10))] == [A_ID]
    assert [c.id for c in select_checkpoints(reg, run="tiny", every=5)] == [A_ID, B_ID]   # the last always
    assert [c.id for c in select_checkpoints(reg, ids=f"{B_ID},{A_ID}")] == [B_ID, A_ID]


@pytest.mark.parametrize("kwargs, message", [
    ({"ids": "nope"}, "unknown checkpoint id"),
    ({"run": "other"}, "no checkpoint matches"),
    ({"steps": "a-b"}, "bad step range"),
    ({"every": 0}, "at least 1"),
])
def test_bad_selection_is_a_user_error(reg, kwargs, message):
    with pytest.raises(UserError, match=message):
        select_checkpoints(reg, **kwargs)


def test_parse_steps():
    assert parse_steps("10-20") == (10, 20) and parse_steps("-5") == (None, 5)
    assert parse_steps("7") == (7, 7) and parse_steps(None) == (None, None)


def test_probe_set_is_fixed_and_the_head_of_evaluations_heldout_set():
    from train.evaluate import EVAL_SEED, heldout_puzzles

    probe = puzzle_set(PuzzleSetConfig(sizes=(3, 5), per_size=3))
    assert [p.people for p in probe] == [3, 3, 3, 5, 5, 5]
    assert [p.id for p in probe] == [p.id for p in puzzle_set(PuzzleSetConfig(sizes=(3, 5), per_size=3))]
    full = heldout_puzzles([3, 5], 10, EVAL_SEED)
    assert [p.id for p in probe] == [p.id for p in full[:3] + full[10:13]]


def test_unknown_analysis_and_bad_options():
    with pytest.raises(HarnessError, match="unknown analysis 'nope'"):
        get_analysis("nope")
    with pytest.raises(HarnessError, match="no such option"):
        get_analysis("verify_prob", colour="red")


# --------------------------------------------------------------------------- caching

def test_a_report_without_analyses_named_leaves_out_the_costly_ones():
    """pass@k (k samples per puzzle), patching (layers x 3 passes per prompt), case tracking
    (layers x (3 + heads) passes per response), steering (alphas x prompts generations) and
    resampling (N continuations per step boundary) run only by name; every other registered
    analysis is in the default set, in report order."""
    from analysis.harness import available_analyses, default_analyses, load_plugins

    load_plugins()
    by_name_only = {n for n, cls in available_analyses().items() if not cls.by_default}
    assert by_name_only == {"passk", "patching", "case_tracking", "steering", "resampling"}
    assert default_analyses() == [n for n in available_analyses() if n not in by_name_only]
    r = subprocess.run([sys.executable, "-m", "analysis", "list"], capture_output=True, text=True, cwd=REPO)
    marked = {line.split()[0] for line in r.stdout.splitlines() if "(by name only)" in line}
    assert r.returncode == 0 and marked == by_name_only


def test_rerun_computes_nothing(reg, tmp_path, counters):
    cache = ResultCache(tmp_path / "cache")
    analyses = [Counting(), BehavioursAnalysis()]
    cks = select_checkpoints(reg)
    first = analyse_checkpoints(reg, cks, analyses, cache=cache, config=SMALL)
    assert [o.error for o in first] == [None, None]
    assert [o.computed for o in first] == [["test_counting", "behaviours"]] * 2
    assert (Counting.calls, counters["generate"], counters["load"]) == (2, 2, 2)

    second = analyse_checkpoints(reg, cks, analyses, cache=cache, config=SMALL)
    assert (Counting.calls, counters["generate"], counters["load"]) == (2, 2, 2)   # nothing at all
    assert [o.computed for o in second] == [[], []]
    assert [o.results for o in second] == [o.results for o in first]
    assert second[0].results["test_counting"] == {"n": 4, "layers": 2}

    # A generation-only analysis with new parameters reuses the cached generations and
    # does not even load the model.
    again = analyse_checkpoints(reg, cks, [BehavioursAnalysis(n_examples=1)], cache=cache, config=SMALL)
    assert [o.computed for o in again] == [["behaviours"]] * 2
    assert (counters["generate"], counters["load"]) == (2, 2)


def test_generations_are_keyed_by_decoding_settings(reg, tmp_path, counters):
    cache = ResultCache(tmp_path / "cache")
    cks = select_checkpoints(reg, ids=A_ID)
    analyse_checkpoints(reg, cks, [Counting()], cache=cache, config=SMALL)
    longer = HarnessConfig(puzzles=SMALL.puzzles, generation=GenerationConfig(max_new_tokens=30, temperature=1.0, seed=3))
    analyse_checkpoints(reg, cks, [Counting()], cache=cache, config=longer)
    assert counters["generate"] == 2 and Counting.calls == 2


def test_model_is_freed_after_each_checkpoint(reg, tmp_path, monkeypatch):
    refs = []

    class Remember(Analysis):
        name = "test_remember"

        def run(self, ctx):
            refs.append(weakref.ref(ctx.hf_model))
            return {}

    analyse_checkpoints(reg, select_checkpoints(reg), [Remember()], cache=ResultCache(tmp_path / "c"), config=SMALL)
    gc.collect()
    assert len(refs) == 2 and all(r() is None for r in refs)


def test_evaluation_generations_are_reused(reg, tmp_path, counters):
    from analysis.evaluate import evaluate_checkpoint
    from train.evaluate import EvalConfig

    cache = ResultCache(tmp_path / "cache")
    ck = reg.get(A_ID)
    evaluate_checkpoint(reg, ck, EvalConfig(people=[3, 4], n_per_size=3, max_new_tokens=16), cache, progress=False)
    assert counters["generate"] == 1
    config = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(3, 4), per_size=2), generation=GenerationConfig(max_new_tokens=16))
    (out,) = analyse_checkpoints(reg, [ck], [BehavioursAnalysis()], cache=cache, config=config)
    assert out.error is None and counters["generate"] == 1
    key = harness.generation_params(harness.weights_fingerprint(reg.resolve(ck)), config)
    gens = cache.get(A_ID, harness.GENERATIONS, key)
    assert [g["source"] for g in gens] == ["evaluation"] * 4
    assert [g["puzzle_id"] for g in gens] == [p.id for p in puzzle_set(config.puzzles)]


# --------------------------------------------------------------------------- bad checkpoints

@pytest.fixture
def bad_registry(tiny_ckpt_pair, tmp_path) -> Registry:
    a, b = tiny_ckpt_pair
    corrupt = tmp_path / "corrupt"
    shutil.copytree(a, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(a, mismatched)
    from tests.tokenizer_fixture import tiny_tokenizer

    tiny_tokenizer(vocab_size=900).save_pretrained(mismatched)
    return make_registry(tmp_path / "ckpts.yaml", a, b, extra=[
        Checkpoint(id="bad/missing", path=str(tmp_path / "nowhere"), run="tiny", stage="stage2", global_step=30),
        Checkpoint(id="bad/corrupt", path=str(corrupt), run="tiny", stage="stage2", global_step=40),
        Checkpoint(id="bad/mismatched", path=str(mismatched), run="tiny", stage="stage2", global_step=50),
    ])


def test_bad_checkpoints_fail_alone_in_one_line(bad_registry, tmp_path, counters):
    cache = ResultCache(tmp_path / "cache")
    outcomes = analyse_checkpoints(bad_registry, select_checkpoints(bad_registry), [Counting(), BehavioursAnalysis()],
                                   cache=cache, config=SMALL)
    errors = {o.checkpoint.id: o.error for o in outcomes}
    assert errors[A_ID] is None and errors[B_ID] is None
    assert "does not exist" in errors["bad/missing"]
    assert "cannot load the weights" in errors["bad/corrupt"]
    assert "tokenizer has" in errors["bad/mismatched"] and "do not belong together" in errors["bad/mismatched"]
    for ck_id in ("bad/missing", "bad/corrupt", "bad/mismatched"):
        assert errors[ck_id].startswith(ck_id + ": ") and "\n" not in errors[ck_id]
        assert not (cache.root / safe_id(ck_id)).exists()      # nothing cached for it
        assert outcomes[[o.checkpoint.id for o in outcomes].index(ck_id)].results == {}
    assert Counting.calls == 2


def test_cli_reports_bad_checkpoints_and_exits_1(bad_registry, tmp_path):
    from typer.testing import CliRunner

    from analysis.cli import app

    result = CliRunner().invoke(app, ["report", "--registry", str(bad_registry.path), "--out", str(tmp_path / "rep"),
                                      "--cache", str(tmp_path / "cache"), "--analyses", "behaviours",
                                      "--puzzle-sizes", "3", "--puzzles-per-size", "1", "--max-new-tokens", "4"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 3
    assert {line.split()[1].rstrip(":") for line in lines} == {"bad/missing", "bad/corrupt", "bad/mismatched"}
    index = (tmp_path / "rep" / "index.md").read_text()
    assert "3 failed" in index and (tmp_path / "rep" / f"{safe_id(A_ID)}.html").exists()


def test_module_entry_point_help_and_one_line_user_error(tmp_path, registry_path, tiny_ckpt):
    env_py = [sys.executable, "-m", "analysis"]
    help_run = subprocess.run(env_py + ["--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "report" in help_run.stdout and "eval" in help_run.stdout
    Registry(registry_path).add(Checkpoint(id="x", path=str(tiny_ckpt)))
    bad = subprocess.run(env_py + ["report", "--registry", str(registry_path), "--ids", "nope"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: {registry_path}: unknown checkpoint id(s): nope"]
    # An out-of-range option value is a usage error (exit 2, no traceback), not a crash.
    zero = subprocess.run(env_py + ["report", "--registry", str(registry_path), "--every", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert zero.returncode == 2 and "Traceback" not in zero.stderr and "--every" in zero.stderr


# --------------------------------------------------------------------------- verify-token probability

def test_fixed_contexts_are_identical_token_ids_for_every_checkpoint(reg, tmp_path):
    cache = ResultCache(tmp_path / "cache")
    seen = []
    for ck_id in (A_ID, B_ID):
        ctx = context_for(reg, ck_id, cache)
        seen.append(VerifyProbAnalysis().fixed_contexts(ctx))
        assert tokenizer_identity(ctx.tokenizer) == tokenizer_identity(context_for(reg, A_ID, cache).tokenizer)
    assert seen[0] == seen[1]
    assert len(list((cache.root / harness.SHARED_CACHE_ID).glob("verify_prob_contexts-*.json"))) == 1
    kinds = {k for c in seen[0] for p in c["points"] for k in p["kinds"]}
    assert kinds == {"step_start", "before_think_end", "after_conclusion"}
    assert all(sum("before_think_end" in p["kinds"] for p in c["points"]) == 1 for c in seen[0])


def test_decision_points_sit_before_the_chosen_tokens(tiny_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    prompt_ids = tok("Question?", add_special_tokens=False)["input_ids"]
    response = "<think>If Zoey is a knight, fine. So Zoey is a knave. Done\n</think><answer>x</answer>"
    ids, points = decision_points(prompt_ids, response, tok)
    by_kind = {k: [p.pos for p in points if k in p.kinds]
               for k in ("step_start", "before_think_end", "after_conclusion")}
    assert tok.decode(ids[by_kind["before_think_end"][0] + 1]) == "</think>"
    (concl,) = by_kind["after_conclusion"]                     # the hypothesis "If Zoey ..." is not one
    assert tok.decode(ids[:concl + 1]).endswith("So Zoey is a knave.")
    starts = [tok.decode(ids[p + 1:p + 3]).strip() for p in by_kind["step_start"]]
    assert [s[:2] for s in starts] == ["If", "So", "Do"]


def test_logit_lens_last_layer_equals_model_softmax(reg, tmp_path):
    ctx = context_for(reg, A_ID, ResultCache(tmp_path / "cache"))
    ctx_rec = build_fixed_contexts(ctx.tokenizer, ctx.puzzles[:1], "chat")[0]
    ids, positions = ctx_rec["ids"], [p["pos"] for p in ctx_rec["points"]]
    sets = token_sets(ctx.tokenizer)
    assert sets["verify"] and sets["control"]
    readout = logit_lens(ctx.model, ids, positions, sets)
    hf = ctx.hf_model
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    probs = out.logits[0, positions].float().softmax(-1)
    for name, idx in sets.items():
        np.testing.assert_allclose(readout.masses[name][-1], probs[:, idx].sum(-1).numpy(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(readout.final_logits, out.logits[0, positions].float())
    # An earlier layer: final norm + unembedding of that layer's output.
    with torch.no_grad():
        early = hf.lm_head(hf.model.norm(out.hidden_states[1][0, positions])).float().softmax(-1)
    np.testing.assert_allclose(readout.masses["verify"][0], early[:, sets["verify"]].sum(-1).numpy(), rtol=1e-5)


def test_phrase_logprobs_equal_teacher_forcing_from_scratch(reg, tmp_path):
    ctx = context_for(reg, B_ID, ResultCache(tmp_path / "cache"))
    rec = build_fixed_contexts(ctx.tokenizer, ctx.puzzles[:1], "chat")[0]
    points = [DecisionPoint(pos=p["pos"], kinds=tuple(p["kinds"]), lead=p["lead"]) for p in rec["points"]][:5]
    phrases = ["Let me verify", "Wait", "验证一下"]
    phrase_ids = {lead: [ctx.tokenizer(lead + ph, add_special_tokens=False)["input_ids"] for ph in phrases]
                  for lead in {p.lead for p in points}}
    readout = logit_lens(ctx.model, rec["ids"], [p.pos for p in points], {"verify": [1]}, keep_cache=True)
    got = phrase_logprobs(ctx.hf_model, readout, points, phrase_ids)
    for i, p in enumerate(points):
        for j, seq in enumerate(phrase_ids[p.lead]):
            full = torch.tensor([rec["ids"][:p.pos + 1] + seq])
            with torch.no_grad():
                logp = ctx.hf_model(full).logits[0].float().log_softmax(-1)
            want = sum(float(logp[p.pos + k, seq[k]]) for k in range(len(seq)))
            assert got[i, j] == pytest.approx(want, abs=1e-4)


def test_verify_prob_analysis_result_and_trends(reg, tmp_path):
    cache = ResultCache(tmp_path / "cache")
    (out,) = analyse_checkpoints(reg, select_checkpoints(reg, ids=A_ID), [VerifyProbAnalysis(n_boot=200)],
                                 cache=cache, config=SMALL)
    assert out.error is None
    r = out.results["verify_prob"]
    assert r["n_layers"] == 2 and r["verify_tokens"]
    for src in ("fixed", "own"):
        assert r[src]["n_contexts"] == 4
    d = r["fixed"]["verify"]["before_think_end"]
    assert len(d["mean"]) == 2 and d["n_puzzles"] == 4
    assert all(lo <= m <= hi for lo, m, hi in zip(d["lo"], d["mean"], d["hi"]))
    assert r["own"]["n_points"]["all"] > 0
    trends = VerifyProbAnalysis().trend_metrics(r)
    assert trends["verify-token prob (fixed contexts)"] == r["fixed"]["verify"]["all"]["mean"][-1]
    assert "verify-token prob (fixed contexts)@lo" in trends
    md, figs = VerifyProbAnalysis().report_section(r)
    assert "before_think_end" in md and len(figs) == 1


def test_bootstrap_ci_contains_the_mean_and_is_seeded():
    rng = np.random.default_rng(1)
    values = rng.normal(0.3, 0.1, size=40)
    mean, lo, hi = bootstrap_ci(values, seed=7)
    assert lo < mean < hi and mean == pytest.approx(values.mean())
    assert bootstrap_ci(values, seed=7) == (mean, lo, hi)
    assert bootstrap_ci(values, seed=8)[1] != lo
    wide = bootstrap_ci(values, seed=7, level=0.99)
    assert wide[1] <= lo and wide[2] >= hi
    m2, lo2, hi2 = bootstrap_ci(np.stack([values, 2 * values], axis=1), seed=7)
    assert m2.shape == (2,) and np.all(lo2 <= m2) and np.all(m2 <= hi2)
    assert bootstrap_ci([0.5]) == (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------- reports

def test_report_pages_and_index_with_trends(reg, tmp_path):
    from typer.testing import CliRunner

    from analysis.cli import app
    from analysis.report import stage_boundaries, trend_figure, trend_frame

    out = tmp_path / "rep"
    args = ["report", "--registry", str(reg.path), "--out", str(out), "--cache", str(tmp_path / "cache"),
            "--puzzle-sizes", "3,4", "--puzzles-per-size", "2", "--max-new-tokens", "24", "--temperature", "1.0",
            "--analyses", "behaviours,verify_prob", "--set", "verify_prob.n_boot=100"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + result.stderr
    for ck_id in (A_ID, B_ID):
        page = (out / f"{safe_id(ck_id)}.html").read_text()
        assert page.count("data:image/png;base64,") == 2
        assert "Reasoning behaviours" in page and "Verify-token probability" in page and ck_id in page
        md = (out / f"{safe_id(ck_id)}.md").read_text()
        assert "## Reasoning behaviours" in md and "## Verify-token probability" in md
        for link in md.split("](")[1:]:
            target = link.split(")")[0]
            if target.startswith("figures/"):
                assert (out / target).exists()
    index_md = (out / "index.md").read_text()
    assert f"[{A_ID}]({safe_id(A_ID)}.md)" in index_md and "figures/trends.png" in index_md
    assert "data:image/png;base64," in (out / "index.html").read_text()

    import pandas as pd

    trends = pd.read_csv(out / "trends.csv")
    verify = trends[trends["metric"] == "verify-token prob (fixed contexts)"]
    assert list(verify["global_step"]) == [10, 20] and verify["lo"].notna().all()
    assert {"accuracy", "verification frequency"} <= set(trends["metric"])

    # The same outcomes again from the cache: one line per run in every panel, and the
    # stage change at step 20 drawn as a vertical line.
    config = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(3, 4), per_size=2),
                           generation=GenerationConfig(max_new_tokens=24, temperature=1.0))
    analyses = [BehavioursAnalysis(), VerifyProbAnalysis(n_boot=100)]
    outcomes = analyse_checkpoints(reg, select_checkpoints(reg), analyses, cache=ResultCache(tmp_path / "cache"),
                                   config=config)
    assert all(o.computed == [] for o in outcomes)
    frame = trend_frame(outcomes, analyses)
    assert stage_boundaries(outcomes) == [("tiny", 20, "stage2")]
    fig = trend_figure(frame, stage_boundaries(outcomes))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == frame["metric"].nunique()
    for ax in panels:
        data_lines = [ln for ln in ax.lines if ln.get_label() == "tiny"]
        assert len(data_lines) == 1 and list(data_lines[0].get_xdata()) == [10, 20]
        assert any(list(ln.get_xdata()) == [20, 20] for ln in ax.lines)   # stage boundary


def test_the_probe_world_follows_the_checkpoints_and_refuses_a_mix(tiny_ckpt_pair, tmp_path):
    from analysis.selection import SelectionError, checkpoints_cast
    from tests.conftest import fixed_cast_copy
    from train.kk import NAMES

    fixed = fixed_cast_copy(tiny_ckpt_pair[0], tmp_path / "fixed")
    reg = make_registry(tmp_path / "ckpts.yaml", fixed, tiny_ckpt_pair[1],
                        extra=[Checkpoint(id="gone", path=str(tmp_path / "gone"), run="x", stage="base",
                                          global_step=0)])
    cks = {ck.id: ck for ck in reg.checkpoints()}
    assert checkpoints_cast(reg, [cks[A_ID], cks["gone"]]) is True      # a missing folder fails later
    assert checkpoints_cast(reg, [cks[B_ID]]) is False
    with pytest.raises(SelectionError, match="mixes fixed-cast checkpoints"):
        checkpoints_cast(reg, [cks[A_ID], cks[B_ID]])
    probe = puzzle_set(PuzzleSetConfig(sizes=(3, 5), per_size=2, fixed_cast=True))
    assert [p.names for p in probe] == [NAMES[:3]] * 2 + [NAMES[:5]] * 2
