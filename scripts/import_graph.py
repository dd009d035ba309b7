"""The import graph of rap/, analysis/ and experiments/ (every import, lazy ones too): prints each cycle and each
import of the harness from the library, and exits non-zero when there is one. `python scripts/import_graph.py`."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("rap", "analysis", "experiments")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            elif path.parent.name == "experiments" and base in {module_name(p).split(".")[-1]
                                                                 for p in (ROOT / "experiments").glob("*.py")}:
                base = f"experiments.{base}"  # experiments/ scripts import their siblings by bare name
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}
    return {name: imports(path, name, set(files)) for name, path in files.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            # a package's __init__ importing its own submodules is how packages re-export; not a cycle of design
            if w.startswith(v + "."):
                continue
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
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def library_to_harness(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    return [(a, b) for a, deps in sorted(g.items()) for b in sorted(deps)
            if a.startswith("rap") and not a.startswith("rap.harness") and b.startswith("rap.harness")]


def main() -> int:
    g = graph()
    bad = 0
    for comp in cycles(g):
        print("cycle:", " <-> ".join(comp))
        bad += 1
    for a, b in library_to_harness(g):
        print(f"library imports harness: {a} -> {b}")
        bad += 1
    print(f"{len(g)} modules, {sum(map(len, g.values()))} imports, {bad} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
