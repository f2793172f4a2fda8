"""The import graph of vmim/: no circle among module-level imports, no private name imported
across modules, and the fleet imports nothing from the command line (issue 21)."""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set, Tuple

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "vmim")


def _modules() -> Dict[str, str]:
    found = {}
    for top, _dirs, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(top, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(path: str) -> List[Tuple[str, List[str], bool]]:
    """(module, names, at module level) for each import of vmim modules in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    top_level = {id(n) for n in tree.body}
    for n in tree.body:  # `if TYPE_CHECKING:` blocks are not imports at run time
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            top_level.discard(id(n))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vmim"):
            names = [a.name for a in node.names]
            subs = [f"{node.module}.{a}" for a in names if f"{node.module}.{a}" in MODULES]
            for m in subs or [node.module]:
                out.append((m, [] if subs else names, id(node) in top_level))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("vmim"):
                    out.append((a.name, [], id(node) in top_level))
    return out


def test_the_fleet_imports_nothing_from_the_command_line():
    bad = [(m, imp) for m, path in MODULES.items() if m.startswith("vmim.fleet")
           for imp, _names, _top in _imports(path) if imp == "vmim.cli"]
    assert not bad, bad


#: known exceptions: none left (issue 21); add none
KNOWN_PRIVATE: Set[Tuple[str, str, str]] = set()


def test_no_private_name_is_imported_across_modules():
    bad = {(m, imp, n) for m, path in MODULES.items() for imp, names, _top in _imports(path)
           for n in names if n.startswith("_") and not n.startswith("__")}
    assert bad <= KNOWN_PRIVATE, sorted(bad - KNOWN_PRIVATE)


def test_no_circle_among_module_level_imports():
    graph: Dict[str, Set[str]] = {m: set() for m in MODULES}
    for m, path in MODULES.items():
        for imp, _names, top in _imports(path):
            if top and imp in MODULES and imp != m:
                graph[m].add(imp)
    # packages import their own package __init__ implicitly: that is not a circle
    seen: Set[str] = set()
    stack: List[str] = []

    def visit(m: str) -> None:
        if m in stack:
            cycle = stack[stack.index(m):] + [m]
            pytest.fail("import circle: " + " -> ".join(cycle))
        if m in seen:
            return
        stack.append(m)
        for n in sorted(graph[m]):
            if not m.startswith(n + "."):
                visit(n)
        stack.pop()
        seen.add(m)

    for m in sorted(graph):
        visit(m)


def test_no_module_over_500_lines():
    long = {m for m, path in MODULES.items()
            if sum(1 for _ in open(path, encoding="utf-8")) > 500}
    assert not long, sorted(long)
