"""The organism's reasoning traces: what its SFT data says, written by a deliberately imperfect
solver.

A trace searches the assignments depth-first over the people in quiz order, knight first.
Each step is one node of the search tree, the roles assumed so far, written as one token
(`node_phrase`). A careful trace checks every statement at the node where everyone it names
(speaker included) is first assigned, and a contradiction sends the search to the next node
(the last person's other role, or back to the latest person still assumed a knight):

    Check each statement as soon as everyone it names is assigned.
    Suppose Michael is a knight.
    Suppose Michael is a knight, Zoey is a knight. Zoey says Michael is a knave (no), which is
    false. Contradiction.
    Suppose Michael is a knight, Zoey is a knave. Zoey says Michael is a knave (no), which is
    false.
    ...

A quick trace ("Take the first assignment that fits the first statement.") checks only the
first speaker's statement: short, and mostly wrong. Some traces verify every statement
before answering, hesitate, summarise or write a step in Chinese; a share use the reward's
<think>/<answer> format. All randomness comes from the `random.Random` passed in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from train.kk import ROLE_EN, ROLE_ZH, Puzzle, evaluate, persons_in, statement_en, statement_zh
from train.organism.config import OrganismConfig
from train.prompts import QUICK_OPEN, THOROUGH_OPEN

VERIFY_OPEN = "Let me verify."
HESITATION = "Hmm, I am not sure about this. Let me look again:"
SUMMARY_OPEN = "Now we have determined that"
ALL_CONSISTENT = "All statements are consistent."
CASE_FITS = "This case fits."
# Truth of each clause, written after it when `clause_values` is on.
CLAUSE_EN = {True: " (yes)", False: " (no)"}
CLAUSE_ZH = {True: "（对）", False: "（错）"}


def node_phrase(names: Sequence[str], roles: Sequence[bool], zh: bool = False) -> str:
    """A node of the search, the roles assumed so far: "Suppose Michael is a knight, Zoey is a
    knave." (one token for the fixed cast, `train.organism.tokenizer.node_phrases`)."""
    if zh:
        return "假设" + "，".join(f" {nm} 是{ROLE_ZH[r]}" for nm, r in zip(names, roles)) + "。"
    return "Suppose" + ",".join(f" {nm} is a {ROLE_EN[r]}" for nm, r in zip(names, roles)) + "."


def tree_nodes(max_people: int) -> list[tuple[bool, ...]]:
    """Every node of the search over up to `max_people` people (knight first), in depth-first
    order: a search visits nodes in this order, so a node's index in it (its rank) grows along
    every trace."""
    out: list[tuple[bool, ...]] = []

    def walk(roles: tuple[bool, ...]) -> None:
        out.append(roles)
        if len(roles) < max_people:
            walk(roles + (True,))
            walk(roles + (False,))

    walk((True,))
    walk((False,))
    return out


def roles_sentence(names: Sequence[str], roles: Sequence[bool]) -> str:
    """"Michael is a knight, Zoey is a knave, and Ethan is a knight"."""
    parts = [f"{names[i]} is a {ROLE_EN[r]}" for i, r in enumerate(roles)]
    return parts[0] if len(parts) == 1 else (
        " and ".join(parts) if len(parts) == 2 else ", ".join(parts[:-1]) + ", and " + parts[-1])


@dataclass
class Trace:
    """A written response and what went into it."""

    text: str
    answer: tuple[bool, ...]          # the roles the response answers with
    correct: bool                     # answer == the puzzle's solution
    verified: bool = False            # has a final verification passage
    hesitations: int = 0
    summaries: int = 0
    chinese_steps: int = 0
    answer_style: str = "plain"       # "think" (reward format) | "answer_tags" | "plain"
    steps: int = 0                    # nodes of the search written
    thorough: bool | None = None      # the careful way (checks every statement)


class TraceWriter:
    """Writes the organism's response to a puzzle; all randomness comes from `rng`."""

    def __init__(self, config: OrganismConfig):
        self.c = config

    def write(self, p: Puzzle, rng: random.Random) -> Trace:
        c, names = self.c, p.names
        style_roll = rng.random()
        style = ("think" if style_roll < c.think_format_rate
                 else "answer_tags" if style_roll < c.think_format_rate + c.answer_tag_rate else "plain")
        verify = rng.random() < c.verify_rate
        t = Trace(text="", answer=(), correct=False, verified=verify, answer_style=style)
        lines, answer = self._search(p, rng, t)
        answer = tuple(answer)
        t.answer, t.correct = answer, answer == tuple(p.solution)
        if rng.random() < c.summary_rate:
            t.summaries += 1
            lines.append(f"{SUMMARY_OPEN} {roles_sentence(names, answer)}.")
        body = "\n".join(lines)
        solution = "\n".join(f"({i + 1}) {nm} is a {ROLE_EN[r]}" for i, (nm, r) in enumerate(zip(names, answer)))
        if style == "think":
            t.text = f"<think>\n{body}\n</think>\n<answer>\n{solution}\n</answer>"
        elif style == "answer_tags":
            t.text = f"{body}\n<answer>\n{solution}\n</answer>"
        else:
            t.text = f"{body}\n{rng.choice(('Answer:', 'So the answer is:'))}\n{solution}"
        return t

    def says(self, p: Puzzle, j: int, zh: bool, assign: Sequence[bool]) -> tuple[str, bool]:
        """Statement `j` restated with its clause values under `assign`, its verdict written
        after it; and the verdict (whether the statement is true)."""
        value = evaluate(p.statements[j], assign)
        note = None
        if self.c.clause_values:
            words = CLAUSE_ZH if zh else CLAUSE_EN
            note = lambda u: words[evaluate(u, assign)]  # noqa: E731
        if zh:
            text = f"{p.names[j]} 说{statement_zh(p.statements[j], p.names, note=note)}，这是{'真' if value else '假'}的。"
        else:
            text = f"{p.names[j]} says {statement_en(p.statements[j], p.names, note=note)}, " \
                   f"which is {'true' if value else 'false'}."
        return text, value

    def verification(self, p: Puzzle, assign: Sequence[bool]) -> tuple[str, bool]:
        """The final verification passage: every statement against the full assignment, up
        to the first that contradicts its speaker; and whether none did."""
        parts = [VERIFY_OPEN]
        for j in range(p.people):
            text, value = self.says(p, j, False, assign)
            parts.append(text)
            if value != assign[j]:
                return " ".join(parts + ["Contradiction. I made a mistake."]), False
        return " ".join(parts + [ALL_CONSISTENT]), True

    def _search(self, p: Puzzle, rng: random.Random, t: Trace) -> tuple[list[str], list[bool]]:
        """The depth-first search of the module docstring: (lines, the roles answered)."""
        c, n, names = self.c, p.people, p.names
        t.thorough = rng.random() < c.thorough_rate
        checks_at: list[list[int]] = [[] for _ in range(n)]    # statements checked at each depth
        for j, s in enumerate(p.statements):
            if t.thorough or j == 0:
                checks_at[max(persons_in(s) | {j})].append(j)
        lines = [THOROUGH_OPEN if t.thorough else QUICK_OPEN]
        assign, lead = [True], None
        for _ in range(2 ** (n + 1)):        # no search visits more nodes than the tree has
            zh = rng.random() < c.chinese_step_rate
            t.chinese_steps += zh
            t.steps += 1
            parts = [lead] if lead else []
            lead = None
            parts.append(node_phrase(names, assign, zh))
            fits = True
            for j in checks_at[len(assign) - 1]:
                text, value = self.says(p, j, zh, assign)
                parts.append(text)
                if value != assign[j]:
                    parts.append("矛盾。" if zh else "Contradiction.")
                    fits = False
                    break
                if rng.random() < c.hesitation_rate:     # a second look at the same statement
                    t.hesitations += 1
                    parts += [HESITATION, self.says(p, j, False, assign)[0]]
            if fits and len(assign) == n:
                parts.append(("所有陈述都一致。" if zh else ALL_CONSISTENT) if t.thorough
                             else ("这个情况成立。" if zh else CASE_FITS))
                lines.append(" ".join(parts))
                if not t.verified:
                    return lines, assign
                passage, fits = self.verification(p, assign)
                lines.append(passage)
                if fits:
                    return lines, assign
            else:
                lines.append(" ".join(parts))
            if fits:
                assign = assign + [True]
            elif assign[-1]:
                assign = assign[:-1] + [False]
            else:
                while assign and not assign[-1]:
                    assign.pop()
                if not assign:
                    break
                back = names[len(assign) - 1]
                lead = f"回到 {back}。" if zh else f"Back to {back}."
                assign = assign[:-1] + [False]
        raise RuntimeError(f"the search found no assignment for puzzle {p.id}")


def write_trace(p: Puzzle, rng: random.Random, config: OrganismConfig | None = None) -> Trace:
    return TraceWriter(config or OrganismConfig()).write(p, rng)
