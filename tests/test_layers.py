"""The product's layering holds: import-linter's contracts (pyproject.toml) and our own AST scan.

The scan counts every import a module makes, at module level or inside a function (a function-level
import is a dependency all the same), and leaves out `if TYPE_CHECKING:` blocks (types only). It finds
import cycles among the product's modules and any import of the simulator or the technicians' scripts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every module (or module.attribute) an import statement names, TYPE_CHECKING blocks left out."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for other in node.orelse:
                yield from imported_names(ast.Module(body=[other], type_ignores=[]), module, is_package)
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            yield target
            yield from (f"{target}.{a.name}" for a in node.names)
        yield from imported_names(node, module, is_package)


def import_graph(root: Path, packages: list[str]) -> dict[str, set[str]]:
    """module -> the project modules it imports (a name resolves to its longest known module prefix)."""
    files = {module_name(root, f): f for p in packages for f in (root / p).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, f in files.items():
        deps = set()
        for name in imported_names(ast.parse(f.read_text(), str(f)), mod, f.name == "__init__.py"):
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != mod:
                deps.add(name)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


@pytest.mark.fast
def test_no_import_cycle_among_the_products_modules():
    graph = import_graph(ROOT, ["sorter"])
    assert len(graph) > 80  # the scan saw the product
    assert cycles(graph) == []


@pytest.mark.fast
def test_nothing_in_the_product_imports_the_simulator_or_the_scripts():
    graph = import_graph(ROOT, ["sorter", "sim", "hw"])
    bad = sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m.startswith("sorter")
        for d in deps
        if d.split(".")[0] != "sorter"
    )
    assert bad == []


@pytest.mark.fast
def test_the_scan_sees_function_level_imports_and_skips_type_checking(tmp_path: Path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("from pkg.a import f\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n")
    (pkg / "d.py").write_text("from . import c\n")
    graph = import_graph(tmp_path, ["pkg"])
    # importing pkg.b imports the package pkg too
    assert graph["pkg.a"] == {"pkg", "pkg.b"} and graph["pkg.d"] == {"pkg", "pkg.c"} and graph["pkg.c"] == set()
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


@pytest.mark.wire  # a subprocess: import-linter's own command
def test_import_linter_contracts_are_kept():
    """pyproject.toml's [tool.importlinter] contracts: layers, pure core, no simulator, no cycles."""
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
