"""The import graph of cdi/, app/ and worker/: no circle, no arrow that runs back up.

Every ``import`` statement counts, wherever it is: at the top of a module, inside a function,
under ``if TYPE_CHECKING:``. A circle hidden in a function-local import is still a circle: the
two modules cannot be read, tested or changed one without the other. The layers (ARCHITECTURE.md):
``cdi`` imports nothing of ``app`` or ``worker``; ``app`` imports nothing of ``worker`` (it
sends tasks by name, app/queue.py).

The graph is read from the source with :mod:`ast`, so a module that cannot be parsed fails
the test instead of being left out.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cdi", "app", "worker")
#: (importer's top package, imported top package) pairs that run back up the layers.
FORBIDDEN = {("cdi", "app"), ("cdi", "worker"), ("app", "worker")}


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file of ``packages`` under ``root``."""
    out: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _owner(name: str, modules: Mapping[str, Path]) -> str | None:
    """The module ``name`` lives in: itself, or the closest enclosing package we have."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``module`` (the file ``path``) imports, anywhere in it.

    ``from a.b import c`` is an arrow to ``a.b.c`` where that is a module, else to ``a.b``;
    relative imports are resolved against ``module``'s package.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(o for a in node.names if (o := _owner(a.name, modules)) is not None)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                owner = target if target in modules else _owner(base, modules)
                if owner is not None:
                    found.add(owner)
    found.discard(module)
    return found


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    modules = module_files(root, packages)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
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
                    found.append(sorted(component))
    return sorted(found)


def upward_arrows(graph: Mapping[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if (a.split(".")[0], b.split(".")[0]) in FORBIDDEN)


def _describe(component: list[str], graph: Mapping[str, set[str]]) -> str:
    inside = set(component)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & inside))}" for m in component)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_the_graph_covers_every_package(graph: dict[str, set[str]]) -> None:
    # An empty or partial graph would pass the checks below without checking anything.
    for package in PACKAGES:
        assert package in graph
    assert {"cdi.audit", "cdi.report.model", "app.main", "app.queue", "worker.runner"} <= set(graph)
    assert "cdi.stats" in graph["cdi.audit"] and "app.queue" in graph["worker.celery_app"]


def test_no_module_imports_itself_back(graph: dict[str, set[str]]) -> None:
    found = cycles(graph)
    assert not found, "import circles: " + " | ".join(_describe(c, graph) for c in found)


def test_no_arrow_runs_back_up(graph: dict[str, set[str]]) -> None:
    assert upward_arrows(graph) == []


def _write(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_circle_through_a_function_local_import_is_found(tmp_path: Path) -> None:
    _write(tmp_path, {
        "cdi/__init__.py": "",
        "cdi/a.py": "from cdi.b import thing\n",
        "cdi/b.py": "thing = 1\n\ndef late():\n    from . import a\n    return a\n",
        "cdi/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cdi.d import X\n",
        "cdi/d.py": "import cdi.c\nX = 1\n",
        "cdi/e.py": "import cdi.a\n",
        "app/__init__.py": "",
        "app/main.py": "def make():\n    from worker.tasks import run\n    return run\n",
        "worker/__init__.py": "",
        "worker/tasks.py": "def run():\n    pass\n",
    })
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["cdi.a", "cdi.b"], ["cdi.c", "cdi.d"]]
    assert upward_arrows(graph) == ["app.main -> worker.tasks"]


def test_a_module_that_cannot_be_parsed_fails(tmp_path: Path) -> None:
    _write(tmp_path, {"cdi/__init__.py": "", "cdi/broken.py": "def f(:\n"})
    with pytest.raises(SyntaxError):
        import_graph(tmp_path, ["cdi"])
