"""Steps of a reasoning trace: the one home of "what is a step".

A step is a sentence-like unit of the thinking. Boundaries are

* line breaks (one or more; a blank line is just a longer break),
* English sentence ends (. ! ? followed by whitespace), except after numbers ("3.5"),
  list enumerators at the start of a line ("1. ") and common abbreviations ("e.g."),
* Chinese sentence ends 。！？ (no whitespace needed),
* K&K reasoning markers that open a new thought after a clause break (, ; :), optionally
  after a connective, e.g. "..., so let's verify" or "...; Case 2: ...": Assume / Suppose / If X is a knight /
  Case 1 / Let's verify / Let me check / Wait / 假设 / 如果 / 情况一 / 验证 / 等等,
* the format tags <think> </think> <answer> </answer> (never part of a step).

Steps carry character offsets into the text and, given a fast tokenizer, token offsets from
its offset mapping: `tok_start` is the token holding the step's first character (so the model
chooses the step's opening at position `tok_start - 1`), `tok_end` is exclusive.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any, Sequence

from train.errors import UserError

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


class SegmentError(UserError):
    pass


@dataclass(frozen=True)
class Step:
    index: int
    text: str
    char_start: int
    char_end: int            # exclusive
    tok_start: int | None = None
    tok_end: int | None = None  # exclusive


_ABBREVIATIONS = ("e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "st", "cf")

# An English sentence end: terminal punctuation (plus closing quotes/brackets) then whitespace.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s)")
_CJK_SENTENCE_END = re.compile(r"[。！？]+[”’」』）]*")
_LINE_BREAK = re.compile(r"\n+")
_TAG = re.compile("|".join(re.escape(t) for t in TAGS))
_ENUMERATOR = re.compile(r"(?:^|\n)[ \t]*(?:\d+|[a-zA-Z]|[ivxIVX]+)$")  # text before the "."

# Markers that start a new step when they follow a clause break.
MARKERS = (
    r"assum(?:e|ing)\b", r"suppose\b", r"let(?:'s| us) (?:assume|suppose|consider)\b",
    r"if [A-Z][a-z]+ (?:is|were) an? (?:knight|knave)\b", r"case \d+\b",
    r"let(?:'s| us| me) (?:verify|check|double-check|re-?check)\b", r"wait\b",
    r"假设", r"如果", r"情况[一二三四五六七八九十\d]", r"验证", r"等等",
)
_MARKER_AFTER_CLAUSE = re.compile(
    r"[,;:，；：]\s*(?=(?:(?:so|and|but|now|then|ok|okay)\s+)?(?:" + "|".join(MARKERS) + "))", re.IGNORECASE)
_CONTENT = re.compile(r"[\w\u4e00-\u9fff]")


def think_span(text: str) -> tuple[int, int]:
    """Character range of the thinking in a response: after `<think>` (or from the start, when
    the prompt pre-filled it) up to `</think>` (or the end, when it never closed)."""
    start = text.find("<think>")
    start = 0 if start < 0 else start + len("<think>")
    end = text.find("</think>", start)
    return start, (len(text) if end < 0 else end)


def _is_false_sentence_end(text: str, m: re.Match) -> bool:
    if text[m.start()] != ".":
        return False
    before = text[:m.start()]
    if _ENUMERATOR.search(before):
        return True
    word = re.search(r"([A-Za-z.]+)$", before)
    return bool(word and word.group(1).lower().rstrip(".") in _ABBREVIATIONS)


def _boundaries(text: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """Gaps (start, end) inside [lo, hi) that separate steps; the gap text belongs to no step."""
    region = text[lo:hi]
    gaps: list[tuple[int, int]] = []
    for m in _TAG.finditer(region):
        gaps.append((m.start(), m.end()))
    for m in _LINE_BREAK.finditer(region):
        gaps.append((m.start(), m.end()))
    for m in _SENTENCE_END.finditer(region):
        if not _is_false_sentence_end(region, m):
            gaps.append((m.end(), m.end()))
    for m in _CJK_SENTENCE_END.finditer(region):
        gaps.append((m.end(), m.end()))
    for m in _MARKER_AFTER_CLAUSE.finditer(region):
        gaps.append((m.start() + 1, m.start() + 1))  # the clause punctuation stays with the left step
    return sorted((a + lo, b + lo) for a, b in gaps)


def token_offsets(text: str, tokenizer: Any) -> list[tuple[int, int]]:
    """(start, end) character span of each token of `text` (no special tokens added)."""
    if not getattr(tokenizer, "is_fast", False):
        raise SegmentError(f"tokenizer {type(tokenizer).__name__} has no offset mapping (not a fast tokenizer)")
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return [tuple(span) for span in enc["offset_mapping"]]


def split_steps(text: str, tokenizer: Any = None, *, span: tuple[int, int] | None = None,
                  offsets: Sequence[tuple[int, int]] | None = None) -> list[Step]:
    """Split `text[span]` (default: all of it) into steps.

    Offsets are relative to the whole `text`, so a caller can tokenize the full response once
    and split only its thinking (`span=think_span(text)`). Token offsets come from
    `offsets` if given, else from `tokenizer`'s offset mapping of `text`; without either they
    are None.
    """
    lo, hi = span if span is not None else (0, len(text))
    cuts = [(lo, lo)] + _boundaries(text, lo, hi) + [(hi, hi)]
    pieces: list[tuple[int, int]] = []
    for (_, a), (b, _) in zip(cuts, cuts[1:]):
        if b <= a:
            continue
        # Trim whitespace so a step's characters are exactly its words.
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if a < b and _CONTENT.search(text, a, b):
            pieces.append((a, b))

    if offsets is None and tokenizer is not None:
        offsets = token_offsets(text, tokenizer)
    if offsets is not None:
        starts = [s for s, _ in offsets]
        ends = [e for _, e in offsets]
    steps: list[Step] = []
    prev_end = 0
    for i, (a, b) in enumerate(pieces):
        t0 = t1 = None
        if offsets is not None:
            t0 = bisect.bisect_right(ends, a)     # first token ending after the step's start
            t1 = bisect.bisect_left(starts, b)    # first token starting at or after its end
            # A token straddling a boundary (e.g. "。假" merged by BPE) stays with the left step.
            t0 = max(t0, prev_end)
            t1 = max(t1, t0)
            prev_end = t1
        steps.append(Step(index=i, text=text[a:b], char_start=a, char_end=b, tok_start=t0, tok_end=t1))
    return steps
