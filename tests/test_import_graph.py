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
    assert "apet_kernels.layer.sparse_delta_linear" in graph["apet_kernels.layer"]  # the reader sees imports at all


def test_no_module_imports_itself_through_others():
    assert _circles(_graph()) == []


def _reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


NEVER = [  # (modules under this package, may never reach modules under that one, even through others)
    ("apet_kernels.peft_method", "apet_kernels.inplace"),  # the two entry points stand beside each other
    ("apet_kernels.inplace", "apet_kernels.peft_method"),
    ("apet_kernels.adapters", "apet_kernels.inplace"),  # what they share sits below both
    ("apet_kernels.adapters", "apet_kernels.peft_method"),
    ("apet_kernels.layer", "apet_kernels.adapters"),  # the layer knows nothing of models
    ("apet_kernels.ops", "apet_kernels.layer"),
]


def test_the_layers_of_the_package_are_kept():
    graph = _graph()
    broken = []
    for low, high in NEVER:
        for module in (m for m in graph if m == low or m.startswith(low + ".")):
            reached = sorted(m for m in _reachable(graph, module) if m == high or m.startswith(high + "."))
            if reached:
                broken.append(f"{module} reaches {reached[0]}")
    assert not broken, broken


def test_no_module_of_the_package_is_over_500_lines_and_the_layer_class_over_400():
    import ast
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
    tree = ast.parse((PACKAGE / "layer" / "sparse_delta_linear.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SparseDeltaLinear")
    assert cls.end_lineno - cls.lineno + 1 <= 400
