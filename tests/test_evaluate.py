"""Evaluation: pass@k, held-out sets, batched generation, aggregation, caching, the eval command
and the published comparison."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import sys
from fractions import Fraction

import pytest
import torch
import typer
from typer.testing import CliRunner

import train.generate as gen
from analysis.cache import ResultCache, safe_id
from analysis.evaluate import (ANALYSIS, PUBLISHED, comparison_figure, comparison_markdown, comparison_table,
                               eval_command, evaluate_checkpoint, load_generations)
from train.evaluate import (EVAL_SEED, EvalConfig, EvalError, eval_puzzles, evaluate_model, heldout_puzzles,
                            mean_at_k, pass_at_k, summarize, training_keys)
from train.generate import (GenerationError, GenerationOut, generate, prompt_reward_config, render_prompts,
                            resolve_backend)
from tests.conftest import SHARED_KK
from train.data import build, generate_split
from train.errors import UserError
from train.registry import Checkpoint, Registry
from train.reward import DEFAULT, score_response


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The machine is shared with training runs: one thread is plenty for a tiny model.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return _load(tiny_ckpt)


@pytest.fixture(scope="module")
def sharp(tiny_ckpt):
    """The tiny model with its weights scaled up: its greedy text varies from step to step
    (the unscaled random model repeats one token), so order and batching bugs would show."""
    model, tok = _load(tiny_ckpt)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model, tok


@pytest.fixture(scope="module")
def puzzles():
    return heldout_puzzles([2, 3, 5], 2)


# --------------------------------------------------------------------------- pass@k

def test_pass_at_k_matches_enumeration_of_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))  # items 0..c-1 are correct
                brute = sum(any(i < c for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_and_bad_input():
    exact = 1 - Fraction(math.comb(200 - 7, 50), math.comb(200, 50))
    assert pass_at_k(200, 7, 50) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(10**6, 1, 1) == pytest.approx(1e-6, rel=1e-9)
    assert pass_at_k(5, 0, 5) == 0.0 and pass_at_k(5, 1, 5) == 1.0
    for bad in ((3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    assert mean_at_k(4, 1) == 0.25
    with pytest.raises(ValueError):
        mean_at_k(0, 0)


# --------------------------------------------------------------------------- held-out sets

def test_heldout_sets_are_deterministic_and_are_the_eval_seed_test_split():
    a = heldout_puzzles([2, 3, 4], 15)
    b = heldout_puzzles([2, 3, 4], 15)
    assert [p.id for p in a] == [p.id for p in b]
    assert [p.people for p in a] == [2] * 15 + [3] * 15 + [4] * 15
    assert EVAL_SEED != 0  # the default training seed
    for n in (2, 3, 4):
        split = generate_split(n, 0, 15, seed=EVAL_SEED)["test"]
        assert [p.id for p in split] == [p.id for p in a if p.people == n]
    assert [p.id for p in heldout_puzzles([2], 15, seed=EVAL_SEED + 1)] != [p.id for p in a[:15]]


def test_heldout_sets_exclude_a_training_set(tmp_path):
    root = tmp_path / "kk"
    build(root, [2, 3], n_train=200, n_test=10, seed=0, progress=False)
    keys = training_keys(root)
    direct = generate_split(2, 200, 10, seed=0)["train"] + generate_split(3, 200, 10, seed=0)["train"]
    assert keys == {p.content_key for p in direct}
    # Small puzzles collide often: without the exclusion, training puzzles would be evaluated.
    plain = heldout_puzzles([2, 3], 30)
    assert any(p.content_key in keys for p in plain)
    config = EvalConfig(people=[2, 3], n_per_size=30, train_data=root)
    held = eval_puzzles(config)
    assert len(held) == 60 and not {p.content_key for p in held} & keys
    assert [p.id for p in eval_puzzles(config)] == [p.id for p in held]
    assert [p.id for p in heldout_puzzles([2, 3], 30, exclude=keys)] == [p.id for p in held]
    with pytest.raises(EvalError, match="train.parquet"):
        training_keys(tmp_path / "nothing")


@pytest.mark.skipif(not (SHARED_KK / "3ppl" / "test.parquet").exists(), reason="reference data not present")
def test_external_reference_sets_skip_missing_sizes():
    config = EvalConfig(people=[2, 3], n_per_size=5, external=SHARED_KK)
    got = eval_puzzles(config)
    assert [p.people for p in got] == [3] * 5


def test_config_validation():
    with pytest.raises(ValueError, match="sampled"):
        EvalConfig(mode="greedy", k=4)
    with pytest.raises(ValueError):
        EvalConfig(people=[1])
    cfg = EvalConfig(mode="sampled", k=4, batch_size=3)
    assert cfg.generation_kwargs["temperature"] == 1.0 and cfg.generation_kwargs["num_samples"] == 4
    assert EvalConfig().generation_kwargs["temperature"] == 0.0
    # Batch size does not change results, so it is not part of the cache key.
    assert cfg.cache_params() == EvalConfig(mode="sampled", k=4).cache_params()


# --------------------------------------------------------------------------- generation

def test_render_prompts_chat_and_raw(tiny, puzzles):
    _, tok = tiny
    chat = render_prompts(tok, puzzles, "chat")
    raw = render_prompts(tok, puzzles, "raw")
    assert all(c.endswith("<|im_start|>assistant\n") and p.quiz in c for c, p in zip(chat, puzzles))
    assert all(r == c + "<think>" for r, c in zip(raw, chat))
    assert prompt_reward_config("raw").prefilled_think and not prompt_reward_config("chat").prefilled_think
    reply = f" reasoning </think><answer>{puzzles[0].solution_text_format}</answer>"
    assert score_response(reply, puzzles[0].solution_text_format, prompt_reward_config("raw"))["score"] == 3
    with pytest.raises(GenerationError):
        render_prompts(tok, puzzles, "plain")


def test_greedy_generation_is_deterministic_batch_independent_and_matches_hf(sharp, puzzles):
    model, tok = sharp
    prompts = render_prompts(tok, puzzles)
    kw = dict(max_new_tokens=12, progress=False)
    a = generate(model, tok, prompts, batch_size=4, **kw)
    assert len(a) == len(prompts) and all(len(o) == 1 for o in a)
    assert generate(model, tok, prompts, batch_size=4, **kw) == a
    assert generate(model, tok, prompts, batch_size=1, **kw) == a
    assert generate(model, tok, prompts[::-1], batch_size=3, **kw)[::-1] == a
    assert len({o[0].text for o in a}) == len(a)  # varied output, so the comparisons mean something
    for i in (0, len(prompts) - 1):  # same tokens as transformers' own greedy search
        enc = tok(prompts[i], return_tensors="pt", add_special_tokens=False)
        ref = model.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc.input_ids.shape[1]:]
        out = a[i][0]
        assert list(out.token_ids) == ref.tolist() and out.n_tokens == len(ref)
        assert out.text == tok.decode(ref, skip_special_tokens=True)
    repeated = generate(model, tok, prompts[:2], num_samples=3, **kw)
    assert repeated == [[x[0]] * 3 for x in a[:2]]


def test_sampled_generation_is_seeded_and_independent_of_batching(sharp, puzzles):
    model, tok = sharp
    prompts = render_prompts(tok, puzzles)
    kw = dict(max_new_tokens=10, temperature=1.0, num_samples=3, progress=False)
    a = generate(model, tok, prompts, seed=7, batch_size=4, **kw)
    assert [len(o) for o in a] == [3] * len(prompts)
    assert generate(model, tok, prompts, seed=7, batch_size=4, **kw) == a
    assert generate(model, tok, prompts[::-1], seed=7, batch_size=5, **kw)[::-1] == a
    assert generate(model, tok, prompts[1:2], seed=7, batch_size=1, **kw) == a[1:2]
    assert generate(model, tok, prompts, seed=8, batch_size=4, **kw) != a
    assert all(len({s.text for s in samples}) > 1 for samples in a)
    # top_k=1 leaves one candidate: sampling then equals greedy decoding.
    greedy = generate(model, tok, prompts[:3], max_new_tokens=10, progress=False)
    top1 = generate(model, tok, prompts[:3], max_new_tokens=10, temperature=1.0, top_k=1, progress=False)
    assert [o[0].token_ids for o in top1] == [o[0].token_ids for o in greedy]
    nucleus = dict(kw, top_p=0.5, top_k=20)
    assert generate(model, tok, prompts[:2], seed=7, **nucleus) == generate(model, tok, prompts[:2], seed=7, **nucleus)


def test_generation_stops_at_generation_config_eos(tiny_ckpt, puzzles):
    model, tok = _load(tiny_ckpt)
    prompts = render_prompts(tok, puzzles[:3])
    free = generate(model, tok, prompts, max_new_tokens=6, progress=False)
    assert all(o[0].n_tokens == 6 and not o[0].finished for o in free)
    first = free[0][0].token_ids[0]
    model.generation_config.eos_token_id = [tok.eos_token_id, first]
    stopped = generate(model, tok, prompts[:1], max_new_tokens=6, progress=False)[0][0]
    assert stopped == GenerationOut(text="", n_tokens=1, finished=True, token_ids=(first,))


def test_backend_resolution_never_imports_vllm_on_cpu(tiny):
    model, _ = tiny
    assert resolve_backend("auto", model) == "transformers"
    assert resolve_backend("transformers") == "transformers"
    with pytest.raises(GenerationError):
        resolve_backend("tensorrt")
    if "vllm" not in sys.modules and not torch.cuda.is_available():
        resolve_backend("auto", "/some/folder")
        assert "vllm" not in sys.modules
    with pytest.raises(GenerationError):
        generate(model, None, ["x"], max_new_tokens=0)


# --------------------------------------------------------------------------- evaluate_model

def test_evaluate_model_scores_with_the_training_reward(tiny, puzzles):
    model, tok = tiny
    config = EvalConfig(people=[2, 3, 5], n_per_size=2, mode="sampled", k=2, max_new_tokens=12)
    result = evaluate_model(model, tok, puzzles, config)
    df = result.generations
    assert len(df) == len(puzzles) * 2
    assert list(df["sample"]) == [0, 1] * len(puzzles)
    assert list(df["puzzle_id"]) == [p.id for p in puzzles for _ in range(2)]
    for row in df.itertuples():
        scored = score_response(row.text, row.solution_text_format, DEFAULT)
        assert (row.score, row.answer, row.format_ok, row.n_correct_people) == (
            scored["score"], scored["answer"], scored["format_ok"], scored["n_correct_people"])
        assert 1 <= row.n_tokens <= 12
    s = result.summary
    assert s["n_puzzles"] == len(puzzles) and s["sizes"] == [2, 3, 5]
    assert set(s["pass_at_k"]) == {"1", "2"} and set(s["accuracy_by_size"]) == {"2", "3", "5"}
    assert s["mean_response_tokens"] == pytest.approx(df["n_tokens"].mean())


def _planted_generate(puzzles, k, calls):
    """A stand-in for train.generate.generate: puzzle i gets min(i % 4, k) correct answers,
    then alternately a wrong answer and a broken format; sample j is 10 + j tokens long."""
    def wrong(p):
        first, rest = p.solution_text_format.split("\n", 1)
        flipped = first.replace("knight", "KNAVE").replace("knave", "knight").replace("KNAVE", "knave")
        return flipped + "\n" + rest

    def fake(model, tokenizer, prompts, **kw):
        calls.append(kw)
        out = []
        for prompt in prompts:
            i = next(i for i, p in enumerate(puzzles) if p.quiz in prompt)
            p = puzzles[i]
            samples = []
            for j in range(kw["num_samples"]):
                if j < min(i % 4, k):
                    text = f"<think> ok </think> <answer>{p.solution_text_format}</answer>"
                elif j % 2 == 0:
                    text = f"<think> hmm </think><answer>{wrong(p)}</answer>"
                else:
                    text = "I think they are all knights."
                samples.append(GenerationOut(text=text, n_tokens=10 + j, finished=True))
            out.append(samples)
        return out

    return fake


def test_accuracy_per_size_aggregation_is_exact(monkeypatch, tiny):
    _, tok = tiny
    puzzles = heldout_puzzles([2, 3, 4], 5)
    k = 3
    calls: list[dict] = []
    monkeypatch.setattr(gen, "generate", _planted_generate(puzzles, k, calls))
    config = EvalConfig(people=[2, 3, 4], n_per_size=5, mode="sampled", k=k, max_new_tokens=50)
    s = evaluate_model(None, tok, puzzles, config).summary
    assert calls[0]["temperature"] == 1.0 and calls[0]["num_samples"] == k and calls[0]["seed"] == EVAL_SEED

    correct = [min(i % 4, k) for i in range(len(puzzles))]
    broken = [sum(1 for j in range(c, k) if j % 2 == 1) for c in correct]
    for n in (2, 3, 4):
        idx = [i for i, p in enumerate(puzzles) if p.people == n]
        assert s["accuracy_by_size"][str(n)] == pytest.approx(sum(correct[i] for i in idx) / (k * len(idx)))
        for j in range(1, k + 1):
            expect = sum(1 - math.comb(k - correct[i], j) / math.comb(k, j) for i in idx) / len(idx)
            assert s["pass_at_k_by_size"][str(n)][str(j)] == pytest.approx(expect)
    assert s["accuracy"] == pytest.approx(sum(correct) / (k * len(puzzles)))
    assert s["mean_at_k"] == pytest.approx(s["accuracy"]) == pytest.approx(s["pass_at_k"]["1"])
    assert s["format_error_rate"] == pytest.approx(sum(broken) / (k * len(puzzles)))
    assert s["answer_rates"]["wrong"] == pytest.approx(1 - s["accuracy"] - s["format_error_rate"])
    assert s["answer_rates"]["missing"] == pytest.approx(s["format_error_rate"])
    assert s["mean_response_tokens"] == pytest.approx(11.0)
    assert s["truncated_rate"] == 0.0
    # every planted answer is either formatted or has no answer marker: roles-only reading agrees
    assert s["roles_accuracy_by_size"] == pytest.approx(s["accuracy_by_size"])


def test_roles_accuracy_reads_answers_whatever_the_format(tiny):
    import pandas as pd

    sol = "(1) Zoey is a knight\n(2) Ethan is a knave"
    texts = [
        "<think> ok </think><answer>(1) Zoey is a knight (2) Ethan is a knave</answer>",  # both right
        "Zoey is a knave.\nAnswer:\n(1) Zoey is a knight\n(2) Ethan is a knave",       # roles only
        "So the answer is:\n(1) Zoey is a knight\n(2) Ethan is a knight",               # wrong
        "Zoey is a knight and Ethan is a knave.",                                          # no marker
    ]
    frame = pd.DataFrame([{
        "puzzle_id": f"p{i}", "people": 2, "sample": 0, "text": t, "n_tokens": 5, "finished": True,
        **{k: v for k, v in score_response(t, sol).items() if k in ("score", "answer", "format_ok", "n_correct_people")},
        "solution_text_format": sol} for i, t in enumerate(texts)])
    s = summarize(frame, k=1)
    assert s["accuracy"] == pytest.approx(0.25)
    assert s["roles_accuracy"] == pytest.approx(0.5) and s["roles_accuracy_by_size"] == {"2": pytest.approx(0.5)}


# --------------------------------------------------------------------------- checkpoints

@pytest.fixture
def small_config():
    return EvalConfig(people=[2, 3], n_per_size=2, mode="sampled", k=2, max_new_tokens=8)


def test_evaluate_checkpoint_caches_keeps_generations_and_updates_registry(
        tmp_path, tiny_ckpt, registry_path, small_config, monkeypatch):
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "model")
    reg = Registry(registry_path)
    reg.add(Checkpoint(id="tiny/step-1", path=str(ckpt), run="tiny", stage="stage1", global_step=1))
    cache = ResultCache(tmp_path / "cache")
    first = evaluate_checkpoint(reg, reg.get("tiny/step-1"), small_config, cache, progress=False)
    assert first["cached"] is False and first["checkpoint"] == "tiny/step-1"
    assert cache.sidecar("tiny/step-1", ANALYSIS, small_config.cache_params(), ".parquet").exists()

    kept = load_generations(cache, "tiny/step-1", small_config)
    assert len(kept) == 4 * 2 and set(kept["people"]) == {2, 3}
    assert {"puzzle_id", "people", "sample", "text", "n_tokens", "score", "answer", "format_ok"} <= set(kept.columns)
    entry = reg.get("tiny/step-1").eval
    assert entry["accuracy"] == round(first["accuracy"], 4)
    assert set(entry["accuracy_by_size"]) == {"2", "3"} and set(entry["pass_at_k"]) == {"1", "2"}
    assert entry["format_error_rate"] == round(first["format_error_rate"], 4)
    assert entry["mean_response_tokens"] == round(first["mean_response_tokens"], 4)

    def no_generation(*a, **kw):
        raise AssertionError("generated although the result is cached")

    monkeypatch.setattr(gen, "generate", no_generation)
    second = evaluate_checkpoint(reg, reg.get("tiny/step-1"), small_config, cache, progress=False)
    assert second["cached"] is True
    assert {k: v for k, v in second.items() if k != "cached"} == {k: v for k, v in first.items() if k != "cached"}
    # Other settings, or new weights at the same path, are evaluated afresh.
    with pytest.raises(AssertionError, match="cached"):
        evaluate_checkpoint(reg, reg.get("tiny/step-1"), small_config.model_copy(update={"n_per_size": 3}),
                            cache, progress=False)
    weights = ckpt / "model.safetensors"
    os.utime(weights, (weights.stat().st_atime, weights.stat().st_mtime + 100))
    with pytest.raises(AssertionError, match="cached"):
        evaluate_checkpoint(reg, reg.get("tiny/step-1"), small_config, cache, progress=False)
    with pytest.raises(EvalError, match="no kept generations"):
        load_generations(cache, "tiny/step-1", small_config.model_copy(update={"k": 3}))


def _eval_app() -> typer.Typer:
    app = typer.Typer(add_completion=False)
    app.command("eval")(eval_command)

    @app.callback()
    def main() -> None:
        """analysis"""

    return app


def test_eval_command_reports_bad_checkpoints_and_evaluates_the_rest(tmp_path, tiny_ckpt, registry_path):
    good = shutil.copytree(tiny_ckpt, tmp_path / "good")
    corrupt = shutil.copytree(tiny_ckpt, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"these are not weights")
    reg = Registry(registry_path)
    for i, (name, path) in enumerate([("good-a", good), ("missing", tmp_path / "gone"),
                                      ("corrupt", corrupt), ("good-b", good)]):
        reg.add(Checkpoint(id=f"run/{name}", path=str(path), run="run", stage="stage1", global_step=i))
    out, cache = tmp_path / "reports" / "eval", tmp_path / "reports" / "cache"
    result = CliRunner().invoke(_eval_app(), [
        "eval", "--registry", str(registry_path), "--run", "run", "--people", "2-3", "--n-per-size", "2",
        "--max-new-tokens", "6", "--batch-size", "4", "--out", str(out), "--cache", str(cache)])
    assert result.exit_code == 1, result.output
    text = result.output
    failures = [line for line in text.splitlines() if line.startswith("failed:")]
    assert len(failures) == 2
    assert "run/missing" in failures[0] and "gone" in failures[0]
    assert "run/corrupt" in failures[1] and "cannot load" in failures[1]
    report = json.loads((out / "eval.json").read_text())
    assert [r["checkpoint"] for r in report["checkpoints"]] == ["run/good-a", "run/good-b"]
    assert [f["id"] for f in report["failed"]] == ["run/missing", "run/corrupt"]
    assert not (cache / safe_id("run/missing")).exists() and not (cache / safe_id("run/corrupt")).exists()
    assert (cache / safe_id("run/good-a")).is_dir()
    assert reg.get("run/good-b").eval["mode"] == "greedy" and not reg.get("run/corrupt").eval
    md = (out / "comparison.md").read_text()
    assert "run/good-a" in md and "o3-mini-high" in md
    assert (out / "comparison.png").stat().st_size > 10_000


def test_eval_command_bad_options_are_one_line_user_errors(registry_path):
    reg = Registry(registry_path)
    reg.add(Checkpoint(id="x/1", path="x"))
    result = CliRunner().invoke(_eval_app(), ["eval", "--registry", str(registry_path), "--k", "4"])
    assert isinstance(result.exception, UserError) and "sampled" in str(result.exception)
    assert "\n" not in str(result.exception)
    result = CliRunner().invoke(_eval_app(), ["eval", "--registry", str(registry_path), "--steps", "a-b"])
    assert isinstance(result.exception, UserError) and "--steps" in str(result.exception)


# --------------------------------------------------------------------------- published comparison

def test_comparison_table_has_the_published_rows_with_sources(tmp_path):
    ours = {"checkpoint": "kk-tiny/stage3/step-400", "k": 1,
            "config": {"mode": "greedy", "seed": EVAL_SEED, "external": None},
            "accuracy_by_size": {"2": 0.5, "3": 0.25}}
    df = comparison_table([ours])
    published = df[~df["source"].str.startswith("ours")].set_index("model")
    design = {  # DESIGN.md section 2
        "o3-mini-high": (0.99, 0.98, 0.97, 0.95, 0.94, 0.89, 0.83),
        "GPT-4o": (0.68, 0.57, 0.49, 0.32, 0.23, 0.21, 0.11),
        "Qwen2.5-7B-Instruct-1M": (0.49, 0.40, 0.25, 0.11, 0.02, 0.06, 0.01),
        "Qwen2.5-7B-Logic-RL (Logic-RL 7B)": (0.99, 0.99, 0.94, 0.92, 0.91, 0.80, 0.67),
    }
    for model, values in design.items():
        assert tuple(published.loc[model, list(range(2, 9))]) == values
        assert published.loc[model, "source"].startswith("Logic-RL README")
    assert len(published) == len(PUBLISHED) and all(r.source for r in PUBLISHED)
    row = df[df["model"] == "kk-tiny/stage3/step-400"].iloc[0]
    assert row["source"].startswith("ours (greedy") and row[2] == 0.5 and math.isnan(row[4])
    assert row["mean"] == pytest.approx(0.375)
    md = comparison_markdown(df)
    assert "| o3-mini-high | Logic-RL README" in md and "| 0.50 | 0.25 | – |" in md
    assert md.count("\n") == len(df) + 2
    path = comparison_figure(df, tmp_path / "fig" / "comparison.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
