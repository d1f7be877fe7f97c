"""The shape of the code in numbers: lines per file and the longest functions.

    python scripts/code_shape.py            # this checkout
    python scripts/code_shape.py --top 15 --root /path/to/another/checkout
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGES = ("train", "analysis", "probes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    files, functions = [], []
    for pkg in PACKAGES:
        for path in sorted((args.root / pkg).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            rel = path.relative_to(args.root)
            files.append((len(text.splitlines()), str(rel)))
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    functions.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.lineno} {node.name}"))
    total = sum(n for n, _ in files)
    print(f"{len(files)} files, {total} lines; the largest:")
    for n, name in sorted(files, reverse=True)[: args.top]:
        print(f"  {n:5d}  {name}")
    print(f"{len(functions)} functions; the longest:")
    for n, name in sorted(functions, reverse=True)[: args.top]:
        print(f"  {n:5d}  {name}")


if __name__ == "__main__":
    main()
