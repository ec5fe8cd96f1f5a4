"""apet_kernels' modules import each other without circles (issue 32: config <-> serialization and the Triton
kernels <-> token_major were two), counting imports inside functions too: a circle is a design knot, and a
lazy import that hides one is still one."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "apet_kernels"


def _graph() -> dict[str, set[str]]:
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    graph = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                found = f"{target}.{alias.name}" if f"{target}.{alias.name}" in files else target
                if found in files and found not in (name, "apet_kernels"):  # (the package's __init__ re-exports)
                    graph[name].add(found)
    return graph


def _circles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    graph = _graph()
    assert "apet_kernels.layers" in graph["apet_kernels.model"]  # the reader sees imports at all


def test_no_module_imports_itself_through_others():
    assert _circles(_graph()) == []
