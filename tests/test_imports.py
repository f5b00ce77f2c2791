"""No import cycles among supermerge's modules, whether an import runs at import time or later.

Every import of a supermerge module counts: at module level, inside a function, under
`if TYPE_CHECKING:`. A function-local or type-only import does not break at import time, but it
ties the modules together all the same, and the next refactor that hoists it does break.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

Graph = dict[str, set[str]]
Sites = dict[tuple[str, str], str]  # (importer, imported) -> "file:line" of the first such import


def module_files(roots: dict[str, Path]) -> dict[str, Path]:
    """Module name -> file, for every .py under each root (package name -> its folder)."""
    files = {}
    for package, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package, *parts])] = path
    return files


def imported_names(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, list[str], int]]:
    """(module named by the import, names it takes from that module, line) for every import in
    the file, anywhere in it; relative imports are made absolute."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def ancestors(module: str) -> list[str]:
    """supermerge.a.b.c -> [supermerge, supermerge.a, supermerge.a.b]."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_edges(roots: dict[str, Path]) -> tuple[Graph, Sites]:
    """The import graph of the packages under `roots` (package name -> folder), and where each edge is.

    An import of M is an edge to M. `from P import x` is an edge to P.x if that is a module, else
    to P. Importing M also runs the __init__ of each package above M: those are edges too when the
    __init__ imports a module of the graph itself, except for the importer's own packages, which
    Python has always started initialising before the importer runs.
    """
    files = module_files(roots)
    prefixes = tuple(f"{package}." for package in roots)
    direct: Graph = {m: set() for m in files}
    sites: Sites = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for base, names, line in imported_names(tree, module, path.name == "__init__.py"):
            targets = [f"{base}.{n}" if f"{base}.{n}" in files else base for n in names] or [base]
            for target in targets:
                if target in roots or target.startswith(prefixes):
                    direct[module].add(target)
                    sites.setdefault((module, target), f"{path}:{line}")
    graph = {m: set(targets) for m, targets in direct.items()}
    for module, targets in direct.items():
        own = {module, *ancestors(module)}
        for target in targets:
            for package in ancestors(target):
                if package not in own and direct.get(package):
                    graph[module].add(package)
                    where = sites[(module, target)]
                    sites.setdefault((module, package), f"{where} (runs {package}'s __init__)")
    return graph, sites


def import_graph(roots: dict[str, Path]) -> Graph:
    """Module -> the modules it imports (see `import_edges`)."""
    return import_edges(roots)[0]


def find_cycles(modules: Graph) -> list[list[str]]:
    """Import cycles, each as [a, b, c] for a -> b -> c -> a, sorted.

    Tarjan's strongly connected components; each component with a cycle is covered by shortest
    cycles, the first through its smallest module, the next through its smallest module no
    reported cycle passes through yet, so every module of every cycle shows up in some chain.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(modules.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(modules):
        if v not in index:
            visit(v)

    cycles = []
    for component in components:
        uncovered = {v for v in component if len(component) > 1 or v in modules.get(v, ())}
        while uncovered:
            start = min(uncovered)
            cycle = shortest_cycle(modules, component, start)
            cycles.append(cycle)
            uncovered -= set(cycle)
    return sorted(cycles)


def shortest_cycle(modules: Graph, component: set[str], start: str) -> list[str]:
    """The shortest path start -> ... -> start inside a strongly connected component (breadth first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(modules.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return path[::-1]
                if w in component and w not in came_from:
                    came_from[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is on no cycle of its component")


def describe(cycle: list[str], sites: Sites) -> str:
    """`a -> b -> c -> a`, then where each of the imports is."""
    hops = list(zip(cycle, [*cycle[1:], cycle[0]], strict=True))
    chain = " -> ".join([*cycle, cycle[0]])
    return "\n".join([chain, *(f"    {a} -> {b}: {sites.get((a, b), '?')}" for a, b in hops)])


def installed_roots() -> dict[str, Path]:
    """The folders the installed supermerge packages come from (engine/ and kernels/ in this checkout)."""
    roots = {}
    for package in ("supermerge", "supermerge.kernels"):
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.origin is not None, package
        roots[package] = Path(spec.origin).parent
    return roots


# ----------------------------------------------------------------------------- the checker itself


def test_find_cycles_reports_each_cycle_once_as_a_chain_and_nothing_for_a_dag() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a", "f"}, "f": set()}
    assert find_cycles(graph) == [["a", "b", "c"], ["d"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_find_cycles_covers_every_module_of_a_tangle() -> None:
    """Two cycles sharing `a`: a -> b -> a and a -> c -> d -> a; both must be shown."""
    graph = {"a": {"b", "c"}, "b": {"a"}, "c": {"d"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b"], ["c", "d", "a"]]


@pytest.fixture
def fake_package(tmp_path: Path) -> Path:
    """A package `fake` with three cycles and one harmless look-alike.

    - a -> b -> c -> a: a imports b at module level; b imports c inside a function; c imports a
      only under TYPE_CHECKING.
    - sub -> e -> sub: sub/__init__ imports e, and e imports sub.x, which runs sub/__init__ first.
    - rel <-> sib: the same through relative imports (`from . import sib`, `from .rel import R`).
    - sub.x imports sub.y: not a cycle, although sub/__init__ imports sub.x, because sub/__init__
      has always started running before any module of sub.
    """
    files = {
        "__init__.py": "",
        "a.py": "from fake import b\n",
        "b.py": "def late():\n    from fake.c import thing\n\n    return thing\n",
        "c.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import fake.a\n\nthing = 1\n",
        "e.py": "from fake.sub.x import X\n",
        "sub/__init__.py": "from fake import e\nfrom fake.sub.x import X\n",
        "sub/x.py": "from fake.sub.y import Y\n\nX = Y\n",
        "sub/y.py": "import os\n\nY = os.sep\n",
        "rel.py": "from . import sib\n\nR = 1\n",
        "sib.py": "from .rel import R\n",
    }
    for name, text in files.items():
        path = tmp_path / "fake" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "fake"


def test_cycles_closed_by_function_local_type_only_relative_and_package_imports_are_found(
    fake_package: Path,
) -> None:
    graph = import_graph({"fake": fake_package})
    assert find_cycles(graph) == [
        ["fake.a", "fake.b", "fake.c"],
        ["fake.e", "fake.sub"],
        ["fake.rel", "fake.sib"],
    ]
    assert graph["fake.sub.x"] == {"fake.sub.y"}
    sites = import_edges({"fake": fake_package})[1]
    message = describe(["fake.a", "fake.b", "fake.c"], sites)
    assert message.splitlines()[0] == "fake.a -> fake.b -> fake.c -> fake.a"
    assert f"fake.c -> fake.a: {fake_package / 'c.py'}:4" in message
    assert "(runs fake.sub's __init__)" in describe(["fake.e", "fake.sub"], sites)


# ----------------------------------------------------------------------------- the real package


def test_supermerge_has_no_import_cycles() -> None:
    roots = installed_roots()
    graph, sites = import_edges(roots)
    for package, folder in roots.items():  # the walk saw the files, so an empty graph cannot pass
        assert package in graph and len([m for m in graph if m.startswith(package)]) > 1, (package, folder)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among supermerge's modules:\n" + "\n".join(
        describe(cycle, sites) for cycle in cycles
    )
