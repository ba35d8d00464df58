"""Which library modules a step's results depend on: the modules it calls and, transitively, the
package modules they import, read from the source (so the table cannot miss an import)."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# modules that move files, words and locks, never a figure: a change to them re-runs nothing
PLUMBING = frozenset({"errors", "paths", "io", "progress", "lock", "config"})


@cache
def imported_by(module: str) -> frozenset[str]:
    """The package modules `module` imports, at the top or inside functions."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            else:  # from . import x, y
                found.update(alias.name for alias in node.names)
    return frozenset(m for m in found if (PACKAGE / f"{m}.py").is_file())


def closure(entries: tuple[str, ...]) -> tuple[str, ...]:
    """`entries` and every package module they import, directly or not, minus the plumbing."""
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported_by(name) - PLUMBING)
    return tuple(sorted(seen))
