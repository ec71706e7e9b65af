"""The package's shape, checked statically: no import cycle (function-local imports count as edges), no module of
another module's private names imported, no module over the size limit, and every module importable on its own."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "posi_jax"
MAX_LINES = 520  # "no module over ~500 lines": a module that grows past this wants to be split


def module_names() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imported_modules(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, str | None]]:
    """(posi_jax module, line, imported name or None) for every import statement in the file, at any depth."""
    me = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    edges = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            edges += [(a.name, node.lineno, None) for a in node.names if a.name.startswith("posi_jax")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(me.split(".")[: -node.level] + ([base] if base else []))
            if not base.startswith("posi_jax"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                edges.append((full, node.lineno, None) if full in modules else (base, node.lineno, alias.name))
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _, _ in imported_modules(path, modules):
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (function-local imports included): " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_names_from_other_modules():
    modules = module_names()
    bad = []
    for name, path in modules.items():
        for target, line, imported in imported_modules(path, modules):
            if imported is not None and imported.startswith("_") and target != name:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}.{imported}")
    assert not bad, "\n".join(bad)


def test_module_size():
    big = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(module_names())
    code = ("import importlib, sys\nbad = []\nfor n in sys.argv[1:]:\n    try:\n        importlib.import_module(n)\n"
            "    except Exception as e:\n        bad.append(f'{n}: {type(e).__name__}: {e}')\nprint('\\n'.join(bad))\n"
            "sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
