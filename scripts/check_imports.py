#!/usr/bin/env python
"""Fail on any cycle in moedistill's intra-package import graph.

    python scripts/check_imports.py              # exit 1 and print every cycle, else a one-line summary
    python scripts/check_imports.py --dot > imports.dot      # the graph for Graphviz (cycle edges in red)
    python scripts/check_imports.py --root path/to/pkg       # another package directory

Why: with no cycle, every module can be imported on its own (``python -c "import moedistill.x"``) in any
order, and every import can sit at the top of its file instead of hiding inside a function to dodge a
half-initialised module. A function-level import is still counted: it only postpones the cycle to the
first call, which is where "partially initialized module" errors show up.

The graph is built from the source with ``ast``; nothing is imported. Node = dotted module name (a package
is its ``__init__.py``). An edge ``M -> T`` means "running M may run T". The whole AST is walked, so imports
inside functions, methods, classes, ``if``/``try`` blocks and a package's lazy module-level ``__getattr__``
all count. Imports under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) are skipped: that body never
runs (its ``else:`` does, and is walked). ``importlib.import_module("pkg.x")`` with a literal counts too.
Not seen: ``__import__(...)`` and ``importlib.import_module`` with a computed name (moedistill uses
neither; a name that is only known at run time cannot be checked from the source).

Which edges an import gives (``pkg`` is the top package):

- ``import pkg.a.b`` / ``from pkg.a.b import name`` / relative forms resolved against M's package: an edge
  to ``pkg.a.b``.
- ``from pkg.a import y``: if ``pkg/a/y.py`` or ``pkg/a/y/__init__.py`` exists, an edge to ``pkg.a.y``;
  otherwise y is a name read from ``pkg.a``'s namespace: an edge to ``pkg.a`` itself, kept even when M is
  inside ``pkg.a`` (the name must already be defined, i.e. ``pkg/a/__init__.py`` must have run that far:
  a real dependency).
- Implicit parents: importing ``pkg.a.b`` first runs ``pkg/__init__.py`` and ``pkg/a/__init__.py``, so M
  also gets an edge to every parent package of the target, EXCEPT the packages that contain M (and M itself
  when M is a package ``__init__``). Python imports a module's parents before the module, so when M runs
  those packages are already in ``sys.modules`` (possibly half-run): importing them again runs no code and
  so is no edge. Counting it would turn every ``pkg/a/__init__.py`` that imports its own submodule ``x``
  into a bogus cycle ``pkg.a -> pkg.a.x -> pkg.a``. The same holds for a plain ``import pkg.a`` from inside
  ``pkg.a`` (it only binds a name). Being inside a package gives M no edge either: the parent runs before
  M, but M does not make it run.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from pathlib import Path

DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "src" / "moedistill"

Graph = dict[str, set[str]]
Sites = dict[tuple[str, str], list[str]]  # (importer, target) -> ["path:line", ...]


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file for every module of the package at ``root`` (the directory's name is the top name)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if "__pycache__" in parts:
            continue
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Collects (target, explicit_package_read, line) for one module; see the module docstring for the rules."""

    def __init__(self, name: str, is_package: bool, modules: dict[str, Path]):
        self.name, self.modules = name, modules
        self.top = name.split(".")[0]
        self.package = name if is_package else name.rpartition(".")[0]  # what a level-1 relative import means
        self.found: list[tuple[str, bool, int]] = []

    def _add(self, target: str, line: int, reads_name: bool = False) -> None:
        if target == self.top or target.startswith(self.top + "."):
            self.found.append((target, reads_name, line))

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # never runs: only its else branch does
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: climb level-1 packages above M's own package
            base = self.package.split(".")
            if node.level - 1 >= len(base):
                return  # beyond the top package: Python refuses it, nothing to resolve
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            if alias.name != "*" and sub in self.modules:
                self._add(sub, node.lineno)  # a submodule (its parents come in as implicit edges)
            else:
                self._add(source, node.lineno, reads_name=True)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (
            (isinstance(func, ast.Attribute) and func.attr == "import_module")
            or (isinstance(func, ast.Name) and func.id == "import_module")
        ) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            self._add(node.args[0].value, node.lineno)
        self.generic_visit(node)


def scan(root: Path) -> tuple[Graph, Sites]:
    """The import graph of the package at ``root`` plus, per edge, where in the source it comes from."""
    modules = module_names(root)
    graph: Graph = {name: set() for name in modules}
    sites: Sites = {}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        where = path.relative_to(root.parent)
        for target, reads_name, line in visitor.found:
            parts = target.split(".")
            # The target and its parents, outermost first; drop the packages M is in (already running).
            chain = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            for dst in chain:
                inside = name == dst or name.startswith(dst + ".")
                if inside and not (reads_name and dst == target):
                    continue
                graph[name].add(dst)
                at = sites.setdefault((name, dst), [])
                if f"{where}:{line}" not in at:  # `from x import a, b` gives one site, not two
                    at.append(f"{where}:{line}")
    return graph, sites


def build_graph(root: Path) -> dict[str, set[str]]:
    """Module -> modules its import statements may run (targets outside the scanned files are kept as they are)."""
    return scan(root)[0]


def _components(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative, so a deep package cannot hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:  # node is the root of a component: pop it
                    comp = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        comp.append(member)
                        if member == node:
                            break
                    out.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def _cycle_through(graph: Graph, comp: list[str]) -> list[str]:
    """A shortest cycle from the component's first node back to itself (BFS inside the component)."""
    start, members = comp[0], set(comp)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:  # closed the loop: walk the parents back
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if nxt in members and nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"no cycle through component {comp}")  # cannot happen for a real component


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle ``[a, b, ..., a]`` per strongly connected component with >1 module or a self-loop."""
    return [
        _cycle_through(graph, comp)
        for comp in _components(graph)
        if len(comp) > 1 or comp[0] in graph.get(comp[0], ())
    ]


def describe(graph: Graph, sites: Sites, cycles: list[list[str]]) -> list[str]:
    """Report lines: each cycle, where each of its edges comes from, and the rest of its component."""
    members = {comp[0]: comp for comp in _components(graph)}  # a cycle starts at its component's first node
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join(cycle))
        lines += [f"    {a} -> {b}: {', '.join(sites[(a, b)])}" for a, b in zip(cycle, cycle[1:])]
        others = sorted(set(members[cycle[0]]) - set(cycle))
        if others:  # the component is larger than this one cycle: more cycles run through these modules
            lines.append(f"    same component: {', '.join(others)}")
    return lines + [f"{len(cycles)} import cycle(s)"]


def to_dot(graph: Graph, cycles: list[list[str]]) -> str:
    red = {(a, b) for cycle in cycles for a, b in zip(cycle, cycle[1:])}
    lines = ["digraph imports {", "  rankdir=LR;", "  node [shape=box, fontsize=10];"]
    lines += [f'  "{name}";' for name in sorted(graph)]
    for src in sorted(graph):
        for dst in sorted(graph[src]):
            lines.append(f'  "{src}" -> "{dst}"' + (" [color=red, penwidth=2];" if (src, dst) in red else ";"))
    return "\n".join(lines + ["}"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"package directory (default: {DEFAULT_ROOT})")
    p.add_argument("--dot", action="store_true", help="print the graph in Graphviz dot format (report on stderr)")
    args = p.parse_args(argv)
    if not (args.root / "__init__.py").is_file():
        p.error(f"{args.root} is not a package directory (no __init__.py)")
    graph, sites = scan(args.root)
    cycles = find_cycles(graph)
    report = sys.stderr if args.dot else sys.stdout
    if args.dot:
        print(to_dot(graph, cycles))
    if not cycles:
        edges = sum(len(v) for v in graph.values())
        print(f"{len(graph)} modules, {edges} edges, no cycle", file=report)
        return 0
    print("\n".join(describe(graph, sites, cycles)), file=report)
    return 1


if __name__ == "__main__":
    sys.exit(main())
