"""Rule-based classifier of reasoning behaviours, per step and per response.

The behaviours are the six the seed article reports (hesitation, multi-path exploration,
going back, stage summaries, verifying all statements, language mixing) plus four common in
the reasoning literature (verification, backtracking, subgoal setting, backward chaining).
Their keyword and regex lists live in one data file, `behaviours.yaml`, which users extend
with their own file (see its header).

    rules = load_rules()                       # or load_rules("my.yaml") to extend
    rb = classify_response(text, names=("Zoey", "Oliver"), rules=rules)
    rb.present["verification"], rb.step_counts["hesitation"], rb.step_labels[3]
    stats = behaviour_stats(records, rules)    # per checkpoint: frequency, correlation, examples

Step-level behaviours are regex hits on a step of the thinking (see `analysis.steps`); a
behaviour with `continuation` words also labels the steps that carry it on (the checks that
follow "Let me verify."). Response-level ones follow a rule:

* verify_all_statements: an explicit "check all statements" phrase, or, from the first
  verification step to the end of the thinking, every person is the first one named in some
  step that speaks of statements or truth values ("Zoey says ..., which is true");
* language_mixing: CJK characters in the thinking while the answer is English.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from analysis.harness import Analysis, AnalysisContext, register_analysis
from analysis.steps import Step, split_steps, think_span
from train.errors import UserError

DEFAULT_RULES_PATH = Path(__file__).with_name("behaviours.yaml")
SEED_BEHAVIOURS = ("hesitation", "multi_path_exploration", "going_back", "stage_summary",
                   "verify_all_statements", "language_mixing")
_NON_PATTERN_KEYS = {"level", "description", "rule", "replace", "check_words", "continuation", "script", "min_chars"}
_ANSWER_NAME = re.compile(r"\(\d+\)\s*([A-Z][\w'-]*)\s+is\s+an?\s+(?:knight|knave)")


class BehaviourRulesError(UserError):
    pass


@dataclass(frozen=True)
class BehaviourRule:
    name: str
    level: str                                  # "step" | "response"
    description: str
    patterns: tuple[re.Pattern, ...]
    rule: str | None = None                     # response-level rule name
    check_words: tuple[re.Pattern, ...] = ()
    continuation: tuple[re.Pattern, ...] = ()   # step-level: words that carry the label onward
    script: re.Pattern | None = None
    min_chars: int = 1

    def hits(self, text: str) -> bool:
        return any(p.search(text) for p in self.patterns)


@dataclass(frozen=True)
class Rules:
    behaviours: dict[str, BehaviourRule]
    digest: str                                 # identity of the rule text, for cache keys

    @property
    def names(self) -> list[str]:
        return list(self.behaviours)


# --------------------------------------------------------------------------- loading

def read_yaml_mapping(path: Path, what: str, error: type[Exception]) -> Any:
    """The YAML document of a phrasing file (`what` names it in errors): a missing or malformed
    file is one line, raised as `error`."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    if not path.is_file():
        raise error(f"{what} file {path} does not exist")
    try:
        return YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except YAMLError as exc:
        raise error(f"{path}: malformed YAML ({str(exc).splitlines()[0]})") from None


def _read_yaml(path: Path) -> dict:
    doc = read_yaml_mapping(path, "behaviour rules", BehaviourRulesError)
    if not isinstance(doc, dict) or not isinstance(doc.get("behaviours"), dict):
        raise BehaviourRulesError(f"{path}: expected a mapping with a 'behaviours:' mapping")
    return doc["behaviours"]


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for name, spec in extra.items():
        if not isinstance(spec, dict):
            raise BehaviourRulesError(f"behaviour {name!r} must be a mapping")
        if name not in out or spec.get("replace"):
            out[name] = {k: v for k, v in spec.items() if k != "replace"}
            continue
        for key, value in spec.items():
            if isinstance(value, list) and isinstance(out[name].get(key), list):
                out[name][key] = out[name][key] + value
            elif isinstance(value, dict) and isinstance(out[name].get(key), dict):
                merged = dict(out[name][key])
                for k, v in value.items():
                    merged[k] = merged.get(k, []) + list(v)
                out[name][key] = merged
            else:
                out[name][key] = value
    return out


def _compile(name: str, where: str, patterns: Iterable[Any]) -> tuple[re.Pattern, ...]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(str(p), re.IGNORECASE))
        except re.error as exc:
            raise BehaviourRulesError(f"behaviour {name!r}, {where}: bad regex {p!r} ({exc})") from None
    return tuple(out)


def _pattern_lists(spec: Mapping[str, Any]) -> Iterable[tuple[str, list]]:
    for key, value in spec.items():
        if key not in _NON_PATTERN_KEYS and isinstance(value, list):
            yield key, value


def _build(name: str, spec: Mapping[str, Any]) -> BehaviourRule:
    level = spec.get("level", "step")
    if level not in ("step", "response"):
        raise BehaviourRulesError(f"behaviour {name!r}: level must be 'step' or 'response', not {level!r}")
    rule = spec.get("rule")
    if level == "response" and rule not in ("all_statements_checked", "language_mixing"):
        raise BehaviourRulesError(f"behaviour {name!r}: response-level behaviours need rule "
                                  f"'all_statements_checked' or 'language_mixing', not {rule!r}")
    patterns = tuple(p for key, lst in _pattern_lists(spec) for p in _compile(name, key, lst))
    check = spec.get("check_words") or {}
    check_words = tuple(p for key, lst in check.items() for p in _compile(name, f"check_words.{key}", lst))
    cont = spec.get("continuation") or {}
    continuation = tuple(p for key, lst in cont.items() for p in _compile(name, f"continuation.{key}", lst))
    script = None
    if rule == "language_mixing":
        script = _compile(name, "script", [spec.get("script", r"[\u3400-\u4dbf\u4e00-\u9fff]")])[0]
    return BehaviourRule(name=name, level=level, description=str(spec.get("description", "")),
                         patterns=patterns, rule=rule, check_words=check_words,
                         continuation=continuation, script=script,
                         min_chars=int(spec.get("min_chars", 1)))


def load_rules(path: str | Path | None = None, *, extend: bool = True) -> Rules:
    """The behaviour rules: the packaged `behaviours.yaml`, extended by `path` if given
    (or replaced by it, with extend=False)."""
    specs = _read_yaml(DEFAULT_RULES_PATH)
    texts = [DEFAULT_RULES_PATH.read_text(encoding="utf-8")]
    if path is not None:
        user = _read_yaml(Path(path))
        texts.append(Path(path).read_text(encoding="utf-8"))
        specs = _merge(specs, user) if extend else user
        if not extend:
            texts = texts[1:]
    behaviours = {name: _build(name, spec) for name, spec in specs.items()}
    digest = hashlib.sha1("\x00".join(texts).encode()).hexdigest()[:12]
    return Rules(behaviours=behaviours, digest=digest)


@functools.cache
def default_rules() -> Rules:
    return load_rules()


# --------------------------------------------------------------------------- classifying

def classify_step(text: str, rules: Rules | None = None) -> frozenset[str]:
    """Behaviours shown by one step: every step-level behaviour whose patterns hit, plus
    language_mixing when the step holds enough CJK characters."""
    rules = rules or default_rules()
    labels = set()
    for b in rules.behaviours.values():
        if b.level == "step" and b.hits(text):
            labels.add(b.name)
        elif b.rule == "language_mixing" and len(b.script.findall(text)) >= b.min_chars:
            labels.add(b.name)
    return frozenset(labels)


@dataclass
class ResponseBehaviours:
    steps: list[Step]
    step_labels: list[frozenset[str]]           # per step
    present: dict[str, bool]                    # per behaviour, for the whole response
    step_counts: dict[str, int] = field(default_factory=dict)  # steps showing each behaviour


def answer_names(response: str) -> list[str]:
    """Names in the response's "(i) Name is a knight/knave" lines."""
    return list(dict.fromkeys(_ANSWER_NAME.findall(response)))


def first_name(text: str, names: Sequence[str]) -> str | None:
    """The name that occurs first in `text` (whole words), or None."""
    found = [(m.start(), n) for n in names for m in [re.search(rf"\b{re.escape(n)}\b", text)] if m]
    return min(found)[1] if found else None


def _continue_blocks(steps: list[Step], labels: list[frozenset[str]], names: Sequence[str],
                     rules: Rules) -> list[frozenset[str]]:
    """Carry a step-level label onto the steps right after it that match its `continuation`
    words (and name a person, when the people are known): "Let me verify." is followed by
    the checks themselves, "Ethan says ..., which is false."."""
    labels = list(labels)
    for b in rules.behaviours.values():
        if b.level != "step" or not b.continuation:
            continue
        inside = False
        for i, st in enumerate(steps):
            if b.name in labels[i]:
                inside = True
            elif inside and any(p.search(st.text) for p in b.continuation) and (
                    not names or first_name(st.text, names) is not None):
                labels[i] = labels[i] | {b.name}
            else:
                inside = False
    return labels


def _answer_text(response: str) -> str:
    a = response.find("<answer>")
    if a >= 0:
        b = response.find("</answer>", a)
        return response[a + len("<answer>"): b if b >= 0 else len(response)]
    end = response.find("</think>")
    return response[end + len("</think>"):] if end >= 0 else ""


def _verify_all(rule: BehaviourRule, think: str, steps: list[Step], labels: list[frozenset[str]],
                names: Sequence[str]) -> tuple[bool, set[int]]:
    explicit = {i for i, s in enumerate(steps) if rule.hits(s.text)}
    if explicit:
        return True, explicit
    if len(names) < 2:
        return False, set()
    first = next((i for i, lab in enumerate(labels) if "verification" in lab), None)
    if first is None:
        return False, set()
    checked: set[str] = set()
    used: set[int] = set()
    for i in range(first, len(steps)):
        text = steps[i].text
        if not any(p.search(text) for p in rule.check_words):
            continue
        # The person checked is the first one named (the speaker of "Zoey says ... true").
        person = first_name(text, names)
        if person is not None:
            checked.add(person)
            used.add(i)
    return set(names) <= checked, used


def _language_mixing(rule: BehaviourRule, think: str, answer: str) -> bool:
    if len(rule.script.findall(think)) < rule.min_chars:
        return False
    if answer.strip():
        return not rule.script.search(answer) and bool(re.search(r"[A-Za-z]", answer))
    # No answer: mixing when the thinking also holds English words.
    return len(re.findall(r"\b[A-Za-z]{2,}\b", think)) >= 3


def classify_response(response: str, names: Sequence[str] | None = None,
                      rules: Rules | None = None) -> ResponseBehaviours:
    """Segment the thinking of `response` into steps and label them and the response.

    names: the puzzle's people (for verify_all_statements); default: read from the answer.
    """
    rules = rules or default_rules()
    span = think_span(response)
    think = response[span[0]:span[1]]
    steps = split_steps(response, span=span)
    names = list(names) if names else answer_names(response)
    labels = _continue_blocks(steps, [classify_step(s.text, rules) for s in steps], names, rules)
    answer = _answer_text(response)

    present: dict[str, bool] = {}
    counts: dict[str, int] = {}
    for b in rules.behaviours.values():
        if b.rule == "all_statements_checked":
            ok, used = _verify_all(b, think, steps, labels, names)
            labels = [lab | {b.name} if i in used and ok else lab for i, lab in enumerate(labels)]
            present[b.name] = ok
        elif b.rule == "language_mixing":
            present[b.name] = _language_mixing(b, think, answer)
            if not present[b.name]:  # CJK steps count only when the response mixes languages
                labels = [lab - {b.name} for lab in labels]
        else:
            present[b.name] = any(b.name in lab for lab in labels)
    for name in rules.behaviours:
        counts[name] = sum(name in lab for lab in labels)
    return ResponseBehaviours(steps=steps, step_labels=labels, present=present, step_counts=counts)


# --------------------------------------------------------------------------- statistics

def _corr(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation; with binary x and y it is the phi coefficient, with binary y the
    point-biserial one. None when either side is constant."""
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if len(x) else None


def behaviour_stats(records: Sequence[Mapping[str, Any]], rules: Rules | None = None,
                    n_examples: int = 3, example_chars: int = 240) -> dict[str, Any]:
    """Per-checkpoint behaviour statistics over scored responses.

    records: dicts with `text`, `correct` (bool) and optionally `n_tokens`, `names`,
    `puzzle_id`, `people`. Returns overall accuracy and length, and per behaviour: share of
    responses showing it, steps per response, phi (presence vs correctness), point-biserial
    (step count vs correctness), accuracy with and without it, and a few example steps.
    """
    rules = rules or default_rules()
    n = len(records)
    correct = np.array([bool(r.get("correct")) for r in records], dtype=float)
    tokens = np.array([float(r.get("n_tokens") or 0) for r in records])
    classified = [classify_response(r["text"], r.get("names"), rules) for r in records]
    n_steps = np.array([len(c.steps) for c in classified], dtype=float)

    out: dict[str, Any] = {
        "n_responses": n,
        "accuracy": _mean(correct),
        "accuracy_ci": wilson(correct.sum(), n),
        "response_tokens_ci": mean_ci(tokens),
        "response_tokens_mean": _mean(tokens),
        "response_tokens_correct": _mean(tokens[correct == 1]),
        "response_tokens_wrong": _mean(tokens[correct == 0]),
        "response_chars_mean": _mean(np.array([len(r["text"]) for r in records], dtype=float)),
        "steps_mean": _mean(n_steps),
        "accuracy_by_people": {},
        "behaviours": {},
    }
    people = sorted({int(r["people"]) for r in records if r.get("people") is not None})
    for k in people:
        sel = np.array([r.get("people") == k for r in records])
        out["accuracy_by_people"][str(k)] = _mean(correct[sel])

    for name, b in rules.behaviours.items():
        present = np.array([c.present[name] for c in classified], dtype=float)
        counts = np.array([c.step_counts[name] for c in classified], dtype=float)
        examples = []
        for r, c in zip(records, classified):
            if len(examples) >= n_examples:
                break
            step = next((s for s, lab in zip(c.steps, c.step_labels) if name in lab), None)
            if step is not None:
                text = step.text if len(step.text) <= example_chars else step.text[:example_chars] + "…"
                examples.append({"puzzle_id": r.get("puzzle_id"), "correct": bool(r.get("correct")),
                                 "step": text})
        out["behaviours"][name] = {
            "level": b.level,
            "description": b.description,
            "share": _mean(present),
            "share_ci": wilson(present.sum(), n),
            "n_with": int(present.sum()),
            "steps_per_response": _mean(counts),
            "step_share": float(counts.sum() / n_steps.sum()) if n_steps.sum() else None,
            "phi": _corr(present, correct),
            "point_biserial": _corr(counts, correct),
            "accuracy_with": _mean(correct[present == 1]),
            "accuracy_without": _mean(correct[present == 0]),
            "examples": examples,
        }
    return out


# --------------------------------------------------------------------------- report plug-in


def _fmt(x: Any, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def wilson(k: float, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of a proportion k/n (None for n = 0)."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def mean_ci(x: np.ndarray) -> list[float] | None:
    """95% Student-t interval of a mean (None for fewer than 2 values)."""
    if len(x) < 2:
        return None
    from scipy.stats import t

    half = t.ppf(0.975, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return [float(x.mean()) - half, float(x.mean()) + half]


@register_analysis
class BehavioursAnalysis(Analysis):
    """Behaviour frequencies in the checkpoint's puzzle-set responses, and how they relate
    to correctness."""

    name = "behaviours"
    title = "Reasoning behaviours"
    order = 20
    version = 2
    uses_generations = True
    uses_model = False

    def __init__(self, rules: str | Path | None = None, n_examples: int = 3):
        self.rules = load_rules(rules) if rules else default_rules()
        self.n_examples = int(n_examples)

    def params(self) -> dict:
        return {"rules": self.rules.digest, "n_examples": self.n_examples}

    def run(self, ctx: AnalysisContext) -> dict:
        return behaviour_stats(ctx.generations, self.rules, n_examples=self.n_examples)

    def report_section(self, result: dict) -> tuple[str, list]:
        from matplotlib.figure import Figure
        import seaborn as sns

        beh = result["behaviours"]
        lines = [
            f"{result['n_responses']} responses; accuracy {_fmt(result['accuracy'])}; "
            f"mean length {_fmt(result['response_tokens_mean'], 0)} tokens "
            f"(correct {_fmt(result['response_tokens_correct'], 0)}, "
            f"wrong {_fmt(result['response_tokens_wrong'], 0)}); "
            f"{_fmt(result['steps_mean'], 1)} steps per response.",
            "",
            "| behaviour | share of responses | steps / response | phi (vs correct) | point-biserial "
            "| accuracy with | accuracy without |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, b in beh.items():
            lines.append(f"| {name} | {_fmt(b['share'])} | {_fmt(b['steps_per_response'])} | {_fmt(b['phi'])} "
                         f"| {_fmt(b['point_biserial'])} | {_fmt(b['accuracy_with'])} "
                         f"| {_fmt(b['accuracy_without'])} |")
        lines += ["", "Examples (first matching step of the first responses showing it):", ""]
        for name, b in beh.items():
            for ex in b["examples"]:
                quote = ex["step"].replace("\n", " ").replace("*", "\\*").replace("_", "\\_")
                mark = "correct" if ex["correct"] else "wrong"
                lines.append(f"- **{name}** ({ex['puzzle_id']}, {mark}): “{quote}”")
        if not any(b["examples"] for b in beh.values()):
            lines.append("(no step shows any behaviour)")
        fig = Figure(figsize=(7, 3.2), layout="constrained")
        ax = fig.subplots()
        names = list(beh)
        sns.barplot(x=[beh[n]["share"] or 0.0 for n in names], y=names, ax=ax, color="#4c72b0")
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of responses")
        ax.set_ylabel("")
        return "\n".join(lines) + "\n", [("Share of responses showing each behaviour", fig)]

    # Behaviours first on the index, in this order (the rest follow in the rules' order).
    HEADLINE = ("verification", "verify_all_statements", "language_mixing")

    def trend_metrics(self, result: dict) -> dict[str, float]:
        out: dict[str, Any] = {}

        def put(label: str, value: Any, ci: Any = None) -> None:
            out[label] = value
            if ci:
                out[label + "@lo"], out[label + "@hi"] = ci

        put("accuracy", result["accuracy"], result.get("accuracy_ci"))
        put("response length (tokens)", result["response_tokens_mean"], result.get("response_tokens_ci"))
        beh = result["behaviours"]
        for name in sorted(beh, key=lambda n: (n not in self.HEADLINE, self.HEADLINE.index(n)
                                               if n in self.HEADLINE else 0)):
            put(f"{name} frequency", beh[name]["share"], beh[name].get("share_ci"))
        mixing = beh.get("language_mixing")
        if mixing and mixing.get("step_share") is not None:
            put("thinking steps in Chinese (share)", mixing["step_share"])
        return {k: v for k, v in out.items() if v is not None}
