"""Step-level ground truth: the gradeable claims of a reasoning trace, graded by the solver.

Knights-and-Knaves lets every intermediate claim of a trace be checked, not only the answer.
From the thinking of a response (English or Chinese) this module extracts

* role claims            "so Ethan must be a knave", "Zoey 是骑士"
* clause values          the organism's "Ethan is a knave (yes)" inside a restated statement
* statement verdicts     "Zoey says ..., which is false", "Zoey's statement is true", "这是假的"
* contradiction verdicts "Contradiction.", "矛盾。"
* consistency verdicts   "This case fits.", "All statements are consistent."
* conditional claims     "if Zoey is a knight, then Ethan is a knave"

each with the assumption in force where it is made ("Suppose ...", "Case 2: ...", "If Zoey
is a knight, ..."; a conclusion is graded under no assumption), and grades it against the
puzzle's statements with `train.kk`:

* role and clause claims: correct when the assumption (with the statements) implies the role,
  wrong when it implies the other; an assumption no solution extends implies what unit
  propagation over the statements derives from it;
* statement verdicts: the speaker's statement evaluated under what the assumption implies;
* contradiction / consistency verdicts: whether some solution extends the assumption.

What cannot be decided (a role the assumption leaves open, a verdict under no assumption) is
not gradeable. The phrasings live in one data file, `claims.yaml`, extendable like
`behaviours.yaml`.

    grammar = load_grammar()                       # or load_grammar("my.yaml") to extend
    rc = analyse_response(text, puzzle, correct)   # claims, coverage and events
    rc.claims[0].grade, rc.first_wrong, rc.passages, rc.fate
    stats = claim_stats(records, puzzles)          # per checkpoint, 95% bootstrap intervals

Events of a response: the first wrong claim; the verification passages (the `verification`
steps of `analysis.behaviours`, with the flags right after them): whether a wrong claim came
before each (an error to catch), whether it flags one (a contradiction, "I made a mistake",
or a claim reversed from an earlier one under the same assumption), whether the flag is right,
whether it approves a wrong assignment (hollow); repairs (a wrong claim later reversed to the
right value under the same assumption); and the answer's fate: clean (right, no wrong claim),
lucky (right despite a wrong claim), slip (wrong, every gradeable claim right), derailed
(wrong after a wrong claim), unanswered (no answer to read). The answer is read whatever its
format (`train.reward.lenient_roles`): the fate is about what the model concluded.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import asdict, dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from analysis.behaviours import classify_response, default_rules, load_rules, read_yaml_mapping
from analysis.harness import Analysis, AnalysisContext, register_analysis
from analysis.steps import Step
from train.errors import UserError
from train.kk import Puzzle, evaluate, persons_in, solve
from train.prompts import QUICK_OPEN, THOROUGH_OPEN

DEFAULT_GRAMMAR_PATH = Path(__file__).with_name("claims.yaml")
SECTIONS = ("role_clause", "supposition", "conditional", "conclusion", "quote", "statement",
            "statement_last", "clause", "role", "contradiction", "consistent", "mistake", "answer")
KINDS = ("role", "clause", "statement", "conditional", "contradiction", "consistent")
FATES = ("clean", "lucky", "slip", "derailed", "unanswered")
CORRECT, WRONG, UNGRADEABLE = "correct", "wrong", "ungradeable"


class ClaimGrammarError(UserError):
    pass


# --------------------------------------------------------------------------- grammar

@dataclass(frozen=True, eq=False)
class Grammar:
    """The phrasings of `claims.yaml` (uncompiled: patterns are compiled per cast of names)."""

    roles: dict[bool, tuple[str, ...]]           # knight (True) / knave (False) -> word regexes
    truth: dict[bool, tuple[str, ...]]
    sections: dict[str, tuple[str, ...]]
    digest: str

    def compiled(self, names: Sequence[str]) -> "CompiledGrammar":
        return _compile_for(self, tuple(names))


def _read(path: Path) -> dict:
    doc = read_yaml_mapping(path, "claim grammar", ClaimGrammarError)
    if not isinstance(doc, dict):
        raise ClaimGrammarError(f"{path}: expected a mapping of grammar sections")
    unknown = sorted(set(doc) - set(SECTIONS) - {"version", "roles", "truth"})
    if unknown:
        raise ClaimGrammarError(f"{path}: unknown section {unknown[0]!r} (known: roles, truth, "
                                f"{', '.join(SECTIONS)})")
    return doc


def _lists(spec: Any, where: str) -> list[str]:
    """The patterns of a section: every list under its language keys."""
    if spec is None:
        return []
    if not isinstance(spec, dict):
        raise ClaimGrammarError(f"{where}: expected a mapping of languages to pattern lists")
    out = []
    for lang, items in spec.items():
        if not isinstance(items, list):
            raise ClaimGrammarError(f"{where}.{lang}: expected a list of patterns")
        out += [str(p) for p in items]
    return out


def load_grammar(path: str | Path | None = None) -> Grammar:
    """The claim grammar: the packaged `claims.yaml`, its lists extended by those of `path`."""
    paths = [DEFAULT_GRAMMAR_PATH] + ([Path(path)] if path is not None else [])
    sections: dict[str, list[str]] = {s: [] for s in SECTIONS}
    roles: dict[bool, list[str]] = {True: [], False: []}
    truth: dict[bool, list[str]] = {True: [], False: []}
    texts = []
    for source in paths:
        doc = _read(source)
        texts.append(source.read_text(encoding="utf-8"))
        try:
            for s in SECTIONS:
                sections[s] += _lists(doc.get(s), s)
            for key, target, words in (("roles", roles, ("knight", "knave")), ("truth", truth, ("true", "false"))):
                spec = doc.get(key) or {}
                for value, word in zip((True, False), words):
                    target[value] += _lists(spec.get(word) if isinstance(spec, dict) else spec, f"{key}.{word}")
            for key, target in (("roles", roles), ("truth", truth)):
                if not target[True] or not target[False]:
                    raise ClaimGrammarError(f"section {key!r} needs words for both values")
            grammar = Grammar(roles={k: tuple(v) for k, v in roles.items()},
                              truth={k: tuple(v) for k, v in truth.items()},
                              sections={k: tuple(v) for k, v in sections.items()},
                              digest=hashlib.sha1("\x00".join(texts).encode()).hexdigest()[:12])
            grammar.compiled(("Zoey", "Ethan"))   # a bad regex fails here, with its section named
        except ClaimGrammarError as exc:           # the file that brought the problem
            raise ClaimGrammarError(f"{source}: {exc}") from None
    return grammar


@cache
def default_grammar() -> Grammar:
    return load_grammar()


@dataclass(frozen=True)
class CompiledGrammar:
    patterns: dict[str, tuple[re.Pattern, ...]]
    role_word: dict[bool, re.Pattern]
    truth_word: dict[bool, re.Pattern]
    names: tuple[str, ...]

    def person(self, word: str) -> int:
        return next(i for i, n in enumerate(self.names) if n.lower() == word.lower())

    def role(self, word: str) -> bool:
        """True for a knight word, False for a knave word."""
        return bool(self.role_word[True].fullmatch(word))

    def truth(self, word: str) -> bool | None:
        for value in (True, False):
            if self.truth_word[value].fullmatch(word):
                return value
        return None

    def roles_in(self, text: str) -> list[tuple[int, int, bool]]:
        """(position, person, is_knight) of every `role_clause` in `text`, in order."""
        found = {}
        for pat in self.patterns["role_clause"]:
            for m in pat.finditer(text):
                knight = self.role(m.group("role")) != bool(_group(m, "neg"))
                found.setdefault(m.start(), (m.start(), self.person(m.group("name")), knight))
        return sorted(found.values())


_NAMED_GROUP = re.compile(r"\(\?P<\w+>")


def _group(m: re.Match, name: str) -> str | None:
    return m.groupdict().get(name)


def _alt(words: Iterable[str]) -> str:
    return "(?:" + "|".join(words) + ")"


@lru_cache(maxsize=64)
def _compile_for(grammar: Grammar, names: tuple[str, ...]) -> CompiledGrammar:
    name_alt = _alt(re.escape(n) for n in sorted(names, key=len, reverse=True))
    role_alt = _alt(grammar.roles[True] + grammar.roles[False])
    truth_alt = _alt(grammar.truth[True] + grammar.truth[False])
    bare = {"name": name_alt, "speaker": name_alt, "role": role_alt, "truth": truth_alt}

    def fill(pattern: str, named: bool) -> str:
        seen: set[str] = set()

        def sub(m: re.Match) -> str:
            key = m.group(1)
            if key in ("roles", "roles_and"):
                body = roles_list if key == "roles" else roles_and
            elif key in bare:
                body = bare[key]
            else:
                return m.group(0)
            if named and key not in seen:
                seen.add(key)
                return f"(?P<{'roles' if key == 'roles_and' else key}>{body})"
            return f"(?:{body})"
        return re.sub(r"\{(\w+)\}", sub, pattern)

    clauses = [fill(p, named=False) for p in grammar.sections["role_clause"]]
    clause_bare = _alt(_NAMED_GROUP.sub("(?:", c) for c in clauses)
    roles_list = rf"{clause_bare}(?:\s*(?:,|，|、|;|；|\band\b|和|并且)\s*(?:and\s+)?{clause_bare})*"
    roles_and = rf"{clause_bare}(?:\s*(?:\band\b|和|并且)\s*{clause_bare})*"

    def comp(section: str, pattern: str) -> re.Pattern:
        try:
            return re.compile(fill(pattern, named=True), re.IGNORECASE)
        except re.error as exc:
            raise ClaimGrammarError(f"{section}: bad regex {pattern!r} ({exc})") from None

    patterns = {s: tuple(comp(s, p) for p in grammar.sections[s]) for s in SECTIONS}
    return CompiledGrammar(
        patterns=patterns,
        role_word={v: re.compile(_alt(grammar.roles[v]), re.IGNORECASE) for v in (True, False)},
        truth_word={v: re.compile(_alt(grammar.truth[v]), re.IGNORECASE) for v in (True, False)},
        names=names,
    )


# --------------------------------------------------------------------------- grading

Assumption = tuple[tuple[int, bool], ...]        # (person, is_knight) in the order assumed


class PuzzleTruth:
    """What the puzzle's statements imply under an assumption (memoised per assumption)."""

    def __init__(self, puzzle: Puzzle):
        self.puzzle = puzzle
        self.solutions = solve(puzzle.statements, limit=1 << puzzle.people)
        self.scopes = [persons_in(s) | {i} for i, s in enumerate(puzzle.statements)]
        self._memo: dict[frozenset, dict[int, frozenset[bool]]] = {}

    def extends(self, assumption: Mapping[int, bool]) -> list[tuple[bool, ...]]:
        return [s for s in self.solutions if all(s[p] == v for p, v in assumption.items())]

    def implied(self, assumption: Mapping[int, bool]) -> dict[int, frozenset[bool]]:
        """The roles the assumption implies, per person: the role every solution extending it
        gives them; when none extends it, the roles unit propagation over the statements
        derives (an impossible case can imply both roles of a person, by different statements)."""
        key = frozenset(assumption.items())
        if key not in self._memo:
            sols = self.extends(assumption)
            if sols:
                self._memo[key] = {p: frozenset({sols[0][p]}) for p in range(self.puzzle.people)
                                   if len({s[p] for s in sols}) == 1}
            else:
                self._memo[key] = self._propagate(dict(assumption))
        return self._memo[key]

    def _forced(self, i: int, q: int, known: Mapping[int, bool]) -> list[bool]:
        """The roles of q with which statement i holds, the others of its scope as in `known`."""
        out = []
        for v in (True, False):
            full = [known.get(p, False) for p in range(self.puzzle.people)]
            full[q] = v
            if evaluate(self.puzzle.statements[i], full) == full[i]:
                out.append(v)
        return out

    def _propagate(self, known: dict[int, bool]) -> dict[int, frozenset[bool]]:
        assumed = set(known)
        changed = True
        while changed:
            changed = False
            for i, scope in enumerate(self.scopes):
                open_ = [p for p in scope if p not in known]
                if len(open_) == 1:
                    fits = self._forced(i, open_[0], known)
                    if len(fits) == 1:
                        known[open_[0]] = fits[0]
                        changed = True
        # What each statement alone forces on a derived person, the others as derived.
        out = {p: {v} for p, v in known.items()}
        for i, scope in enumerate(self.scopes):
            for q in scope - assumed:
                if q in known and all(p in known for p in scope):
                    fits = self._forced(i, q, known)
                    if len(fits) == 1:
                        out[q].add(fits[0])
        return {p: frozenset(v) for p, v in out.items()}

    def grade_role(self, person: int, knight: bool, assumption: Mapping[int, bool]) -> str:
        known = self.implied(assumption)
        if person not in known:
            return UNGRADEABLE
        return CORRECT if knight in known[person] else WRONG

    def grade_statement(self, speaker: int, value: bool, assumption: Mapping[int, bool]) -> str:
        known = self.implied(assumption)
        stmt = self.puzzle.statements[speaker]
        people = sorted(persons_in(stmt))
        if not set(people) <= set(known):
            return UNGRADEABLE
        values = set()
        for combo in itertools.product(*(sorted(known[p]) for p in people)):
            full = [False] * self.puzzle.people
            for p, v in zip(people, combo):
                full[p] = v
            values.add(evaluate(stmt, full))
        if len(values) > 1:
            return UNGRADEABLE
        return CORRECT if value in values else WRONG

    def grade_fit(self, fits: bool, assumption: Mapping[int, bool]) -> str:
        if not assumption:
            return UNGRADEABLE
        return CORRECT if bool(self.extends(assumption)) == fits else WRONG


# --------------------------------------------------------------------------- extraction

@dataclass
class Claim:
    step: int                        # index of the step of the thinking
    pos: int                         # character offset in the step
    kind: str                        # one of KINDS
    form: str                        # role | statement | contradiction | consistent
    person: int | None               # the person (role) or speaker (statement); None for verdicts
    value: bool                      # knight / true (role, statement); True for verdicts
    assumption: Assumption
    grade: str
    text: str

    @property
    def polarity(self) -> bool:
        """What the claim says: knight / true; for verdicts, that the case fits."""
        return self.form == "consistent" if self.form in ("contradiction", "consistent") else self.value

    def key(self) -> tuple:
        """What the claim is about, for reversals: a contradiction reverses a consistency
        verdict on the same case, a role or verdict the opposite one on the same person and case."""
        form = "fit" if self.form in ("contradiction", "consistent") else self.form
        return (form, self.person, frozenset(self.assumption))


def _assume(current: Assumption, roles: Sequence[tuple[int, bool]]) -> Assumption:
    """The case after assuming `roles`: a person assumed again replaces the case from the
    point where that person was assumed (a new branch); new people extend it (nesting)."""
    out = list(current)
    for person, knight in roles:
        at = next((k for k, (p, _) in enumerate(out) if p == person), None)
        if at is not None:
            out = out[:at]
        out.append((person, knight))
    return tuple(out)


def _blank(text: str, a: int, b: int) -> str:
    return text[:a] + " " * (b - a) + text[b:]


class _Extractor:
    def __init__(self, puzzle: Puzzle, grammar: Grammar):
        self.g = grammar.compiled(puzzle.names)
        self.truth = PuzzleTruth(puzzle)
        self.case: Assumption = ()
        self.last_speaker: int | None = None
        self.claims: list[Claim] = []
        self.mistakes: list[int] = []          # steps that say the trace erred
        self._names = re.compile(_alt(re.escape(n) for n in sorted(puzzle.names, key=len, reverse=True)), re.IGNORECASE)

    def _add(self, step: int, pos: int, kind: str, form: str, person: int | None, value: bool,
             assumption: Assumption, text: str) -> None:
        a = dict(assumption)
        if form == "role":
            grade = self.truth.grade_role(person, value, a)
        elif form == "statement":
            grade = self.truth.grade_statement(person, value, a)
        else:
            grade = self.truth.grade_fit(form == "consistent", a)
        self.claims.append(Claim(step, pos, kind, form, person, value, assumption, grade, text.strip()))

    def _find(self, section: str, text: str) -> list[re.Match]:
        found = [m for p in self.g.patterns[section] for m in p.finditer(text) if m.end() > m.start()]
        found.sort(key=lambda m: (m.start(), -m.end()))
        out, end = [], -1
        for m in found:                      # leftmost, longest, not overlapping
            if m.start() >= end:
                out.append(m)
                end = m.end()
        return out

    def step(self, i: int, text: str) -> None:
        g, work = self.g, text
        n_before = len(self.claims)
        conclusion = bool(self._find("conclusion", work))
        for m in self._find("supposition", work)[:1]:
            if m.start() == 0 or not work[:m.start()].strip():
                self.case = _assume(self.case, [(p, k) for _, p, k in g.roles_in(m.group("roles"))])
                work = _blank(work, m.start(), m.end())
        # A conditional's antecedent extends the case for the rest of the step; at the start
        # of a step it opens a case for the steps after it too.
        local_from, local = len(work), self.case
        for m in self._find("conditional", work)[:1]:
            roles = [(p, k) for _, p, k in g.roles_in(m.group("roles"))]
            local_from, local = m.end(), _assume(self.case, roles)
            if not work[:m.start()].strip():
                self.case = local
            work = _blank(work, m.start(), m.end())
        base = () if conclusion else self.case

        def where(pos: int) -> tuple[str | None, Assumption]:
            return ("conditional", local) if pos >= local_from else (None, base)

        for m in self._find("quote", work):
            speaker = g.person(m.group("speaker"))
            self.last_speaker = speaker
            q0 = m.start("quote")
            for c in self._find("clause", m.group("quote")):
                value = g.truth(c.group("value"))
                if value is None:
                    continue
                knight = (g.role(c.group("role")) != bool(_group(c, "neg"))) == value
                kind, a = where(q0 + c.start())
                self._add(i, q0 + c.start(), kind or "clause", "role", g.person(c.group("name")), knight, a, c.group(0))
            if _group(m, "truth"):
                kind, a = where(m.start("truth"))
                self._add(i, m.start("truth"), kind or "statement", "statement", speaker,
                          bool(g.truth(m.group("truth"))), a, m.group(0))
            work = _blank(work, m.start(), m.end())
        for section in ("statement", "statement_last"):
            for m in self._find(section, work):
                if section == "statement":
                    speaker = g.person(m.group("speaker"))
                else:   # the person named last before it in the step, else the last speaker quoted
                    named = [n for n in re.finditer(self._names, text[:m.start()])]
                    speaker = g.person(named[-1].group(0)) if named else self.last_speaker
                    if speaker is None:
                        continue
                lie = _group(m, "lie")
                value = (not re.search(r"lie|lying|说谎", lie)) if lie else bool(g.truth(m.group("truth")))
                value = value != bool(_group(m, "neg"))
                kind, a = where(m.start())
                self._add(i, m.start(), kind or "statement", "statement", speaker, value, a, m.group(0))
                work = _blank(work, m.start(), m.end())
        closes = False
        for form in ("consistent", "contradiction"):
            for m in self._find(form, work):
                kind, a = where(m.start())
                self._add(i, m.start(), kind or form, form, None, True, a, m.group(0))
                work = _blank(work, m.start(), m.end())
                closes = closes or form == "contradiction"
        roles_said: list[tuple[int, bool]] = []
        for m in self._find("role", work):
            knight = g.role(m.group("role")) != bool(_group(m, "neg"))
            people = ([g.person(w.group(0)) for w in self._names.finditer(m.group("names"))]
                if _group(m, "names") else [g.person(m.group("name"))])
            kind, a = where(m.start())
            for p in people:
                self._add(i, m.start(), kind or "role", "role", p, knight, a, m.group(0))
                roles_said.append((p, knight))
        if self._find("mistake", work):
            self.mistakes.append(i)
        self.claims[n_before:] = sorted(self.claims[n_before:], key=lambda c: c.pos)
        if conclusion and roles_said:         # a verification after it checks this candidate
            self.case = _assume((), roles_said)
        elif closes:                          # an impossible case is left
            self.case = ()


@dataclass
class Passage:
    """A verification passage: steps [start, end] of the thinking."""

    start: int
    end: int
    error_before: bool               # a wrong claim came before its first flag (no flag: before its end)
    flagged: bool                    # it says something is wrong
    flag_right: bool | None          # every flag it raises is right (None: no flag)
    approves: bool                   # it declares the case consistent
    hollow: bool                     # ... the case is wrong, and it raises no flag


@dataclass
class ResponseClaims:
    steps: list[Step]
    claims: list[Claim]
    coverage: float | None           # share of steps with a gradeable claim
    first_wrong: dict | None         # {"step", "position" (0..1 through the steps), "kind"}
    passages: list[Passage]
    repairs: int                     # wrong claims later reversed to the right value
    n_wrong: int
    fate: str                        # one of FATES
    mistakes: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"claims": [{**asdict(c), "assumption": [list(x) for x in c.assumption]} for c in self.claims],
                "coverage": self.coverage, "first_wrong": self.first_wrong,
                "passages": [asdict(p) for p in self.passages], "repairs": self.repairs,
                "n_wrong": self.n_wrong, "fate": self.fate}


def _reversals(claims: Sequence[Claim]) -> list[tuple[Claim, Claim]]:
    """(earlier, later) pairs: the later claim says the opposite about the same thing under
    the same assumption (each later claim paired with the latest such earlier one)."""
    out = []
    for j, later in enumerate(claims):
        if later.grade == UNGRADEABLE:
            continue
        for earlier in reversed(claims[:j]):
            if earlier.key() == later.key() and earlier.grade != UNGRADEABLE:
                if earlier.polarity != later.polarity:
                    out.append((earlier, later))
                break
    return out


def _passages(labels: Sequence[frozenset[str]], claims: Sequence[Claim], mistakes: Sequence[int],
              reversals: Sequence[Claim]) -> list[Passage]:
    flag_steps = {c.step for c in claims if c.form == "contradiction"} | set(mistakes)
    runs: list[list[int]] = []
    for k, lab in enumerate(labels):
        if "verification" in lab:
            if runs and runs[-1][1] == k - 1:
                runs[-1][1] = k
            else:
                runs.append([k, k])
        elif runs and runs[-1][1] == k - 1 and k in flag_steps:   # the flag right after a check
            runs[-1][1] = k
    reversed_ids = {id(c) for c in reversals}
    out = []
    for start, end in runs:
        inside = [c for c in claims if start <= c.step <= end]
        # Flags as (position, right): a contradiction, a reversal, a "mistake" (right when an
        # error came before it).
        flags = [((c.step, c.pos), c.grade == CORRECT) for c in inside
                 if (c.form == "contradiction" or id(c) in reversed_ids) and c.grade != UNGRADEABLE]
        first = min([f[0] for f in flags] + [(k, -1) for k in mistakes if start <= k <= end], default=None)
        # An error to catch: a wrong claim before the first flag (without a flag: up to the end).
        limit = first if first is not None else (end, float("inf"))
        error = any(c.grade == WRONG and (c.step, c.pos) < limit for c in claims)
        flags += [((k, -1), error) for k in mistakes if start <= k <= end]
        fits = [c for c in inside if c.form == "consistent" and c.grade != UNGRADEABLE]
        out.append(Passage(start=start, end=end, error_before=error, flagged=bool(flags),
                           flag_right=all(r for _, r in flags) if flags else None, approves=bool(fits),
                           hollow=not flags and any(c.grade == WRONG for c in fits)))
    return out


def answer_start(text: str, g: CompiledGrammar) -> int:
    """Where the answer starts in a response (the `answer` section; the end when none): the
    steps from there on are not thinking."""
    return min((m.start() for p in g.patterns["answer"] for m in [p.search(text)] if m), default=len(text))


# --------------------------------------------------------------------------- step kinds

STEP_KINDS = ("answer-way opening", "contradiction", "case header", "summary", "verification",
              "statement check", "other")


def step_kind(text: str, names: Sequence[str], *, verification: bool = False, grammar: Grammar | None = None,
              rules: Any = None) -> str:
    """The kind of one step of the thinking, the first of `STEP_KINDS` that applies:

    answer-way opening  the careful or quick opening (`train.prompts`)
    contradiction       the `contradiction` phrasings
    case header         a `supposition` ("Suppose Zoey is a knight", "假设 Zoey 是骑士")
    summary             a `conclusion`, or a stage summary (`analysis.behaviours`)
    verification        a verification step (`verification`: the step carries that label
                        from its passage) or a `consistent` verdict ("This case fits.")
    statement check     a `quote`, `statement` or `statement_last` verdict
    """
    g = (grammar or default_grammar()).compiled(names)
    rules = rules or default_rules()
    t = text.strip()

    def hit(*sections: str) -> bool:
        return any(p.search(t) for s in sections for p in g.patterns[s])

    def labelled(behaviour: str) -> bool:
        rule = rules.behaviours.get(behaviour)
        return rule is not None and rule.hits(t)

    if t.startswith((THOROUGH_OPEN, QUICK_OPEN)):
        return "answer-way opening"
    if hit("contradiction"):
        return "contradiction"
    if hit("supposition"):
        return "case header"
    if hit("conclusion") or labelled("stage_summary"):
        return "summary"
    if verification or hit("consistent") or labelled("verification"):
        return "verification"
    if hit("quote", "statement", "statement_last"):
        return "statement check"
    return "other"


def step_kinds(response: str, names: Sequence[str], grammar: Grammar | None = None,
               rules: Any = None) -> list[tuple[Step, str]]:
    """The steps of a response's thinking (up to where the answer starts), each with its kind."""
    grammar, rules = grammar or default_grammar(), rules or default_rules()
    rb = classify_response(response, names=names, rules=rules)
    answer_at = answer_start(response, grammar.compiled(names))
    return [(st, step_kind(st.text, names, verification="verification" in lab, grammar=grammar, rules=rules))
            for st, lab in zip(rb.steps, rb.step_labels) if st.char_start < answer_at]


def analyse_response(text: str, puzzle: Puzzle, grammar: Grammar | None = None,
                     rules: Any = None) -> ResponseClaims:
    """The graded claims of a response's thinking and its events (see the module doc).

    The answer's fate reads the answer's roles whatever its format (`train.reward.lenient_roles`).
    rules: the behaviour rules that decide the verification steps (default: behaviours.yaml).
    """
    from train.reward import lenient_roles

    grammar = grammar or default_grammar()
    rb = classify_response(text, names=puzzle.names, rules=rules or default_rules())
    ex = _Extractor(puzzle, grammar)
    answer_at = answer_start(text, ex.g)
    steps = [st for st in rb.steps if st.char_start < answer_at]
    for st in steps:
        ex.step(st.index, st.text)
    claims = ex.claims
    gradeable = [c for c in claims if c.grade != UNGRADEABLE]
    n_steps = len(steps)
    covered = {c.step for c in gradeable}
    wrong = [c for c in gradeable if c.grade == WRONG]
    first = wrong[0] if wrong else None
    pairs = _reversals(claims)
    repaired = {id(e) for e, later in pairs if e.grade == WRONG and later.grade == CORRECT}
    answer = lenient_roles(text, puzzle.names)
    if answer is None:
        fate = "unanswered"
    elif answer == tuple(puzzle.solution):
        fate = "lucky" if wrong else "clean"
    else:
        fate = "derailed" if wrong else "slip"
    return ResponseClaims(
        steps=steps, claims=claims, coverage=len(covered) / n_steps if n_steps else None,
        first_wrong=None if first is None else {"step": first.step, "position": first.step / max(n_steps - 1, 1),
                                                "kind": first.kind},
        passages=_passages(rb.step_labels[:n_steps], claims, ex.mistakes, [later for _, later in pairs]),
        repairs=sum(1 for c in wrong if id(c) in repaired), n_wrong=len(wrong), fate=fate,
        mistakes=ex.mistakes)


# --------------------------------------------------------------------------- statistics

def _rate(num: float, den: float) -> float:
    return num / den if den else float("nan")


def response_metrics(rc: ResponseClaims) -> dict[str, float]:
    """One response's rates (nan where the denominator is empty); `claim_stats` averages them
    over puzzles. Only passages that hold a gradeable claim or a flag count: a "verification"
    step that checks nothing gradeable (a plan, "Check each statement ...") is no check."""
    out: dict[str, float] = {}
    graded = [c for c in rc.claims if c.grade != UNGRADEABLE]
    out["accuracy"] = _rate(sum(c.grade == CORRECT for c in graded), len(graded))
    for kind in KINDS:
        g = [c for c in graded if c.kind == kind]
        out[f"accuracy:{kind}"] = _rate(sum(c.grade == CORRECT for c in g), len(g))
    out["coverage"] = float("nan") if rc.coverage is None else rc.coverage
    checks = [p for p in rc.passages if p.flagged or any(
        p.start <= c.step <= p.end for c in graded)]
    with_error = [p for p in checks if p.error_before]
    without = [p for p in checks if not p.error_before]
    flagged = [p for p in checks if p.flagged]
    approving = [p for p in checks if p.approves]
    out["detection"] = _rate(sum(p.flagged for p in with_error), len(with_error))
    out["false_alarm"] = _rate(sum(p.flagged for p in without), len(without))
    out["flag_right"] = _rate(sum(bool(p.flag_right) for p in flagged), len(flagged))
    out["hollow"] = _rate(sum(p.hollow for p in approving), len(approving))
    out["repair"] = _rate(rc.repairs, rc.n_wrong)
    out["has_wrong"] = float(rc.n_wrong > 0)
    out["first_wrong_position"] = float("nan") if rc.first_wrong is None else rc.first_wrong["position"]
    out["verifies"] = float(bool(checks))
    for fate in FATES:
        out[f"fate:{fate}"] = float(rc.fate == fate)
    return out


METRICS = {   # key -> label on reports and the index
    "accuracy": "claim accuracy",
    **{f"accuracy:{k}": f"claim accuracy ({k})" for k in KINDS},
    "coverage": "claim coverage (steps)",
    "detection": "verification detection rate",
    "false_alarm": "verification false-alarm rate",
    "flag_right": "verification flags right",
    "hollow": "hollow verification rate",
    "repair": "repair rate",
    "has_wrong": "responses with a wrong claim",
    "first_wrong_position": "first wrong claim position",
    "verifies": "responses that verify",
    **{f"fate:{f}": f"answer fate: {f}" for f in FATES},
}


def claim_stats(records: Sequence[Mapping[str, Any]], puzzles: Sequence[Puzzle], grammar: Grammar | None = None,
                rules: Any = None, n_boot: int = 1000, seed: int = 0, n_examples: int = 3,
                example_chars: int = 200) -> dict[str, Any]:
    """Per-checkpoint claim statistics over responses (`text`, `puzzle_id`):
    each metric of `response_metrics` averaged over a puzzle's responses, then over puzzles,
    with a 95% bootstrap interval over puzzles; counts of claims by kind and grade; the first
    wrong claim's kinds; a few wrong claims as examples."""
    from analysis.verify_prob import bootstrap_ci

    by_id = {p.id: p for p in puzzles}
    per_puzzle: dict[str, list[dict[str, float]]] = {}
    counts: dict[str, dict[str, int]] = {k: {CORRECT: 0, WRONG: 0, UNGRADEABLE: 0} for k in KINDS}
    first_kinds: dict[str, int] = {}
    examples: list[dict] = []
    n_steps = n_covered = 0
    for r in records:
        p = by_id.get(r["puzzle_id"])
        if p is None:
            raise ClaimGrammarError(f"generation of puzzle {r['puzzle_id']} is not in the puzzle set")
        rc = analyse_response(r["text"], p, grammar, rules)
        per_puzzle.setdefault(p.id, []).append(response_metrics(rc))
        for c in rc.claims:
            counts[c.kind][c.grade] += 1
        if rc.first_wrong:
            first_kinds[rc.first_wrong["kind"]] = first_kinds.get(rc.first_wrong["kind"], 0) + 1
            if len(examples) < n_examples:
                c = next(c for c in rc.claims if c.grade == WRONG)
                step = rc.steps[[s.index for s in rc.steps].index(c.step)].text
                examples.append({"puzzle_id": p.id, "kind": c.kind, "claim": c.text,
                                 "step": step if len(step) <= example_chars else step[:example_chars] + "…",
                                 "assumption": {p.names[q]: ("knight" if k else "knave") for q, k in c.assumption}})
        n_steps += len(rc.steps)
        n_covered += len({c.step for c in rc.claims if c.grade != UNGRADEABLE})
    metrics: dict[str, dict] = {}
    for key in METRICS:
        values = [np.nanmean([m[key] for m in ms]) if any(np.isfinite(m[key]) for m in ms) else np.nan
                  for ms in per_puzzle.values()]
        v = np.array([x for x in values if np.isfinite(x)])
        if len(v):
            mean, lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed)
            metrics[key] = {"mean": float(mean), "lo": float(lo), "hi": float(hi), "n_puzzles": int(len(v))}
        else:
            metrics[key] = {"mean": None, "lo": None, "hi": None, "n_puzzles": 0}
    return {"n_responses": len(records), "n_puzzles": len(per_puzzle), "metrics": metrics,
            "claims": counts, "steps": n_steps, "steps_with_claim": n_covered,
            "first_wrong_kinds": first_kinds, "examples": examples}


# --------------------------------------------------------------------------- report plug-in

def _fmt_ci(m: Mapping[str, Any]) -> str:
    if m.get("mean") is None:
        return "–"
    return f"{m['mean']:.2f} [{m['lo']:.2f}, {m['hi']:.2f}] (n={m['n_puzzles']})"


@register_analysis
class ClaimsAnalysis(Analysis):
    """Every gradeable claim of the checkpoint's puzzle-set responses, graded by the solver:
    claim accuracy, what verification catches, repairs and the answers' fates."""

    name = "claims"
    title = "Step-level ground truth: graded claims"
    order = 25
    version = 1
    uses_generations = True
    uses_model = False

    def __init__(self, grammar: str = "", rules: str = "", n_boot: int = 1000, seed: int = 0,
                 n_examples: int = 3):
        self.grammar = load_grammar(grammar) if grammar else default_grammar()
        self.rules = load_rules(rules) if rules else default_rules()
        self.n_boot, self.seed, self.n_examples = int(n_boot), int(seed), int(n_examples)

    def params(self) -> dict:
        return {"grammar": self.grammar.digest, "rules": self.rules.digest, "n_boot": self.n_boot,
                "seed": self.seed, "n_examples": self.n_examples}

    def run(self, ctx: AnalysisContext) -> dict:
        return claim_stats(ctx.generations, ctx.puzzles, self.grammar, self.rules, n_boot=self.n_boot,
                           seed=self.seed, n_examples=self.n_examples)

    def report_section(self, result: dict) -> tuple[str, list]:
        from matplotlib.figure import Figure

        m = result["metrics"]
        graded = {k: v[CORRECT] + v[WRONG] for k, v in result["claims"].items()}
        lines = [
            f"{result['n_responses']} responses; {sum(graded.values())} gradeable claims "
            f"({sum(v[UNGRADEABLE] for v in result['claims'].values())} not gradeable) in "
            f"{result['steps']} thinking steps, {result['steps_with_claim']} of them with a gradeable claim. "
            "Means over puzzles with 95% bootstrap intervals; n = puzzles where the rate is defined.",
            "",
            "| metric | value [95% CI] |",
            "|---|---|",
        ]
        lines += [f"| {label} | {_fmt_ci(m[key])} |" for key, label in METRICS.items()]
        lines += ["", "| claim kind | correct | wrong | not gradeable |", "|---|---|---|---|"]
        lines += [f"| {k} | {v[CORRECT]} | {v[WRONG]} | {v[UNGRADEABLE]} |" for k, v in result["claims"].items()]
        if result["first_wrong_kinds"]:
            lines += ["", "First wrong claim by kind: " + ", ".join(
                f"{k} {n}" for k, n in sorted(result["first_wrong_kinds"].items(), key=lambda kv: -kv[1])) + "."]
        if result["examples"]:
            lines += ["", "First wrong claims (the step, the case in force):", ""]
            for ex in result["examples"]:
                quote = ex["step"].replace("\n", " ").replace("*", "\\*").replace("_", "\\_")
                case = ", ".join(f"{n} {r}" for n, r in ex["assumption"].items()) or "no assumption"
                lines.append(f"- {ex['puzzle_id']} ({ex['kind']}; {case}): “{quote}”")
        fig = Figure(figsize=(8, 3.4), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2, width_ratios=[3, 2])
        keys = ["accuracy"] + [f"accuracy:{k}" for k in KINDS] + ["detection", "false_alarm", "hollow", "repair"]
        labels = ["all claims"] + list(KINDS) + ["detection", "false alarm", "hollow", "repair"]
        vals = [m[k]["mean"] for k in keys]
        y = np.arange(len(keys))
        ax1.barh(y, [v or 0.0 for v in vals], color=["#4c72b0"] * (1 + len(KINDS)) + ["#dd8452"] * 4)
        err = np.array([[max(0.0, (m[k]["mean"] or 0) - (m[k]["lo"] or 0)), max(0.0, (m[k]["hi"] or 0) - (m[k]["mean"] or 0))]
                        for k in keys]).T
        ax1.errorbar([v or 0.0 for v in vals], y, xerr=err, fmt="none", ecolor="black", capsize=2)
        ax1.set_yticks(y, [f"{lab} (n/a)" if v is None else lab for lab, v in zip(labels, vals)])
        ax1.invert_yaxis()
        ax1.set_xlim(0, 1)
        ax1.set_xlabel("rate (mean over puzzles, 95% CI)")
        left = 0.0
        colors = {"clean": "#55a868", "lucky": "#ccb974", "slip": "#8172b3", "derailed": "#c44e52",
                  "unanswered": "#8c8c8c"}
        for fate in FATES:
            share = m[f"fate:{fate}"]["mean"] or 0.0
            ax2.barh([0], [share], left=left, color=colors[fate], label=fate)
            left += share
        ax2.set_xlim(0, 1)
        ax2.set_yticks([])
        ax2.set_xlabel("share of answers")
        ax2.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=7, frameon=False)
        return "\n".join(lines) + "\n", [("Claim accuracy by kind, verification events, and the answers' fates", fig)]

    HEADLINE = ("accuracy", "detection", "false_alarm", "hollow", "repair", "fate:lucky", "fate:slip", "coverage")

    def trend_metrics(self, result: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        for key in self.HEADLINE + tuple(f"accuracy:{k}" for k in KINDS):
            m = result["metrics"].get(key) or {}
            if m.get("mean") is None:
                continue
            out[METRICS[key]] = m["mean"]
            out[METRICS[key] + "@lo"], out[METRICS[key] + "@hi"] = m["lo"], m["hi"]
        return out
