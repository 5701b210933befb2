"""The package's shape stays readable (issue 8): no module over MAX_LINES lines,
no folder of otel_gil/ with more than MAX_MODULES modules, no import cycle, and
the stages import only downstream-to-upstream (docs/architecture.md). Pure
logic over the source files: nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set

PACKAGE = Path(__file__).resolve().parent.parent / "otel_gil"
MAX_LINES = 400
MAX_MODULES = 12  # .py files in one folder, __init__.py included
# What each stage may import from the package (besides the top-level modules:
# config, errors, names, trust). A stage never calls back into a later one.
MAY_IMPORT: Dict[str, Set[str]] = {
    "abi": set(),
    "app": {"abi"},
    "target": {"abi"},
    "stacks": {"abi", "target"},
    "probes": {"abi", "target", "stacks"},
    "sidecar": {"abi", "app", "target", "stacks", "probes", "export"},
    "export": {"abi"},
    "views": set(),
    "cli": {"abi", "app", "target", "stacks", "probes", "sidecar", "export", "views", "dev"},
    "dev": {"abi", "app", "target", "views"},
}
TOP_LEVEL = {"otel_gil.config", "otel_gil.errors", "otel_gil.names", "otel_gil.trust"}


def modules() -> Iterator[Path]:
    yield from sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, known: Set[str], at_import_time: bool) -> Set[str]:
    """The otel_gil modules ``path`` imports: all of them, or only those run
    when it is imported (module level, outside ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes: List[ast.AST] = []
    if at_import_time:
        todo: List[ast.AST] = list(tree.body)
        while todo:
            node = todo.pop()
            if isinstance(node, ast.If) and _type_checking(node):
                todo += node.orelse
            elif isinstance(node, (ast.If, ast.Try)):
                todo += [*node.body, *node.orelse, *getattr(node, "handlers", []),
                         *getattr(node, "finalbody", [])]
            elif isinstance(node, ast.ExceptHandler):
                todo += node.body
            else:
                nodes.append(node)
    else:
        nodes = [n for n in ast.walk(tree)]
    found: Set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "otel_gil"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "otel_gil":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found & known


def graph(at_import_time: bool) -> Dict[str, Set[str]]:
    paths = {module_name(p): p for p in modules()}
    known = set(paths)
    return {name: imports(path, known, at_import_time) - {name} for name, path in paths.items()}


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_module_is_over_the_line_limit() -> None:
    # GIVEN every module of the package WHEN its lines are counted
    long = {module_name(p): n for p in modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    # THEN none is over the limit (split it by what it does)
    assert long == {}


def test_no_folder_has_too_many_modules() -> None:
    folders: Dict[str, int] = {}
    for p in modules():
        key = str(p.parent.relative_to(PACKAGE.parent))
        folders[key] = folders.get(key, 0) + 1
    assert {k: n for k, n in folders.items() if n > MAX_MODULES} == {}


def test_no_import_cycle() -> None:
    # GIVEN the package's imports, those run at import time and the deferred ones
    # (inside functions) alike THEN no two modules depend on each other
    assert cycles(graph(at_import_time=False)) == []
    assert cycles(graph(at_import_time=True)) == []


def test_stages_import_only_what_comes_before_them() -> None:
    # GIVEN each stage folder's imports of the package
    wrong = []
    for name, deps in graph(at_import_time=False).items():
        parts = name.split(".")
        if len(parts) < 3 and not (len(parts) == 2 and parts[1] in MAY_IMPORT):
            continue  # a top-level module
        stage = parts[1]
        for dep in deps:
            dep_parts = dep.split(".")
            if dep in TOP_LEVEL or dep == "otel_gil" or len(dep_parts) < 2 \
                    or dep_parts[1] == stage or dep_parts[1] not in MAY_IMPORT:
                continue
            if dep_parts[1] not in MAY_IMPORT[stage]:
                wrong.append(f"{name} -> {dep}")
    # THEN none reaches into a later stage (the data flows one way)
    assert sorted(wrong) == []


def test_the_checks_see_a_cycle_and_a_long_module() -> None:
    # GIVEN a graph with a cycle and one without THEN only the first is reported
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    # AND the package's modules are found at all (the limits are not vacuous)
    names = {module_name(p) for p in modules()}
    assert {"otel_gil", "otel_gil.abi.events", "otel_gil.sidecar.server"} <= names
