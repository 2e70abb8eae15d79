"""The import graph of ``zoo``, ``modalities`` and ``tasks``: layered (tasks -> zoo -> modalities) and acyclic.

The graph is read from the source with ``ast``: every ``import`` / ``from ... import`` statement, at module level
and inside functions alike (an import deferred into a function still ties the two modules together), relative
imports resolved. ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
``import a.b.c`` runs the ``__init__`` of ``a`` and ``a.b`` before ``a.b.c`` and binds ``a`` in the importer: it is an
edge to each of ``a``, ``a.b`` and ``a.b.c``.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zoo", "modalities", "tasks")

#: what ``modalities`` may import from ``zoo`` (measured when the test was written; the intended direction is
#: tasks -> zoo -> modalities, so this list only ever shrinks)
MODALITIES_FROM_ZOO: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every module of the three packages: dotted name → file."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_names(path: Path, name: str) -> list[str]:
    """The dotted names ``path`` (module ``name``) imports, relative imports resolved; ``from a import b``
    gives ``a.b`` (the caller keeps whichever of ``a.b`` / ``a`` is a module); ``import a.b.c`` gives ``a``,
    ``a.b`` and ``a.b.c`` (the parent packages' ``__init__`` run, and ``a`` is bound)."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                out += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            out += [f"{source}.{a.name}" for a in node.names]
    return out


def import_graph() -> dict[str, set[str]]:
    """module → the project modules it imports (self-imports dropped)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for target in imported_names(path, name):
            while target and target not in modules:  # `from a.b import func` → a.b; `import a.b.c` → a.b.c
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(comp)) for comp in components]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component (breadth-first)."""
    start = min(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def _package(module: str) -> str:
    return module.partition(".")[0]


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    """The reader itself: function-level, relative (``from . import x``, ``from .x import f``) and
    ``from pkg import submodule`` imports all become edges."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import g\n")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n    return b\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\nfrom ..a import f\n")
    (pkg / "c.py").write_text("import pkg.sub.b as b\n")
    assert imported_names(pkg / "a.py", "pkg.a") == ["pkg.sub.b"]
    assert imported_names(pkg / "c.py", "pkg.c") == ["pkg", "pkg.sub", "pkg.sub.b"]  # every parent's __init__ runs
    assert imported_names(pkg / "sub" / "b.py", "pkg.sub.b") == ["pkg.a", "pkg.a.f"]
    assert imported_names(pkg / "sub" / "__init__.py", "pkg.sub") == ["pkg.sub.b.g"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_zoo_and_modalities_never_import_tasks():
    graph = import_graph()
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if _package(m) in ("zoo", "modalities")
                 for t in ts if _package(t) == "tasks")
    assert not bad, "zoo/modalities must not import tasks (tasks -> zoo -> modalities):\n" + "\n".join(bad)


def test_modalities_import_from_zoo_only_what_they_did():
    graph = import_graph()
    found = {(m, t) for m, ts in graph.items() if _package(m) == "modalities" for t in ts if _package(t) == "zoo"}
    new = sorted(found - MODALITIES_FROM_ZOO)
    assert not new, "new modalities -> zoo imports (the direction is zoo -> modalities):\n" + \
        "\n".join(f"{m} -> {t}" for m, t in new)


def test_tasks_layers():
    """Entry points (``tasks.cli``) are imported by nothing else; the Lightning glue (``tasks.runtime``) imports no
    task, tool or entry point; ``tasks.base`` imports no entry point or tool."""
    graph = import_graph()
    bad = [f"{m} -> {t}" for m, ts in graph.items() for t in ts
           if t.startswith("tasks.cli") and not m.startswith("tasks.cli")]
    bad += [f"{m} -> {t}" for m, ts in graph.items() if m.startswith("tasks.runtime") for t in ts
            if _package(t) == "tasks" and not t.startswith("tasks.runtime") and t != "tasks.registry"]
    bad += [f"tasks.base -> {t}" for t in graph["tasks.base"] if t.startswith(("tasks.cli", "tasks.tools"))]
    assert not bad, "layering broken:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and graph["tasks.base"]  # the reader found the tree
    cycles = find_cycles(graph)
    assert not cycles, f"{len(cycles)} import cycle(s) (function-level imports count):\n" + \
        "\n".join(" -> ".join(c) for c in cycles)
