"""The shape of the code: imports run one way, and no two files of different concerns import
each other. Read from the source with `ast` (imports inside functions included), so a new
upward arrow or circle fails here before it grows.

    task      train.kk, train.data, train.reward, train.prompts, train.errors, train.cli
    models    train.models, train.layout, train.generate, train.evaluate, train.registry,
              train.checkpoint_folders
    on top    training (train.schedule, train.engine*, train.run, train.plots), the organism
              (train.organism.*), analysis.*, probes.* (a plug-in of the analysis harness)
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("train", "analysis", "probes")
LAYERS = {
    "task": {"train.kk", "train.data", "train.reward", "train.prompts", "train.errors", "train.cli", "train"},
    "models": {"train.models", "train.layout", "train.generate", "train.evaluate", "train.registry",
               "train.checkpoint_folders"},
    "training": {"train.schedule", "train.engine", "train.engine_trl", "train.engine_verl", "train.run",
                 "train.plots"},
}
# What each concern may import besides itself (task and models are open to everyone above them).
ALLOWED = {
    "task": {"task"},
    "models": {"task", "models"},
    "training": {"task", "models", "training"},
    "organism": {"task", "models", "organism"},
    "analysis": {"task", "models", "analysis"},
    "probes": {"task", "models", "analysis", "probes"},
}


def concern(module: str) -> str:
    for name, members in LAYERS.items():
        if module in members:
            return name
    if module.startswith("train.organism"):
        return "organism"
    top = module.split(".")[0]
    assert top in ("analysis", "probes"), f"{module} belongs to no concern: add it to LAYERS"
    return top


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a `from pkg import sub` counts as pkg.sub)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and t.split(".")[0] in PACKAGES:
                    graph[name].add(t)
    return graph


def test_imports_only_run_downward_or_sideways_within_a_concern():
    graph = import_graph()
    assert len(graph) > 40
    wrong = sorted(f"{a} ({concern(a)}) -> {b} ({concern(b)})" for a, targets in graph.items() for b in targets
                   if concern(b) not in ALLOWED[concern(a)])
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_circle_of_imports_between_files():
    graph = import_graph()
    index, low, stack, on, circles = {}, {}, [], set(), []     # Tarjan's strongly connected components

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_checker_sees_an_upward_import():
    """The layering test is not vacuous: a training module importing analysis is caught."""
    graph = import_graph()
    graph["train.run"] = graph["train.run"] | {"analysis.evaluate"}
    wrong = [(a, b) for a, targets in graph.items() for b in targets if concern(b) not in ALLOWED[concern(a)]]
    assert ("train.run", "analysis.evaluate") in wrong
