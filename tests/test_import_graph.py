"""The package's import graph has no cycles: `core/` none at all, the package none but the
executor factory's.

A cycle that only works because one of its imports sits inside a function is a layering
mistake hidden from Python, not fixed: the two modules still need each other. So the graph is
built from every `import` the code runs, at module level or in a function body, read with `ast`
from the sources (nothing is imported). Imports under `if TYPE_CHECKING:` are left out: they
never run, they only name types for annotations.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path
from typing import Iterator

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "folovllm"

# The imports allowed to close a cycle: (importer, imported) -> why. The executor factory,
# `get_executor_cls` beside the base class, picks one of the subclasses, which import the base
# class (vLLM's `Executor.get_class` does the same): a factory next to its products, harmless.
ALLOWED_CYCLE_EDGES = {
    ("executor.abstract", "executor.uniproc_executor"): "the executor factory",
    ("executor.abstract", "executor.multiproc_executor"): "the executor factory",
    ("executor.abstract", "executor.external_launcher"): "the executor factory",
}
# Imported only by the tests, the benchmarks and the CLI: never by the engine.
OFFLINE_PACKAGES = ("folovllm.testing", "folovllm.tools")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def iter_imports(node: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.stmt, bool]]:
    """Every import statement under `node` that can run, and whether it sits in a function."""
    for child in ast.iter_child_nodes(node):
        # `if TYPE_CHECKING:` never runs its body (only its `else:`, if any)
        children = child.orelse if isinstance(child, ast.If) and is_type_checking(child.test) else [child]
        for stmt in children:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                yield stmt, in_function
            else:
                yield from iter_imports(stmt, in_function or isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)))


def imported_modules(node: ast.stmt, modules: set[str]) -> set[str]:
    """The folovllm modules an import statement loads: `from a.b import c` loads `a.b.c` when
    that is a module, else `a.b`."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & modules
    assert isinstance(node, ast.ImportFrom) and node.level == 0, (
        f"line {node.lineno}: a relative import (the package uses absolute ones, which this reads)")
    base = node.module or ""
    return {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
            for alias in node.names} & modules


def build_import_graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """-> (module -> the folovllm modules it imports, module -> its function-level imports of
    anything, as text)."""
    paths = sorted(PACKAGE_DIR.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    graph: dict[str, set[str]] = {}
    lazy: dict[str, list[str]] = {}
    for path in paths:
        name = module_name(path)
        graph[name] = set()
        for node, in_function in iter_imports(ast.parse(path.read_text(), str(path))):
            graph[name] |= imported_modules(node, modules) - {name}
            if in_function:
                lazy.setdefault(name, []).append(f"line {node.lineno}: {ast.unparse(node)}")
    return graph, lazy


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The shortest cycle through each module of every strongly connected component (Tarjan's
    algorithm), each cycle once: [a, b, c, a] for a -> b -> c -> a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:  # v is the root of a component: pop it
            component = set(stack[stack.index(v):])
            del stack[stack.index(v):]
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles: list[list[str]] = []
    for component in components:
        for start in sorted(component):
            cycle = shortest_cycle(graph, start, component)
            if set(zip(cycle, cycle[1:])) not in [set(zip(c, c[1:])) for c in cycles]:
                cycles.append(cycle)
    return cycles


def shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """Breadth-first from `start` back to it, inside one component: [start, ..., start]."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        next_frontier = []
        for v in frontier:
            for w in sorted(graph[v] & within):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if w not in parent:
                    parent[w] = v
                    next_frontier.append(w)
        frontier = next_frontier
    raise AssertionError(f"{start} is in a cycle but none was found")


def describe(cycle: list[str]) -> str:
    return " -> ".join(cycle)


def short(name: str) -> str:
    return name.removeprefix("folovllm.")


def test_the_graph_reads_imports_as_python_runs_them():
    """What counts: module-level imports, function-level ones (flagged), the `else:` of
    `if TYPE_CHECKING:`, never its body; and a made-up cycle is found and named."""
    tree = ast.parse(textwrap.dedent("""
        import a
        if TYPE_CHECKING:
            import b
        else:
            import c
        def f():
            from d import e
        class K:
            def m(self):
                import g
    """))
    assert [(ast.unparse(node), lazy) for node, lazy in iter_imports(tree)] == [
        ("import a", False), ("import c", False), ("from d import e", True), ("import g", True)]
    graph, _ = build_import_graph()
    assert "folovllm.core.block_pool" in graph["folovllm.core.kv_cache_manager"]
    assert "folovllm.envs" in graph["folovllm"]  # `from folovllm import envs`: the module
    made_up = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(made_up) == [["a", "b", "c", "a"]]


def test_core_has_no_import_cycle():
    graph, _ = build_import_graph()
    core = {name: {t for t in targets if t.startswith("folovllm.core.")}
            for name, targets in graph.items() if name.startswith("folovllm.core.")}
    cycles = find_cycles(core)
    assert not cycles, "import cycles in core/:\n" + "\n".join(describe(c) for c in cycles)


def test_core_has_no_function_level_import():
    """core/ is plain Python over plain data: it needs no import deferred to a call (to break a
    cycle, or to keep a heavy package off the import path)."""
    _, lazy = build_import_graph()
    found = {name: lines for name, lines in lazy.items() if name.startswith("folovllm.core.")}
    assert not found, "function-level imports in core/:\n" + "\n".join(
        f"{name}: {line}" for name, lines in sorted(found.items()) for line in lines)


def test_package_has_no_import_cycle_but_the_allowed():
    graph, _ = build_import_graph()
    pruned = {name: {t for t in targets if (short(name), short(t)) not in ALLOWED_CYCLE_EDGES}
              for name, targets in graph.items()}
    cycles = find_cycles(pruned)
    assert not cycles, "import cycles in folovllm (imports at module or function level):\n" + "\n".join(
        describe(c) for c in cycles)


def test_every_allowed_cycle_still_exists():
    """An allowed import that no longer closes a cycle is removed from the list, so the list
    stays the honest account of what is left."""
    graph, _ = build_import_graph()
    for (importer, imported), why in ALLOWED_CYCLE_EDGES.items():
        source, target = f"folovllm.{importer}", f"folovllm.{imported}"
        assert target in graph[source], f"{importer} no longer imports {imported} ({why}): remove it"
        reached, stack = set(), [target]
        while stack:
            for w in graph[stack.pop()] - reached:
                reached.add(w)
                stack.append(w)
        assert source in reached, f"{importer} -> {imported} ({why}) closes no cycle now: remove it"


def test_engine_never_imports_the_offline_packages():
    """`folovllm.testing` (test models) and `folovllm.tools` (the quantizer) serve the tests, the
    benchmarks and the CLI; the engine must run without them."""
    graph, _ = build_import_graph()
    found = [f"{short(name)} -> {short(t)}" for name, targets in sorted(graph.items())
             for t in sorted(targets)
             if t.startswith(OFFLINE_PACKAGES) and not name.startswith(OFFLINE_PACKAGES)
             and name != "folovllm.entrypoints.cli"]
    assert not found, "the engine imports offline code:\n" + "\n".join(found)
