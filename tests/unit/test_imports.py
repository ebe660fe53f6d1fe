"""The module graph of the wsproxy package has no circle (issue 13, Build item 3).

The graph is read from the source with ``ast``: every ``import`` and ``from ...
import`` counts, at module level, under ``if TYPE_CHECKING:`` and inside functions
alike, because each is a dependency a reader must follow and a circle through any of
them is a circle in the design. Held here:

- no circle among wsproxy modules;
- only the entry points (``wsproxy.cli``, ``wsproxy.__main__``, ``wsproxy.demo``)
  import ``wsproxy.server``: connections, metrics and the admin view see the proxy
  through the Protocols of ``wsproxy.host``;
- the pure cores import no asyncio, neither themselves nor through any wsproxy module
  they import, and loading one in a fresh interpreter does not load asyncio (which
  also covers the third-party libraries they use).

``docs/internals.md`` draws the graph these rules keep.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "wsproxy"

ENTRY_POINTS = frozenset({"wsproxy.cli", "wsproxy.__main__", "wsproxy.demo"})
SERVER = "wsproxy.server"
#: The sans-I/O cores. connection.py may not exist yet: names without a file are left
#: out, never the test. dev.py's coverage-gated PURE_MODULES are added to these.
PURE = ("frames", "keepalive", "http", "exchange", "config", "connection")


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported module, dotted (a wsproxy module, or the name as written)
    path: Path  # of the importing file, relative to the package's parent
    line: int
    where: str  # "top level", "TYPE_CHECKING" or "function"

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.path}:{self.line}, {self.where})"


@dataclass
class Graph:
    modules: set[str]
    internal: dict[str, list[Edge]]  # source -> edges to modules of the package
    external: dict[str, list[Edge]]  # source -> edges to anything else

    def closure(self, start: str) -> set[str]:
        """``start`` and every package module it reaches by imports."""
        seen, todo = {start}, [start]
        while todo:
            for e in self.internal.get(todo.pop(), []):
                if e.target not in seen:
                    seen.add(e.target)
                    todo.append(e.target)
        return seen


def _module_names(package: Path) -> dict[Path, str]:
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[path] = ".".join(parts)
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Every import of one module as (name, line, where), with ``from X import y``
    resolved to ``X.y`` when that is a module of the package."""

    def __init__(self, module: str, is_package: bool, modules: set[str]) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.where = ["top level"]
        self.found: list[tuple[str, int, str]] = []

    def _add(self, name: str, node: ast.stmt) -> None:
        self.found.append((name, node.lineno, self.where[-1]))

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.where.append("TYPE_CHECKING" if self.where[-1] == "top level" else self.where[-1])
        for child in node.body:
            self.visit(child)
        self.where.pop()
        for child in node.orelse:
            self.visit(child)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.where.append("function")
        self.generic_visit(node)
        self.where.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base_parts = self.package.split(".")
            if node.level > 1:
                base_parts = base_parts[: -(node.level - 1)]
            base = ".".join([*base_parts, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            self._add(candidate if candidate in self.modules else base, node)


def build_graph(package: Path) -> Graph:
    """The import graph of the package in directory ``package``, from its source."""
    names = _module_names(package)
    modules = set(names.values())
    top = package.name
    graph = Graph(modules, {m: [] for m in modules}, {m: [] for m in modules})
    for path, module in names.items():
        visitor = _Imports(module, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        rel = path.relative_to(package.parent)
        for name, line, where in dict.fromkeys(visitor.found):  # one per line and name
            if name == top or name.startswith(top + "."):
                # `import wsproxy.events.hub` names the deepest module it loads.
                while name not in modules and "." in name:
                    name = name.rpartition(".")[0]
                graph.internal[module].append(Edge(module, name, rel, line, where))
            else:
                graph.external[module].append(Edge(module, name, rel, line, where))
    return graph


@dataclass
class Circle:
    modules: set[str]  # a strongly connected component: each reaches every other
    edges: list[Edge]  # every import between them (each lies on some circle)
    example: list[Edge]  # one shortest way round, from the first module by name

    def __str__(self) -> str:
        return (
            f"{', '.join(sorted(self.modules))}\n  for example:\n{_lines(self.example)}"
            f"\n  every import among them:\n{_lines(self.edges)}"
        )


def cycles(graph: Graph) -> list[Circle]:
    """Each strongly connected component (Tarjan) of more than one module, and each
    module that imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph.internal.get(v, []):
            w = e.target
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

    for v in sorted(graph.internal):
        if v not in index:
            visit(v)
    found = []
    for component in components:
        inside = [e for v in sorted(component) for e in graph.internal[v] if e.target in component]
        if not inside:
            continue  # one module that does not import itself
        start = min(component)
        # Shortest way round from `start` (breadth first, inside the component).
        came: dict[str, Edge] = {}
        frontier = [start]
        while frontier and start not in came:
            nxt = []
            for v in frontier:
                for e in graph.internal[v]:
                    if e.target in component and e.target not in came:
                        came[e.target] = e
                        nxt.append(e.target)
            frontier = nxt
        way = [came[start]]
        while way[-1].source != start:
            way.append(came[way[-1].source])
        found.append(Circle(component, inside, way[::-1]))
    return sorted(found, key=lambda c: min(c.modules))


def _imports_asyncio(name: str) -> bool:
    # `zmq.asyncio` and `websockets.asyncio.server` load asyncio too.
    return "asyncio" in name.split(".") or name.split(".")[0] == "uvloop"


def _dev_pure_modules() -> tuple[str, ...]:
    """``PURE_MODULES`` of dev.py (the coverage gate), read without running dev.py."""
    dev = ROOT / "dev.py"
    if not dev.is_file():
        return ()
    for node in ast.parse(dev.read_text(encoding="utf-8")).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "PURE_MODULES" for t in node.targets)
            and isinstance(node.value, ast.Tuple | ast.List)
        ):
            return tuple(ast.literal_eval(node.value))
    return ()


def pure_modules() -> list[str]:
    names = dict.fromkeys([*PURE, *_dev_pure_modules()])
    return [f"wsproxy.{n}" for n in names if (PACKAGE / f"{n.replace('.', '/')}.py").is_file()]


def _lines(edges: Iterable[object]) -> str:
    return "\n".join(f"  {e}" for e in edges)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")
    return root / "pkg"


# ---------------------------------------------------------------------------- the reader


def test_the_reader_sees_imports_under_type_checking_in_functions_and_relative(
    tmp_path: Path,
) -> None:
    package = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.core import VALUE\n",
            "pkg/core.py": "import enum\nVALUE = 1\n",
            "pkg/a.py": """\
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from pkg.b import B
                else:
                    import json
            """,
            "pkg/b.py": """\
                class B:
                    def f(self) -> None:
                        from pkg import a
            """,
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "from .. import core\nfrom ..core import VALUE\nimport zmq.asyncio\n",
            "pkg/sub/d.py": "import pkg.sub.c\nfrom . import c\nimport pkg.sub.missing\n",
        },
    )
    graph = build_graph(package)
    got = {(e.source, e.target, e.where) for edges in graph.internal.values() for e in edges}
    assert got == {
        ("pkg", "pkg.core", "top level"),
        ("pkg.a", "pkg.b", "TYPE_CHECKING"),
        ("pkg.b", "pkg.a", "function"),
        ("pkg.sub.c", "pkg.core", "top level"),
        ("pkg.sub.d", "pkg.sub.c", "top level"),
        ("pkg.sub.d", "pkg.sub", "top level"),  # pkg.sub.missing: the deepest that exists
    }
    assert {e.target for e in graph.external["pkg.a"]} == {"typing", "json"}
    assert [e.target for e in graph.external["pkg.sub.c"]] == ["zmq.asyncio"]
    assert _imports_asyncio("zmq.asyncio") and not _imports_asyncio("json")
    assert graph.closure("pkg.sub.d") == {"pkg.sub.d", "pkg.sub.c", "pkg.sub", "pkg.core"}
    # The only circle: a imports b for typing, b imports a inside a method.
    [circle] = cycles(graph)
    assert circle.modules == {"pkg.a", "pkg.b"}
    way = [(e.source, e.target) for e in circle.example]
    assert way == [("pkg.a", "pkg.b"), ("pkg.b", "pkg.a")]
    assert "pkg/a.py:3, TYPE_CHECKING" in str(circle)


def test_the_reader_finds_a_longer_circle_and_a_module_importing_itself(tmp_path: Path) -> None:
    package = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/x.py": "from pkg import y\n",
            "pkg/y.py": "import pkg.z\nimport pkg.x\n",
            "pkg/z.py": "def f() -> None:\n    from pkg.x import g\n",
            "pkg/w.py": "import pkg.w\nfrom pkg import x\n",
        },
    )
    w, xyz = cycles(build_graph(package))
    assert [(e.source, e.target) for e in w.example] == [("pkg.w", "pkg.w")]
    assert xyz.modules == {"pkg.x", "pkg.y", "pkg.z"}
    assert [(e.source, e.target) for e in xyz.example] == [("pkg.x", "pkg.y"), ("pkg.y", "pkg.x")]
    assert len(xyz.edges) == 4  # w -> x leads into the circle, not round it


def test_the_reader_sees_the_real_package() -> None:
    # The rules below must not hold only because the reader missed the imports.
    graph = build_graph(PACKAGE)
    assert {"wsproxy.server", "wsproxy.cli", "wsproxy.events.hub"} <= graph.modules
    edges = {(e.source, e.target, e.where) for es in graph.internal.values() for e in es}
    assert ("wsproxy.__main__", "wsproxy.cli", "top level") in edges
    assert ("wsproxy.cli", "wsproxy.server", "function") in edges
    assert ("wsproxy.exchange", "wsproxy.http", "top level") in edges
    assert any(s == "wsproxy.server" and w == "function" for s, _, w in edges)
    assert "asyncio" in {e.target for e in graph.external["wsproxy.server"]}


# ---------------------------------------------------------------------------- the rules


def test_no_import_circle() -> None:
    found = cycles(build_graph(PACKAGE))
    if found:
        pytest.fail(
            "wsproxy modules importing each other in a circle:\n" + "\n".join(map(str, found))
        )


def test_only_the_entry_points_import_the_server() -> None:
    graph = build_graph(PACKAGE)
    assert SERVER in graph.modules
    offending = [
        e
        for edges in graph.internal.values()
        for e in edges
        if e.target == SERVER and e.source not in ENTRY_POINTS
    ]
    if offending:
        pytest.fail(
            "only cli, __main__ and demo may import wsproxy.server; the others take the "
            "Protocols of wsproxy.host:\n" + _lines(offending)
        )


def test_pure_cores_import_no_asyncio() -> None:
    graph = build_graph(PACKAGE)
    pure = pure_modules()
    assert {"wsproxy.frames", "wsproxy.keepalive", "wsproxy.http"} <= set(pure)
    offending = [
        f"{name}: {e}"
        for name in pure
        for module in sorted(graph.closure(name))
        for e in graph.external[module]
        if _imports_asyncio(e.target)
    ]
    if offending:
        pytest.fail("pure cores reaching asyncio:\n" + _lines(offending))


def _loaded_with(module: str) -> set[str]:
    """The modules a fresh interpreter holds after importing ``module``."""
    probe = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return set(out.split())


def test_pure_cores_load_without_asyncio() -> None:
    # A fresh interpreter per module: third-party imports (pydantic, h11, yaml) count.
    loaded = {name: _loaded_with(name) for name in pure_modules()}
    assert all(name in mods for name, mods in loaded.items())  # the probe really ran
    offending = sorted(name for name, mods in loaded.items() if "asyncio" in mods)
    assert not offending, f"loading these pulls in asyncio: {offending}"
