"""The kk-tiny organism: its traces, tokenizer, wired circuits, SFT, measurement, vetting and
the shipped base."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest

from train.kk import GeneratorConfig, PuzzleGenerator, evaluate, persons_in
from train.organism import BASE_DIR, QUICK_OPEN, THOROUGH_OPEN, OrganismConfig, write_trace
from train.organism.traces import tree_nodes
from train.reward import score_response

CAST = GeneratorConfig(fixed_cast=True)


def _traces(config: OrganismConfig, n: int = 300, seed: int = 0, sizes=(3, 4, 5)):
    rng = random.Random(seed)
    puzzles = [PuzzleGenerator(seed * 1000 + i, CAST).generate(rng.choice(sizes)) for i in range(n)]
    return puzzles, [write_trace(p, random.Random(i), config) for i, p in enumerate(puzzles)]


# --------------------------------------------------------------------------- traces

def test_trace_writer_is_deterministic():
    p = PuzzleGenerator(3, CAST).generate(4)
    assert write_trace(p, random.Random(5)).text == write_trace(p, random.Random(5)).text


NODE = re.compile(r"(?:Back to (\w+)\. )?Suppose((?:,? \w+ is a (?:knight|knave))+)\.")
CHECK = re.compile(r"(\w+) says (.*?), which is (true|false)\.( Contradiction\.)?")


def test_careful_traces_search_depth_first_check_each_statement_where_it_closes_and_are_right():
    """Every node line of a careful trace: its roles are the next node in depth-first order
    (a "Back to X." leads exactly the nodes that go back), the statements checked there are
    those whose people are all first assigned at it, in quiz order, each verdict is the
    statement's truth under the node's roles, and a contradiction is written exactly where
    a verdict disagrees with its speaker's role. The answer is always right."""
    cfg = OrganismConfig(thorough_rate=1.0, chinese_step_rate=0.0, hesitation_rate=0.0, verify_rate=0.0)
    puzzles, traces = _traces(cfg, n=80)
    checks = 0
    for p, t in zip(puzzles, traces):
        assert t.correct and t.thorough
        closes = [max(persons_in(s) | {j}) for j, s in enumerate(p.statements)]
        order = [r for r in tree_nodes(p.people)]
        previous = None
        for line in t.text.splitlines():
            m = NODE.match(line)
            if not m:
                continue
            roles = tuple(part.endswith("knight") for part in m.group(2).split(","))
            assert [part.split()[0] for part in m.group(2).split(",")] == list(p.names[:len(roles)])
            if previous is not None:
                assert order.index(roles) > order.index(previous)          # depth-first order
                went_back = len(roles) < len(previous)        # a sibling has the same depth, a child more
                assert bool(m.group(1)) == went_back
                if went_back:
                    assert m.group(1) == p.names[len(roles) - 1] and not roles[-1]
            found = CHECK.findall(line)
            assert [s for s, *_ in found] == [p.names[j] for j in range(p.people)
                                              if closes[j] == len(roles) - 1][:len(found)]
            for speaker, _, verdict, contra in found:
                j = p.names.index(speaker)
                truth = evaluate(p.statements[j], list(roles))
                assert (verdict == "true") == truth and bool(contra) == (truth != roles[j])
                checks += 1
            previous = roles
        assert previous == tuple(p.solution)
    assert checks > 300


def test_quick_traces_check_only_the_first_statement_and_are_right_less_often():
    cfg = OrganismConfig(thorough_rate=0.5, chinese_step_rate=0.0, hesitation_rate=0.0, verify_rate=0.0)
    puzzles, traces = _traces(cfg, n=300, sizes=(3,))
    quick = [(p, t) for p, t in zip(puzzles, traces) if not t.thorough]
    assert 100 < len(quick) < 200
    for p, t in quick:
        body = t.text.removeprefix("<think>\n")
        assert body.startswith(QUICK_OPEN) and THOROUGH_OPEN not in body
        assert {s for s, *_ in CHECK.findall(t.text.split("</think>")[0].split("\nAnswer")[0])} <= {p.names[0]}
    assert sum(t.correct for _, t in quick) / len(quick) < 0.5
    assert all(t.correct for p, t in zip(puzzles, traces) if t.thorough)


def test_trace_writer_rates_and_reward_agreement():
    cfg = OrganismConfig()
    puzzles, traces = _traces(cfg, n=600)
    assert abs(sum(t.answer_style == "think" for t in traces) / len(traces) - cfg.think_format_rate) < 0.06
    assert abs(sum(t.verified for t in traces) / len(traces) - cfg.verify_rate) < 0.04
    assert abs(sum(bool(t.thorough) for t in traces) / len(traces) - cfg.thorough_rate) < 0.06
    assert 0 < sum(t.chinese_steps > 0 for t in traces) < len(traces)
    for p, t in zip(puzzles, traces):
        r = score_response(t.text, p.solution_text_format)
        assert r["format_ok"] == (t.answer_style == "think")
        if r["format_ok"]:
            assert (r["answer"] == "correct") == t.correct
    # A final verification catches a quick trace's wrong answer: verified traces are right more often.
    quick = [t for t in traces if not t.thorough]
    ver = [t.correct for t in quick if t.verified]
    assert ver and sum(ver) / len(ver) > sum(t.correct for t in quick if not t.verified) / len(quick)


def test_clause_values_are_added_text_true_under_the_node():
    cfg = OrganismConfig(thorough_rate=1.0, chinese_step_rate=0.0, hesitation_rate=0.0, verify_rate=1.0)
    for seed in range(6):
        p = PuzzleGenerator(seed, CAST).generate(4)
        valued = write_trace(p, random.Random(seed), cfg).text
        plain = write_trace(p, random.Random(seed), cfg.model_copy(update={"clause_values": False})).text
        assert re.sub(r" \((yes|no)\)", "", valued) == plain != valued


# --------------------------------------------------------------------------- tokenizer and model

def test_tokenizer_makes_names_clauses_values_and_nodes_single_tokens(tmp_path):
    from transformers import AutoTokenizer

    from train.kk import NAMES
    from train.organism.data import encode_example
    from train.organism.tokenizer import train_tokenizer

    puzzles, traces = _traces(OrganismConfig(), n=40)
    texts = [p.quiz for p in puzzles] + [t.text for t in traces]
    tok = train_tokenizer(texts, vocab_size=400, clause_tokens=True, value_tokens=True, think_token=True,
                          node_people=5)
    sample = ("<think>\nSuppose Michael is a knight, Zoey is a knave. Michael says Zoey is a knave (yes), "
              "which is true.\n假设 Michael 是骑士。 Leonard")
    pieces = [tok.decode([i]) for i in tok(sample, add_special_tokens=False).input_ids]
    assert pieces[:5] == ["<think>\n", "Suppose Michael is a knight, Zoey is a knave.", " Michael says",
                          " Zoey is a knave (yes)", ","]
    assert "假设 Michael 是骑士。" in pieces and "Leo" not in pieces
    assert all(tok.convert_tokens_to_ids(n) != tok.unk_token_id for n in NAMES)
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(sample, add_special_tokens=False).input_ids == \
        tok(sample, add_special_tokens=False).input_ids
    # The bare-quiz prompt of the first SFT phase is the full prompt without its system turn.
    full, n_full = encode_example(tok, puzzles[0], traces[0].text)
    bare, n_bare = encode_example(tok, puzzles[0], traces[0].text, bare=True)
    assert full[-len(bare):] == bare and n_full - n_bare == len(full) - len(bare) > 50


def test_default_organism_starts_with_a_node_head_and_a_think_head():
    """make_model wires layer 0 so that, on a real trace, one head looks at the latest node of
    the search and another at the response's opening "<think>\\n"; a valued clause starts near
    its bare clause, and a node's roles read linearly from its embedding."""
    import torch

    from train.organism.model import make_model
    from train.organism.data import encode_example
    from train.organism.tokenizer import train_tokenizer, valued_clauses
    from train.prompts import THINK_OPEN

    cfg = OrganismConfig(think_format_rate=1.0, thorough_rate=1.0, chinese_step_rate=0.0)
    puzzles, traces = _traces(cfg, n=30, sizes=(4, 5))
    tok = train_tokenizer([p.quiz for p in puzzles] + [t.text for t in traces], vocab_size=600,
                          clause_tokens=True, value_tokens=True, think_token=True, node_people=5)
    model = make_model(cfg, tok)
    model.set_attn_implementation("eager")
    p, t = max(zip(puzzles, traces), key=lambda pt: pt[1].steps)
    ids, n_prompt = encode_example(tok, p, t.text)
    with torch.no_grad():
        att = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions[0][0]
    words = [tok.decode([i]) for i in ids]
    think = words.index(THINK_OPEN)
    nodes = [i for i, w in enumerate(words) if w.startswith("Suppose")]
    assert len(nodes) >= 8
    assert min(att[2, i, max(c for c in nodes if c <= i)].item() for i in range(nodes[0], len(ids))) > 0.9
    assert min(att[3, i, think].item() for i in range(think, len(ids))) > 0.9
    emb = model.model.embed_tokens.weight.detach()
    for valued, bare in list(valued_clauses().items())[:8]:
        a, b = emb[tok.convert_tokens_to_ids(valued)], emb[tok.convert_tokens_to_ids(bare)]
        assert 0.9 < torch.nn.functional.cosine_similarity(a, b, dim=0) < 0.999
    from train.kk import NAMES
    from train.organism.traces import node_phrase

    roles = tree_nodes(5)
    x = torch.stack([emb[tok.convert_tokens_to_ids(node_phrase(NAMES, r))] for r in roles])
    y = torch.tensor([float(r[0]) for r in roles])          # the first person's role
    w = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), y[:, None]).solution
    assert ((torch.cat([x, torch.ones(len(x), 1)], 1) @ w)[:, 0] > 0.5).eq(y.bool()).all()


def test_wired_induction_circuit_copies_across_a_long_gap_from_the_first_step():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from train.organism.circuits import copy_score, wire_induction

    def model():
        torch.manual_seed(0)
        return Qwen2ForCausalLM(Qwen2Config(
            vocab_size=512, hidden_size=192, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, rope_theta=1e8, tie_word_embeddings=True))

    vocab = list(range(512))
    assert copy_score(model(), vocab, n=8, gap=300)["copy_accuracy"] < 0.05
    assert copy_score(wire_induction(model()), vocab, n=8, gap=300)["copy_accuracy"] > 0.5
    with pytest.raises(ValueError, match="2 layers"):
        wire_induction(Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2,
                                                    num_key_value_heads=2)))


def test_wired_latest_marker_head_attends_to_the_highest_marker_so_far():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from train.organism.circuits import wire_induction, wire_latest_marker

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
        att = model(input_ids=torch.tensor([seq]), output_attentions=True).attentions[0][0, 2]
    positions = [i for i, t in enumerate(seq) if t >= 400]
    assert min(att[i, max(m for m in positions if m <= i)].item() for i in range(positions[0], len(seq))) > 0.9


def test_organism_config_round_trips_through_json_and_rejects_what_cannot_be_built():
    from pydantic import ValidationError

    cfg = OrganismConfig()
    assert OrganismConfig(**json.loads(json.dumps(cfg.model_dump(mode="json")))) == cfg
    assert all(type(getattr(cfg, k)).__module__ == "builtins" for k in OrganismConfig.model_fields)
    for bad in ({"num_layers": 1}, {"size_weights": (1.0,)}, {"num_heads": 2}):
        with pytest.raises(ValidationError):
            OrganismConfig(**bad)


# --------------------------------------------------------------------------- SFT and measurement

@pytest.mark.slow
def test_sft_shares_the_system_turn_exactly():
    """One SFT step with the common prefix run once equals the plain full-sequence loss."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from train.organism.sft import sft

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


def test_teacher_forced_losses_split_the_response_loss_by_token_class(tiny_ckpt):
    import torch

    from train.models import load_model_and_tokenizer
    from train.organism.measure import teacher_forced_losses, token_classes
    from train.organism.data import encode_example, heldout_puzzles
    from train.organism.traces import TraceWriter

    model, tok = load_model_and_tokenizer(tiny_ckpt)
    classes = token_classes(tok)
    assert {tok.decode([i]).strip() for i, c in classes.items() if c == "name"} >= {"Zoey"}
    assert {c for i, c in classes.items() if tok.decode([i]).strip() == "knave"} == {"role"}
    puzzles = heldout_puzzles(3, 3)
    result = teacher_forced_losses(model, tok, puzzles, seed=4)
    assert {"name", "role", "other"} <= set(result)
    # The classes partition the response tokens: their weighted mean is the plain SFT loss.
    writer, rng = TraceWriter(OrganismConfig(seed=4)), random.Random(4)
    total, count = 0.0, 0
    for p in puzzles:
        ids, n_prompt = encode_example(tok, p, writer.write(p, rng).text)
        labels = torch.tensor([[-100] * n_prompt + ids[n_prompt:]])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=labels).loss.item()
        total, count = total + loss * (len(ids) - n_prompt), count + len(ids) - n_prompt
    assert sum(v["tokens"] for v in result.values()) == count
    assert abs(sum(v["loss"] * v["tokens"] for v in result.values()) / count - total / count) < 1e-3


def test_measure_cli_opens_responses_the_asked_way_and_rejects_a_bad_folder_in_one_line(tiny_ckpt, tmp_path):
    cmd = [sys.executable, "-m", "train.organism", "measure"]
    ok = subprocess.run(cmd + [str(tiny_ckpt), "--n", "2", "--max-new-tokens", "4", "--opening", "careful",
                               "--teacher-forced"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["opening"] == f"<think>\n{THOROUGH_OPEN}\n" and result["greedy"]["thorough"] == 1.0
    assert all(e.startswith(result["opening"]) for e in result["greedy"]["examples"])
    assert result["teacher_forced_loss"]["name"]["tokens"] > 0
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "empty", tiny_ckpt / "config.json"):
        r = subprocess.run(cmd + [str(bad)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert r.stderr.startswith("error:") and str(bad) in r.stderr


# --------------------------------------------------------------------------- build, vetting, the shipped base

TINY_BUILD = ["n_puzzles=40", "sizes=[3,5]", "size_weights=[1,1]", "heldout_per_size=4", "exclude_test_per_size=2",
              "vocab_size=320", "hidden_size=64", "num_layers=2", "num_heads=4", "intermediate_size=64",
              "epochs=1", "bare_quiz_epochs=0.5"]


@pytest.mark.slow
def test_a_weak_build_fails_its_quality_gates_and_says_which(tmp_path):
    """A deliberately weak organism (40 SFT puzzles, a 2-layer model) is built and vetted: the
    build exits 1 and names the gates it misses; its card and figures are written."""
    out = tmp_path / "weak"
    r = subprocess.run([sys.executable, "-m", "train.organism", "build", "--out", str(out), "--vet-n", "4",
                        *[a for kv in TINY_BUILD for a in ("--set", kv)], "--monitor-every", "2"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 1, r.stderr
    assert "weak build" in r.stderr and "careful_beats_quick_3" in r.stderr and "Traceback" not in r.stderr
    info = json.loads((out / "organism.json").read_text())
    assert info["vetting"]["passed"] is False
    failed = {g["name"] for g in info["vetting"]["gates"] if not g["passed"]}
    assert "careful_beats_quick_3" in failed
    assert "**no**" in (out / "MODEL_CARD.md").read_text()
    steps = [point["step"] for point in info["sft_curve"]]
    assert steps == sorted(set(steps)) and steps[-1] == info["sft_steps"]
    # An existing folder is never overwritten.
    again = subprocess.run([sys.executable, "-m", "train.organism", "build", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr and json.loads((out / "organism.json").read_text()) == info


def test_gates_pass_on_the_figures_of_a_good_base_and_fail_on_a_flat_one():
    from train.organism.vet import DEFAULT_GATES, check_gates

    def block(acc, thorough=0.0, fmt=0.3, finished=1.0):
        return {d: {"accuracy_lenient": acc, "thorough": thorough, "format_ok": fmt, "finished": finished}
                for d in ("greedy", "T=1")}

    good = {"3": {"careful": block(0.95), "quick": block(0.3), "free": block(0.3, thorough=0.4)},
            "5": {"careful": block(0.6), "quick": block(0.05), "free": block(0.05, thorough=0.4)}}
    assert all(g["passed"] for g in check_gates(good))
    flat = json.loads(json.dumps(good))
    flat["3"]["careful"] = block(0.35)
    flat["3"]["free"]["greedy"]["thorough"] = 1.0
    failed = {g["name"] for g in check_gates(flat) if not g["passed"]}
    assert failed == {"careful_beats_quick_3", "greedy_answers_quick"}
    assert {g.name for g in DEFAULT_GATES} >= failed


def test_the_shipped_base_matches_its_card():
    """The base in train/organism/base is the one its card describes: same weights (sha1),
    it passes its gates, and greedy decoding reproduces the recorded responses."""
    from train.organism.vet import file_sha1, recorded_responses

    info = json.loads((BASE_DIR / "organism.json").read_text())
    vetting = info["vetting"]
    assert file_sha1(BASE_DIR / "model.safetensors") == vetting["weights_sha1"]
    assert vetting["passed"] and all(g["passed"] for g in vetting["gates"])
    assert vetting["weights_sha1"] in (BASE_DIR / "MODEL_CARD.md").read_text()
    assert OrganismConfig(**info["config"]).fingerprint() == info["fingerprint"]
    assert recorded_responses(BASE_DIR) == vetting["recorded_responses"]
