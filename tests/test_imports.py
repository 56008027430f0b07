"""Imports run one way: no cycle among the package's modules (imports inside functions included), and no module
reaches into another module's private names.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` / ``from ... import``
anywhere in ``ttkernels/`` and ``triton_kernels/`` (installed as ``ttkernels._triton_kernels``) that names a module
of the package is an edge. Importing a module also runs its package's ``__init__``; those parent edges are left
out (every package ``__init__`` imports its children), so a cycle here is one between modules proper.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = {"ttkernels": ROOT / "ttkernels", "ttkernels._triton_kernels": ROOT / "triton_kernels"}


def _modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in TREES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _package(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package(module)
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def _imports(module: str) -> tuple[set[str], list[str]]:
    """``(modules of the package that ``module`` imports, private names it takes from other modules)``."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    edges: set[str] = set()
    private: list[str] = []
    bound: dict[str, str] = {}  # local name -> package module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    edges.add(alias.name)
                    bound[alias.asname or alias.name.partition(".")[0]] = (
                        alias.name if alias.asname else alias.name.partition(".")[0]
                    )
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            if source not in MODULES:
                continue
            edges.add(source)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES:
                    edges.add(sub)
                    bound[alias.asname or alias.name] = sub
                elif alias.name.startswith("_") and not alias.name.startswith("__"):
                    private.append(f"from {source} import {alias.name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and f"{bound[node.value.id]}.{node.attr}" not in MODULES
            and bound[node.value.id] != module
        ):
            private.append(f"{bound[node.value.id]}.{node.attr}")
    parents = {module.rsplit(".", k)[0] for k in range(1, module.count(".") + 1)}
    return {e for e in edges if e != module and e not in parents}, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _graph() -> dict[str, set[str]]:
    return {m: _imports(m)[0] for m in MODULES}


def test_the_graph_is_read():
    graph = _graph()
    # a few edges that exist, so that a parser that finds nothing cannot pass the tests below
    assert "ttkernels.spec" in graph["ttkernels.reference"]
    assert "ttkernels.ops" in graph["ttkernels.modules"]
    assert "ttkernels._triton_kernels._common" in graph["ttkernels._triton_kernels.shrink"]
    assert len(MODULES) > 20


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles (in-function imports included): {cycles}"


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_modules_private_names():
    private = {m: p for m in MODULES if (p := _imports(m)[1])}
    assert not private, f"private names used across modules: {private}"
