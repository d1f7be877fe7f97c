"""Rule-based behaviour classifier: every behaviour in English and Chinese, negatives,
response-level rules, per-checkpoint statistics and user rule files."""

from __future__ import annotations

import pytest

from analysis.behaviours import (BehaviourRulesError, BehavioursAnalysis, behaviour_stats, classify_response,
                                 classify_step, load_rules)

STEP_CASES = {
    "hesitation": ("Hmm, I'm not sure this is right.", "嗯，我不太确定这个推理。",
                   "Zoey is certainly a knight."),
    "multi_path_exploration": ("Let's test both possibilities for Zoey.", "我们考虑两种情况：佐伊是骑士或无赖。",
                               "Zoey is a knight."),
    "going_back": ("Let's go back to Oliver's statement from earlier.", "回到之前奥利弗的陈述。",
                   "Oliver's statement is false."),
    "stage_summary": ("Now we have determined that Zoey and Emma are knights.", "现在我们已经确定佐伊是骑士。",
                      "Emma says Zoey is a knave."),
    "verification": ("Let me verify this against Emma's statement.", "我们来验证一下艾玛的话。",
                     "Zoey is lying, so she is a knave."),
    "backtracking": ("This leads to a contradiction, so the assumption is wrong.", "这导致矛盾，所以假设不成立。",
                     "This is consistent."),
    "subgoal_setting": ("First, we need to determine whether Zoey is a knight.", "首先，我们需要确定佐伊的身份。",
                        "Oliver is a knave."),
    "backward_chaining": ("For Oliver's statement to be true, Emma must be a knave.", "要使奥利弗的话成立，艾玛必须是无赖。",
                          "Zoey says she is a knight."),
}


@pytest.mark.parametrize("behaviour", sorted(STEP_CASES))
def test_step_behaviour_english(behaviour):
    assert behaviour in classify_step(STEP_CASES[behaviour][0])


@pytest.mark.parametrize("behaviour", sorted(STEP_CASES))
def test_step_behaviour_chinese(behaviour):
    assert behaviour in classify_step(STEP_CASES[behaviour][1])


@pytest.mark.parametrize("behaviour", sorted(STEP_CASES))
def test_step_behaviour_negative(behaviour):
    assert behaviour not in classify_step(STEP_CASES[behaviour][2])


@pytest.mark.parametrize("text", ["Zoey says that Oliver is a knave.", "So Oliver is a knight.", "所以奥利弗是无赖。"])
def test_plain_deduction_shows_no_behaviour(text):
    # A step written in Chinese is a language-mixing step; whether the response mixes
    # languages is decided at the response level.
    assert classify_step(text) - {"language_mixing"} == frozenset()


ANSWER = "<answer>(1) Zoey is a knight\n(2) Oliver is a knave</answer>"


def response(think: str, answer: str = ANSWER) -> str:
    return f"<think>{think}</think>{answer}"


@pytest.mark.parametrize("think", [
    "Zoey is a knight. Oliver is a knave. Let me check all statements again. Everything holds.",
    "Zoey is a knight. Oliver is a knave. All statements are consistent.",
    "佐伊是骑士。奥利弗是无赖。检查所有陈述，都一致。",
])
def test_verify_all_statements_explicit(think):
    rb = classify_response(response(think), names=["Zoey", "Oliver"])
    assert rb.present["verify_all_statements"]
    assert rb.step_counts["verify_all_statements"] >= 1


def test_verify_all_statements_by_checking_every_person():
    think = ("Zoey is a knight, so Oliver is a knave. Let me verify. Zoey says Oliver lies, which is true. "
             "Oliver says Zoey is a knave, which is false.")
    rb = classify_response(response(think), names=["Zoey", "Oliver"])
    assert rb.present["verify_all_statements"]
    assert rb.step_counts["verify_all_statements"] == 2
    # Names default to the ones in the answer.
    assert classify_response(response(think)).present["verify_all_statements"]


@pytest.mark.parametrize("think", [
    # Verification covers only one of the two people.
    "Zoey is a knight, so Oliver is a knave. Let me verify. Zoey says Oliver lies, which is true.",
    # Everyone is discussed, but nothing is ever verified.
    "Zoey says Oliver lies, which is true. Oliver says Zoey is a knave, which is false.",
])
def test_verify_all_statements_negative(think):
    assert not classify_response(response(think), names=["Zoey", "Oliver"]).present["verify_all_statements"]


def test_language_mixing_chinese_thinking_english_answer():
    rb = classify_response(response("假设佐伊是骑士。那么奥利弗在说谎。So Oliver is a knave."))
    assert rb.present["language_mixing"]
    assert rb.step_counts["language_mixing"] == 2
    assert "language_mixing" in rb.step_labels[0] and "language_mixing" not in rb.step_labels[2]


def test_language_mixing_without_an_answer_needs_english_in_the_thinking():
    assert classify_response("<think>假设佐伊是骑士。 Then Oliver is a knave here.").present["language_mixing"]
    assert not classify_response("<think>假设佐伊是骑士。那么奥利弗在说谎。").present["language_mixing"]


@pytest.mark.parametrize("text", [
    response("Assume Zoey is a knight. Then Oliver is a knave."),                    # all English
    response("假设佐伊是骑士。那么奥利弗在说谎。", "<answer>(1) 佐伊是骑士\n(2) 奥利弗是无赖</answer>"),  # Chinese answer
    response("Zoey 是 a knight. Then Oliver is a knave."),                              # one CJK character
])
def test_language_mixing_negative(text):
    rb = classify_response(text)
    assert not rb.present["language_mixing"]
    assert rb.step_counts["language_mixing"] == 0


@pytest.mark.parametrize("text", [
    "Case 1: Zoey is a knight, Ethan is a knave.",                   # one case is not several paths
    "Zoey 说 Ethan 是骗子或者 Mason 是骑士，这是真的。",                  # restating an "or" statement
    "Suppose Michael is a knight, Zoey is a knave. This case fits.",  # one node of a search
])
def test_multi_path_exploration_negative(text):
    assert "multi_path_exploration" not in classify_step(text)


def test_response_labels_steps_and_counts():
    text = response("First, let's start with Zoey. Hmm, wait. Case 2: Zoey is a knight. "
                    "That leads to a contradiction. Now we have determined Zoey is a knave. Let me verify this.")
    rb = classify_response(text)
    assert len(rb.steps) == len(rb.step_labels) == 7     # "Hmm," and "wait." are two steps
    assert rb.present["subgoal_setting"] and rb.present["hesitation"] and rb.present["multi_path_exploration"]
    assert rb.present["backtracking"] and rb.present["stage_summary"] and rb.present["verification"]
    assert not rb.present["going_back"] and not rb.present["language_mixing"]
    assert rb.step_counts["hesitation"] == 2


def _records():
    verified = response("Zoey is a knight. Let me verify this. It checks out.")
    plain = response("Zoey is a knight. Oliver is a knave.")
    return [
        {"text": verified, "correct": True, "n_tokens": 30, "puzzle_id": "p1", "people": 2},
        {"text": verified, "correct": True, "n_tokens": 34, "puzzle_id": "p2", "people": 2},
        {"text": plain, "correct": False, "n_tokens": 10, "puzzle_id": "p3", "people": 3},
        {"text": plain, "correct": False, "n_tokens": 14, "puzzle_id": "p4", "people": 3},
    ]


def test_behaviour_stats_frequency_correlation_and_examples():
    stats = behaviour_stats(_records())
    assert stats["n_responses"] == 4 and stats["accuracy"] == 0.5
    assert stats["response_tokens_mean"] == 22.0
    assert stats["response_tokens_correct"] == 32.0 and stats["response_tokens_wrong"] == 12.0
    assert stats["accuracy_by_people"] == {"2": 1.0, "3": 0.0}
    v = stats["behaviours"]["verification"]
    assert v["share"] == 0.5 and v["n_with"] == 2
    assert v["steps_per_response"] == 1.0        # "Let me verify this." and "It checks out." in 2 of 4
    assert v["phi"] == pytest.approx(1.0) and v["point_biserial"] == pytest.approx(1.0)
    assert v["accuracy_with"] == 1.0 and v["accuracy_without"] == 0.0
    assert v["examples"][0] == {"puzzle_id": "p1", "correct": True, "step": "Let me verify this."}
    h = stats["behaviours"]["hesitation"]         # never shown: no correlation, no examples
    assert h["share"] == 0.0 and h["phi"] is None and h["accuracy_with"] is None and h["examples"] == []


def test_analysis_plugin_section_and_trends():
    a = BehavioursAnalysis()
    result = behaviour_stats(_records(), a.rules)
    md, figs = a.report_section(result)
    assert "| verification | 0.50 |" in md and "Let me verify this." in md
    assert len(figs) == 1
    trends = a.trend_metrics(result)
    assert trends["accuracy"] == 0.5 and trends["verification frequency"] == 0.5
    assert trends["response length (tokens)"] == 22.0


def test_user_rules_extend_replace_and_add(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text(
        "behaviours:\n"
        "  hesitation:\n    en: ['\\bhuh\\b']\n"
        "  verification:\n    replace: true\n    level: step\n    en: ['\\bzzz\\b']\n"
        "  self_praise:\n    level: step\n    description: praises itself\n"
        "    en: ['\\bbrilliant\\b']\n    zh: ['太棒了']\n",
        encoding="utf-8")
    rules = load_rules(user)
    assert "hesitation" in classify_step("Huh, odd.", rules)
    assert "hesitation" in classify_step("Hmm.", rules)                 # defaults kept
    assert "verification" not in classify_step("Let me verify.", rules)  # replaced
    assert "verification" in classify_step("zzz", rules)
    assert "self_praise" in classify_step("太棒了，解出来了。", rules)
    assert rules.digest != load_rules().digest
    assert BehavioursAnalysis(rules=user).params() != BehavioursAnalysis().params()


@pytest.mark.parametrize("body, message", [
    ("behaviours:\n  x:\n    en: ['(unclosed']\n", "behaviour 'x', en: bad regex"),
    ("behaviours:\n  x:\n    level: paragraph\n", "level must be 'step' or 'response'"),
    ("behaviours:\n  x:\n    level: response\n", "need rule"),
    ("checkpoints: []\n", "expected a mapping with a 'behaviours:' mapping"),
    ("behaviours: [\n", "malformed YAML"),
])
def test_bad_rule_files_are_one_line_errors(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(BehaviourRulesError, match=message) as info:
        load_rules(path)
    assert "\n" not in str(info.value)


def test_missing_rule_file(tmp_path):
    with pytest.raises(BehaviourRulesError, match="does not exist"):
        load_rules(tmp_path / "nope.yaml")


def test_checks_after_let_me_verify_are_verification_steps():
    think = ("Zoey says Ethan is a knave, which is true. So Ethan is a knave.\nLet me verify. "
             "Ethan says Zoey is a knight, which is false.\n验证：艾玛说佐伊是骑士，这是真的。\nSo the answer holds.")
    rb = classify_response(response(think), names=["Zoey", "Ethan"])
    verifying = [s.text for s, lab in zip(rb.steps, rb.step_labels) if "verification" in lab]
    # The first check comes before any verification; "So the answer holds." names nobody.
    assert verifying == ["Let me verify.", "Ethan says Zoey is a knight, which is false.",
                         "验证：艾玛说佐伊是骑士，这是真的。"]
