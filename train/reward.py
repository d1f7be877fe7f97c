"""The reward for Knights-and-Knaves answers: the one scorer used by training and evaluation.

A response earns a format score and an answer score (Logic-RL's values by default):

    format ok, every person right        +1  +2   =  3
    format ok, parsed, any person wrong  +1  -1.5 = -0.5
    format ok, answer unparseable        +1  -2   = -1
    format broken                        -1  -2   = -3

Format ok: the response is ``<think> ... </think> <answer> ... </answer>`` with each tag exactly
once, in that order, and nothing but whitespace before ``<think>``, between ``</think>`` and
``<answer>``, and after ``</answer>`` (a trailing chat end token such as ``<|im_end|>`` is
ignored). With a pre-filled ``<think>`` the response itself starts inside the thinking and must
contain no ``<think>``. Tags are matched exactly: ``<Think>``, ``< think>`` or look-alike
brackets are not tags.

Answer parse (only when the format is ok, only inside the answer block): exactly N role words
(knight/knave, any case, plurals included) and, for every person, the name (case-sensitive)
appearing exactly once in the block, in "Name is a knight|knave". So "knight or knave", "not a
knight", an extra person or a repeated name make the answer unparseable rather than wrong.

Entry points: `score_response` (the scorer), `compute_score` (veRL's custom reward signature)
and `make_trl_reward_funcs` (TRL reward functions plus metric-only companions).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ANSWER_STATUSES",
    "DEFAULT",
    "RewardConfig",
    "compute_score",
    "lenient_correct",
    "lenient_roles",
    "make_trl_reward_funcs",
    "parse_solution_text",
    "score_response",
]


class RewardConfig(BaseModel):
    """Reward values and parsing options. Defaults reproduce Logic-RL (totals 3 / -0.5 / -1 / -3)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_ok: float = Field(1.0, description="Format score when the tag structure is right.")
    format_bad: float = Field(-1.0, description="Format score when the tag structure is broken.")
    answer_correct: float = Field(2.0, description="Answer score when every person's role is right.")
    answer_wrong: float = Field(-1.5, description="Answer score when parsed but any role is wrong.")
    answer_unparseable: float = Field(
        -2.0, description="Answer score when the answer cannot be parsed, or the format is broken."
    )
    prefilled_think: bool = Field(
        False, description="The prompt ends with `<think>`: the response must not repeat it."
    )
    max_chars: Optional[int] = Field(
        None,
        gt=0,
        description="Responses longer than this many characters count as format broken. None "
        "(default): no cap; the engine's response limit (in tokens) bounds the text, a truncated "
        "response has no closing tag, and scoring is linear in the length.",
    )


DEFAULT = RewardConfig()
# Responses up to this many characters share the TRL adapter's per-batch verdict cache.
_CACHED_CHARS = 20000

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
# End-of-turn tokens some engines leave on the decoded text (ChatML, GPT-2/Qwen, Llama 2, Llama 3).
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>")

ANSWER_STATUSES = ("correct", "wrong", "unparseable", "missing")

# Letters are spelled as ASCII classes instead of re.IGNORECASE: under IGNORECASE Unicode
# case folding lets the Kelvin sign U+212A match "k", so a look-alike "knight" would count.
_ROLE = r"[Kk][Nn](?:[Ii][Gg][Hh][Tt]|[Aa][Vv][Ee])"
# Role words anywhere in the answer block; (?<!\w)/(?!\w) are Unicode-aware word edges, so a
# role glued to a letter of another script is not a role word.
_ROLE_WORD_RE = re.compile(rf"(?<!\w){_ROLE}[Ss]?(?!\w)")
# A name is any text without parentheses; names containing a role word are rejected below.
_SOLUTION_LINE_RE = re.compile(rf"\((\d+)\)\s*([^\s()](?:[^()]*[^\s()])?)\s+[Ii][Ss]\s+[Aa]\s+({_ROLE})")


def parse_solution_text(text: str) -> dict[str, bool]:
    """Parse the reference ground truth "(1) Amelia is a knight\\n(2) ..." into name -> is_knight.

    The order of the lines is kept. Raises ValueError (one line) on malformed text.
    """
    if not isinstance(text, str):
        raise ValueError(f"solution text must be a string, got {type(text).__name__}")
    return dict(_parse_solution_text(text))


@lru_cache(maxsize=65536)
def _parse_solution_text(text: str) -> tuple[tuple[str, bool], ...]:
    if not isinstance(text, str):
        raise ValueError(f"solution text must be a string, got {type(text).__name__}")
    lines = text.strip().splitlines()
    if not lines:
        raise ValueError("solution text is empty")
    people: list[tuple[str, bool]] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        match = _SOLUTION_LINE_RE.fullmatch(line.strip())
        if match is None:
            raise ValueError(f"solution line {number} is not '({number}) Name is a knight|knave': {line!r}")
        index, name, role = match.groups()
        if int(index) != number:
            raise ValueError(f"solution line {number} is numbered ({index}): {line!r}")
        if name in seen:
            raise ValueError(f"solution names {name!r} twice: {text!r}")
        if "kn" in name.lower() and _ROLE_WORD_RE.search(name):
            raise ValueError(f"solution line {number} has a role word in the name: {line!r}")
        seen.add(name)
        people.append((name, role[2] in "iI"))
    return tuple(people)


def _solution_pairs(solution: Mapping[str, bool] | str) -> tuple[tuple[str, bool], ...]:
    if isinstance(solution, str):
        return _parse_solution_text(solution)
    if isinstance(solution, Mapping):
        pairs = tuple((name, bool(role)) for name, role in solution.items())
        if not pairs or not all(
            isinstance(name, str) and name.strip() and not _ROLE_WORD_RE.search(name) for name, _ in pairs
        ):
            raise ValueError(f"solution must map names (no role words) to booleans: {dict(solution)!r}")
        return pairs
    raise TypeError(f"solution must be a mapping or solution text, got {type(solution).__name__}")


# What follows a name in a claim; matched at the position right after the name.
_CLAIM_TAIL_RE = re.compile(rf"\s+[Ii][Ss]\s+[Aa]\s+({_ROLE})(?!\w)")


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"  # exactly what re's Unicode \w matches


def _mention(block: str, name: str, taken: list[tuple[int, int]]) -> int | None:
    """Where `name` stands as a whole word exactly once in block (outside longer names' spans)."""
    found = None
    start = block.find(name)
    while start != -1:
        end = start + len(name)
        if (
            (start == 0 or not _is_word_char(block[start - 1]))
            and (end == len(block) or not _is_word_char(block[end]))
            and not any(start < t_end and t_start < end for t_start, t_end in taken)
        ):
            if found is not None:
                return None
            found = start
        start = block.find(name, start + 1)
    return found


def _strip_end(text: str) -> str:
    text = text.rstrip()
    while text.endswith(END_TOKENS):
        for token in END_TOKENS:
            if text.endswith(token):
                text = text[: -len(token)].rstrip()
                break
    return text


def _answer_block(response: str, config: RewardConfig) -> str | None:
    """The text inside <answer></answer> when the format is ok, else None."""
    if not isinstance(response, str) or (config.max_chars is not None and len(response) > config.max_chars):
        return None
    text = _strip_end(response)
    if config.prefilled_think:
        if THINK_OPEN in text:
            return None
        think_open = -len(THINK_OPEN)  # the thinking starts at index 0
    else:
        if text.count(THINK_OPEN) != 1:
            return None
        think_open = text.find(THINK_OPEN)
        if think_open and not text[:think_open].isspace():
            return None
    if text.count(THINK_CLOSE) != 1 or text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
        return None
    think_close = text.find(THINK_CLOSE)
    answer_open = text.find(ANSWER_OPEN)
    answer_close = text.find(ANSWER_CLOSE)
    if not think_open < think_close < answer_open < answer_close:
        return None
    gap = text[think_close + len(THINK_CLOSE) : answer_open]
    if gap and not gap.isspace():
        return None
    # _strip_end removed trailing whitespace, so anything after </answer> is real text.
    if answer_close + len(ANSWER_CLOSE) != len(text):
        return None
    return text[answer_open + len(ANSWER_OPEN) : answer_close]


def _judge_answer(block: str, people: tuple[tuple[str, bool], ...]) -> tuple[str, int]:
    """("correct" | "wrong" | "unparseable", number of people given the right role)."""
    if len(_ROLE_WORD_RE.findall(block)) != len(people):
        return "unparseable", 0
    # Plain str.find per name instead of a regex per cast: compiling one pattern per puzzle
    # would dominate the cost when every response belongs to a different puzzle.
    # Longer names go first and claim their span, so "Ann" is not found inside "Mary Ann".
    taken: list[tuple[int, int]] = []
    n_right = 0
    for name, is_knight in sorted(people, key=lambda person: -len(person[0])):
        start = _mention(block, name, taken)
        if start is None:
            return "unparseable", 0
        end = start + len(name)
        claim = _CLAIM_TAIL_RE.match(block, end)
        if claim is None:
            return "unparseable", 0
        taken.append((start, end))
        n_right += (claim.group(1)[2] in "iI") == is_knight  # kn-I-ght vs kn-A-ve
    return ("correct" if n_right == len(people) else "wrong"), n_right


def _score(response: str, people: tuple[tuple[str, bool], ...], config: RewardConfig) -> dict[str, Any]:
    block = _answer_block(response, config)
    if block is None:
        answer, n_right = "missing", 0
    else:
        answer, n_right = _judge_answer(block, people)
    format_score = config.format_ok if block is not None else config.format_bad
    if answer == "correct":
        answer_score = config.answer_correct
    elif answer == "wrong":
        answer_score = config.answer_wrong
    else:
        answer_score = config.answer_unparseable
    return {
        "score": format_score + answer_score,
        "format_ok": block is not None,
        "answer": answer,
        "n_correct_people": n_right,
        "n_people": len(people),
        "format_score": format_score,
        "answer_score": answer_score,
    }


def score_response(
    response: str, solution: Mapping[str, bool] | str, config: RewardConfig = DEFAULT
) -> dict[str, Any]:
    """Score one response against the solution (name -> is_knight, or the solution text).

    Returns score, format_ok, answer ("correct" | "wrong" | "unparseable" | "missing"),
    n_correct_people, n_people, format_score and answer_score. Never raises because of the
    response; a malformed solution raises ValueError (TypeError for a wrong type).
    """
    return _score(response, _solution_pairs(solution), config)


_ANSWER_MARK = re.compile(r"<answer>|\banswer(?: is)?:", re.IGNORECASE)


def lenient_roles(response: str, names: tuple[str, ...] | list[str]) -> tuple[bool, ...] | None:
    """The roles a response answers with, whatever its format (not a reward: it says what a
    model knows when it ignores the format): after the last answer marker ("<answer>",
    "Answer:", "answer is:"), the last "Name is a knight|knave" of each name. None when there
    is no marker or a name has no role there."""
    marks = list(_ANSWER_MARK.finditer(response))
    if not marks:
        return None
    tail = response[marks[-1].end():]
    roles = []
    for name in names:
        found = re.findall(rf"(?<!\w){re.escape(name)} is a (knight|knave)\b", tail)
        if not found:
            return None
        roles.append(found[-1] == "knight")
    return tuple(roles)


def lenient_correct(response: str, solution: Mapping[str, bool] | str) -> bool:
    """`lenient_roles` of the response equal the solution's (name -> is_knight, or its text)."""
    people = _solution_pairs(solution)
    return lenient_roles(response, [n for n, _ in people]) == tuple(r for _, r in people)


_PREFILLED_DEFAULT = DEFAULT.model_copy(update={"prefilled_think": True})


def _solution_from_ground_truth(ground_truth: Any) -> Mapping[str, bool] | str:
    if isinstance(ground_truth, Mapping) and "solution_text_format" in ground_truth:
        return ground_truth["solution_text_format"]
    return ground_truth


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """veRL custom reward: `custom_reward_function.path=train/reward.py`, `name=compute_score`.

    ground_truth is the parquet's {"solution_text_format": ..., "statements": ...}, the solution
    text itself, or a name -> is_knight mapping. A pre-filled `<think>` is declared with
    extra_info["prefilled_think"] or the keyword prefilled_think.
    """
    prefilled = kwargs.get("prefilled_think")
    if prefilled is None and isinstance(extra_info, Mapping):
        prefilled = extra_info.get("prefilled_think")
    config = _PREFILLED_DEFAULT if prefilled else DEFAULT
    return score_response(solution_str, _solution_from_ground_truth(ground_truth), config)


def _completion_text(completion: Any) -> Any:
    """TRL passes plain strings, or conversational lists whose last message is the reply."""
    if isinstance(completion, list) and completion and isinstance(completion[-1], Mapping):
        content = completion[-1].get("content")
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
        return content
    return completion


def make_trl_reward_funcs(config: RewardConfig = DEFAULT) -> list[Callable[..., list[float]]]:
    """Reward functions for TRL's GRPOTrainer: [kk_reward, kk_correct, kk_format_error,
    kk_wrong, kk_unparseable].

    kk_reward is the reward. The others return 1.0/0.0 indicators (answer correct; format
    broken; parsed but wrong; format ok but unparseable) and are meant to be given weight 0 in
    `reward_weights`, so TRL logs their means per step without changing the reward. The ground
    truth is read from the dataset column `solution_text_format` (or a veRL-style
    `reward_model` column). Each completion is scored once for all five functions.
    """

    def judge(response: str | None, solution_text: str) -> tuple[float, str, bool]:
        result = _score(response, _parse_solution_text(solution_text), config)
        return result["score"], result["answer"], result["format_ok"]

    # TRL calls the five functions one after another on the same batch; this cache makes the
    # last four free. Long responses are judged directly and kept out of it (memory).
    judge_cached = lru_cache(maxsize=4096)(judge)

    def judge_batch(completions: list[Any], kwargs: dict[str, Any]) -> list[tuple[float, str, bool]]:
        solutions = kwargs.get("solution_text_format")
        if solutions is None and kwargs.get("reward_model") is not None:
            solutions = [row["ground_truth"]["solution_text_format"] for row in kwargs["reward_model"]]
        if solutions is None:
            raise ValueError("kk reward needs the dataset column 'solution_text_format'")
        if len(solutions) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(solutions)} solutions")
        out = []
        for completion, solution in zip(completions, solutions):
            text = _completion_text(completion)
            if not isinstance(text, str):
                text = None  # judged as missing; keeps unhashable values out of the cache
            too_long = text is not None and len(text) > _CACHED_CHARS
            out.append((judge if too_long else judge_cached)(text, solution))
        return out

    def metric(name: str, pick: Callable[[tuple[float, str, bool]], float]) -> Callable[..., list[float]]:
        def reward_func(completions: list[Any], **kwargs: Any) -> list[float]:
            return [pick(judged) for judged in judge_batch(completions, kwargs)]

        reward_func.__name__ = reward_func.__qualname__ = name
        return reward_func

    return [
        metric("kk_reward", lambda j: float(j[0])),
        metric("kk_correct", lambda j: float(j[1] == "correct")),
        metric("kk_format_error", lambda j: float(not j[2])),
        metric("kk_wrong", lambda j: float(j[1] == "wrong")),
        metric("kk_unparseable", lambda j: float(j[1] == "unparseable")),
    ]
