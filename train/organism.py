"""kk-tiny: a model organism of the Logic-RL base model, small enough to build on 2 CPU cores.

A few-million-parameter Qwen2, started from hand-wired circuits (train/circuits.py), is
fine-tuned (SFT) on solutions written by a deliberately imperfect solver. Like the 7B base
model of the article, the result

* solves some puzzles and gets others wrong,
* knows how to check every statement before answering, but mostly does not,
* sometimes hesitates, summarises, verifies, or writes a step in Chinese,
* mostly ignores the requested <think>/<answer> format (a minority of responses use it),

so that GRPO has something to improve: the format, and the share of careful solutions.

The default solver (`search="cases"`) goes through the assignments in a fixed order (case k:
the bits of k-1, first person most significant, 0 = knight) and checks each against the
statements, one by one, until a statement contradicts its speaker's role:

    Check every statement in each case.
    Case 1: Michael is a knight, Zoey is a knight, Ethan is a knight. Michael says Zoey is a
    knave (no), which is false. Contradiction.
    Case 2: ... Michael says Zoey is a knave (no), which is false. Contradiction.
    Case 3: ... Michael says Zoey is a knave (yes), which is true. Zoey says ... All statements
    are consistent.

A thorough trace (`thorough_rate`) checks every statement and is always right; a quick one
("Find the first case that fits the first statement.") checks only the first speaker's and
takes the first case that fits it: short, and right about a quarter of the time on 3 people.
Every token of a case follows from the case number, which a wired head finds (the latest
case token) wherever it is, and from the statement being checked, which a wired induction
head copies from the quiz; a clause and its value are one token (`value_tokens`).

The earlier solver (`search="steps"`) is a depth-first search over the people in quiz order
(knight first), where a check needs the roles assumed lines earlier; its mistakes overlook a
contradiction (`mistake`). README, "Status of kk-tiny", says what each choice changed.

    python -m train.organism build --out /tmp/kk-tiny          # the default organism
    python -m train.organism measure /tmp/kk-tiny --n 200      # its behaviour on held-out puzzles
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from train.errors import UserError
from train.kk import (GeneratorConfig, Puzzle, PuzzleGenerator, Statement, evaluate, is_unit, persons_in,
                      statement_en, unit_parts)
from train.prompts import chat_messages

# --------------------------------------------------------------------------- settings

BUILD_VERSION = 2      # raise when the same config would build a different model (cache key)


class OrganismConfig(BaseModel):
    """Everything that decides the organism; one config gives one model, bit for bit on one
    kind of CPU (`bf16` follows the CPU unless set)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(0, description="Seeds puzzles, traces, initial weights and data order.")
    # Puzzles
    sizes: tuple[int, ...] = Field((2, 3, 4, 5), description="Numbers of people in the SFT puzzles.")
    size_weights: tuple[float, ...] = Field(
        (0.10, 0.45, 0.28, 0.17), description="Relative share of each size in `sizes`.")
    n_puzzles: int = Field(9000, ge=1, description="SFT puzzles (one trace each).")
    heldout_seed: int = Field(
        777, description="Seed of the held-out puzzles `measure_organism` uses; SFT excludes them.")
    heldout_per_size: int = Field(200, ge=0, description="Held-out puzzles per size excluded from SFT.")
    exclude_data_seed: int | None = Field(
        0, description="SFT also excludes the test splits `train.data` draws for this seed (None: don't).")
    exclude_test_per_size: int = Field(100, ge=0, description="Size of those test splits.")
    # Behaviour of the trace writer
    search: Literal["steps", "cases"] = Field(
        "cases", description="How a trace searches. 'steps': depth-first over the people, "
        "assuming one role at a time and going back on a contradiction. 'cases': every "
        "assignment in a fixed order (Case 1, Case 2, ...), each checked statement by statement; "
        "a case's roles follow from its number alone, so no step needs the search history.")
    thorough_rate: float = Field(
        0.45, ge=0, le=1, description="`cases` search: share of traces that check every statement "
        "of each case (\"Check every statement in each case.\"); the rest take the first case "
        "that fits the first speaker's statement (\"Find the first case that fits the first "
        "statement.\"), short and mostly wrong.")
    step_mistake_rate: float = Field(
        0.25, ge=0, le=1, description="Chance that a contradicting statement is let through, so a "
        "wrong role is accepted (how: `mistake`).")
    mistake: Literal["overlook", "flip"] = Field(
        "overlook", description="How a mistake is written. 'overlook': the statement's truth is "
        "written right and the contradiction is not noticed. 'flip': its truth is written flipped, "
        "so that it agrees with the speaker's role; a verdict in the SFT data then follows the "
        "speaker's role more often than the clauses, and the organism learns that shortcut "
        "(README, \"Status of kk-tiny\").")
    verify_rate: float = Field(
        0.07, ge=0, le=1, description="Chance that a trace verifies every statement before "
        "answering (and goes back when that finds a contradiction).")
    hesitation_rate: float = Field(
        0.04, ge=0, le=1, description="Chance, per accepted assumption, of 'Hmm, I am not sure "
        "about this.' followed by a second look at that step's statements.")
    summary_rate: float = Field(
        0.08, ge=0, le=1, description="Chance, per accepted assumption after the first, of a stage "
        "summary 'Now we have determined that ...'.")
    chinese_step_rate: float = Field(
        0.05, ge=0, le=1, description="Chance that a search step is written in Chinese.")
    clause_values: bool = Field(
        True, description="Write each clause's truth after it when a statement is checked "
        "(\"if Mia is a knave (no) then ...\"), so a verdict follows from values written a few "
        "tokens back instead of from roles fixed lines earlier.")
    values_after: bool = Field(
        False, description="With `clause_values`, write the clause values after the whole "
        "statement (\"Zoey says Ethan is a knave or Mia is a knight: no, yes, which is true.\") "
        "instead of after each clause: the statement is then copied without a break, and with "
        "`clause_tokens` 3-person accuracy rises from 11/60 to 21/60 greedy (README, \"Status of "
        "kk-tiny\").")
    role_notes: bool = Field(
        False, description="Every person named in a checked statement carries the role assumed "
        "for them: \"Michael (knight) says Ethan (knave) is a knight (no)\". The latest mention of "
        "a person then tells their current role, so a clause value needs only the previous "
        "occurrence of a name, not the search history: held-out clause-value loss 0.02 instead of "
        "0.53, verdict loss 0.0007 instead of 0.25. Off by default: the checks become so alike "
        "that greedy decoding loops over them (45% of 3-person responses unfinished at 512 "
        "tokens), and traces grow by a quarter (README, \"Status of kk-tiny\").")
    think_format_rate: float = Field(
        0.35, ge=0, le=1, description="Share of responses in the exact <think>...</think><answer>..."
        "</answer> format the reward wants.")
    answer_tag_rate: float = Field(
        0.15, ge=0, le=1, description="Share of responses with <answer> tags but no <think> block "
        "(format broken); the rest end with a plain 'Answer:' list.")
    fixed_cast: bool = Field(
        True, description="Puzzles star a fixed cast (an n-person puzzle's people are the first n "
        "names of train.kk.NAMES, in order), here and in the RL data of any model built with it. "
        "With names drawn at random the organism must find which name comes next in the quiz's "
        "list, which a 2-core build does not learn: 3-person accuracy stays at 0/60.")
    # Tokenizer and model
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary size (with special tokens).")
    names_as_tokens: bool = Field(
        True, description="Every puzzle name is one added token. Byte-level BPE spells a name "
        "differently after a space and after a quote, so copying it from the quiz would be a "
        "learned mapping between unrelated tokens; as one token the model learns to copy names "
        "about twice as early in SFT.")
    clause_tokens: bool = Field(
        True, description="Every speaker phrase (\"Zoey says\") and every clause (\"Zoey is not a "
        "knave\") of the fixed cast's first 8 names is one added token, with and without a leading "
        "space. A speaker then occurs once in a quiz, so a check finds the statement it restates "
        "by one-token induction, and copies it clause by clause (`cast_phrases`).")
    value_tokens: bool = Field(
        True, description="With `clause_tokens` and values written after each clause "
        "(`values_after` false), every clause with its value (\" Zoey is a knave (no)\") is one "
        "token, whose embedding starts as the bare clause's: a value then sits on the clause it "
        "belongs to, and the copy of a statement from the quiz runs through it.")
    hidden_size: int = Field(192, ge=16)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(768, ge=16)
    max_position_embeddings: int = Field(2048, ge=256)
    rope_theta: float = Field(1e8, gt=0, description="RoPE base. Large, so the slow RoPE pairs stay "
        "nearly unrotated across a whole prompt and response, where the induction circuit matches.")
    induction_init: bool = Field(
        True, description="Start from a hand-wired induction circuit (train/circuits.py) instead "
        "of random weights. Without it SFT on 2 cores never learns to copy a name from the "
        "prompt: held-out name loss 1.98 and copy probe 0.04, against 1.05 and 0.79 with it.")
    case_head: bool = Field(
        True, description="`cases` search with `induction_init`: also wire a layer-0 head that "
        "attends to the latest case number (train.circuits.wire_latest_marker), so every position "
        "knows the case being checked; a case's roles, and so every clause value, follow from it.")
    think_head: bool = Field(
        True, description="With `induction_init`, the opening of a think block (\"<think>\" and a "
        "newline, one token; the system prompt's \"<think>\" stays another) is a marker that a "
        "wired layer-0 head attends to (train.circuits.wire_latest_marker), so the end of a long "
        "search still knows to close the block.")
    embed_scale: float = Field(50.0, gt=0, description="Embedding scale of the wired init "
        "(train.circuits.wire_induction); keeps the circuit alive through SFT.")
    # SFT
    bare_quiz_epochs: float = Field(
        0.3, ge=0, description="Passes over the SFT examples with the bare quiz as the prompt (no "
        "system turn), run before `epochs`. Copying from the quiz (induction) forms much sooner "
        "in the short context than behind the 150-token system turn, and carries over to it.")
    epochs: float = Field(1.0, gt=0, description="Passes over the SFT examples with the full chat "
        "prompt (fractions allowed).")
    lr: float = Field(2e-3, gt=0, description="Peak AdamW learning rate (linear warm-up, cosine decay).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of `lr`.")
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    batch_tokens: int = Field(2048, ge=256, description="Tokens per optimizer step (padded batch "
        "area, not counting the shared system turn).")
    max_length: int = Field(1024, ge=64, description="Longest SFT example in tokens; longer ones are dropped.")
    bf16: bool | None = Field(
        None, description="bf16 autocast for SFT. None: only where the CPU has native bf16 "
        "(AVX512-BF16 or AMX; `cpu_has_fast_bf16`), where it is 2-3x faster than fp32. On an "
        "AVX2-only CPU autocast emulates bf16 and a step is about 16x slower than fp32.")
    threads: int = Field(2, ge=1, description="torch threads.")

    @model_validator(mode="after")
    def _circuit_fits(self) -> "OrganismConfig":
        from train.circuits import check_geometry

        problem = self.induction_init and check_geometry(self.hidden_size, self.num_heads, self.num_layers)
        if problem:
            raise ValueError(f"{problem} (or set induction_init false)")
        extra = (self.search == "cases" and self.case_head) + self.think_head
        if self.induction_init and self.num_heads // 2 + extra > self.num_heads:
            raise ValueError(f"{self.num_heads} heads leave {self.num_heads - self.num_heads // 2} free "
                             f"in layer 0 after the induction circuit, and case_head and think_head "
                             f"need {extra} (set one false, or use more heads)")
        return self

    def fingerprint(self) -> str:
        import hashlib

        # BUILD_VERSION: a change in how a config is built gives a new cache key too.
        return hashlib.sha1(f"{BUILD_VERSION} {self.model_dump_json()}".encode()).hexdigest()[:12]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's own check: AVX512-BF16 or AMX)."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_bf16(config: OrganismConfig) -> bool:
    return cpu_has_fast_bf16() if config.bf16 is None else config.bf16


def config_with(overrides: Sequence[str]) -> OrganismConfig:
    """OrganismConfig with `key=value` overrides (values parsed as JSON when they can be)."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in OrganismConfig.model_fields:
            raise UserError(f"--set {item!r}: expected key=value with a key of OrganismConfig "
                            f"({', '.join(OrganismConfig.model_fields)})")
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw
    try:
        return OrganismConfig(**values)
    except ValidationError as e:
        err = e.errors()[0]
        where = " ".join(["--set", *map(str, err["loc"])])
        raise UserError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None


# --------------------------------------------------------------------------- trace writer

ROLE_EN = {True: "knight", False: "knave"}
ROLE_ZH = {True: "骑士", False: "骗子"}

VERIFY_OPEN = "Let me verify."
VERIFY_OPEN_ZH = "让我验证一下。"
HESITATION = "Hmm, I am not sure about this. Let me look again:"
SUMMARY_OPEN = "Now we have determined that"
# How a `cases` trace opens, and how it takes a case.
THOROUGH_OPEN = "Check every statement in each case."
QUICK_OPEN = "Find the first case that fits the first statement."
ALL_CONSISTENT = "All statements are consistent."
CASE_FITS = "This case fits."
# A response's think block opens with this; as one token it differs from the system prompt's "<think>".
THINK_OPEN = "<think>\n"
# Truth of each clause, written after it when `clause_values` is on.
CLAUSE_EN = {True: " (yes)", False: " (no)"}
CLAUSE_ZH = {True: "（对）", False: "（错）"}


def statement_zh(stmt: Statement, names: Sequence[str], top: bool = True,
                 note: Callable[[Statement], str] | None = None) -> str:
    """Chinese for a statement; names keep a space on each side, as in mixed-script writing.
    `note(unit)` is appended to every clause, as in `train.kk.statement_text`."""
    op = stmt[0]
    if is_unit(stmt):
        leaf, negated = unit_parts(stmt)
        text = f" {names[leaf[1]]} {'不是' if negated else '是'}{ROLE_ZH[leaf[0] == 'telling-truth']}"
        return text + (note(stmt) if note else "")
    sub = lambda s: statement_zh(s, names, top=False, note=note)  # noqa: E731
    if op == "not":
        text = f"并非{sub(stmt[1])}"
    elif op in ("and", "or"):
        text = ("并且" if op == "and" else "或者").join(sub(s) for s in stmt[1:])
    elif op == "->":
        text = f"如果{sub(stmt[1])}，那么{sub(stmt[2])}"
    else:
        text = f"{sub(stmt[1])}当且仅当{sub(stmt[2])}"
    return text if top else f"（{text}）"


@dataclass
class Trace:
    """A written response and what went into it."""

    text: str
    answer: tuple[bool, ...]          # the roles the response answers with
    correct: bool                     # answer == the puzzle's solution
    mistakes: int = 0                 # contradictions let through
    verified: bool = False            # has a final verification passage
    hesitations: int = 0
    summaries: int = 0
    chinese_steps: int = 0
    answer_style: str = "plain"       # "think" (reward format) | "answer_tags" | "plain"
    steps: int = 0                    # search steps (assumptions, or cases) written
    thorough: bool | None = None      # `cases` search: checks every statement of each case


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
        search = self._cases if c.search == "cases" else self._steps
        lines, answer = search(p, rng, t)
        answer = tuple(answer)
        t.answer, t.correct = answer, answer == tuple(p.solution)
        if rng.random() < c.summary_rate:
            t.summaries += 1
            lines.append(f"{SUMMARY_OPEN} {_roles_sentence(names, answer)}.")
        body = "\n".join(lines)
        solution = "\n".join(f"({i + 1}) {nm} is a {ROLE_EN[r]}" for i, (nm, r) in enumerate(zip(names, answer)))
        if style == "think":
            t.text = f"<think>\n{body}\n</think>\n<answer>\n{solution}\n</answer>"
        elif style == "answer_tags":
            t.text = f"{body}\n<answer>\n{solution}\n</answer>"
        else:
            t.text = f"{body}\n{rng.choice(('Answer:', 'So the answer is:'))}\n{solution}"
        return t

    def _says(self, p: Puzzle, j: int, value: bool, zh: bool, assign: Sequence[bool]) -> str:
        """Statement `j` restated, its clause values, and the verdict `value` ('flip' mistakes
        flip it; clause values are always right)."""
        c, names = self.c, p.names
        note, after = None, []
        if c.clause_values:
            words = CLAUSE_ZH if zh else CLAUSE_EN
            if c.values_after:      # collected in reading order, written after the statement
                note = lambda u: after.append(words[evaluate(u, assign)].strip(" ()（）")) or ""  # noqa: E731
            else:
                note = lambda u: words[evaluate(u, assign)]  # noqa: E731
        who = names
        if c.role_notes:    # everyone a checked statement names is assigned by now
            fmt = "{}（{}）" if zh else "{} ({})"
            who = [fmt.format(nm, (ROLE_ZH if zh else ROLE_EN)[r]) for nm, r in zip(names, assign)]
        if zh:
            text = statement_zh(p.statements[j], who, note=note) + ("：" + "，".join(after) if after else "")
            return f"{who[j]} 说{text}，这是{'真' if value else '假'}的。"
        text = statement_en(p.statements[j], who, note=note) + (": " + ", ".join(after) if after else "")
        return f"{who[j]} says {text}, which is {'true' if value else 'false'}."

    @staticmethod
    def _contradiction(zh: bool) -> str:
        return "矛盾。" if zh else "Contradiction."

    def _verification(self, p: Puzzle, assign: Sequence[bool]) -> tuple[str, bool]:
        """The final verification passage: every statement against the full assignment, up
        to the first that contradicts its speaker; and whether none did."""
        parts = [VERIFY_OPEN]
        for j in range(p.people):
            value = evaluate(p.statements[j], assign)
            parts.append(self._says(p, j, value, False, assign))
            if value != assign[j]:
                return " ".join(parts + ["Contradiction. I made a mistake."]), False
        return " ".join(parts + [ALL_CONSISTENT]), True

    def _cases(self, p: Puzzle, rng: random.Random, t: Trace) -> tuple[list[str], list[bool]]:
        """Cases in a fixed order (case k: the bits of k-1, first person most significant,
        0 = knight), each checked statement by statement until one contradicts its speaker.
        A thorough trace checks every statement; a quick one only the first speaker's and
        takes the first case that fits it. Everything a token depends on is local: a case's
        roles follow from its number, which is one token (`case_tokens`)."""
        c, n = self.c, p.people
        t.thorough = rng.random() < c.thorough_rate
        lines = [THOROUGH_OPEN if t.thorough else QUICK_OPEN]
        lead = None
        for k in range(2 ** n):
            assign = [not (k >> (n - 1 - i)) & 1 for i in range(n)]
            zh = rng.random() < c.chinese_step_rate
            t.chinese_steps += zh
            t.steps += 1
            parts = [lead] if lead else []
            lead = None
            roles = zip(p.names, assign)
            if zh:
                parts.append(f"情况{k + 1}：" + "，".join(f" {nm} 是{ROLE_ZH[r]}" for nm, r in roles) + "。")
            else:
                parts.append(f"Case {k + 1}:" + ",".join(f" {nm} is a {ROLE_EN[r]}" for nm, r in roles) + ".")
            fits = True
            for j in range(n if t.thorough else 1):
                value = evaluate(p.statements[j], assign)
                parts.append(self._says(p, j, value, zh, assign))
                if value != assign[j]:
                    parts.append(self._contradiction(zh))
                    fits = False
                    break
                if rng.random() < c.hesitation_rate:     # a second look at the same statement
                    t.hesitations += 1
                    parts += [HESITATION, self._says(p, j, value, False, assign)]
            if not fits:
                lines.append(" ".join(parts))
                continue
            parts.append(("所有陈述都一致。" if zh else ALL_CONSISTENT) if t.thorough
                         else ("这个情况成立。" if zh else CASE_FITS))
            lines.append(" ".join(parts))
            if t.verified:      # catches a quick trace's wrong case
                passage, consistent = self._verification(p, assign)
                lines.append(passage)
                if consistent:
                    return lines, assign
                lead = "Back to the cases."
                continue
            return lines, assign
        raise RuntimeError(f"no case fits puzzle {p.id}")

    def _steps(self, p: Puzzle, rng: random.Random, t: Trace) -> tuple[list[str], list[bool]]:
        """Depth-first search over the people in quiz order (knight first); see the module
        docstring."""
        c, n, names, stmts = self.c, p.people, p.names, p.statements
        verify = t.verified
        # A statement is evaluated at the first person by whom its speaker and every person it
        # mentions are assigned.
        closes_at: list[list[int]] = [[] for _ in range(n)]
        for j, s in enumerate(stmts):
            closes_at[max(persons_in(s) | {j})].append(j)

        lines = [" ".join(f"{names[j]} says {statement_en(s, names)}." for j, s in enumerate(stmts))]
        path: list[bool] = []      # roles of persons 0..len(path)-1 on the current branch
        k, role = 0, True          # the person being assigned and the role tried
        lead = None                # text that opens the next step (after a go-back)
        budget = 8 * 2 ** n        # no search needs more; guards the loop
        while budget:
            budget -= 1
            zh = rng.random() < c.chinese_step_rate
            t.chinese_steps += zh
            t.steps += 1
            if zh:
                head = f"假设 {names[k]} 是骑士。" if role else f"所以 {names[k]} 是骗子。"
            else:
                head = f"Assume {names[k]} is a knight." if role else f"So {names[k]} is a knave."
            parts = [lead, head] if lead else [head]
            lead = None
            assign = path + [role]
            ok, checked = True, []
            for j in closes_at[k]:
                value = evaluate(stmts[j], assign)
                holds = value == assign[j]
                if not holds and rng.random() < c.step_mistake_rate:
                    holds = True
                    if c.mistake == "flip":
                        value = not value
                    t.mistakes += 1
                parts.append(self._says(p, j, value, zh, assign))
                checked.append(j)
                if not holds:
                    parts.append(self._contradiction(zh))
                    ok = False
                    break
            if ok and checked and rng.random() < c.hesitation_rate:
                # A second look at this step's statements, evaluated without mistakes.
                t.hesitations += 1
                parts.append(HESITATION)
                for j in checked:
                    value = evaluate(stmts[j], assign)
                    parts.append(self._says(p, j, value, False, assign))
                    if value != assign[j]:
                        parts.append(self._contradiction(False))
                        ok = False
                        break
            lines.append(" ".join(parts))
            if ok:
                path = assign
                if len(path) < n:
                    if len(path) >= 2 and rng.random() < c.summary_rate:
                        t.summaries += 1
                        lines.append(f"{SUMMARY_OPEN} {_roles_sentence(names, path)}.")
                    k, role = len(path), True
                    continue
                if not verify:
                    break
                passage, consistent = self._verification(p, path)
                lines.append(passage)
                if consistent:
                    break
                path = path[:-1]   # the last step was not a dead end, but the assignment is
                role_last = assign[-1]
                if role_last:
                    k, role, lead = n - 1, False, f"Back to {names[n - 1]}."
                    continue
                k, role, lead = self._go_back(path, names, rng, reason=None)
                continue
            if role:
                role = False
                continue
            k, role, lead = self._go_back(path, names, rng, reason=k)
        else:
            raise RuntimeError(f"trace search did not finish for puzzle {p.id}")

        return lines, path

    @staticmethod
    def _go_back(path: list[bool], names: Sequence[str], rng: random.Random,
                 reason: int | None) -> tuple[int, bool, str]:
        """Back to the latest person still assumed a knight; they become a knave."""
        while path and not path[-1]:
            path.pop()
        if not path:
            raise RuntimeError("search exhausted: the puzzle has no solution under these steps")
        j = len(path) - 1
        path.pop()
        if reason is None:
            return j, False, f"Back to {names[j]}."
        return j, False, f"{names[reason]} can be neither, so back to {names[j]}."


def _roles_sentence(names: Sequence[str], roles: Sequence[bool]) -> str:
    parts = [f"{names[i]} is a {ROLE_EN[r]}" for i, r in enumerate(roles)]
    return parts[0] if len(parts) == 1 else (
        " and ".join(parts) if len(parts) == 2 else ", ".join(parts[:-1]) + ", and " + parts[-1])


def write_trace(p: Puzzle, rng: random.Random, config: OrganismConfig | None = None) -> Trace:
    return TraceWriter(config or OrganismConfig()).write(p, rng)


# --------------------------------------------------------------------------- SFT data


def heldout_puzzles(people: int, n: int, seed: int = 777, fixed_cast: bool = True) -> list[Puzzle]:
    """The first `n` distinct held-out puzzles of one size (what `measure_organism` uses).

    Fewer when the size has fewer distinct puzzles (there are about 400 of 2 people).
    """
    gen = PuzzleGenerator(seed * 1000 + people, GeneratorConfig(fixed_cast=fixed_cast))
    out, seen, misses = [], set(), 0
    while len(out) < n and misses < 20 * n + 100:
        p = gen.generate(people)
        if p.content_key in seen:
            misses += 1
            continue
        seen.add(p.content_key)
        out.append(p)
    return out


def excluded_keys(config: OrganismConfig) -> set[str]:
    """Content keys SFT must not see: held-out measurement puzzles and the dataset test splits."""
    keys: set[str] = set()
    for n in config.sizes:
        keys |= {p.content_key for p in heldout_puzzles(n, config.heldout_per_size, config.heldout_seed,
                                                         config.fixed_cast)}
        if config.exclude_data_seed is not None and config.exclude_test_per_size:
            from train.data import generate_split

            test = generate_split(n, n_train=0, n_test=config.exclude_test_per_size,
                                  seed=config.exclude_data_seed, fixed_cast=config.fixed_cast)["test"]
            keys |= {p.content_key for p in test}
    return keys


def sft_puzzles(config: OrganismConfig, exclude: set[str] | None = None) -> list[Puzzle]:
    """SFT puzzles, sizes drawn by `size_weights`, none of them in `exclude` (by default
    `excluded_keys(config)`). Small sizes repeat puzzles; each repeat gets its own trace."""
    if len(config.size_weights) != len(config.sizes):
        raise ValueError("size_weights must have one weight per entry of sizes")
    exclude = excluded_keys(config) if exclude is None else exclude
    rng = random.Random(config.seed)
    world = GeneratorConfig(fixed_cast=config.fixed_cast)
    gens = {n: PuzzleGenerator(config.seed * 1000 + 500 + n, world) for n in config.sizes}
    out = []
    while len(out) < config.n_puzzles:
        n = rng.choices(config.sizes, weights=config.size_weights)[0]
        for _ in range(10_000):
            p = gens[n].generate(n)
            if p.content_key not in exclude:
                out.append(p)
                break
        else:
            raise ValueError(f"every {n}-person puzzle found is excluded; lower heldout_per_size")
    return out


def sft_traces(puzzles: Sequence[Puzzle], config: OrganismConfig) -> list[Trace]:
    rng = random.Random(config.seed + 1)
    writer = TraceWriter(config)
    return [writer.write(p, rng) for p in puzzles]


# --------------------------------------------------------------------------- tokenizer and model


def cast_phrases(n_names: int = 8) -> list[str]:
    """The fixed cast's speaker phrases ("Zoey says") and clauses ("Zoey is not a knave") for
    the first `n_names` names, each with and without a leading space (`clause_tokens`)."""
    from train.kk import NAMES

    cast = NAMES[:n_names]
    phrases = [f"{n} says" for n in cast] + [f"{n} is {neg}a {r}" for n in cast for neg in ("", "not ")
                                            for r in ("knight", "knave")]
    return [v for p in phrases for v in (p, " " + p)]


def valued_clauses() -> dict[str, str]:
    """Each clause of `cast_phrases()` followed by its value (" Zoey is a knave (no)"), mapped
    to the bare clause (`value_tokens`)."""
    return {c + CLAUSE_EN[v]: c for c in cast_phrases() if " says" not in c for v in (True, False)}


def case_phrases(max_people: int = 6) -> list[str]:
    """The case numbers of a `cases` search ("Case 12", "情况12") up to 2**`max_people`."""
    return [f"{w}{k}" for w in ("Case ", "情况") for k in range(1, 2 ** max_people + 1)]


def train_tokenizer(texts: Sequence[str], vocab_size: int, names_as_tokens: bool = True,
                    clause_tokens: bool = False, case_tokens: bool = False, value_tokens: bool = False,
                    think_token: bool = False):
    """Qwen-style byte-level BPE (see train/tokenizer.py); the format tags, the puzzle names
    when `names_as_tokens`, `cast_phrases()` when `clause_tokens`, `case_phrases()` when
    `case_tokens`, `valued_clauses()` when `value_tokens` and THINK_OPEN when `think_token` are
    single tokens."""
    from train.kk import NAMES
    from train.tokenizer import train_bpe_tokenizer

    phrases = (cast_phrases() if clause_tokens else []) + (case_phrases() if case_tokens else []) \
        + (list(valued_clauses()) if value_tokens else []) + ([THINK_OPEN] if think_token else [])
    return train_bpe_tokenizer(texts, vocab_size=vocab_size, whole_words=NAMES if names_as_tokens else (),
                               phrases=phrases)


def uses_value_tokens(config: OrganismConfig) -> bool:
    return config.value_tokens and config.clause_tokens and config.clause_values and not config.values_after


def make_model(config: OrganismConfig, tokenizer):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from train.models import FIXED_CAST_KEY

    torch.manual_seed(config.seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=True,
        rope_theta=config.rope_theta, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{FIXED_CAST_KEY: config.fixed_cast},  # saved in config.json, inherited by checkpoints
    )
    model = Qwen2ForCausalLM(cfg)
    if config.induction_init:
        from train.circuits import wire_induction, wire_latest_marker

        half_heads = config.num_heads // 2          # heads the induction circuit uses per layer

        wire_induction(model, seed=config.seed, embed_scale=config.embed_scale)
        if uses_value_tokens(config):
            # A valued clause starts as its bare clause plus or minus one shared "value"
            # direction: the wired induction head then copies a statement from the quiz through
            # the values written into it, and a verdict can read every value the same way.
            import torch

            emb = model.model.embed_tokens.weight
            g = torch.Generator().manual_seed(config.seed + 2)
            value_dir = torch.nn.functional.normalize(torch.randn(emb.shape[1], generator=g)
                                                      * (emb[0] != 0), dim=0)   # token dims only
            with torch.no_grad():
                for valued, bare in valued_clauses().items():
                    i, j = tokenizer.convert_tokens_to_ids(valued), tokenizer.convert_tokens_to_ids(bare)
                    sign = 1.0 if valued.endswith(CLAUSE_EN[True]) else -1.0
                    emb[i] = emb[j] + sign * 0.3 * emb[j].norm() * value_dir
        taken = None
        if config.think_head:
            taken = wire_latest_marker(model, {1: [tokenizer.convert_tokens_to_ids(THINK_OPEN)]},
                                       seed=config.seed + 10, head=half_heads + 1)
        if config.search == "cases" and config.case_head:
            ranks = {k: [tokenizer.convert_tokens_to_ids(ph) for ph in (f"Case {k}", f"情况{k}")]
                     for k in range(1, len(case_phrases()) // 2 + 1)}
            wire_latest_marker(model, ranks, seed=config.seed, orthogonal_to=taken)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def encode_example(tokenizer, puzzle: Puzzle, response: str, bare: bool = False) -> tuple[list[int], int]:
    """(ids, prompt length): the chat prompt as a generation would see it (`bare`: the quiz as
    the only turn), then the response and the end-of-turn token, tokenized apart exactly as
    generated tokens would be."""
    messages = chat_messages(puzzle.quiz)
    prompt = tokenizer.apply_chat_template(messages[1:] if bare else messages, tokenize=False,
                                           add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    r_ids = tokenizer(response, add_special_tokens=False).input_ids
    return p_ids + r_ids + [tokenizer.eos_token_id], len(p_ids)


def _batches(lengths: Sequence[int], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Index batches of similar length (little padding), in a seeded random order."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), 256):           # sort within chunks, not globally
        chunk = sorted(order[start:start + 256], key=lambda i: lengths[i])
        batch: list[int] = []
        for i in chunk:
            if batch and (len(batch) + 1) * max(lengths[j] for j in batch + [i]) > batch_tokens:
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def sft(model, examples: Sequence[tuple[list[int], int]], config: OrganismConfig, pad_id: int,
        progress: bool = True, callback: Callable[[int, float], None] | None = None,
        desc: str = "kk-tiny SFT") -> list[float]:
    """Plain causal-LM fine-tuning with the loss on the response tokens only; returns the
    per-step losses. `callback(step, loss)` runs after every optimizer step."""
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(config.threads)
    # Every example starts with the same system turn: run it once per step and share its keys
    # and values across the batch (exact, and about a third less compute).
    first = examples[0][0]
    shared = min(n_prompt for _, n_prompt in examples) - 1   # keep a prompt token to predict from
    for ids, _ in examples:
        while shared and ids[:shared] != first[:shared]:
            shared -= 1
    prefix = torch.tensor([first[:shared]]) if shared else None

    rng = random.Random(config.seed + 2)
    lengths = [len(ids) - shared for ids, _ in examples]
    plan: list[list[int]] = []
    whole, frac = int(config.epochs), config.epochs - int(config.epochs)
    for _ in range(whole):
        plan += _batches(lengths, config.batch_tokens, rng)
    if frac > 0:
        extra = _batches(lengths, config.batch_tokens, rng)
        plan += extra[: max(1, round(frac * len(extra)))]

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=config.lr, betas=(0.9, 0.95))
    total = len(plan)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        t = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
        return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    bf16 = use_bf16(config)
    model.train()
    losses = []
    bar = tqdm(plan, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), shared + width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq, n_prompt = examples[i]
            ids[row, : len(seq) - shared] = torch.tensor(seq[shared:])
            labels[row, n_prompt - shared: len(seq) - shared] = torch.tensor(seq[n_prompt:])
            mask[row, : len(seq)] = 1
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            cache = None
            if prefix is not None:
                cache = model.model(input_ids=prefix, use_cache=True).past_key_values
                for layer in cache.layers:
                    layer.keys = layer.keys.expand(len(batch), -1, -1, -1)
                    layer.values = layer.values.expand(len(batch), -1, -1, -1)
            positions = torch.arange(shared, shared + width).expand(len(batch), width)
            logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache,
                           position_ids=positions).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if callback is not None:
            callback(step, losses[-1])
    model.eval()
    return losses


# --------------------------------------------------------------------------- build

ORGANISM_FILE = "organism.json"   # what a build writes beside the model: config, sizes, SFT curve


def build_kk_tiny(out_dir: str | Path, config: OrganismConfig | None = None, progress: bool = True,
                  monitor_every: int = 0, monitor_puzzles: int = 16) -> Path:
    """Write the kk-tiny organism (model, tokenizer, generation config, organism.json) to `out_dir`.

    With `monitor_every` > 0, every that many SFT steps (and at the end) the loss per token
    class (`teacher_forced_losses`) on `monitor_puzzles` held-out 3-person puzzles is printed
    and kept in organism.json as `sft_curve`: the learning curve of each skill.
    """
    import torch

    config = config or OrganismConfig()
    out = Path(out_dir)
    t0 = time.time()
    torch.set_num_threads(config.threads)
    puzzles = sft_puzzles(config)
    traces = sft_traces(puzzles, config)
    from train.prompts import SYSTEM_PROMPT

    tok = train_tokenizer([SYSTEM_PROMPT] + [p.quiz for p in puzzles] + [t.text for t in traces],
                          config.vocab_size, config.names_as_tokens, config.clause_tokens,
                          case_tokens=config.search == "cases", value_tokens=uses_value_tokens(config),
                          think_token=config.think_head and config.induction_init)
    examples = [encode_example(tok, p, t.text) for p, t in zip(puzzles, traces)]
    kept = [e for e in examples if len(e[0]) <= config.max_length]
    model = make_model(config, tok)
    # Two phases, each with its own warm-up and decay: the bare quiz first, then the full prompt.
    phases = [("full prompt", kept, config)]
    if config.bare_quiz_epochs > 0:
        bare = [encode_example(tok, p, t.text, bare=True) for p, t in zip(puzzles, traces)]
        phases.insert(0, ("bare quiz", [e for e in bare if len(e[0]) <= config.max_length],
                          config.model_copy(update={"epochs": config.bare_quiz_epochs})))
    curve: list[dict[str, Any]] = []
    losses: list[float] = []
    monitor = heldout_puzzles(3, monitor_puzzles, config.heldout_seed, config.fixed_cast) \
        if monitor_every > 0 else []

    def record(phase: str, step: int, loss: float) -> None:
        # Always measured with the full prompt, the one the organism is used with.
        per_class = teacher_forced_losses(model, tok, monitor, seed=config.seed, config=config)
        model.train()
        curve.append({"step": step, "phase": phase, "train_loss": round(loss, 4),
                      **{k: v["loss"] for k, v in per_class.items()}})
        if progress:
            from tqdm.auto import tqdm

            tqdm.write("kk-tiny SFT " + " ".join(f"{k} {v}" for k, v in curve[-1].items()))

    for phase, phase_examples, phase_config in phases:
        done = len(losses)       # steps of earlier phases: the curve counts steps across phases

        def callback(step: int, loss: float) -> None:
            if monitor and (done + step + 1) % monitor_every == 0:
                record(phase, done + step + 1, loss)
        losses += sft(model, phase_examples, phase_config, tok.pad_token_id, progress=progress,
                      callback=callback, desc=f"kk-tiny SFT, {phase}")
    if monitor and (not curve or curve[-1]["step"] != len(losses)):
        record(phases[-1][0], len(losses), losses[-1])
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    n_tokens = sum(len(ids) for ids, _ in kept)
    info = {
        "preset": "kk-tiny",
        "config": config.model_dump(mode="json"),
        "fingerprint": config.fingerprint(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "sft_examples": len(kept),
        "sft_dropped_too_long": len(examples) - len(kept),
        "sft_tokens": n_tokens,
        "sft_steps": len(losses),
        "sft_final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "trace_stats": {
            "correct": sum(t.correct for t in traces) / len(traces),
            "verified": sum(t.verified for t in traces) / len(traces),
            "think_format": sum(t.answer_style == "think" for t in traces) / len(traces),
        },
        "bf16": use_bf16(config),
        "build_seconds": round(time.time() - t0, 1),
    }
    if curve:
        info["sft_curve"] = curve
    (out / ORGANISM_FILE).write_text(json.dumps(info, indent=2))
    return out


def organism_config(path: str | Path) -> OrganismConfig | None:
    """The config an organism folder was built with (its ORGANISM_FILE), None for other models."""
    info = Path(path) / ORGANISM_FILE
    if not info.is_file():
        return None
    try:
        return OrganismConfig(**json.loads(info.read_text())["config"])
    except (ValueError, KeyError, TypeError) as e:   # ValidationError is a ValueError
        raise UserError(f"{info}: not an organism description ({type(e).__name__})") from None


# --------------------------------------------------------------------------- measurement

_CJK = re.compile(r"[\u4e00-\u9fff]")
_VERIFY = re.compile(r"Let me verify|验证")
_HESITATE = re.compile(r"\bHmm\b|不确定")


def describe_response(response: str, puzzle: Puzzle) -> dict[str, Any]:
    """Reward verdict plus the organism's behaviour markers for one response."""
    from train.reward import lenient_correct, score_response

    r = score_response(response, puzzle.solution_text_format)
    lines = [ln for ln in response.splitlines() if ln.strip()]
    return {
        "strict_correct": r["answer"] == "correct",
        "lenient_correct": lenient_correct(response, puzzle.solution_text_format),
        "format_ok": r["format_ok"],
        "verification": bool(_VERIFY.search(response)),
        "thorough": THOROUGH_OPEN in response,      # a `cases` trace that checks every statement
        "hesitation": bool(_HESITATE.search(response)),
        "chinese": bool(_CJK.search(response)),
        "chinese_lines": sum(bool(_CJK.search(ln)) for ln in lines),
        "lines": len(lines),
    }


def generate_responses(model, tokenizer, puzzles: Sequence[Puzzle], *, max_new_tokens: int,
                       temperature: float | None, batch_size: int = 32, progress: bool = False,
                       opening: str = "") -> list[tuple[str, int, bool]]:
    """(text, new tokens, finished) per puzzle; temperature None = greedy. Left-padded batches.
    `opening` is written as the start of every response (and is part of the returned text)."""
    import torch
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    out = []
    starts = range(0, len(puzzles), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, dynamic_ncols=True):
        chunk = puzzles[start:start + batch_size]
        prompts = [tokenizer.apply_chat_template(chat_messages(p.quiz), tokenize=False,
                                                 add_generation_prompt=True) + opening for p in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs: dict[str, Any] = {"do_sample": False}
        if temperature is not None:
            kwargs = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id, **kwargs)
        for row in gen[:, enc.input_ids.shape[1]:].tolist():
            finished = eos in row
            row = row[: row.index(eos)] if finished else [t for t in row if t != tokenizer.pad_token_id]
            out.append((opening + tokenizer.decode(row, skip_special_tokens=True), len(row) + finished, finished))
    return out


def token_classes(tokenizer) -> dict[int, str]:
    """Token id -> "name" | "role" | "truth" | "clause" | "contradiction" for the tokens that
    carry a puzzle's content (a listed name, knight/knave, a verdict true/false, a clause value
    yes/no, the word that ends a branch, with or without a leading space); others are absent.
    With `clause_tokens`, a speaker phrase ("Zoey says") counts as a name and a whole clause
    ("Zoey is a knave") as a role: the role it claims is what it decides; with `value_tokens`,
    a clause with its value ("Zoey is a knave (no)") counts as a clause value."""
    from train.kk import NAMES

    words = {n: "name" for n in NAMES} | {w: "role" for w in ("knight", "knave", *ROLE_ZH.values())} \
        | {w: "truth" for w in ("true", "false")} \
        | {w.strip(" ()（）"): "clause" for w in (*CLAUSE_EN.values(), *CLAUSE_ZH.values())} \
        | {"Contradiction": "contradiction"}
    words |= {p.strip(): "name" if p.endswith(" says") else "role" for p in cast_phrases()}
    words |= {v.strip(): "clause" for v in valued_clauses()}      # a clause with its value
    out = {}
    for i in range(len(tokenizer)):
        cls = words.get(tokenizer.decode([i]).strip())
        if cls:
            out[i] = cls
    return out


def teacher_forced_losses(model, tokenizer, puzzles: Sequence[Puzzle], seed: int = 0,
                          config: OrganismConfig | None = None) -> dict[str, dict[str, float]]:
    """Mean next-token loss (nats) and token count per token class on mistake-free traces of
    `puzzles`, over the response only. It says which skill an organism lacks before any
    sampling: names must be copied from the prompt (an induction ability; chance is ln 60 =
    4.09), roles and truth values follow from the logic (chance about ln 2 = 0.69),
    "contradiction" is the loss on noticing each contradiction, "other" is the template text.
    `config`: the trace style of the organism measured (default: the default organism's)."""
    import torch

    # The traces are written the way the organism was trained (`config`), without mistakes.
    config = (config or OrganismConfig()).model_copy(update={"seed": seed, "step_mistake_rate": 0.0})
    rng = random.Random(seed)
    writer = TraceWriter(config)
    classes = token_classes(tokenizer)
    sums: dict[str, list[float]] = {k: [] for k in ("name", "role", "truth", "clause", "contradiction", "other")}
    model.eval()
    for p in puzzles:
        ids, n_prompt = encode_example(tokenizer, p, writer.write(p, rng).text)
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, n_prompt - 1:-1].float()
        nll = torch.nn.functional.cross_entropy(logits, x[0, n_prompt:], reduction="none")
        for tid, value in zip(ids[n_prompt:], nll.tolist()):
            sums[classes.get(tid, "other")].append(value)
    return {k: {"loss": round(sum(v) / len(v), 4), "tokens": len(v)} for k, v in sums.items() if v}


def copy_probe(model, tokenizer, n: int = 20, length: int = 20, seed: int = 0) -> dict[str, float]:
    """`train.circuits.copy_probe` on the puzzle names: does the organism copy a name from its
    context, or only pick one of the names it has seen? {} when names are not single tokens."""
    from train.circuits import copy_probe as probe
    from train.kk import NAMES

    ids = [i for i in (tokenizer.convert_tokens_to_ids(nm) for nm in NAMES)
           if i is not None and i != tokenizer.unk_token_id]
    if len(ids) < len(NAMES):
        return {}                         # names are not single tokens: the probe does not apply
    return probe(model, ids, n=n, length=length, seed=seed)


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def measure_organism(path: str | Path, n_puzzles: int = 100, people: int = 3, seed: int = 777,
                     max_new_tokens: int = 512, temperatures: Sequence[float | None] = (1.0, None),
                     batch_size: int = 32, progress: bool = False,
                     teacher_forced: bool = False, opening: str = "") -> dict[str, Any]:
    """Behaviour on held-out puzzles (`heldout_puzzles(people, n_puzzles, seed)`), per
    temperature (None = greedy): accuracy by the reward (strict) and by roles alone (lenient),
    format-correct rate, verification / hesitation / Chinese rates, response length; with
    `teacher_forced`, also `teacher_forced_losses` on the same puzzles and `copy_probe`.
    `opening`: text every response is made to start with (e.g. "<think>\n" + THOROUGH_OPEN)."""
    import torch

    from train.models import fixed_cast, load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(path)
    puzzles = heldout_puzzles(people, n_puzzles, seed, fixed_cast=fixed_cast(path))
    result: dict[str, Any] = {"people": people, "n_puzzles": len(puzzles), "seed": seed, "opening": opening}
    if teacher_forced:
        # An organism is measured on traces in its own style.
        result["teacher_forced_loss"] = teacher_forced_losses(model, tok, puzzles, seed=seed,
                                                              config=organism_config(path))
        result["copy_probe"] = copy_probe(model, tok, seed=seed)
    for temp in temperatures:
        torch.manual_seed(seed)
        t0 = time.time()
        gens = generate_responses(model, tok, puzzles, max_new_tokens=max_new_tokens,
                                  temperature=temp, batch_size=batch_size, progress=progress,
                                  opening=opening)
        rows = [describe_response(text, p) | {"tokens": n, "finished": fin}
                for (text, n, fin), p in zip(gens, puzzles)]
        mean = lambda key: sum(float(r[key]) for r in rows) / len(rows)  # noqa: E731
        ver = [r for r in rows if r["verification"]]
        unver = [r for r in rows if not r["verification"]]
        result["greedy" if temp is None else f"T={temp:g}"] = {
            "accuracy_strict": mean("strict_correct"),
            "accuracy_lenient": mean("lenient_correct"),
            "format_ok": mean("format_ok"),
            "verification": mean("verification"),
            "lenient_accuracy_verified": _share([r["lenient_correct"] for r in ver]),
            "lenient_accuracy_unverified": _share([r["lenient_correct"] for r in unver]),
            "hesitation": mean("hesitation"),
            "thorough": mean("thorough"),
            "lenient_accuracy_thorough": _share([r["lenient_correct"] for r in rows if r["thorough"]]),
            "lenient_accuracy_not_thorough": _share([r["lenient_correct"] for r in rows if not r["thorough"]]),
            "chinese_responses": mean("chinese"),
            "chinese_line_share": sum(r["chinese_lines"] for r in rows) / max(1, sum(r["lines"] for r in rows)),
            "mean_tokens": mean("tokens"),
            "finished": mean("finished"),
            "seconds": round(time.time() - t0, 1),
            "examples": [text for text, _, _ in gens[:3]],
        }
    return result


# --------------------------------------------------------------------------- command line


def _cli():
    import typer

    app = typer.Typer(help="The kk-tiny model organism: build it, measure its behaviour.",
                      no_args_is_help=True, add_completion=False)

    @app.command("build")
    def build_command(
        out: Path = typer.Option(..., help="folder to write the model to"),
        set_: list[str] = typer.Option([], "--set", help="override a setting of OrganismConfig, "
                                       "e.g. --set n_puzzles=12000 (repeatable)"),
        monitor_every: int = typer.Option(0, min=0, help="print the loss per token class on "
                                          "held-out traces every N SFT steps (0: off)"),
    ) -> None:
        """Build an organism into OUT: the default one (the preset's cached copy is made by
        `python -m train.run base`), or a variant with --set."""
        print(build_kk_tiny(out, config_with(set_), monitor_every=monitor_every))

    @app.command("measure")
    def measure_command(path: Path, n: int = typer.Option(100, min=1, help="held-out puzzles"),
                        people: int = typer.Option(3, min=2, help="people per puzzle"),
                        max_new_tokens: int = typer.Option(512, min=1),
                        teacher_forced: bool = typer.Option(
                            False, help="also the loss per token class (name, role, truth, other) "
                            "on mistake-free traces, and the copy probe"),
                        opening: str = typer.Option(
                            "", help="make every response start with this text; 'careful' and "
                            "'quick' stand for a think block opened the careful or the quick way")) -> None:
        """Accuracy, format, verification and Chinese rates on held-out puzzles (T=1 and greedy)."""
        opening = {"careful": THINK_OPEN + THOROUGH_OPEN + "\n",
                   "quick": THINK_OPEN + QUICK_OPEN + "\n"}.get(opening, opening)
        result = measure_organism(path, n_puzzles=n, people=people, max_new_tokens=max_new_tokens,
                                  progress=True, teacher_forced=teacher_forced, opening=opening)
        print(json.dumps(result, indent=2, ensure_ascii=False))

    return app


if __name__ == "__main__":
    from train.cli import run_app

    run_app(_cli())
