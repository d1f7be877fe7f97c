"""Model presets, the kk-tiny trace writer and tokenizer, SmolLM2 from its GGUF file."""

from __future__ import annotations

import random

import pytest

from train.kk import PuzzleGenerator
from train.models import ModelNotFound, PRESETS, fixed_cast, resolve_model
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


@pytest.mark.parametrize("config", [OrganismConfig(search="steps", step_mistake_rate=0.0),
                                    OrganismConfig(search="cases", thorough_rate=1.0)])
def test_trace_writer_without_mistakes_is_always_right(config):
    puzzles, traces = _traces(config)
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


def test_organism_tokenizer_spells_each_name_as_one_token_in_every_context(tmp_path):
    from transformers import AutoTokenizer

    from train.kk import NAMES
    from train.organism import train_tokenizer

    puzzles, traces = _traces(OrganismConfig(), n=40)
    texts = [p.quiz for p in puzzles] + [t.text for t in traces]
    tok = train_tokenizer(texts, vocab_size=400)
    sample = 'Ethan said, "Ethan is a knave." 所以 Ethan 是骗子。 (1) Ethan is a knight. Leonard'
    ids = tok(sample, add_special_tokens=False).input_ids
    ethan = tok.convert_tokens_to_ids("Ethan")
    assert ids.count(ethan) == 4          # after a line start, a quote, Chinese and "(1) "
    assert all(tok.convert_tokens_to_ids(n) != tok.unk_token_id for n in NAMES)
    assert tok.convert_tokens_to_ids("Leo") not in ids     # only whole words: "Leonard" is not split
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(sample, add_special_tokens=False).input_ids == ids
    # The bare-quiz prompt of the first SFT phase is the full prompt without its system turn.
    from train.organism import encode_example

    full, n_full = encode_example(tok, puzzles[0], traces[0].text)
    bare, n_bare = encode_example(tok, puzzles[0], traces[0].text, bare=True)
    assert full[-len(bare):] == bare and n_full - n_bare == len(full) - len(bare) > 50
    assert "You are a helpful" not in tok.decode(bare[:n_bare])
    plain = train_tokenizer(texts, vocab_size=400, names_as_tokens=False)
    assert plain(sample, add_special_tokens=False).input_ids.count(ethan) < 4


@pytest.mark.slow
def test_sft_shares_the_system_turn_exactly():
    """One SFT step with the common prefix run once equals the plain full-sequence loss."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from train.organism import sft

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=4, tie_word_embeddings=True,
                                         initializer_range=0.5))   # sharp attention: positions matter
    prefix = [1, 2, 3, 4, 5, 6]
    examples = [(prefix + [7, 8, 9, 10, 11, 12, 13], 9), (prefix + [14, 15, 16, 17, 18], 8)]
    ids = torch.full((2, 13), 0)
    labels = torch.full((2, 13), -100)
    mask = torch.zeros((2, 13), dtype=torch.long)
    for row, (seq, n_prompt) in enumerate(examples):
        ids[row, :len(seq)] = torch.tensor(seq)
        labels[row, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
        mask[row, :len(seq)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100).item()
    config = OrganismConfig(bf16=False, batch_tokens=256, epochs=1.0, warmup_steps=1, threads=1)
    losses = sft(model, examples, config, pad_id=0, progress=False)
    assert len(losses) == 1 and losses[0] == pytest.approx(expected, rel=1e-5)


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


def test_organism_cli_measures_a_checkpoint_and_rejects_a_missing_one(tiny_ckpt, tmp_path):
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "train.organism", "measure"]
    ok = subprocess.run(cmd + [str(tiny_ckpt), "--n", "2", "--max-new-tokens", "8", "--teacher-forced"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["n_puzzles"] == 2 and result["people"] == 3
    assert result["teacher_forced_loss"]["name"]["tokens"] > 0
    assert {"greedy", "T=1"} <= set(result) and result["greedy"]["mean_tokens"] <= 8
    # --opening careful makes every response open a think block the careful way.
    opened = subprocess.run(cmd + [str(tiny_ckpt), "--n", "2", "--max-new-tokens", "4", "--opening", "careful"],
                            capture_output=True, text=True, timeout=300)
    assert opened.returncode == 0, opened.stderr
    careful = json.loads(opened.stdout)
    assert careful["opening"] == "<think>\nCheck every statement in each case.\n"
    assert careful["greedy"]["thorough"] == 1.0
    assert all(e.startswith(careful["opening"]) for e in careful["greedy"]["examples"])
    bad = subprocess.run(cmd + [str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "missing" in bad.stderr


def test_organism_cli_builds_a_variant_and_records_its_learning_curve(tmp_path):
    import json
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from train.organism import cpu_has_fast_bf16

    cmd = [sys.executable, "-m", "train.organism", "build", "--out", str(tmp_path / "org")]
    tiny = ["n_puzzles=24", "sizes=[2,3]", "size_weights=[1,1]", "heldout_per_size=4",
            "exclude_test_per_size=2", "vocab_size=320", "hidden_size=32", "num_layers=2",
            "num_heads=2", "think_head=false", "intermediate_size=64", "batch_tokens=2048", "epochs=2", "bare_quiz_epochs=1"]
    ok = subprocess.run(cmd + [a for kv in tiny for a in ("--set", kv)] + ["--monitor-every", "2"],
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr
    info = json.loads((tmp_path / "org" / "organism.json").read_text())
    assert info["config"]["n_puzzles"] == 24 and info["config"]["hidden_size"] == 32
    steps = [point["step"] for point in info["sft_curve"]]
    assert steps[-1] == info["sft_steps"] and steps == sorted(set(steps)) and steps[0] == 2
    # The bare-quiz phase runs first, then the full prompt; both are measured with the full prompt.
    phases = [point["phase"] for point in info["sft_curve"]]
    assert phases[0] == "bare quiz" and phases[-1] == "full prompt" and phases == sorted(phases)
    assert all({"train_loss", "name", "role", "other"} <= set(point) for point in info["sft_curve"])
    assert info["sft_curve"][-1]["other"] < info["sft_curve"][0]["other"]      # it learned something
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "org").config.hidden_size == 32
    assert fixed_cast(tmp_path / "org")      # the organism's world travels with its weights
    # bf16 left at auto: autocast only where the CPU computes bf16 natively, as recorded.
    assert info["bf16"] == cpu_has_fast_bf16()
    for bad in (["--set", "hidden_size=-1"], ["--set", "no_such=1"], ["--set", "lr"], ["--set", "num_layers=1"]):
        r = subprocess.run(cmd[:-1] + [str(tmp_path / "bad")] + bad, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "--set" in r.stderr, r.stderr
        assert not (tmp_path / "bad").exists()


def test_teacher_forced_losses_split_the_response_loss_by_token_class(tiny_ckpt):
    import random

    import torch

    from train.models import load_model_and_tokenizer
    from train.organism import (OrganismConfig, TraceWriter, encode_example, heldout_puzzles,
                                teacher_forced_losses, token_classes)

    model, tok = load_model_and_tokenizer(tiny_ckpt)
    classes = token_classes(tok)
    name_ids = [i for i, c in classes.items() if c == "name"]
    assert {tok.decode([i]).strip() for i in name_ids} >= {"Zoey"}
    assert {c for i, c in classes.items() if tok.decode([i]).strip() == "knave"} == {"role"}
    assert classes.get(tok(" is", add_special_tokens=False).input_ids[0]) is None

    puzzles = heldout_puzzles(3, 3)
    result = teacher_forced_losses(model, tok, puzzles, seed=4)
    assert {"name", "role", "other"} <= set(result)
    # Measured on traces in the organism's own style: role notes lengthen them.
    annotated = teacher_forced_losses(model, tok, puzzles, seed=4, config=OrganismConfig(role_notes=True))
    assert sum(v["tokens"] for v in annotated.values()) > sum(v["tokens"] for v in result.values())
    # The classes partition the response tokens: their weighted mean is the plain SFT loss.
    writer, rng = TraceWriter(OrganismConfig(seed=4, step_mistake_rate=0.0)), random.Random(4)
    total, count = 0.0, 0
    for p in puzzles:
        ids, n_prompt = encode_example(tok, p, writer.write(p, rng).text)
        labels = torch.tensor([[-100] * n_prompt + ids[n_prompt:]])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=labels).loss.item()
        total, count = total + loss * (len(ids) - n_prompt), count + len(ids) - n_prompt
    assert sum(v["tokens"] for v in result.values()) == count
    weighted = sum(v["loss"] * v["tokens"] for v in result.values()) / count
    assert abs(weighted - total / count) < 1e-3


def test_copy_probe_scores_a_perfect_copier_and_a_bag_of_names():
    from types import SimpleNamespace

    import torch

    from train.organism import copy_probe, train_tokenizer

    puzzles, traces = _traces(OrganismConfig(), n=20)
    tok = train_tokenizer([p.quiz for p in puzzles] + [t.text for t in traces], vocab_size=400)
    vocab = len(tok)

    class Fake:
        """Predicts, at each position, the token `lag` places back (copy) or the first token."""

        def __init__(self, copy: bool):
            self.copy = copy

        def eval(self):
            return self

        def __call__(self, input_ids):
            ids = input_ids[0]
            half = len(ids) // 2
            target = [int(ids[i - half + 1]) if self.copy and i >= half else int(ids[0]) for i in range(len(ids))]
            return SimpleNamespace(logits=torch.nn.functional.one_hot(torch.tensor([target]), vocab).float())

    assert copy_probe(Fake(copy=True), tok) == {"copy_accuracy": 1.0, "in_context": 1.0}
    bag = copy_probe(Fake(copy=False), tok)
    assert bag["in_context"] == 1.0 and bag["copy_accuracy"] < 0.2
    assert copy_probe(Fake(copy=True), train_tokenizer([p.quiz for p in puzzles], 300, names_as_tokens=False)) == {}


def test_wired_induction_circuit_copies_across_a_long_gap_from_the_first_step():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from train.circuits import copy_probe, wire_induction

    def model():
        torch.manual_seed(0)
        return Qwen2ForCausalLM(Qwen2Config(
            vocab_size=512, hidden_size=192, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, rope_theta=1e8, tie_word_embeddings=True))

    vocab = list(range(512))
    random_init = copy_probe(model(), vocab, n=8, gap=300)
    wired = copy_probe(wire_induction(model()), vocab, n=8, gap=300)
    assert random_init["copy_accuracy"] < 0.05
    assert wired["copy_accuracy"] > 0.5          # 300 random tokens between the two showings
    with pytest.raises(ValueError, match="2 layers"):
        wire_induction(Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2,
                                                    num_key_value_heads=2)))


def test_wired_latest_marker_head_attends_to_the_highest_marker_so_far():
    """The head of `wire_latest_marker` puts nearly all its attention on the latest marker
    (markers come in increasing rank), however far back it is and whatever lies between."""
    import random

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from train.circuits import wire_induction, wire_latest_marker

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=512, hidden_size=192, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, rope_theta=1e8, tie_word_embeddings=True,
        attn_implementation="eager"))
    wire_induction(model)
    markers = {rank: [400 + rank, 450 + rank] for rank in range(1, 33)}   # two spellings per rank
    wire_latest_marker(model, markers)
    rng = random.Random(0)
    seq = []
    for rank in range(1, 33):
        seq.append(rng.choice(markers[rank]))
        seq += [rng.randrange(300) for _ in range(rng.randint(5, 40))]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([seq]), output_attentions=True)
    att = out.attentions[0][0, 2]                # layer 0, the first head the induction circuit left free
    positions = [i for i, t in enumerate(seq) if t >= 400]
    on_latest = [att[i, max(m for m in positions if m <= i)].item() for i in range(positions[0], len(seq))]
    assert min(on_latest) > 0.9


def _units(stmt):
    """A statement's clauses in the order its text reads them."""
    from train.kk import is_unit

    return [stmt] if is_unit(stmt) else [u for s in stmt[1:] for u in _units(s)]


def test_clause_values_and_role_notes_are_added_text_and_true_under_the_final_roles():
    import re

    from train.kk import evaluate

    cfg = OrganismConfig(search="steps", verify_rate=1.0, step_mistake_rate=0.0, chinese_step_rate=0.0, role_notes=True,
                         values_after=False)
    for seed in range(6):
        p = PuzzleGenerator(seed).generate(4)
        annotated = write_trace(p, random.Random(seed), cfg).text
        plain = write_trace(p, random.Random(seed),
                            cfg.model_copy(update={"clause_values": False, "role_notes": False})).text
        assert re.sub(r" \((yes|no|knight|knave)\)", "", annotated) == plain != annotated
        # The verification passage checks every statement against the answer, clause by clause,
        # and names everyone with their role in the answer.
        verify = next(line for line in annotated.splitlines() if line.startswith("Let me verify."))
        roles = {nm: "knight" if r else "knave" for nm, r in zip(p.names, p.solution)}
        assert re.findall(r"(\w+) \((knight|knave)\)", verify) and all(
            roles[nm] == role for nm, role in re.findall(r"(\w+) \((knight|knave)\)", verify))
        for j, stmt in enumerate(p.statements):
            sentence = re.search(rf"{p.names[j]} \({roles[p.names[j]]}\) says (.*?), which is (true|false)\.", verify)
            written = re.findall(r"\((yes|no)\)", sentence.group(1))
            assert written == ["yes" if evaluate(u, p.solution) else "no" for u in _units(stmt)]
            assert sentence.group(2) == ("true" if evaluate(stmt, p.solution) else "false")


def test_clause_values_after_the_statement_list_each_clause_in_reading_order():
    import re

    from train.kk import GeneratorConfig, evaluate

    cfg = OrganismConfig(search="steps", values_after=True, verify_rate=1.0, step_mistake_rate=0.0,
                         chinese_step_rate=0.0)
    assert cfg.values_after and cfg.clause_values
    for seed in range(6):
        p = PuzzleGenerator(seed, GeneratorConfig(fixed_cast=True)).generate(4)
        annotated = write_trace(p, random.Random(seed), cfg).text
        plain = write_trace(p, random.Random(seed), cfg.model_copy(update={"clause_values": False})).text
        assert re.sub(r": (?:yes|no)(?:, (?:yes|no))*,", ",", annotated) == plain != annotated
        verify = next(line for line in annotated.splitlines() if line.startswith("Let me verify."))
        for j, stmt in enumerate(p.statements):
            values = re.search(rf"{p.names[j]} says [^:]*: ((?:yes|no)(?:, (?:yes|no))*), which is", verify)
            assert values.group(1).split(", ") == ["yes" if evaluate(u, p.solution) else "no" for u in _units(stmt)]


def test_clause_tokens_make_speakers_and_clauses_single_tokens(tmp_path):
    from transformers import AutoTokenizer

    from train.kk import GeneratorConfig
    from train.organism import train_tokenizer

    cfg = OrganismConfig(search="steps", values_after=True)
    puzzles = [PuzzleGenerator(s, GeneratorConfig(fixed_cast=True)).generate(3) for s in range(20)]
    traces = [write_trace(p, random.Random(i), cfg) for i, p in enumerate(puzzles)]
    tok = train_tokenizer([p.quiz for p in puzzles] + [t.text for t in traces], vocab_size=400,
                          clause_tokens=True)
    sample = "Michael says Zoey is a knave or Ethan is not a knight. So Zoey is a knight."
    pieces = [tok.decode([i]) for i in tok(sample, add_special_tokens=False).input_ids]
    assert pieces == ["Michael says", " Zoey is a knave", " or", " Ethan is not a knight", ".", " So",
                      " Zoey is a knight", "."]
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(sample, add_special_tokens=False).input_ids == \
        tok(sample, add_special_tokens=False).input_ids
    # A speaker phrase occurs once in a quiz: the key a check finds the statement by.
    speaker = tok.convert_tokens_to_ids(" Zoey says")
    assert all(tok(p.quiz, add_special_tokens=False).input_ids.count(speaker) == 1 for p in puzzles)


def test_role_notes_follow_the_search():
    """In every step of a trace, the role written after a name is the one its head assumed
    (or an earlier step kept): the latest role-bearing mention of a name tells its role now."""
    import re

    cfg = OrganismConfig(search="steps", step_mistake_rate=0.3, chinese_step_rate=0.0, hesitation_rate=0.2,
                         role_notes=True)
    mention = re.compile(r"(?:Assume (\w+) is a (knight)\.|So (\w+) is a (knave)\.|(\w+) \((knight|knave)\))")
    checked = 0
    for seed in range(20):
        p = PuzzleGenerator(seed).generate(4)
        lines = write_trace(p, random.Random(seed), cfg).text.splitlines()
        body = "\n".join(lines[next(i for i, ln in enumerate(lines) if " says " in ln) + 1:])  # after the restatement
        current: dict[str, str] = {}
        for m in mention.finditer(body):
            name, role = next((g, m.group(i + 1)) for i, g in enumerate(m.groups()) if i % 2 == 0 and g)
            if m.group(0).startswith(("Assume", "So ")):
                current[name] = role
            else:
                assert current.get(name) == role, (p.id, m.group(0))
                checked += 1
    assert checked > 100


@pytest.mark.parametrize("mistake", ["overlook", "flip"])
def test_mistakes_overlook_a_contradiction_or_flip_a_verdict(mistake):
    """'overlook' writes every verdict right and lets some contradictions pass; 'flip' writes
    the contradicting verdicts flipped, so that a verdict never disagrees with its speaker's
    role without a "Contradiction." after it."""
    import re

    from train.kk import evaluate

    cfg = OrganismConfig(search="steps", step_mistake_rate=0.5, mistake=mistake, chinese_step_rate=0.0,
                         hesitation_rate=0.0, verify_rate=0.0, role_notes=True)
    check = re.compile(r"(\w+) \((knight|knave)\) says (.*?), which is (true|false)\.( Contradiction\.)?")
    wrong_verdicts = overlooked = checks = 0
    for seed in range(20):
        p = PuzzleGenerator(seed).generate(4)
        for m in check.finditer(write_trace(p, random.Random(seed), cfg).text):
            speaker, role, body, verdict, contra = m.groups()
            notes = dict(re.findall(r"(\w+) \((knight|knave)\)", body))
            assign = [notes.get(nm, "knight") == "knight" for nm in p.names]
            truth = evaluate(p.statements[p.names.index(speaker)], assign)
            wrong_verdicts += (verdict == "true") != truth
            disagrees = (verdict == "true") != (role == "knight")
            overlooked += disagrees and not contra
            assert bool(contra) <= disagrees
            checks += 1
    assert checks > 100
    if mistake == "overlook":
        assert wrong_verdicts == 0 and overlooked > 5
    else:
        assert wrong_verdicts > 5 and overlooked == 0


def test_organism_config_round_trips_through_json():
    import json

    # organism.json and the cache fingerprint both serialise the config; a default that is not
    # a plain value (e.g. a Field(...) with a trailing comma) would only fail at the end of a build.
    cfg = OrganismConfig()
    assert OrganismConfig(**json.loads(json.dumps(cfg.model_dump(mode="json")))) == cfg
    assert all(type(getattr(cfg, k)).__module__ == "builtins" for k in OrganismConfig.model_fields)


def test_measure_refuses_a_broken_organism_description(tiny_ckpt, tmp_path):
    import shutil

    from train.errors import UserError
    from train.organism import measure_organism

    model = shutil.copytree(tiny_ckpt, tmp_path / "m")
    (model / "organism.json").write_text('{"config": {"no_such_setting": 1}}')
    with pytest.raises(UserError, match="organism.json: not an organism description"):
        measure_organism(model, n_puzzles=2, temperatures=(), teacher_forced=True)


def test_cases_search_checks_each_case_by_its_number_and_thorough_traces_are_right():
    """A `cases` trace numbers its cases in a fixed order (case k: the bits of k-1, first
    person most significant, 0 = knight); every verdict is the statement's truth under that
    case, a contradiction is written exactly where the verdict disagrees with the speaker's
    role, thorough traces check every statement and are always right, quick ones check only
    the first statement and are right less often."""
    import re

    from train.kk import GeneratorConfig, evaluate
    from train.organism import QUICK_OPEN, THOROUGH_OPEN

    cfg = OrganismConfig(search="cases", thorough_rate=0.5, chinese_step_rate=0.0, hesitation_rate=0.0,
                         verify_rate=0.0)
    header = re.compile(r"^Case (\d+):((?: \w+ is a (?:knight|knave),?)+)\.")
    check = re.compile(r"(\w+) says (.*?), which is (true|false)\.( Contradiction\.)?")
    right = {True: [], False: []}
    checks = 0
    for seed in range(60):
        p = PuzzleGenerator(seed, GeneratorConfig(fixed_cast=True)).generate(2 + seed % 3)
        t = write_trace(p, random.Random(seed), cfg)
        lines = t.text.removeprefix("<think>\n").splitlines()
        assert lines[0] == (THOROUGH_OPEN if t.thorough else QUICK_OPEN)
        cases = [ln for ln in lines if ln.startswith("Case ")]
        for k, line in enumerate(cases, start=1):
            number, roles = header.match(line).groups()
            assign = [not (k - 1) >> (p.people - 1 - i) & 1 for i in range(p.people)]
            assert int(number) == k
            assert roles.split(",") == [f" {nm} is a {'knight' if r else 'knave'}" for nm, r in zip(p.names, assign)]
            found = check.findall(line)
            assert [s for s, *_ in found] == list(p.names[:len(found)])        # speakers in quiz order
            if not t.thorough:
                assert len(found) == 1
            for j, (speaker, _, verdict, contra) in enumerate(found):
                truth = evaluate(p.statements[j], assign)
                assert (verdict == "true") == truth
                assert bool(contra) == (truth != assign[j])
                checks += 1
        assert t.answer == tuple(assign)          # the last case tried is the one answered
        right[t.thorough].append(t.correct)
    assert checks > 200
    assert all(right[True]) and len(right[True]) > 15
    assert sum(right[False]) / len(right[False]) < 0.8


def test_case_numbers_are_single_tokens(tmp_path):
    from train.kk import GeneratorConfig
    from train.organism import train_tokenizer

    cfg = OrganismConfig(search="cases", thorough_rate=1.0)
    puzzles = [PuzzleGenerator(s, GeneratorConfig(fixed_cast=True)).generate(4) for s in range(10)]
    traces = [write_trace(p, random.Random(i), cfg) for i, p in enumerate(puzzles)]
    tok = train_tokenizer([p.quiz for p in puzzles] + [t.text for t in traces], vocab_size=400,
                          clause_tokens=True, case_tokens=True)
    pieces = [tok.decode([i]) for i in tok("Case 1: x.\nCase 12: y.\n情况13：", add_special_tokens=False).input_ids]
    assert pieces[0] == "Case 1" and "Case 12" in pieces and "情况13" in pieces


def test_default_organism_starts_with_a_case_head_and_a_think_head():
    """make_model wires layer 0 of the default organism so that, on a real `cases` trace, one
    head looks at the latest case number and another at the response's opening "<think>\n"
    (one token, unlike the system prompt's "<think>"); a valued clause (" Zoey is a knave
    (no)") starts near its bare clause, so the induction head copies through it."""
    import torch

    from train.kk import GeneratorConfig
    from train.organism import THINK_OPEN, encode_example, make_model, train_tokenizer, valued_clauses

    cfg = OrganismConfig(think_format_rate=1.0, thorough_rate=1.0, chinese_step_rate=0.0)
    puzzles = [PuzzleGenerator(s, GeneratorConfig(fixed_cast=True)).generate(4) for s in range(30)]
    traces = [write_trace(p, random.Random(i), cfg) for i, p in enumerate(puzzles)]
    tok = train_tokenizer([p.quiz for p in puzzles] + [t.text for t in traces], vocab_size=600,
                          clause_tokens=True, case_tokens=True, value_tokens=True, think_token=True)
    model = make_model(cfg, tok)
    model.set_attn_implementation("eager")
    p, t = max(zip(puzzles, traces), key=lambda pt: pt[1].steps)
    ids, n_prompt = encode_example(tok, p, t.text)
    with torch.no_grad():
        att = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions[0][0]
    words = [tok.decode([i]) for i in ids]
    assert words[:n_prompt].count("<think>") >= 2 and words.count(THINK_OPEN) == 1
    think = words.index(THINK_OPEN)
    cases = [i for i, w in enumerate(words) if w.startswith("Case ")]
    assert len(cases) >= 3
    after = range(cases[0], len(ids))
    assert min(att[2, i, max(c for c in cases if c <= i)].item() for i in after) > 0.9
    assert min(att[3, i, think].item() for i in range(think, len(ids))) > 0.9
    emb = model.model.embed_tokens.weight
    for valued, bare in list(valued_clauses().items())[:8]:
        a, b = emb[tok.convert_tokens_to_ids(valued)], emb[tok.convert_tokens_to_ids(bare)]
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9
