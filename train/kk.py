"""Knights-and-Knaves puzzles: the statement grammar, a fast solver, a seeded generator and
the reference text style.

This module is the one home of the puzzle grammar. A statement is a nested tuple over person
indices, exactly as in the reference generator (mem-kk-logic):

    ('telling-truth', i)   person i is a knight        ('lying', i)   person i is a knave
    ('not', s)             ('and', s1, s2, ...)         ('or', s1, s2, ...)
    ('->', s1, s2)         ('<=>', s1, s2)

A puzzle is valid when exactly one knight/knave assignment satisfies, for every person i,
"i is a knight  <=>  statement_i is true".
"""

from __future__ import annotations

import ast
import hashlib
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

from train.errors import UserError

Statement = tuple

LEAVES = ("telling-truth", "lying")
OPERATORS = ("not", "and", "or", "->", "<=>")
MIN_PEOPLE, MAX_PEOPLE = 2, 16

NAMES = (
    "Michael", "Zoey", "Ethan", "Mason", "Jacob", "Alexander", "Avery", "Riley", "Chloe",
    "Jack", "Emily", "Amelia", "Penelope", "Evelyn", "Oliver", "Sophia", "Liam", "Emma",
    "Noah", "Olivia", "William", "Ava", "James", "Isabella", "Benjamin", "Mia", "Lucas",
    "Charlotte", "Henry", "Harper", "Daniel", "Abigail", "Matthew", "Ella", "Joseph",
    "Elizabeth", "David", "Sofia", "Samuel", "Victoria", "Sebastian", "Aria", "Owen",
    "Scarlett", "Gabriel", "Grace", "Carter", "Lily", "Luke", "Hannah", "Isaac", "Nora",
    "Logan", "Stella", "Aiden", "Aurora", "Wyatt", "Violet", "Leo", "Lucy",
)

# Sentence templates of the reference text style; {name} speaks, {s} is the statement.
SAY_TEMPLATES = (
    '{name} said, "{s}."',
    '{name} said that {s}.',
    '"{s}," {name} mentioned.',
    '{name} asserted: "{s}".',
    '{name} was heard saying, "{s}".',
    '{name} commented, "{s}".',
    '{name} stated, "{s}".',
    '{name} noted, "{s}".',
    '{name} remarked, "{s}".',
    '{name} expressed that {s}.',
    'In {name}\'s words: "{s}".',
    '{name} told you that {s}.',
    'According to {name}, "{s}".',
    '{name} claimed, "{s}."',
)

# The fixed-cast world's one template (GeneratorConfig.fixed_cast): a statement in the very
# words a solution restates it in.
PLAIN_TEMPLATE = "{name} says {s}."

QUIZ_HEAD = (
    "A very special island is inhabited only by knights and knaves. Knights always tell the "
    "truth, and knaves always lie. You meet {n} inhabitants: {names}."
)
QUIZ_TAIL = "So who is a knight and who is a knave?"


class PuzzleError(UserError, ValueError):
    """Bad puzzle input: the message is one line that names the problem."""


# --------------------------------------------------------------------------- grammar

def validate_statement(stmt: Any, n_people: int) -> None:
    """Raise PuzzleError unless `stmt` follows the grammar over persons 0..n_people-1."""
    if not isinstance(stmt, tuple) or not stmt:
        raise PuzzleError(f"statement {stmt!r} is not a non-empty tuple")
    op = stmt[0]
    if op in LEAVES:
        if len(stmt) != 2 or not isinstance(stmt[1], int) or isinstance(stmt[1], bool):
            raise PuzzleError(f"leaf {stmt!r} must be ('{op}', person_index)")
        if not 0 <= stmt[1] < n_people:
            raise PuzzleError(f"leaf {stmt!r} names person {stmt[1]}, outside 0..{n_people - 1}")
        return
    if op == "not":
        if len(stmt) != 2:
            raise PuzzleError(f"'not' takes one operand: {stmt!r}")
    elif op in ("and", "or"):
        if len(stmt) < 3:
            raise PuzzleError(f"'{op}' takes two or more operands: {stmt!r}")
    elif op in ("->", "<=>"):
        if len(stmt) != 3:
            raise PuzzleError(f"'{op}' takes exactly two operands: {stmt!r}")
    else:
        raise PuzzleError(f"unknown operator {op!r} in {stmt!r}")
    for sub in stmt[1:]:
        validate_statement(sub, n_people)


def parse_statements(text: str | Sequence, n_people: int | None = None) -> tuple[Statement, ...]:
    """Statements from their reference string form "(('lying', 0), ...)" (or a sequence)."""
    if isinstance(text, str):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as exc:
            raise PuzzleError(f"statements are not a Python tuple literal: {exc}") from None
    else:
        value = text
    value = _to_tuples(value)
    if not isinstance(value, tuple) or not value:
        raise PuzzleError("statements must be a non-empty tuple, one statement per person")
    n = len(value) if n_people is None else n_people
    if len(value) != n:
        raise PuzzleError(f"{len(value)} statements for {n} people")
    for stmt in value:
        validate_statement(stmt, n)
    return value


def _to_tuples(x: Any) -> Any:
    # JSON and parquet turn tuples into lists; the grammar is defined on tuples.
    if isinstance(x, (list, tuple)):
        return tuple(_to_tuples(v) for v in x)
    if hasattr(x, "tolist"):
        return _to_tuples(x.tolist())
    return x


def evaluate(stmt: Statement, assignment: Sequence[bool]) -> bool:
    """Truth value of a statement under a full assignment (True = knight)."""
    op = stmt[0]
    if op == "telling-truth":
        return bool(assignment[stmt[1]])
    if op == "lying":
        return not assignment[stmt[1]]
    if op == "not":
        return not evaluate(stmt[1], assignment)
    if op == "and":
        return all(evaluate(s, assignment) for s in stmt[1:])
    if op == "or":
        return any(evaluate(s, assignment) for s in stmt[1:])
    if op == "->":
        return (not evaluate(stmt[1], assignment)) or evaluate(stmt[2], assignment)
    if op == "<=>":
        return evaluate(stmt[1], assignment) == evaluate(stmt[2], assignment)
    raise PuzzleError(f"unknown operator {op!r}")


def persons_in(stmt: Statement) -> frozenset[int]:
    if stmt[0] in LEAVES:
        return frozenset((stmt[1],))
    return frozenset().union(*(persons_in(s) for s in stmt[1:]))


def statement_types(stmt: Statement) -> Iterable[str]:
    """Every operator and leaf kind in a statement (for histograms)."""
    yield stmt[0]
    if stmt[0] not in LEAVES:
        for s in stmt[1:]:
            yield from statement_types(s)


# --------------------------------------------------------------------------- solver
# An assignment is an int whose bit i is set when person i is a knight. Statements are compiled
# once into closures over that int, which is several times faster than walking the tuples.

def _compile(stmt: Statement) -> Callable[[int], bool]:
    op = stmt[0]
    if op == "telling-truth":
        bit = 1 << stmt[1]
        return lambda v: v & bit != 0
    if op == "lying":
        bit = 1 << stmt[1]
        return lambda v: v & bit == 0
    subs = [_compile(s) for s in stmt[1:]]
    if op == "not":
        f = subs[0]
        return lambda v: not f(v)
    if op in ("and", "or") and len(subs) == 2:
        a, b = subs
        return (lambda v: a(v) and b(v)) if op == "and" else (lambda v: a(v) or b(v))
    if op == "and":
        return lambda v: all(f(v) for f in subs)
    if op == "or":
        return lambda v: any(f(v) for f in subs)
    a, b = subs
    if op == "->":
        return lambda v: not a(v) or b(v)
    return lambda v: a(v) == b(v)


def _constraint(i: int, stmt: Statement) -> Callable[[int], bool]:
    """"Person i is a knight <=> statement_i" as a check on a full assignment of its scope."""
    bit, f = 1 << i, _compile(stmt)
    return lambda v: (v & bit != 0) == f(v)


def _mask(persons: Iterable[int]) -> int:
    m = 0
    for p in persons:
        m |= 1 << p
    return m


def solve(statements: Sequence[Statement], limit: int = 2) -> list[tuple[bool, ...]]:
    """All satisfying assignments, up to `limit` of them, by backtracking (not 2^N enumeration).

    Each constraint "i is a knight <=> statement_i" is checked as soon as every person it
    mentions has a value, so a contradiction prunes the whole subtree below it.
    """
    n = len(statements)
    scopes = [_mask(persons_in(s)) | 1 << i for i, s in enumerate(statements)]
    checks = [_constraint(i, s) for i, s in enumerate(statements)]
    # Most-mentioned persons first; each constraint is checked at the depth where the last
    # person of its scope gets a value.
    mentions = [sum(1 for m in scopes if m >> q & 1) for q in range(n)]
    order = sorted(range(n), key=lambda q: -mentions[q])
    depth_of = {q: d for d, q in enumerate(order)}
    closing: list[list[Callable[[int], bool]]] = [[] for _ in range(n)]
    for c, m in enumerate(scopes):
        closing[max(depth_of[q] for q in range(n) if m >> q & 1)].append(checks[c])
    solutions: list[tuple[bool, ...]] = []

    def dfs(depth: int, v: int) -> bool:
        if depth == n:
            solutions.append(tuple(bool(v >> i & 1) for i in range(n)))
            return len(solutions) >= limit
        bit = 1 << order[depth]
        for val in (v | bit, v):
            for check in closing[depth]:
                if not check(val):
                    break
            else:
                if dfs(depth + 1, val):
                    return True
        return False

    dfs(0, 0)
    return solutions


def solve_by_enumeration(statements: Sequence[Statement], limit: int = 2) -> list[tuple[bool, ...]]:
    """The reference's 2^N check; kept as the baseline for the generator benchmark."""
    n = len(statements)
    found = []
    for code in range(1 << n):
        a = tuple(bool(code >> (n - 1 - i) & 1) for i in range(n))
        if all(evaluate(s, a) == a[i] for i, s in enumerate(statements)):
            found.append(a)
            if len(found) >= limit:
                break
    return found


def unique_solution(statements: Sequence[Statement]) -> tuple[bool, ...] | None:
    sols = solve(statements, limit=2)
    return sols[0] if len(sols) == 1 else None


# --------------------------------------------------------------------------- text

def _leaf_text(stmt: Statement, names: Sequence[str], negated: bool = False) -> str:
    role = "knight" if stmt[0] == "telling-truth" else "knave"
    return f"{names[stmt[1]]} is {'not ' if negated else ''}a {role}"


def is_unit(stmt: Statement) -> bool:
    """A leaf or a negated leaf: what the text says as one clause ("X is (not) a knight")."""
    return stmt[0] in LEAVES or (stmt[0] == "not" and stmt[1][0] in LEAVES)


def unit_parts(unit: Statement) -> tuple[Statement, bool]:
    """(leaf, negated) of a clause (`is_unit`)."""
    return (unit[1], True) if unit[0] == "not" else (unit, False)


def statement_text(stmt: Statement, names: Sequence[str], top: bool = True,
                   note: Callable[[Statement], str] | None = None) -> str:
    """English for a statement, in the reference's phrasing. `note(unit)` is appended to
    every clause (`is_unit`), e.g. its truth value."""
    op = stmt[0]
    if is_unit(stmt):
        leaf, negated = unit_parts(stmt)
        return _leaf_text(leaf, names, negated) + (note(stmt) if note else "")
    sub = lambda s: statement_text(s, names, top=False, note=note)  # noqa: E731
    if op == "not":
        text = f"it is not the case that {sub(stmt[1])}"
    elif op in ("and", "or"):
        parts = [sub(s) for s in stmt[1:]]
        text = f" {op} ".join(parts) if len(parts) == 2 else ", ".join(parts[:-1]) + f", {op} {parts[-1]}"
    elif op == "->":
        text = f"if {sub(stmt[1])} then {sub(stmt[2])}"
    else:
        text = f"{sub(stmt[1])} if and only if {sub(stmt[2])}"
    if top:
        return text[0].upper() + text[1:]
    return f"({text})"


def statement_en(stmt: Statement, names: Sequence[str],
                 note: Callable[[Statement], str] | None = None) -> str:
    """`statement_text` as it reads mid-sentence: lower-case unless it starts with a name."""
    s = statement_text(stmt, names, note=note)
    return s if any(s.startswith(n) for n in names) else s[0].lower() + s[1:]


ROLE_EN = {True: "knight", False: "knave"}
ROLE_ZH = {True: "骑士", False: "骗子"}


def statement_zh(stmt: Statement, names: Sequence[str], top: bool = True,
                 note: Callable[[Statement], str] | None = None) -> str:
    """Chinese for a statement, as a model thinking in Chinese restates it; names stay Latin
    with a space on each side. `note(unit)` is appended to every clause, as in `statement_text`."""
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


def solution_text(names: Sequence[str], solution: Sequence[bool]) -> str:
    """The reference ground-truth format: "(1) Amelia is a knight\\n(2) ..."."""
    return "\n".join(
        f"({i + 1}) {name} is a {'knight' if knight else 'knave'}"
        for i, (name, knight) in enumerate(zip(names, solution))
    )


def quiz_text(names: Sequence[str], statements: Sequence[Statement], rng: random.Random,
              plain: bool = False) -> str:
    """The reference's quiz: one sentence per person in a template drawn from SAY_TEMPLATES,
    or (`plain`) always PLAIN_TEMPLATE."""
    listed = ", ".join(names[:-1]) + f", and {names[-1]}" if len(names) > 2 else " and ".join(names)
    sentences = [QUIZ_HEAD.format(n=len(names), names=listed)]
    for i, stmt in enumerate(statements):
        template = PLAIN_TEMPLATE if plain else rng.choice(SAY_TEMPLATES)
        # Mid-sentence or quoted-first forms start lower-case; a sentence-initial quote does not.
        mid = plain or not template.startswith("{name}") or "that {s}" in template
        s = statement_en(stmt, names) if mid else statement_text(stmt, names)
        sentences.append(template.format(name=names[i], s=s))
    sentences.append(QUIZ_TAIL)
    return " ".join(sentences)


# --------------------------------------------------------------------------- puzzles

@dataclass(frozen=True)
class Puzzle:
    """One K&K puzzle (the puzzle-record contract of DESIGN.md section 4)."""

    id: str
    people: int
    names: tuple[str, ...]
    statements: tuple[Statement, ...]
    solution: tuple[bool, ...]
    quiz: str
    solution_text_format: str
    split: str = ""
    seed: int | None = None
    source: str = "kk-lab"
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def content_key(self) -> str:
        """Identity by logical content (statements only; names are cosmetic)."""
        return content_key(self.statements)

    def to_record(self) -> dict:
        d = asdict(self)
        d["names"] = list(self.names)
        d["statements"] = repr(self.statements)
        d["solution"] = list(self.solution)
        return d


def content_key(statements: Sequence[Statement]) -> str:
    return hashlib.sha1(repr(tuple(statements)).encode()).hexdigest()[:16]


def make_puzzle(names: Sequence[str], statements: Sequence[Statement], *, rng: random.Random,
                split: str = "", seed: int | None = None, source: str = "kk-lab",
                solution: Sequence[bool] | None = None, quiz: str | None = None) -> Puzzle:
    """Build a Puzzle, re-deriving (and, if given, checking) its unique solution."""
    statements = parse_statements(tuple(statements), len(names))
    if len(set(names)) != len(names):
        raise PuzzleError(f"names are not distinct: {list(names)}")
    sols = solve(statements, limit=2)
    if len(sols) != 1:
        raise PuzzleError(f"puzzle has {len(sols) if len(sols) < 2 else '2 or more'} solutions, not exactly one")
    derived = sols[0]
    if solution is not None and tuple(bool(x) for x in solution) != derived:
        raise PuzzleError(f"given solution {list(solution)} disagrees with the derived {list(derived)}")
    key = content_key(statements)
    return Puzzle(
        id=f"kk{len(names)}-{key[:12]}",
        people=len(names),
        names=tuple(names),
        statements=statements,
        solution=derived,
        quiz=quiz if quiz is not None else quiz_text(names, statements, rng),
        solution_text_format=solution_text(names, derived),
        split=split,
        seed=seed,
        source=source,
    )


@dataclass
class GeneratorConfig:
    """Settings of the puzzle generator (defaults: the reference's depth 2, width 2)."""

    depth: int = 2           # nesting depth of a statement; 1 = a bare leaf
    width: int = 2           # max operands of and/or
    # Relative weights of the node kinds below the depth limit (the reference rolls a fair
    # six-sided die: leaf, not, and, or, ->, <=>).
    weights: tuple[float, ...] = (1, 1, 1, 1, 1, 1)
    # A fixed cast: an n-person puzzle's people are NAMES[:n], in that order, instead of n
    # names drawn at random, and each says their statement in PLAIN_TEMPLATE ("Zoey says Ethan
    # is a knave."). The kk-tiny organism's world (train.organism); a model made for it says so
    # in its config.json (FIXED_CAST_KEY).
    fixed_cast: bool = False


# config.json key of a model made for the fixed-cast puzzle world; checkpoints trained from it
# inherit the key, so data, evaluation and probes follow the model.
FIXED_CAST_KEY = "kk_fixed_cast"


class PuzzleGenerator:
    """Seeded generator of uniquely solvable puzzles of N people.

    Plants a random solution, draws each person's statement until its truth matches the
    speaker's planted role, then redraws statements of persons on whom a second solution
    differs until the planted one is the only one. This avoids rejecting whole puzzles,
    which becomes hopeless beyond ~10 people.
    """

    def __init__(self, seed: int, config: GeneratorConfig | None = None):
        self.seed = seed
        self.config = config or GeneratorConfig()
        self.rng = random.Random(seed)

    def _leaf(self, speaker: int, n: int) -> Statement:
        while True:
            kind = self.rng.choice(LEAVES)
            who = self.rng.randrange(n)
            if not (kind == "lying" and who == speaker):  # "I am a knave" is paradoxical
                return (kind, who)

    def statement(self, speaker: int, n: int, depth: int | None = None) -> Statement:
        depth = self.config.depth if depth is None else depth
        if depth <= 1:
            return self._leaf(speaker, n)
        kind = self.rng.choices(("leaf",) + OPERATORS, weights=self.config.weights)[0]
        if kind == "leaf":
            return self._leaf(speaker, n)
        if kind == "not":
            return ("not", self.statement(speaker, n, depth - 1))
        k = self.rng.randint(2, max(2, self.config.width)) if kind in ("and", "or") else 2
        parts: list[Statement] = []
        while len(parts) < k:
            s = self.statement(speaker, n, depth - 1)
            if s not in parts:
                parts.append(s)
        return (kind, *parts)

    def generate(self, n: int, names: Sequence[str] | None = None, max_repairs: int = 1000) -> Puzzle:
        if not MIN_PEOPLE <= n <= MAX_PEOPLE:
            raise PuzzleError(f"number of people {n} is outside the supported range {MIN_PEOPLE}..{MAX_PEOPLE}")
        if names is None:
            names = NAMES[:n] if self.config.fixed_cast else self.rng.sample(NAMES, n)
        names = tuple(names)
        planted = tuple(self.rng.random() < 0.5 for _ in range(n))
        stmts = [self._matching(i, n, planted) for i in range(n)]
        for _ in range(max_repairs):
            sols = solve(stmts, limit=2)
            other = next((s for s in sols if s != planted), None)
            if other is None:
                return make_puzzle(names, stmts, rng=self.rng, seed=self.seed, solution=planted,
                                   quiz=quiz_text(names, stmts, self.rng, plain=self.config.fixed_cast))
            # Redraw one statement; a speaker on whom the two worlds differ is preferred,
            # since the new statement's truth must then differ between them.
            diff = [i for i in range(n) if planted[i] != other[i]]
            i = self.rng.choice(diff) if self.rng.random() < 0.7 else self.rng.randrange(n)
            stmts[i] = self._matching(i, n, planted)
        raise PuzzleError(f"no uniquely solvable {n}-person puzzle after {max_repairs} repairs")

    def _matching(self, speaker: int, n: int, planted: Sequence[bool]) -> Statement:
        while True:
            s = self.statement(speaker, n)
            if evaluate(s, planted) == planted[speaker]:
                return s
