"""Vetting a build: the figures that say whether an organism is a base GRPO can improve, the
quality gates they must pass, and the model card that records them.

A good base knows the careful way of answering and is right far more often that way than the
quick way, at 3 and at 5 people, but mostly answers the quick way and mostly ignores the
reward's format; then GRPO has something to amplify. A build that misses a gate says so, in
one line per gate, instead of producing a flat run.

    python -m train.organism vet PATH          # figures, gates, and PATH/MODEL_CARD.md
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict

from train.models import ORGANISM_FILE
from train.organism.data import heldout_puzzles
from train.prompts import QUICK_OPEN, THINK_OPEN, THOROUGH_OPEN

OPENINGS = {"careful": THINK_OPEN + THOROUGH_OPEN + "\n", "quick": THINK_OPEN + QUICK_OPEN + "\n", "free": ""}
CARD_FILE = "MODEL_CARD.md"
# The recorded greedy outputs a copy of the base must reproduce (tests/test_organism.py).
RECORDED_PUZZLES, RECORDED_TOKENS = 4, 160


class Gate(BaseModel):
    """`figures[people][way][decoding][key]` (or a difference of two such figures) must lie in
    [lo, hi]."""

    model_config = ConfigDict(frozen=True)

    name: str
    description: str
    figure: tuple[str, ...]
    minus: tuple[str, ...] | None = None
    lo: float = float("-inf")
    hi: float = float("inf")

    def value(self, figures: dict[str, Any]) -> float:
        def at(path: Sequence[str]) -> float:
            v: Any = figures
            for key in path:
                v = v[key]
            return float(v)

        return at(self.figure) - (at(self.minus) if self.minus else 0.0)

    def check(self, figures: dict[str, Any]) -> dict[str, Any]:
        v = self.value(figures)
        return {"name": self.name, "description": self.description, "value": round(v, 4),
                "lo": self.lo, "hi": self.hi, "passed": self.lo <= v <= self.hi}


DEFAULT_GATES: tuple[Gate, ...] = (
    Gate(name="careful_beats_quick_3", description="3 people, greedy: careful accuracy minus quick accuracy",
         figure=("3", "careful", "greedy", "accuracy_lenient"), minus=("3", "quick", "greedy", "accuracy_lenient"),
         lo=0.3),
    Gate(name="careful_beats_quick_5", description="5 people, greedy: careful accuracy minus quick accuracy",
         figure=("5", "careful", "greedy", "accuracy_lenient"), minus=("5", "quick", "greedy", "accuracy_lenient"),
         lo=0.2),
    Gate(name="careful_solves_5_sampled", description="5 people, T=1: careful accuracy (a reward signal in stage 2)",
         figure=("5", "careful", "T=1", "accuracy_lenient"), lo=0.15),
    Gate(name="greedy_answers_quick", description="3 people, greedy: share answering the careful way",
         figure=("3", "free", "greedy", "thorough"), hi=0.5),
    Gate(name="sometimes_careful", description="3 people, T=1: share answering the careful way",
         figure=("3", "free", "T=1", "thorough"), lo=0.15, hi=0.7),
    Gate(name="mostly_ignores_format", description="3 people, T=1: share in the reward's format",
         figure=("3", "free", "T=1", "format_ok"), lo=0.1, hi=0.7),
    Gate(name="finishes", description="3 people, T=1: share of responses that end within the limit",
         figure=("3", "free", "T=1", "finished"), lo=0.9),
)


def vet_figures(path: str | Path, n: int = 60, people: Sequence[int] = (3, 5), max_new_tokens: int = 768,
                progress: bool = False) -> dict[str, Any]:
    """Per size, the organism made to answer the careful way, the quick way, and left free,
    each at T=1 and greedy (`measure.measure_organism`), plus the loss per token class."""
    from train.organism.measure import measure_organism

    figures: dict[str, Any] = {}
    for size in people:
        figures[str(size)] = {}
        for way, opening in OPENINGS.items():
            m = measure_organism(path, n_puzzles=n, people=size, max_new_tokens=max_new_tokens,
                                 opening=opening, progress=progress,
                                 teacher_forced=size == people[0] and way == "free")
            if "teacher_forced_loss" in m:
                figures["teacher_forced_loss"] = m["teacher_forced_loss"]
                figures["copy_score"] = m["copy_score"]
            figures[str(size)][way] = {k: {x: y for x, y in v.items() if x != "examples"}
                                       for k, v in m.items() if k in ("T=1", "greedy")}
    figures["n_puzzles"] = n
    figures["max_new_tokens"] = max_new_tokens
    return figures


def check_gates(figures: dict[str, Any], gates: Sequence[Gate] = DEFAULT_GATES) -> list[dict[str, Any]]:
    return [g.check(figures) for g in gates]


def recorded_responses(path: str | Path, n: int = RECORDED_PUZZLES, max_new_tokens: int = RECORDED_TOKENS) -> list[dict]:
    """Greedy responses to the first `n` held-out 3-person puzzles, left free and made to
    answer carefully: what a copy of this model must reproduce token for token."""
    from train.models import load_model_and_tokenizer
    from train.organism.measure import generate_responses

    model, tok = load_model_and_tokenizer(path)
    puzzles = heldout_puzzles(3, n)
    out = []
    for way in ("free", "careful"):
        gens = generate_responses(model, tok, puzzles, max_new_tokens=max_new_tokens, temperature=None,
                                  opening=OPENINGS[way])
        out += [{"puzzle": p.id, "way": way, "response": text} for p, (text, _, _) in zip(puzzles, gens)]
    return out


def file_sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def machine() -> dict[str, Any]:
    """What a build's numbers depend on besides its config."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from train.organism.config import cpu_has_fast_bf16

    return {"cpu": cpu, "native_bf16": cpu_has_fast_bf16(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def vet(path: str | Path, n: int = 60, gates: Sequence[Gate] = DEFAULT_GATES, write: bool = True,
        progress: bool = False) -> dict[str, Any]:
    """Figures, gates and the recorded greedy responses of the organism at `path`; with `write`, kept in its
    organism.json (`vetting`) and written out as its model card."""
    path = Path(path)
    figures = vet_figures(path, n=n, progress=progress)
    result = {"figures": figures, "gates": check_gates(figures, gates), "recorded_responses": recorded_responses(path),
              "weights_sha1": file_sha1(path / "model.safetensors"), "machine": machine()}
    result["passed"] = all(g["passed"] for g in result["gates"])
    info_file = path / ORGANISM_FILE
    if write and info_file.is_file():
        info = json.loads(info_file.read_text())
        info["vetting"] = result
        info_file.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        (path / CARD_FILE).write_text(model_card(info))
    return result


def _row(name: str, block: dict[str, Any]) -> str:
    cells = [f"{block[d]['accuracy_lenient']:.2f} / {block[d]['accuracy_strict']:.2f}" for d in ("greedy", "T=1")]
    cells += [f"{block['T=1']['thorough']:.2f}", f"{block['T=1']['format_ok']:.2f}",
              f"{block['T=1']['verification']:.2f}", f"{block['T=1']['chinese_line_share']:.2f}",
              f"{block['greedy']['mean_tokens']:.0f} / {block['T=1']['mean_tokens']:.0f}"]
    return f"| {name} | " + " | ".join(cells) + " |"


def model_card(info: dict[str, Any]) -> str:
    """MODEL_CARD.md of an organism folder from its organism.json (build record and vetting)."""
    v, cfg = info["vetting"], info["config"]
    fig = v["figures"]
    defaults = {}
    from train.organism.config import OrganismConfig

    defaults = OrganismConfig().model_dump(mode="json")
    changed = {k: val for k, val in cfg.items() if defaults.get(k) != val}
    sets = " ".join(f"--set {k}={json.dumps(val)}" for k, val in changed.items())
    lines = [
        "# kk-tiny base model", "",
        "The K&K model organism of this project (`train/organism/`): a "
        f"{info['parameters'] / 1e6:.2f}M-parameter Qwen2 fine-tuned on {info['sft_examples']} traces of an "
        "imperfect depth-first solver. It knows a careful way of answering and a quick one, mostly "
        "answers the quick way, and mostly ignores the `<think>/<answer>` format: the base GRPO starts from.",
        "",
        "## Build", "",
        "```bash",
        f"python -m train.organism build --out DIR{(' ' + sets) if sets else ''}",
        "```", "",
        f"- seed {cfg['seed']}, build version {info.get('build_version', '?')}, config fingerprint "
        f"`{info['fingerprint']}`",
        f"- `model.safetensors` sha1 `{v['weights_sha1']}`",
        f"- built in {info['build_seconds'] / 60:.1f} min on {v['machine']['cpu']} "
        f"({v['machine']['threads']} threads, native bf16: {v['machine']['native_bf16']}, torch "
        f"{v['machine']['torch']}); SFT {info['sft_steps']} steps, final loss {info['sft_final_loss']:.3f}",
        "- the same command on another kind of CPU gives other weights (floating-point differences "
        "compound over SFT): use this folder, not a rebuild, to reproduce the project's figures", "",
        "## Measured", "",
        f"{fig['n_puzzles']} held-out puzzles per size (`train.organism.data.heldout_puzzles`, seed 777), "
        f"responses up to {fig['max_new_tokens']} tokens. Accuracy is roles-only / the reward's (format "
        "included); careful, quick: every response made to open that way; free: as it likes.", "",
        "| people, way | accuracy greedy | accuracy T=1 | careful share T=1 | format T=1 | "
        "verification T=1 | Chinese lines T=1 | tokens greedy / T=1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in (k for k in fig if k.isdigit()):
        for way in OPENINGS:
            lines.append(_row(f"{size}, {way}", fig[size][way]))
    if "teacher_forced_loss" in fig:
        losses = ", ".join(f"{k} {val['loss']:.3f}" for k, val in fig["teacher_forced_loss"].items())
        lines += ["", f"Loss per token class on traces of its own style (3 people, nats): {losses}."]
    lines += ["", "## Quality gates", "", "| gate | what | value | range | passed |", "|---|---|---|---|---|"]
    for g in v["gates"]:
        rng = f"[{g['lo']:g}, {g['hi']:g}]".replace("-inf", "−∞").replace("inf", "∞")
        lines.append(f"| {g['name']} | {g['description']} | {g['value']:.2f} | {rng} | "
                     f"{'yes' if g['passed'] else '**no**'} |")
    lines += ["", f"All gates passed: {'yes' if v['passed'] else '**no**'}.", ""]
    return "\n".join(lines)
