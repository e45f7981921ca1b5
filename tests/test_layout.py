"""The package layout: no import circle between itemsage modules (top-level or inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import itemsage

PACKAGE = Path(itemsage.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """module -> the itemsage modules it imports anywhere in its source (function-level imports too)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("itemsage"):
                parts = node.module.split(".")
                if len(parts) > 1:
                    deps.add(parts[1])
                else:  # from itemsage import schema, artifacts
                    deps.update(a.name for a in node.names if (PACKAGE / f"{a.name}.py").is_file())
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names
                            if a.name.startswith("itemsage.") and len(a.name.split(".")) > 1)
        deps.discard(name)
        deps.discard("__init__")
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle():
    graph = import_graph()
    assert {"train", "evaluate", "model", "pairs", "checkpoint", "home"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert "train" not in graph["evaluate"]
