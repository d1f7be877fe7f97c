"""Steps of a trace: boundaries, K&K markers, Chinese sentence ends, token offsets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.steps import SegmentError, Step, split_steps, think_span, token_offsets


def texts(steps: list[Step]) -> list[str]:
    return [s.text for s in steps]


@pytest.fixture(scope="module")
def tok():
    from tests.tokenizer_fixture import tiny_tokenizer

    return tiny_tokenizer()


def test_sentences_and_blank_lines():
    text = "Assume Zoey is a knight. Then Oliver lies!\n\nSo Oliver is a knave? Yes.\nDone"
    assert texts(split_steps(text)) == [
        "Assume Zoey is a knight.", "Then Oliver lies!", "So Oliver is a knave?", "Yes.", "Done"]


def test_character_offsets_point_at_the_step_text():
    text = "  First step.   Second step.\n\n\n  Third  "
    steps = split_steps(text)
    assert texts(steps) == ["First step.", "Second step.", "Third"]
    for i, s in enumerate(steps):
        assert s.index == i
        assert text[s.char_start:s.char_end] == s.text
        assert s.tok_start is None and s.tok_end is None


def test_markers_after_a_clause_break_open_a_step():
    text = ("Zoey is a knave, so let's verify this. Oliver says he lies; Case 2: Oliver is a knight, "
            "wait, that fails: if Emma is a knight then ok, assume Liam is a knave.")
    assert texts(split_steps(text)) == [
        "Zoey is a knave,", "so let's verify this.", "Oliver says he lies;", "Case 2: Oliver is a knight,",
        "wait, that fails:", "if Emma is a knight then ok,", "assume Liam is a knave."]


def test_no_split_inside_numbers_abbreviations_or_enumerators():
    text = "The value is 3.5 here, e.g. for Zoey.\n1. Oliver speaks first.\n2. Emma speaks."
    assert texts(split_steps(text)) == [
        "The value is 3.5 here, e.g. for Zoey.", "1. Oliver speaks first.", "2. Emma speaks."]


def test_chinese_sentence_ends_and_markers():
    text = "假设佐伊是骑士。那么奥利弗在说谎！是这样吗？等等，验证一下。"
    assert texts(split_steps(text)) == ["假设佐伊是骑士。", "那么奥利弗在说谎！", "是这样吗？", "等等，", "验证一下。"]


def test_tags_are_boundaries_and_never_part_of_a_step():
    text = "<think>Zoey lies.</think><answer>(1) Zoey is a knave</answer>"
    assert texts(split_steps(text)) == ["Zoey lies.", "(1) Zoey is a knave"]


def test_think_span_with_prefilled_or_unclosed_think():
    assert think_span("<think> a </think> b") == (7, 10)
    assert think_span(" a </think><answer>x</answer>") == (0, 3)       # <think> was pre-filled
    assert think_span("<think> still thinking") == (7, 22)              # never closed
    text = "<think>Step one. Step two.</think><answer>Zoey is a knave.</answer>"
    steps = split_steps(text, span=think_span(text))
    assert texts(steps) == ["Step one.", "Step two."]
    assert text[steps[0].char_start:steps[0].char_end] == "Step one."


def test_token_offsets_cover_each_step(tok):
    text = "<think>Assume Zoey is a knight.\n\nLet me verify. 假设 验证。等等！ Zoey is a knave.</think>"
    steps = split_steps(text, tok, span=think_span(text))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert texts(steps)[:2] == ["Assume Zoey is a knight.", "Let me verify."]
    prev_end = 0
    for s in steps:
        assert prev_end <= s.tok_start < s.tok_end <= len(ids)
        assert s.text in tok.decode(ids[s.tok_start:s.tok_end])
        prev_end = s.tok_end
    # The token before a step's first token is the position that chooses the step's opening.
    second = steps[1]
    assert tok.decode(ids[second.tok_start:second.tok_start + 1]).strip().startswith("L")


def test_precomputed_offsets_match_tokenizer(tok):
    text = "Assume Zoey is a knight. So Oliver is a knave."
    assert split_steps(text, tok) == split_steps(text, offsets=token_offsets(text, tok))


def test_slow_tokenizer_is_a_one_line_error():
    class Slow:
        is_fast = False

    with pytest.raises(SegmentError, match="not a fast tokenizer"):
        split_steps("Zoey lies.", Slow())


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(list("ab .,;:!?\n") + ["。", "假设", " Case 1", ", wait", "<think>", "3.5", " e.g."]),
                max_size=40).map("".join))
def test_steps_are_ordered_disjoint_and_trimmed(text):
    steps = split_steps(text)
    prev = 0
    for s in steps:
        assert prev <= s.char_start < s.char_end <= len(text)
        assert text[s.char_start:s.char_end] == s.text == s.text.strip()
        assert "<think>" not in s.text
        prev = s.char_end
