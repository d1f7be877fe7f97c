"""Probe targets: one binary label per probe position, or "not applicable".

Every position is a decision point before the final answer starts (see `probes.features`);
a row carries `char`, the end of the response prefix the model has read there, and
`next_text`, the characters of the next token. The targets:

* answer_correct      will this generation's final answer be correct (the training reward's
                      `score_response`); only at positions inside a think block, so a
                      response's format is not the cue (a response with no <think> has none);
* next_verification   is the next step of the thinking a verification step (the
                      `verification` behaviour of `analysis.behaviours`); no next step
                      (e.g. just before </think>) counts as "no";
* next_token_chinese  is the next token written in Chinese (its first non-space character
                      is CJK);
* assumed_role_true   is the role of the latest "Assume / Suppose / If X is a knight|knave"
                      (假设 / 如果 X 是骑士|骗子) in the prefix the true one; only where such an
                      assumption exists.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from analysis.segment import think_span
from train.errors import UserError

TARGETS = ("answer_correct", "next_verification", "next_token_chinese", "assumed_role_true")
NOT_APPLICABLE = -1

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
# Where the final answer begins when a response has no answer tags.
_ANSWER_LINE = re.compile(r"(?m)^[ \t]*(?:\(1\)\s|(?:So the (?:final )?answer is|(?:Final )?Answer)\s*:)",
                          re.IGNORECASE)
# "Assume X is a knight" and kin; keywords case-insensitive, the name capitalised. An
# assumption opens a clause: start, a sentence or clause break, or a connective before it.
_ASSUME_EN = re.compile(
    r"(?:^|(?<=[.!?\n:;,]))[ \t]*(?i:(?:so|now|then|and|ok|okay|first|next|alternatively|instead)[, ]+)?"
    r"(?i:(?:let(?:'s| us| me)\s+)?(?:assume|assuming|suppose|supposing|if|what if))\s+(?i:that\s+)?"
    r"([A-Z][\w'-]*)\s+(?i:is|were|was)\s+(?i:an?)\s+(?i:(knight|knave))\b")
_ASSUME_ZH = re.compile(r"(?:假设|如果|假如|设)\s*([A-Za-z][\w'-]*)\s*是\s*(骑士|骗子|无赖|knight|knave)")
_REPORTED = re.compile(r"\b(?:says?|said|claims?|claimed|states?|stated)\b[^.!?\n]*$|说[^。！？\n]*$", re.IGNORECASE)
_KNIGHT = ("knight", "骑士")


class TargetError(UserError):
    pass


def check_targets(targets: Sequence[str]) -> list[str]:
    """The targets, validated (one-line error naming the unknown ones)."""
    targets = list(dict.fromkeys(t.strip() for t in targets if t.strip()))
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise TargetError(f"unknown probe target(s) {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(TARGETS)}")
    return targets


# --------------------------------------------------------------------------- response regions

def answer_start(text: str) -> int:
    """Character offset where the final answer begins: the first of </think>, <answer> and an
    answer line ("(1) ..." or "Answer:"); len(text) when there is none."""
    cands = [i for i in (text.find("</think>"), text.find("<answer>")) if i >= 0]
    m = _ANSWER_LINE.search(text)
    if m:
        cands.append(m.start())
    return min(cands) if cands else len(text)


def think_block(text: str, prefilled: bool = False) -> tuple[int, int] | None:
    """Character range of the think block, cut where the answer starts; None when the response
    has none (`prefilled`: the prompt already opened <think>)."""
    if not prefilled and "<think>" not in text:
        return None
    lo, hi = think_span(text) if not prefilled else (0, len(text))
    return lo, min(hi, answer_start(text))


# --------------------------------------------------------------------------- single labels

def answer_correct(record: Mapping[str, Any], solution_text: str | None = None) -> bool:
    """The generation's answer is correct under the training reward (`score_response`);
    from the record's `answer` when the harness scored it, else scored here."""
    if "answer" in record:
        return record["answer"] == "correct"
    if solution_text is None:
        raise TargetError("answer_correct needs the record's 'answer' or the puzzle's solution text")
    from analysis.generate import prompt_reward_config
    from train.reward import score_response

    style = record.get("prompt_style", "chat")
    return score_response(record["text"], solution_text, prompt_reward_config(style))["answer"] == "correct"


def is_chinese(token_text: str) -> bool:
    """The token's first non-space character is CJK."""
    core = token_text.strip()
    return bool(core) and bool(_CJK.match(core))


def latest_assumption(prefix: str, names: Sequence[str]) -> tuple[str, bool] | None:
    """(name, is_knight) of the latest assumption about a puzzle person in `prefix`, or None.
    Assumptions inside reported speech ("Zoey says if ...") or open quotes do not count."""
    best: tuple[int, str, bool] | None = None
    known = set(names)
    for pattern in (_ASSUME_EN, _ASSUME_ZH):
        for m in pattern.finditer(prefix):
            name, role = m.group(1), m.group(2).lower()
            if name not in known:
                continue
            start = m.start(1)
            line_start = max(prefix.rfind(c, 0, start) for c in "\n")
            if _REPORTED.search(prefix[line_start + 1:m.start()]):
                continue
            if (prefix.count('"', 0, start) + prefix.count("“", 0, start) - prefix.count("”", 0, start)) % 2:
                continue
            if best is None or start > best[0]:
                best = (start, name, role in _KNIGHT)
    return None if best is None else (best[1], best[2])


def assumed_role_true(prefix: str, names: Sequence[str], solution: Sequence[bool]) -> bool | None:
    """Whether the latest assumption in `prefix` gives its person the true role (None: no
    assumption yet)."""
    hit = latest_assumption(prefix, names)
    if hit is None:
        return None
    name, knight = hit
    return bool(solution[list(names).index(name)]) == knight


def next_step_is_verification(steps: Sequence[Any], labels: Sequence[frozenset[str]], char: int) -> bool:
    """The first step starting at or after `char` is labelled a verification."""
    for st, lab in zip(steps, labels):
        if st.char_start >= char:
            return "verification" in lab
    return False


# --------------------------------------------------------------------------- rows of a context

def context_labels(context: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], target: str,
                   rules: Any = None) -> np.ndarray:
    """Labels (1, 0 or NOT_APPLICABLE) of one response's rows for one target.

    context: text, names, solution, prompt_style and answer (or solution_text) of one
    generation; rows: dicts with `char` (prefix end) and `next_text`.
    """
    text = context["text"]
    out = np.full(len(rows), NOT_APPLICABLE, dtype=np.int8)
    if target == "answer_correct":
        block = think_block(text, prefilled=context.get("prompt_style") == "raw")
        if block is None:
            return out
        label = int(answer_correct(context, context.get("solution_text")))
        for i, r in enumerate(rows):
            if block[0] <= r["char"] <= block[1]:
                out[i] = label
    elif target == "next_verification":
        from analysis.behaviours import classify_response

        rb = classify_response(text, context.get("names"), rules)
        for i, r in enumerate(rows):
            out[i] = int(next_step_is_verification(rb.steps, rb.step_labels, r["char"]))
    elif target == "next_token_chinese":
        for i, r in enumerate(rows):
            if r.get("next_text") is not None:
                out[i] = int(is_chinese(r["next_text"]))
    elif target == "assumed_role_true":
        names, solution = list(context["names"]), list(context["solution"])
        for i, r in enumerate(rows):
            v = assumed_role_true(text[:r["char"]], names, solution)
            if v is not None:
                out[i] = int(v)
    else:
        check_targets([target])
    return out
