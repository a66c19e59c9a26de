"""The import graph between fedlm's packages has no cycles (issue: layers without circles).

A package is a folder of ``src/fedlm`` (``aggregation``, ``aggregation.lora``, ``runtime.flower``, ...); a module
directly under ``src/fedlm`` is its own node. Every import counts, also the ones inside functions, except those under
``if TYPE_CHECKING:`` (annotations only: nothing runs them). ``core`` imports nothing else of fedlm.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "fedlm"


def _node_of(module: str) -> str:
    """The package (dotted folder under fedlm) or top-level module that ``module`` belongs to."""
    parts = module.split(".")[1:]
    node: list[str] = []
    for part in parts:
        if not (ROOT.joinpath(*node, part)).is_dir():
            break
        node.append(part)
    return ".".join(node) if node else (parts[0] if parts else "fedlm")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every fedlm module imported in ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                found.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.append(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [name for name in found if name == "fedlm" or name.startswith("fedlm.")]


def package_graph() -> dict[str, dict[str, list[str]]]:
    """node -> imported node -> the files that import it."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        source = _node_of(module) if path.name != "__init__.py" or module.count(".") > 0 else "fedlm"
        for imported in _imports(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            target = _node_of(imported)
            if target != source:
                graph[source][target].append(str(path.relative_to(ROOT)))
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
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

    for v in list(graph):
        if v not in index:
            connect(v)
    return found


def test_no_cycles_between_packages() -> None:
    graph = package_graph()
    loops = cycles(graph)
    detail = [f"{a} -> {b} ({', '.join(files)})" for loop in loops for a in loop for b, files in graph[a].items() if b in loop]
    assert not loops, "import cycles between packages:\n" + "\n".join(detail)


def test_core_imports_nothing_else_of_fedlm() -> None:
    assert set(package_graph().get("core", {})) == set()


def test_the_check_finds_a_cycle() -> None:
    graph = {"a": {"b": ["a.py"]}, "b": {"c": ["b.py"]}, "c": {"a": ["c.py"]}, "d": {"a": ["d.py"]}}
    assert cycles(graph) == [["a", "b", "c"]]
