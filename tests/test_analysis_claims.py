"""Claim extraction and grading against hand-labelled traces (tests/claims_traces.yaml),
the solver-backed grading rules on planted cases, the statistics and the report plug-in."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from analysis.claims import (CORRECT, FATES, KINDS, UNGRADEABLE, WRONG, ClaimGrammarError, ClaimsAnalysis,
                             PuzzleTruth, analyse_response, claim_stats, load_grammar)
from train.kk import GeneratorConfig, PuzzleGenerator, evaluate, make_puzzle, parse_statements

DATA = Path(__file__).with_name("claims_traces.yaml")
LABELS = YAML(typ="safe").load(DATA.read_text(encoding="utf-8"))
PUZZLES = {key: make_puzzle(spec["names"], parse_statements(spec["statements"]), rng=random.Random(0))
           for key, spec in LABELS["puzzles"].items()}
TRACES = LABELS["traces"]
_PASSAGE = re.compile(r"(\d+)-(\d+) error=(yes|no) flagged=(yes|no) right=(yes|no|none) hollow=(yes|no)")
_YES = {"yes": True, "no": False, "none": None}


def claim_label(c, names) -> str:
    if c.form in ("contradiction", "consistent"):
        what = ""
    elif c.form == "role":
        what = f" {names[c.person]}={'knight' if c.value else 'knave'}"
    else:
        what = f" {names[c.person]}={'true' if c.value else 'false'}"
    return f"{c.step} {c.kind}{what} {c.grade}"


def passage_label(p) -> str:
    yn = {True: "yes", False: "no", None: "none"}
    return (f"{p.start}-{p.end} error={yn[p.error_before]} flagged={yn[p.flagged]} "
            f"right={yn[p.flag_right]} hollow={yn[p.hollow]}")


def test_labelled_set_is_large_and_varied():
    assert len(TRACES) >= 40
    assert len({t["id"] for t in TRACES}) == len(TRACES)
    chinese = [t for t in TRACES if re.search(r"[\u4e00-\u9fff]", t["text"])]
    organism = [t for t in TRACES if "Suppose" in t["text"] or "假设" in t["text"]]
    assert len(chinese) >= 8 and len(organism) >= 15 and len(TRACES) - len(organism) >= 10
    labels = [c.split()[1] for t in TRACES for c in t["claims"]]
    grades = [c.split()[-1] for t in TRACES for c in t["claims"]]
    assert set(labels) == set(KINDS) and {CORRECT, WRONG, UNGRADEABLE} <= set(grades)
    assert {t["fate"] for t in TRACES} == set(FATES)


@pytest.mark.parametrize("trace", TRACES, ids=[t["id"] for t in TRACES])
def test_claims_and_events_agree_with_labels(trace):
    p = PUZZLES[trace["puzzle"]]
    rc = analyse_response(trace["text"], p)
    assert [claim_label(c, p.names) for c in rc.claims] == trace["claims"]
    first = None if rc.first_wrong is None else f"{rc.first_wrong['step']} {rc.first_wrong['kind']}"
    assert first == trace["first_wrong"]
    assert [passage_label(x) for x in rc.passages] == trace["passages"]
    assert rc.repairs == trace["repairs"]
    assert rc.fate == trace["fate"]


def test_passage_labels_are_well_formed():
    for t in TRACES:
        for p in t["passages"]:
            assert _PASSAGE.fullmatch(p), (t["id"], p)



# --------------------------------------------------------------------------- planted ground truth

def _organism_traces(thorough: float, n: int = 24, seed: int = 3):
    from train.organism.config import OrganismConfig
    from train.organism.traces import write_trace

    config = OrganismConfig(thorough_rate=thorough, verify_rate=0.5, hesitation_rate=0.2, summary_rate=0.5,
                            chinese_step_rate=0.3, clause_values=True)
    gen = PuzzleGenerator(seed, GeneratorConfig(fixed_cast=True))
    rng = random.Random(seed)
    for k in range(n):
        p = gen.generate(3 + k % 3)
        yield p, write_trace(p, rng, config)


def test_a_correct_solver_writes_only_correct_claims():
    """The organism's careful traces are written by a correct search: every claim in them
    is graded correct, every case it approves is the solution, and the answer is clean."""
    n_claims = 0
    for p, trace in _organism_traces(thorough=1.0):
        rc = analyse_response(trace.text, p)
        assert rc.claims and all(c.grade == CORRECT for c in rc.claims), \
            [(c.text, c.grade) for c in rc.claims if c.grade != CORRECT]
        assert rc.fate == "clean" and not any(x.hollow for x in rc.passages)
        n_claims += len(rc.claims)
    assert n_claims > 200


def test_quick_traces_are_wrong_exactly_where_they_approve_a_wrong_case():
    """Quick traces check only the first statement: their clause values and verdicts are
    right, "This case fits." is wrong exactly when the case is not the solution, and the
    summary's roles (graded under no case) exactly where they are not the solution's."""
    seen_wrong = seen_right = 0
    for p, trace in _organism_traces(thorough=0.0):
        rc = analyse_response(trace.text, p)
        fits = [c for c in rc.claims if c.form == "consistent"]
        summary = [c for c in rc.claims if not c.assumption]
        assert fits and all(c.grade == CORRECT for c in rc.claims if c.form != "consistent" and c.assumption)
        for c in summary:
            assert (c.grade == CORRECT) == (p.solution[c.person] == c.value)
        for c in fits:
            assert (c.grade == CORRECT) == (dict(c.assumption) == dict(enumerate(p.solution)))
        assert rc.fate == ("clean" if trace.correct and not rc.n_wrong else
                           "lucky" if trace.correct else "derailed")
        seen_wrong += not trace.correct
        seen_right += trace.correct
    assert seen_wrong and seen_right


def test_grading_agrees_with_brute_force_on_consistent_cases():
    """Under a case some solution extends, a role is correct iff every extending solution
    has it; a statement's verdict iff its value there; a fit verdict iff a solution extends it."""
    from itertools import product

    gen = PuzzleGenerator(11)
    rng = random.Random(5)
    for _ in range(12):
        p = gen.generate(rng.choice((3, 4)))
        truth = PuzzleTruth(p)
        every = [a for a in product((True, False), repeat=p.people)
                 if all(evaluate(s, a) == a[i] for i, s in enumerate(p.statements))]
        for _ in range(10):
            people = rng.sample(range(p.people), rng.randint(1, p.people))
            case = {q: rng.random() < 0.5 for q in people}
            ext = [a for a in every if all(a[q] == v for q, v in case.items())]
            assert truth.grade_fit(True, case) == (CORRECT if ext else WRONG)
            assert truth.grade_fit(False, case) == (WRONG if ext else CORRECT)
            if not ext:
                continue
            for q in range(p.people):
                assert truth.grade_role(q, ext[0][q], case) == CORRECT
                assert truth.grade_role(q, not ext[0][q], case) == WRONG
                value = evaluate(p.statements[q], ext[0])
                assert truth.grade_statement(q, value, case) == CORRECT
                assert truth.grade_statement(q, not value, case) == WRONG


def test_an_impossible_case_implies_what_its_statements_force():
    p = PUZZLES["P2"]      # Zoey: "Ethan is a knave"; Ethan: "Zoey and Ethan are knights"
    truth = PuzzleTruth(p)
    # Zoey a knave: her statement forces Ethan a knight, his own forces him a knave.
    assert truth.implied({0: False}) == {0: frozenset({False}), 1: frozenset({True, False})}
    assert truth.grade_role(1, True, {0: False}) == CORRECT == truth.grade_role(1, False, {0: False})
    assert truth.grade_statement(1, False, {0: False}) == CORRECT   # false whatever Ethan is
    assert truth.grade_fit(False, {0: False}) == CORRECT
    assert truth.grade_fit(True, {}) == UNGRADEABLE


# --------------------------------------------------------------------------- grammar files

def test_a_user_grammar_extends_the_phrasings(tmp_path):
    p = PUZZLES["P2"]
    text = "Zoey is certainly a knight.\nAnswer: (1) Zoey is a knight (2) Ethan is a knave"
    assert analyse_response(text, p).claims == []
    extra = tmp_path / "mine.yaml"
    extra.write_text("role:\n  en:\n    - '\\b{name} is certainly (?P<neg>not )?an? {role}\\b'\n", encoding="utf-8")
    grammar = load_grammar(extra)
    [claim] = analyse_response(text, p, grammar).claims
    assert (claim.kind, claim.person, claim.value, claim.grade) == ("role", 0, True, CORRECT)
    assert grammar.digest != load_grammar().digest


BAD_GRAMMARS = {
    "role:\n  en:\n    - '({name}'\n": "role: bad regex",
    "roles_of: {}\n": "unknown section 'roles_of'",
    "role: [a]\n": "expected a mapping of languages",
    "role: {en: [a\n": "malformed YAML",
    None: "does not exist",
}


def test_a_bad_grammar_file_is_one_clear_line(tmp_path):
    for k, (content, problem) in enumerate(BAD_GRAMMARS.items()):
        bad = tmp_path / f"bad{k}.yaml"
        if content is not None:
            bad.write_text(content, encoding="utf-8")
        with pytest.raises(ClaimGrammarError) as err:
            load_grammar(bad)
        message = str(err.value)
        assert problem in message and str(bad) in message and "\n" not in message, (content, message)


# --------------------------------------------------------------------------- statistics and report

def test_statistics_count_the_labelled_events():
    traces = [t for t in TRACES if t["puzzle"] == "P3"]
    records = [{"puzzle_id": PUZZLES["P3"].id + f"-{k}", "text": t["text"]} for k, t in enumerate(traces)]
    # One puzzle per trace (same statements, distinct ids), so each trace is one bootstrap unit.
    puzzles = [make_puzzle(PUZZLES["P3"].names, PUZZLES["P3"].statements, rng=random.Random(0))
               for _ in traces]
    puzzles = [type(p)(**{**p.__dict__, "id": r["puzzle_id"]}) for p, r in zip(puzzles, records)]
    out = claim_stats(records, puzzles, n_boot=200)
    m = out["metrics"]
    for fate in FATES:
        share = sum(t["fate"] == fate for t in traces) / len(traces)
        assert m[f"fate:{fate}"]["mean"] == pytest.approx(share)
        assert m[f"fate:{fate}"]["lo"] <= share <= m[f"fate:{fate}"]["hi"]
    n_claims = {k: sum(c.split()[1] == k for t in traces for c in t["claims"]) for k in KINDS}
    assert {k: sum(v.values()) for k, v in out["claims"].items()} == n_claims
    wrong = sum(c.endswith(" wrong") for t in traces for c in t["claims"])
    assert sum(v[WRONG] for v in out["claims"].values()) == wrong
    assert m["has_wrong"]["mean"] == pytest.approx(sum(t["first_wrong"] is not None for t in traces) / len(traces))

    analysis = ClaimsAnalysis(n_boot=200)
    md, figs = analysis.report_section(out)
    assert "claim accuracy" in md and "hollow" in md and len(figs) == 1
    trend = analysis.trend_metrics(out)
    assert trend["claim accuracy"] == pytest.approx(m["accuracy"]["mean"])
    assert trend["claim accuracy@lo"] <= trend["claim accuracy"] <= trend["claim accuracy@hi"]


def test_a_generation_outside_the_puzzle_set_is_named():
    with pytest.raises(ClaimGrammarError, match="kk9-nope"):
        claim_stats([{"puzzle_id": "kk9-nope", "text": "x"}], [PUZZLES["P2"]])
