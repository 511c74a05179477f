"""No function in cdi/, app/ or worker/ is longer than 80 lines, unless its docstring says why.

A long function is where shared mutable state and copies hide; the audit is a pipeline of
small steps (ARCHITECTURE.md). A function that must stay long says so in its docstring with
the words "long because".
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 80


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """``(name, lines)`` of every function in ``source`` over ``limit`` lines whose docstring
    does not say why."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if lines > limit and "long because" not in (ast.get_docstring(node) or "").lower():
                out.append((node.name, lines))
    return out


def test_the_checker_sees_a_long_function_and_its_excuse() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(90))
    assert long_functions(f"def f():\n{body}") == [("f", 91)]
    assert long_functions(f'def f():\n    """Long because a table is spelt out."""\n{body}') == []
    assert long_functions(f"class C:\n    async def g(self):\n{body.replace('    ', '        ')}") == [("g", 91)]


def test_no_function_is_over_80_lines() -> None:
    found = {
        f"{path.relative_to(ROOT)}:{name}": lines
        for package in ("cdi", "app", "worker")
        for path in sorted((ROOT / package).rglob("*.py"))
        for name, lines in long_functions(path.read_text(encoding="utf-8"))
    }
    assert found == {}
