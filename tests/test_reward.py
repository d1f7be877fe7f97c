"""Tests for train/reward.py: value table, adversarial corpus, properties, reference data, TRL adapter."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import train.reward as reward_module
from train.reward import (
    DEFAULT,
    RewardConfig,
    compute_score,
    lenient_correct,
    lenient_roles,
    make_trl_reward_funcs,
    parse_solution_text,
    score_response,
)

TOTALS = {3.0, -0.5, -1.0, -3.0}
SOLUTION = {"Amelia": True, "Penelope": False, "Evelyn": True}
SOLUTION_TEXT = "(1) Amelia is a knight\n(2) Penelope is a knave\n(3) Evelyn is a knight"
GOOD = SOLUTION_TEXT
FLIPPED = "(1) Amelia is a knight\n(2) Penelope is a knight\n(3) Evelyn is a knight"
THINK = "Assume Amelia is a knight. Then Penelope lies, so Evelyn is a knight. No contradiction."


def wrap(answer: str, think: str = THINK, before: str = "", between: str = "\n", after: str = "") -> str:
    return f"{before}<think>{think}</think>{between}<answer>{answer}</answer>{after}"


# --------------------------------------------------------------------------- value table


def test_reference_value_table():
    cases = {
        wrap(GOOD): (3.0, "correct", 3),
        wrap(FLIPPED): (-0.5, "wrong", 2),
        wrap("Amelia is a knight or a knave"): (-1.0, "unparseable", 0),
        GOOD: (-3.0, "missing", 0),
    }
    for response, (score, answer, n_right) in cases.items():
        result = score_response(response, SOLUTION)
        assert result["score"] == score
        assert result["answer"] == answer
        assert result["n_correct_people"] == n_right
        assert result["n_people"] == 3
        assert result["format_ok"] == (answer != "missing")
        assert result["format_score"] + result["answer_score"] == result["score"]


def test_text_and_mapping_solutions_agree():
    for response in (wrap(GOOD), wrap(FLIPPED), wrap(""), "nothing"):
        assert score_response(response, SOLUTION) == score_response(response, SOLUTION_TEXT)


def test_prefilled_think():
    prefilled = RewardConfig(prefilled_think=True)
    body = f"{THINK}</think>\n<answer>{GOOD}</answer>"
    assert score_response(body, SOLUTION, prefilled)["score"] == 3.0
    assert score_response(body, SOLUTION)["score"] == -3.0  # without the flag the <think> is missing
    # The pre-filled tag must not be repeated.
    assert score_response("<think>" + body, SOLUTION, prefilled)["score"] == -3.0
    assert score_response(" <think>" + body, SOLUTION, prefilled)["score"] == -3.0
    assert score_response(wrap(GOOD), SOLUTION, prefilled)["score"] == -3.0
    # The thinking may be empty, and leading text is the thinking itself.
    assert score_response(f"</think><answer>{GOOD}</answer>", SOLUTION, prefilled)["score"] == 3.0
    wrong = f"{THINK}</think><answer>{FLIPPED}</answer><|im_end|>"
    assert score_response(wrong, SOLUTION, prefilled)["score"] == -0.5
    assert score_response("x</think><answer></answer>", SOLUTION, prefilled)["score"] == -1.0


def test_custom_config_values():
    config = RewardConfig(format_ok=0.5, format_bad=-2.0, answer_correct=4.0, answer_wrong=-1.0,
                          answer_unparseable=-3.0)
    assert score_response(wrap(GOOD), SOLUTION, config)["score"] == 4.5
    assert score_response(wrap(FLIPPED), SOLUTION, config)["score"] == -0.5
    assert score_response(wrap("no idea"), SOLUTION, config)["score"] == -2.5
    result = score_response("no tags", SOLUTION, config)
    assert (result["score"], result["format_score"], result["answer_score"]) == (-5.0, -2.0, -3.0)


def test_config_is_frozen_documented_and_strict():
    assert DEFAULT == RewardConfig()
    assert (DEFAULT.format_ok, DEFAULT.format_bad, DEFAULT.answer_correct, DEFAULT.answer_wrong,
            DEFAULT.answer_unparseable, DEFAULT.prefilled_think, DEFAULT.max_chars) == (
        1.0, -1.0, 2.0, -1.5, -2.0, False, None)
    with pytest.raises(ValidationError):
        DEFAULT.format_ok = 5.0
    with pytest.raises(ValidationError):
        RewardConfig(answer_right=1.0)
    with pytest.raises(ValidationError):
        RewardConfig(max_chars=0)
    assert all(field.description for field in RewardConfig.model_fields.values())
    assert hash(DEFAULT) == hash(RewardConfig())


def test_max_chars():
    response = wrap(GOOD, think="x" * 500)
    assert DEFAULT.max_chars is None  # no cap unless asked: the engine's token limit bounds responses
    assert score_response(wrap(GOOD, think="x" * 10**6), SOLUTION)["score"] == 3.0
    assert score_response(response, SOLUTION, RewardConfig(max_chars=len(response)))["score"] == 3.0
    short = RewardConfig(max_chars=len(response) - 1)
    assert score_response(response, SOLUTION, short) == score_response("", SOLUTION)


# --------------------------------------------------------------------------- solution parsing


def test_parse_solution_text():
    assert parse_solution_text(SOLUTION_TEXT) == SOLUTION
    assert list(parse_solution_text(SOLUTION_TEXT)) == ["Amelia", "Penelope", "Evelyn"]
    assert parse_solution_text("(1) Mary Ann is a knave\r\n(2) O'Neil is a knight\n") == {
        "Mary Ann": False, "O'Neil": True}
    assert parse_solution_text("(1) Zoey is a Knight") == {"Zoey": True}


@pytest.mark.parametrize("text", [
    "",
    "   \n ",
    "(1) Amelia is a knight\n(3) Penelope is a knave",
    "(1) Amelia is a knight\n(1) Penelope is a knave",
    "(1) Amelia is a knight\n(2) Amelia is a knave",
    "(1) Amelia is a knight\n\n(2) Penelope is a knave",
    "Amelia is a knight",
    "(1) Amelia is a hero",
    "(1) Amelia is a knight, (2) Penelope is a knave",
    "(1) is a knight",
    "(1) Sir Knight is a knight",
    "(1) Amelia is a knight (2) Penelope is a knave",
])
def test_parse_solution_text_rejects_malformed(text):
    with pytest.raises(ValueError) as info:
        parse_solution_text(text)
    message = str(info.value)
    assert message and "\n" not in message


def test_bad_solution_arguments_raise_clearly():
    with pytest.raises(ValueError):
        score_response(wrap(GOOD), {})
    with pytest.raises(TypeError):
        score_response(wrap(GOOD), 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        score_response(wrap(GOOD), "garbage")


def test_names_that_prefix_each_other():
    solution = {"Jack": True, "Jackson": False, "Liam": False, "William": True}
    good = "(1) Jack is a knight\n(2) Jackson is a knave\n(3) Liam is a knave\n(4) William is a knight"
    assert score_response(wrap(good), solution)["score"] == 3.0
    swapped = good.replace("Jack is a knight", "Jack is a knave").replace("Jackson is a knave",
                                                                           "Jackson is a knight")
    assert score_response(wrap(swapped), solution)["n_correct_people"] == 2
    missing_jack = good.replace("(1) Jack is a knight", "(1) Jacksonville is a knight")
    assert score_response(wrap(missing_jack), solution)["answer"] == "unparseable"


def test_multi_word_and_special_names():
    solution = {"Mary Ann": True, "Ann": False, "Dr. Who?": True}
    good = "Mary Ann is a knight; Ann is a knave; Dr. Who? is a knight"
    assert score_response(wrap(good), solution)["score"] == 3.0
    assert score_response(wrap(good.replace("Ann is a knave", "Ann is a knight")), solution)[
        "answer"] == "wrong"


def test_non_string_response_is_missing():
    for response in (None, b"<think></think><answer></answer>", 3, ["x"]):
        assert score_response(response, SOLUTION)["answer"] == "missing"  # type: ignore[arg-type]


# --------------------------------------------------------------------------- adversarial corpus

C, W, U, M = "correct", "wrong", "unparseable", "missing"
SCORE = {C: 3.0, W: -0.5, U: -1.0, M: -3.0}

ADVERSARIAL = [
    # Well-formed answers.
    ("correct_basic", wrap(GOOD), C),
    ("correct_one_sentence", wrap("Amelia is a knight, Penelope is a knave, and Evelyn is a knight."), C),
    ("correct_shuffled_lines", wrap("(1) Evelyn is a knight\n(2) Amelia is a knight\n(3) Penelope is a knave"), C),
    ("correct_upper_case_roles", wrap("Amelia IS A KNIGHT\nPenelope Is A Knave\nEvelyn is a Knight"), C),
    ("correct_answer_padding", wrap(f"\n\n  {GOOD}  \n"), C),
    ("correct_no_gap_between_blocks", wrap(GOOD, between=""), C),
    ("correct_prose_around", wrap(f"Final answer:\n{GOOD}\nDone."), C),
    ("correct_knighthood_is_not_a_role", wrap(f"{GOOD}\n(by knighthood)"), C),
    ("correct_chinese_thinking", wrap(GOOD, think="假设 Amelia 是骑士，那么 Penelope 在说谎。"), C),
    ("correct_crlf", wrap(GOOD.replace("\n", "\r\n"), think="a\r\nb", between="\r\n", after="\r\n"), C),
    ("correct_tabs", wrap("Amelia\tis\ta\tknight\tPenelope is\ta knave\t\tEvelyn is a knight"), C),
    ("correct_whitespace_before_think", wrap(GOOD, before=" \n\t"), C),
    ("correct_whitespace_after_answer", wrap(GOOD, after="\n\n   "), C),
    ("correct_im_end", wrap(GOOD, after="<|im_end|>"), C),
    ("correct_endoftext", wrap(GOOD, after="\n<|endoftext|>\n"), C),
    ("correct_eos_s", wrap(GOOD, after="</s>"), C),
    ("correct_eot_id", wrap(GOOD, after="<|eot_id|>"), C),
    ("correct_two_end_tokens", wrap(GOOD, after="<|im_end|><|endoftext|>"), C),
    ("correct_nul_in_think", wrap(GOOD, think="a\x00b\x1bc"), C),
    # A 4,096-token response of a 7B preset runs past 20,000 characters; it earns its credit.
    ("correct_long_7b_response", wrap(GOOD, think="Assume Amelia is a knight. " * 1200), C),
    ("correct_answer_also_in_think", wrap(GOOD, think=f"Draft: {FLIPPED}"), C),
    # Parsed but wrong.
    ("wrong_one_role", wrap(FLIPPED), W),
    ("wrong_all_roles", wrap("Amelia is a knave\nPenelope is a knight\nEvelyn is a knave"), W),
    ("wrong_mixed_case_role", wrap("Amelia is a KNAVE\nPenelope is a knave\nEvelyn is a knight"), W),
    # Format ok, answer unparseable.
    ("empty_answer", wrap(""), U),
    ("whitespace_answer", wrap(" \n\t "), U),
    ("answer_only_in_think", wrap("", think=GOOD), U),
    ("knight_or_knave", wrap("Amelia is a knight or knave\nPenelope is a knave\nEvelyn is a knight"), U),
    ("extra_role_word", wrap(f"{GOOD}\nKnights always tell the truth."), U),
    ("plural_roles_grouped", wrap("Amelia and Evelyn are knights, Penelope is a knave"), U),
    ("plural_roles_extra", wrap(f"{GOOD}\nSo two knights."), U),
    ("plural_role_after_is_a", wrap("Amelia is a knights\nPenelope is a knave\nEvelyn is a knight"), U),
    ("not_a_knight", wrap("Amelia is not a knave\nPenelope is a knave\nEvelyn is a knight"), U),
    ("name_missing", wrap("(1) Amelia is a knight\n(2) Penelope is a knave"), U),
    ("name_missing_role_count_kept", wrap("Amelia is a knight\nPenelope is a knave\nShe is a knight"), U),
    ("name_repeated", wrap(f"{GOOD}\n(Amelia was hard)"), U),
    ("name_repeated_conflicting", wrap("Amelia is a knight\nAmelia is a knave\nPenelope is a knave"), U),
    ("extra_person", wrap(f"{GOOD}\n(4) Zoey is a knave"), U),
    ("lower_case_names", wrap(GOOD.lower()), U),
    ("name_glued_underscore", wrap(GOOD.replace("Amelia is", "Amelia_ is")), U),
    ("name_plural", wrap(GOOD.replace("Amelia is", "Amelias is")), U),
    ("cyrillic_a_in_name", wrap(GOOD.replace("Amelia", "\u0410melia")), U),
    ("cyrillic_e_in_name", wrap(GOOD.replace("Penelope", "P\u0435nelope")), U),
    ("cyrillic_i_in_role", wrap(GOOD.replace("Amelia is a knight", "Amelia is a kn\u0456ght")), U),
    ("kelvin_sign_in_role", wrap(GOOD.replace("Amelia is a knight", "Amelia is a \u212anight")), U),
    ("fullwidth_letters_in_name", wrap(GOOD.replace("Amelia", "\uff21melia")), U),
    ("is_an_knight", wrap(GOOD.replace("Amelia is a knight", "Amelia is an knight")), U),
    ("markdown_bold_names", wrap("**Amelia** is a knight\n**Penelope** is a knave\n**Evelyn** is a knight"), U),
    ("colon_list", wrap("1. Amelia: knight\n2. Penelope: knave\n3. Evelyn: knight"), U),
    ("answer_in_chinese", wrap("Amelia 是骑士, Penelope 是无赖, Evelyn 是骑士"), U),
    ("role_count_only", wrap("knight knave knight"), U),
    # Format broken.
    ("no_tags", GOOD, M),
    ("empty_response", "", M),
    ("whitespace_response", " \n ", M),
    ("nested_answer_in_think", f"<think>{THINK}<answer>{GOOD}</answer></think>", M),
    ("nested_think_in_answer", f"<answer><think>{THINK}</think>{GOOD}</answer>", M),
    ("answer_before_think", f"<answer>{GOOD}</answer><think>{THINK}</think>", M),
    ("repeated_think", f"<think>a</think><think>b</think><answer>{GOOD}</answer>", M),
    ("repeated_answer", f"<think>a</think><answer>{GOOD}</answer><answer>{GOOD}</answer>", M),
    ("repeated_think_open", f"<think>a<think>b</think><answer>{GOOD}</answer>", M),
    ("answer_tags_inside_answer", wrap(f"<answer>{GOOD}</answer>"), M),
    ("closing_tags_swapped", f"<think>{THINK}</answer><answer>{GOOD}</think>", M),
    ("unterminated_think", f"<think>{THINK}<answer>{GOOD}</answer>", M),
    ("unterminated_answer", f"<think>{THINK}</think><answer>{GOOD}", M),
    ("truncated_close_tag", f"<think>{THINK}</think><answer>{GOOD}</answ", M),
    ("missing_slash", f"<think>{THINK}<think><answer>{GOOD}<answer>", M),
    ("upper_case_tags", f"<THINK>{THINK}</THINK><ANSWER>{GOOD}</ANSWER>", M),
    ("mixed_case_answer_tag", f"<think>{THINK}</think><Answer>{GOOD}</Answer>", M),
    ("space_inside_tag", f"< think>{THINK}</think><answer>{GOOD}</answer>", M),
    ("space_before_bracket", f"<think>{THINK}</think><answer >{GOOD}</answer>", M),
    ("space_after_slash", f"<think>{THINK}</ think><answer>{GOOD}</answer>", M),
    ("fullwidth_brackets", f"\uff1cthink\uff1e{THINK}\uff1c/think\uff1e\uff1canswer\uff1e{GOOD}\uff1c/answer\uff1e", M),
    ("math_angle_brackets", f"\u27e8think\u27e9{THINK}\u27e8/think\u27e9\u27e8answer\u27e9{GOOD}\u27e8/answer\u27e9", M),
    ("lookalike_bracket_one_tag", f"<think>{THINK}</think>\u2039answer>{GOOD}</answer>", M),
    ("cyrillic_letter_in_tag", f"<th\u0456nk>{THINK}</th\u0456nk><answer>{GOOD}</answer>", M),
    ("text_after_answer", wrap(GOOD, after="\nHope this helps!"), M),
    ("text_after_end_token", wrap(GOOD, after="<|im_end|>more"), M),
    ("unknown_end_token", wrap(GOOD, after="<|end|>"), M),
    ("text_before_think", wrap(GOOD, before="Sure! "), M),
    ("assistant_header_before_think", wrap(GOOD, before="Assistant: "), M),
    ("text_between_blocks", wrap(GOOD, between="\nFinal answer:\n"), M),
    ("only_think", f"<think>{THINK}</think>", M),
    ("only_answer", f"<answer>{GOOD}</answer>", M),
    ("prefilled_style_without_flag", f"{THINK}</think><answer>{GOOD}</answer>", M),
    # A runaway generation is cut at the token limit, so its closing tag is missing.
    ("huge_output_1mb_truncated", wrap(GOOD, think="I am thinking. " * 70000)[:-len("</answer>")], M),
]


@pytest.mark.parametrize(("response", "answer"), [(r, a) for _, r, a in ADVERSARIAL],
                         ids=[name for name, _, _ in ADVERSARIAL])
def test_adversarial_corpus(response, answer):
    result = score_response(response, SOLUTION)
    assert result["answer"] == answer
    assert result["score"] == SCORE[answer]
    assert result["format_ok"] == (answer != M)
    if answer in (U, M):
        assert result["n_correct_people"] == 0


def test_adversarial_corpus_is_broad():
    names = [name for name, _, _ in ADVERSARIAL]
    assert len(names) == len(set(names)) and len(names) >= 45
    assert {answer for _, _, answer in ADVERSARIAL} == {C, W, U, M}


# --------------------------------------------------------------------------- properties

NAMES = ("Amelia", "Penelope", "Evelyn")
ROLE_WORDS = {"knight", "knave", "knights", "knaves"}
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
FRAGMENTS = [
    *TAGS, "<Think>", "< answer>", "</ answer>", "\uff1cthink\uff1e", "<thinkk>", "<answer", "/think>",
    *NAMES, "\u0410melia", "amelia", "Amelia_", "Eve", "Zoey",
    "knight", "knave", "Knights", "KNAVE", "kn\u0456ght", "\u212anight", "knighthood",
    " is a ", " is not a ", " or ", " and ", "\n", " ", "\t", "\r\n", "(1) ", ", ", ".", "",
    "<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "\u00a0", "骑士",
]
CLAIMS = [f"{name} is a {role}" for name in NAMES for role in ("knight", "knave")]
fragment_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS + CLAIMS), st.text(max_size=8)),
                         max_size=30).map("".join)
# Answer blocks made mostly of claims, so that many get parsed (right, wrong, or nearly right).
claim_text = st.lists(st.one_of(st.sampled_from(CLAIMS), st.sampled_from(CLAIMS), st.sampled_from(FRAGMENTS)),
                      max_size=6).flatmap(
    lambda parts: st.sampled_from(["\n", " ", ", ", "; "]).map(lambda sep: sep.join(parts)))
solutions = st.tuples(st.booleans(), st.booleans(), st.booleans()).map(lambda roles: dict(zip(NAMES, roles)))


def oracle_full_credit(response: str, solution: dict[str, bool]) -> bool:
    """Independent check: each tag once, in order, and the answer block names every person exactly
    once, as "Name is a <right role>", with no other role word."""
    if any(response.count(tag) != 1 for tag in TAGS):
        return False
    positions = [response.index(tag) for tag in TAGS]
    if positions != sorted(positions):
        return False
    block = response.split("<answer>")[1].split("</answer>")[0]
    words = re.findall(r"\w+", block)
    if sum(1 for w in words if w.isascii() and w.lower() in ROLE_WORDS) != len(solution):
        return False
    for name, is_knight in solution.items():
        if words.count(name) != 1:
            return False
        i = words.index(name)
        if [w.lower() if w.isascii() else w for w in words[i + 1:i + 4]] != [
                "is", "a", "knight" if is_knight else "knave"]:
            return False
    return True


@st.composite
def near_answers(draw):
    """One claim per person in any order, then up to two fragments spliced in anywhere."""
    parts = [f"{name} is a {draw(st.sampled_from(['knight', 'knave']))}"
             for name in draw(st.permutations(NAMES))]
    for _ in range(draw(st.integers(0, 2))):
        parts.insert(draw(st.integers(0, len(parts))), draw(st.sampled_from(FRAGMENTS + CLAIMS)))
    return draw(st.sampled_from(["\n", " ", ", "])).join(parts)


@st.composite
def tagged_responses(draw):
    """Mostly well-formed tag skeletons around adversarial fragments, so many answers get parsed."""
    answer = draw(st.one_of(near_answers(), claim_text, fragment_text))
    parts = [draw(fragment_text), "<think>", draw(fragment_text), "</think>", draw(fragment_text),
             "<answer>", answer, "</answer>", draw(fragment_text)]
    if draw(st.booleans()):  # keep the edges clean so the answer block is judged
        parts[0] = parts[4] = parts[8] = draw(st.sampled_from(["", " ", "\n", "<|im_end|>"]))
        if draw(st.booleans()):
            parts[2] = draw(st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=30))
    return "".join(parts)


any_response = st.one_of(st.text(), fragment_text, tagged_responses(), tagged_responses())


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response=any_response, solution=solutions)
def test_property_never_raises_and_full_credit_only_when_oracle_agrees(response, solution):
    for config in (DEFAULT, RewardConfig(prefilled_think=True)):
        result = score_response(response, solution, config)
        assert result["score"] in TOTALS
        assert result["answer"] in ("correct", "wrong", "unparseable", "missing")
        assert 0 <= result["n_correct_people"] <= 3
        assert (result["answer"] == "correct") == (result["score"] == 3.0)
        assert (result["answer"] == "missing") == (not result["format_ok"])
    if score_response(response, solution)["score"] == 3.0:
        assert oracle_full_credit(response, solution)
    prefilled = score_response(response, solution, RewardConfig(prefilled_think=True))
    if prefilled["score"] == 3.0:
        assert oracle_full_credit("<think>" + response, solution)


@st.composite
def well_formed(draw):
    """A response that should earn full credit, in one of the accepted styles."""
    solution = draw(solutions)
    order = draw(st.permutations(NAMES))
    spaces = st.sampled_from([" ", "  ", "\t", "\n", "\u00a0"])
    lines = []
    for i, name in enumerate(order, start=1):
        role = "knight" if solution[name] else "knave"
        role = draw(st.sampled_from([role, role.upper(), role.capitalize()]))
        words = [name, draw(st.sampled_from(["is", "IS", "Is"])), draw(st.sampled_from(["a", "A"])), role]
        line = words[0] + "".join(draw(spaces) + w for w in words[1:])
        lines.append(draw(st.sampled_from([f"({i}) ", f"{i}. ", "- ", ""])) + line
                     + draw(st.sampled_from(["", ".", ";", ","])))
    answer = draw(st.sampled_from(["\n", " ", "\r\n"])).join(lines)
    alphabet = st.characters(blacklist_characters="<>")
    think = draw(st.text(alphabet=alphabet, max_size=200))
    response = (draw(st.sampled_from(["", " ", "\n"])) + f"<think>{think}</think>"
                + draw(st.sampled_from(["", "\n", " \n "])) + f"<answer>{answer}</answer>"
                + draw(st.sampled_from(["", "\n", "<|im_end|>", "<|endoftext|>\n"])))
    return response, solution, order


@settings(max_examples=300, deadline=None)
@given(case=well_formed(), data=st.data())
def test_property_well_formed_answers_earn_full_credit_and_a_flip_costs_it(case, data):
    response, solution, order = case
    assert oracle_full_credit(response, solution)
    assert score_response(response, solution)["score"] == 3.0
    victim = data.draw(st.sampled_from(NAMES))
    flipped = dict(solution, **{victim: not solution[victim]})
    result = score_response(response, flipped)
    assert (result["score"], result["answer"], result["n_correct_people"]) == (-0.5, "wrong", 2)


# --------------------------------------------------------------------------- reference data

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/logic-rl-kk"


def reference_rows():
    pd = pytest.importorskip("pandas")
    files = sorted(REFERENCE_DIR.glob("*ppl/*.parquet"))
    if not files:
        pytest.skip(f"reference K&K data not found under {REFERENCE_DIR}")
    for file in files:
        frame = pd.read_parquet(file, columns=["names", "solution", "reward_model"])
        yield from frame.itertuples(index=False)


def test_reference_ground_truths_score_full_and_a_flip_scores_wrong():
    rng = random.Random(20250101)
    n_rows = 0
    sizes = set()
    for row in reference_rows():
        ground_truth = row.reward_model["ground_truth"]
        text = ground_truth["solution_text_format"]
        solution = parse_solution_text(text)
        assert list(solution) == list(row.names)
        assert list(solution.values()) == [bool(v) for v in row.solution]
        response = f"<think>Let me check every statement.</think>\n<answer>{text}</answer>"
        assert score_response(response, text)["score"] == 3.0
        result = compute_score("kk_logic", response, ground_truth, {"index": 0, "split": "train"})
        assert (result["score"], result["answer"], result["n_correct_people"]) == (3.0, "correct", len(solution))
        assert compute_score("kk_logic", response.removeprefix("<think>"), ground_truth,
                             {"prefilled_think": True})["score"] == 3.0

        victim = rng.choice(list(solution))
        role = "knight" if solution[victim] else "knave"
        flipped_role = "knave" if solution[victim] else "knight"
        flipped_text = text.replace(f"{victim} is a {role}", f"{victim} is a {flipped_role}")
        assert flipped_text != text
        flipped = f"<think>Let me check every statement.</think>\n<answer>{flipped_text}</answer>"
        result = compute_score("kk_logic", flipped, ground_truth, None)
        assert (result["score"], result["answer"], result["n_correct_people"]) == (-0.5, "wrong", len(solution) - 1)
        assert score_response(flipped, solution)["score"] == -0.5
        n_rows += 1
        sizes.add(len(solution))
    assert n_rows == 5000
    assert sizes == {3, 4, 5, 6, 7}


def test_compute_score_accepts_text_mapping_and_kwargs():
    response = wrap(GOOD)
    assert compute_score("kk_logic", response, SOLUTION_TEXT)["score"] == 3.0
    assert compute_score("kk_logic", response, SOLUTION)["score"] == 3.0
    body = response.removeprefix("<think>")
    assert compute_score("kk_logic", body, SOLUTION_TEXT)["score"] == -3.0
    assert compute_score("kk_logic", body, SOLUTION_TEXT, prefilled_think=True)["score"] == 3.0
    assert compute_score("kk_logic", body, {"solution_text_format": SOLUTION_TEXT, "statements": "()"},
                         extra_info={"prefilled_think": True})["score"] == 3.0
    result = compute_score("kk_logic", None, SOLUTION_TEXT)  # type: ignore[arg-type]
    assert result["score"] == -3.0
    assert {"score", "format_ok", "answer", "n_correct_people", "n_people", "format_score",
            "answer_score"} <= set(result)


# --------------------------------------------------------------------------- TRL adapter

TRL_COMPLETIONS = [wrap(GOOD), wrap(FLIPPED), wrap("Amelia is a knight or knave"), "no tags at all"]
TRL_EXPECTED = {
    "kk_reward": [3.0, -0.5, -1.0, -3.0],
    "kk_correct": [1.0, 0.0, 0.0, 0.0],
    "kk_format_error": [0.0, 0.0, 0.0, 1.0],
    "kk_wrong": [0.0, 1.0, 0.0, 0.0],
    "kk_unparseable": [0.0, 0.0, 1.0, 0.0],
}


def call_like_trl(func, completions, **columns):
    return func(prompts=["p"] * len(completions), completions=completions,
                completion_ids=[[1, 2]] * len(completions), trainer_state=None,
                log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None, **columns)


@pytest.mark.parametrize("style", ["string", "conversational", "content_parts"])
def test_trl_reward_funcs(style):
    funcs = make_trl_reward_funcs()
    assert [f.__name__ for f in funcs] == list(TRL_EXPECTED)
    if style == "string":
        completions = TRL_COMPLETIONS
    elif style == "conversational":
        completions = [[{"role": "assistant", "content": c}] for c in TRL_COMPLETIONS]
    else:
        completions = [[{"role": "assistant", "content": [{"type": "text", "text": c}]}]
                       for c in TRL_COMPLETIONS]
    columns = {"solution_text_format": [SOLUTION_TEXT] * 4, "extra": [1, 2, 3, 4]}
    for func in funcs:
        values = call_like_trl(func, completions, **columns)
        assert values == TRL_EXPECTED[func.__name__]
        assert all(type(v) is float for v in values)


def test_trl_reward_funcs_prefilled_and_reward_model_column():
    funcs = make_trl_reward_funcs(RewardConfig(prefilled_think=True))
    completions = [f"{THINK}</think><answer>{GOOD}</answer>", wrap(GOOD)]
    reward_model = [{"style": "rule", "ground_truth": {"solution_text_format": SOLUTION_TEXT}}] * 2
    assert call_like_trl(funcs[0], completions, reward_model=reward_model) == [3.0, -3.0]
    with pytest.raises(ValueError):
        call_like_trl(funcs[0], completions)
    with pytest.raises(ValueError):
        call_like_trl(funcs[0], completions, solution_text_format=[SOLUTION_TEXT])


def test_trl_reward_funcs_score_each_completion_once(monkeypatch):
    calls = []
    real_score = reward_module._score

    def counting_score(*args):
        calls.append(args[0])
        return real_score(*args)

    monkeypatch.setattr(reward_module, "_score", counting_score)
    funcs = make_trl_reward_funcs()
    columns = {"solution_text_format": [SOLUTION_TEXT] * 4}
    for func in funcs:
        call_like_trl(func, TRL_COMPLETIONS, **columns)
    assert sorted(calls, key=str) == sorted(TRL_COMPLETIONS, key=str)


def test_trl_reward_funcs_odd_completions_do_not_raise():
    funcs = make_trl_reward_funcs()
    truncated = wrap(GOOD, think="x" * 1_000_000)[:-len("</answer>")]
    completions = [None, [], [{"role": "assistant"}], [{"role": "assistant", "content": None}], 7, truncated]
    columns = {"solution_text_format": [SOLUTION_TEXT] * 6}
    assert call_like_trl(funcs[0], completions, **columns) == [-3.0] * 6
    assert call_like_trl(funcs[2], completions, **columns) == [1.0] * 6
    # a long, finished response is judged like a short one (outside the verdict cache)
    assert call_like_trl(funcs[0], [wrap(GOOD, think="x" * 1_000_000)], solution_text_format=[SOLUTION_TEXT]) == [3.0]


def test_lenient_roles_reads_the_last_answer_whatever_the_format():
    names = ["Zoey", "Ethan"]
    # the last marker wins, and within it the last role given to a name
    text = "Answer: Zoey is a knave.\nNo wait.\nSo the answer is: Zoey is a knave, Zoey is a knight, Ethan is a knave"
    assert lenient_roles(text, names) == (True, False)
    assert lenient_roles("<answer>(1) Zoey is a knight (2) Ethan is a knave</answer>", names) == (True, False)
    assert lenient_roles("Zoey is a knight and Ethan is a knave.", names) is None    # no marker
    assert lenient_roles("Answer: Zoey is a knight.", names) is None                 # Ethan missing
    assert lenient_roles("Answer: AZoey is a knight, Ethan is a knave", names) is None  # not the name
    assert lenient_correct("Answer:\n(1) Zoey is a knight\n(2) Ethan is a knave",
                           "(1) Zoey is a knight\n(2) Ethan is a knave")
    assert not lenient_correct("Answer: Zoey is a knight, Ethan is a knight", {"Zoey": True, "Ethan": False})
