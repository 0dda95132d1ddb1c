"""No import circles among the project's own modules, counting imports inside functions too.

A lazy import (inside a function) hides a circle from Python at start-up, not from a reader: the two
modules still cannot be understood, tested or moved apart. This reads every module's source (it
imports nothing) and fails with the circle's path when one module reaches itself again.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("accounts", "certificates", "chat", "gateway", "mcp_servers", "nodes", "node_agent", "operations",
            "optimagpt", "responses_api")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "migrations" not in path.parts:
                found[module_name(path)] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, anywhere in its file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()

    def add(candidate: str) -> None:
        # `import a.b.c` needs a.b.c; the packages above it only run their (empty) __init__ files.
        while candidate and candidate not in modules:
            candidate = candidate.rpartition(".")[0]
        if candidate and candidate != name:
            targets.add(candidate)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in modules else base)
    return targets


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(start: str) -> None:
        # Iterative, so a deep chain of imports cannot hit the recursion limit.
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return components


def closed_path(graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """One circle through the component's first module, found breadth first, to print."""
    start = min(members)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    return sorted(members)


def project_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_lazy_and_relative_imports() -> None:
    graph = project_graph()
    assert len(graph) > 50
    assert "gateway.sse" in graph["gateway.api"]  # `from .sse import ...` at module level
    assert "gateway.invalidation" in graph["optimagpt.server"]  # imported inside a function
    assert "node_agent.protocol" in graph["nodes.consumers"]  # the gateway reaches the Django-free agent


def test_the_checker_finds_a_circle_through_a_lazy_import(tmp_path: Path) -> None:
    """The check itself can fail: a circle closed only by an import inside a function is found."""
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("import pkg.c\n")
    (tmp_path / "c.py").write_text("def later():\n    from .a import thing\n")
    modules = {f"pkg.{name}": tmp_path / f"{name}.py" for name in "abc"}
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    assert import_circles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert closed_path(graph, {"pkg.a", "pkg.b", "pkg.c"}) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_among_the_projects_modules() -> None:
    graph = project_graph()
    circles = import_circles(graph)
    assert not circles, "import circles:\n" + "\n".join(
        f"{', '.join(circle)}: e.g. {' -> '.join(closed_path(graph, set(circle)))}" for circle in circles)
