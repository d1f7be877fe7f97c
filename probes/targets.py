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
* assumed_role_true   is the role the reasoning currently assumes for a named person the true
                      one: the latest "Assume / Suppose / If X is a knight|knave" (假设 / 如果 X
                      是骑士|骗子), or, when a header assigning several people came later
                      ("Case 3: A is a knight, B is a knave, ..." / "情况3：..."; a search
                      node "Suppose A is a knight, B is a knave." / "假设 A 是骑士， B 是骗子。"),
                      its role for the person being checked (the latest "X says" / "X 说" after
                      the header, else the case's first person or the node's last, the one
                      it adds); only where such an assumption exists.

Control tasks (`CONTROL_UNITS`): Hewitt and Liang give each word type a random label, the unit
a memorising probe could key on. For a target that labels single positions that unit is the
token at the position; answer_correct labels whole responses, so its control gives each
response one random label (the token-type control is reported beside it: where a model's
decision points use a dozen token types, as kk-tiny's do, a linear probe reads any labelling
of them, which says nothing about a label that is not a function of the token).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from analysis.steps import think_span
from analysis.verify_prob import KINDS
from train.errors import UserError

TARGETS = ("answer_correct", "next_verification", "next_token_chinese", "assumed_role_true")
# Control tasks per target, the first the one selectivity is measured against.
CONTROL_UNITS = {"answer_correct": ("response", "token"), "next_verification": ("token",),
                 "next_token_chinese": ("token",), "assumed_role_true": ("token",)}
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
# A case header of a search by cases, or a node of a depth-first search, and the assignments
# it lists (group 1: a case, whose first person is checked first; group 2: a node, whose
# last person is the one it adds).
_CASE = re.compile(r"(?:\b(?i:case)\s*\d+\s*:|情况\s*\d+\s*[:：])([^.。\n]*)|(?:\b(?i:suppose)\b|假设)([^.。\n]*)")
_CASE_ROLE = re.compile(r"([A-Z][\w'-]*)\s*(?:(?i:is\s+an?\s+(knight|knave))\b|是\s*(骑士|骗子|无赖))")
_SPEAKER = re.compile(r"([A-Z][\w'-]*)\s*(?:says\b|说)")
_REPORTED = re.compile(r"\b(?:says?|said|claims?|claimed|states?|stated)\b[^.!?\n]*$|说[^。！？\n]*$", re.IGNORECASE)
_KNIGHT = ("knight", "骑士")


class TargetError(UserError):
    pass


def _choose(items: Sequence[str] | str, allowed: Sequence[str], what: str) -> list[str]:
    """Comma-separated or listed names, deduplicated and checked against `allowed` (one-line
    error naming the unknown ones)."""
    items = items.split(",") if isinstance(items, str) else list(items)
    chosen = list(dict.fromkeys(x.strip() for x in items if x.strip()))
    unknown = [x for x in chosen if x not in allowed]
    if unknown or not chosen:
        raise TargetError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {', '.join(allowed)}")
    return chosen


def check_kinds(kinds: Sequence[str] | str) -> list[str]:
    """Decision-point kinds to probe at ("before_think_end,step_start", "all" or a list), validated."""
    if isinstance(kinds, str) and kinds.strip() == "all":
        return list(KINDS)
    return _choose(kinds, KINDS, "decision-point kind(s)")


def check_targets(targets: Sequence[str]) -> list[str]:
    """The targets, validated."""
    return _choose(targets, TARGETS, "probe target(s)")


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
    from train.generate import prompt_reward_config
    from train.reward import score_response

    style = record.get("prompt_style", "chat")
    return score_response(record["text"], solution_text, prompt_reward_config(style))["answer"] == "correct"


def is_chinese(token_text: str) -> bool:
    """The token's first non-space character is CJK."""
    core = token_text.strip()
    return bool(core) and bool(_CJK.match(core))


def latest_case(prefix: str, names: Sequence[str]) -> tuple[int, str, bool] | None:
    """(offset, name, is_knight) from the latest case header in `prefix`: the role it gives the
    person being checked (the latest speaker after the header, else the header's first person),
    or None without a header."""
    known = set(names)
    header = None
    for m in _CASE.finditer(prefix):
        header = m
    if header is None:
        return None
    listed = header.group(1) if header.group(1) is not None else header.group(2)
    roles = {name: (en or zh).lower() in _KNIGHT for name, en, zh in _CASE_ROLE.findall(listed) if name in known}
    if not roles:
        return None
    speakers = [m.group(1) for m in _SPEAKER.finditer(prefix, header.end()) if m.group(1) in roles]
    name = speakers[-1] if speakers else list(roles)[0 if header.group(1) is not None else -1]
    return header.start(), name, roles[name]


def latest_assumption(prefix: str, names: Sequence[str]) -> tuple[str, bool] | None:
    """(name, is_knight) of the latest assumption about a puzzle person in `prefix`, or None:
    an "Assume X is ..." or a case header (`latest_case`), whichever comes later. Assumptions
    inside reported speech ("Zoey says if ...") or open quotes do not count."""
    case = latest_case(prefix, names)
    best: tuple[int, str, bool] | None = case
    known = set(names)
    for pattern in (_ASSUME_EN, _ASSUME_ZH):
        for m in pattern.finditer(prefix):
            name, role = m.group(1), m.group(2).lower()
            if name not in known:
                continue
            start = m.start(1)
            if case is not None and case[0] <= start and "\n" not in prefix[case[0]:start] \
                    and not re.search(r"[.。]", prefix[case[0]:start]):
                continue            # the header's own first assignment
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
            # no next token (the response ends there): None, or NaN once the rows went through pandas
            if isinstance(r.get("next_text"), str):
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
