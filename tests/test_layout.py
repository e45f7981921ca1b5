"""The package layout: one package per pipeline stage, imports flowing one way down the pipeline.

Read from the source with `ast` (function-level imports too), so a lazy import inside a function
cannot hide a dependency on a later stage.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import itemsage

PACKAGE = Path(itemsage.__file__).parent

# Ranks in pipeline order. A module may import its own unit and any unit of a lower rank; units of
# one rank (evaluate and serve) may not import each other. `shared` is the few top-level modules
# every stage uses; `demo` runs every stage; `cli` parses flags and calls them all.
LAYERS: list[set[str]] = [
    {"shared"},
    {"encoders"},
    {"data"},
    {"graph"},
    {"model"},
    {"train"},
    {"embed"},
    {"index"},
    {"evaluate", "serve"},
    {"demo"},
    {"cli"},
]
SHARED = {"schema", "artifacts", "config", "progress", "metrics"}
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """'itemsage.data.ingest' -> 'data'; 'itemsage.schema' -> 'shared'; 'itemsage' -> 'root'."""
    parts = module.split(".")
    if parts[0] != "itemsage":
        raise ValueError(module)
    if len(parts) == 1:
        return "root"
    return "shared" if parts[1] in SHARED else parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """The itemsage modules (dotted) that `source` imports anywhere, relative imports resolved."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..data import y
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("itemsage"):
                continue
            for alias in node.names:  # `from itemsage import schema` names a module; `from m import f` a name
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _is_module(candidate) else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("itemsage"))
    found.discard(module)
    found.discard("itemsage")  # the root package (__version__): every submodule import loads it first anyway
    return found


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """module -> the itemsage modules it imports, for every module of the package."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        graph[name] = imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")
    return graph


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """Every import against the pipeline order: 'a -> b' where b's unit is later than a's, or of
    another unit of the same rank."""
    bad = []
    for module, deps in sorted(graph.items()):
        unit = unit_of(module)
        if unit == "root":  # itemsage/__init__: `load` reaches into model lazily, the public entry
            continue
        for dep in sorted(deps):
            other = unit_of(dep)
            if other == "root" or other == unit:
                continue
            if other not in RANK or unit not in RANK:
                bad.append(f"{module} -> {dep} (unit not in LAYERS)")
            elif RANK[other] >= RANK[unit]:
                bad.append(f"{module} -> {dep}")
    return bad


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


@pytest.mark.parametrize("source, expected", [
    # an earlier stage importing a later one, at module level and inside a function
    ("from itemsage.train.loop import train", ["itemsage.data.x -> itemsage.train.loop"]),
    ("def f():\n    from itemsage.serve import app\n", ["itemsage.data.x -> itemsage.serve.app"]),
    ("from itemsage import evaluate", ["itemsage.data.x -> itemsage.evaluate"]),
    ("import itemsage.index.live", ["itemsage.data.x -> itemsage.index.live"]),
    ("from ..model import tower", ["itemsage.data.x -> itemsage.model.tower"]),
    # the same stage, an earlier stage and the shared modules are fine
    ("from itemsage.data.readers import Source\nfrom itemsage import schema\nfrom . import normalise", []),
    ("from itemsage.encoders.text import TextQueryEncoder", []),
])
def test_wrong_way_sees_a_later_stage(source, expected):
    graph = {"itemsage.data.x": imports_of(source, "itemsage.data.x", is_package=False)}
    assert wrong_way(graph) == expected


def test_evaluate_and_serve_do_not_import_each_other():
    graph = {"itemsage.serve.x": {"itemsage.evaluate.report"}, "itemsage.evaluate.y": {"itemsage.serve.app"}}
    assert wrong_way(graph) == ["itemsage.evaluate.y -> itemsage.serve.app", "itemsage.serve.x -> itemsage.evaluate.report"]


def test_every_module_sits_in_a_stage():
    units = {unit_of(m) for m in import_graph()}
    assert units - {"root"} <= set(RANK), units - set(RANK)
    assert {"shared", "encoders", "data", "model", "train", "embed", "index", "evaluate", "serve", "cli"} <= units


def test_imports_flow_down_the_pipeline():
    graph = import_graph()
    assert wrong_way(graph) == []


def test_no_import_circle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_modules_stay_small():
    """One job per module: none passes ~500 lines (STYLE: split a module when it holds two jobs)."""
    sizes = {module_name(p): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > 520} == {}
