"""Which library modules a step's results depend on: the modules it calls and, transitively, the
package modules they import, read from the source (so the table cannot miss an import).

A module is named by its dotted path under the package ("train", "methods",
"methods.deepcluster"); `path_of` gives its file. Imports are followed into subpackages:
`from .methods import deepcluster` depends on methods/__init__.py and methods/deepcluster.py.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# modules that move files, words and locks, never a figure: a change to them re-runs nothing
PLUMBING = frozenset({"errors", "paths", "io", "progress", "lock", "config"})


def path_of(module: str) -> str:
    """The file of `module`, relative to the package: "methods/deepcluster.py", a package's
    "methods/__init__.py"."""
    base = module.replace(".", "/")
    return f"{base}/__init__.py" if (PACKAGE / base).is_dir() else f"{base}.py"


def _exists(module: str) -> bool:
    return (PACKAGE / path_of(module)).is_file()


def _imports(node: ast.ImportFrom, package: list[str]) -> set[str]:
    """The package modules one `from ... import ...` inside `package` (its dotted parts) names."""
    if node.level == 0 or node.level > len(package) + 1:
        return set()
    base = package[: len(package) - (node.level - 1)]
    if node.module:  # from .x import y: module x, and y too when y is a module of package x
        target = ".".join([*base, *node.module.split(".")])
        return {target} | {f"{target}.{alias.name}" for alias in node.names}
    return {".".join([*base, alias.name]) for alias in node.names}  # from . import x, y


@cache
def imported_by(module: str) -> frozenset[str]:
    """The package modules `module` imports, at the top or inside functions."""
    path = PACKAGE / path_of(module)
    parts = module.split(".")
    package = parts if path.name == "__init__.py" else parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            found |= _imports(node, package)
    # importing a subpackage's module runs the subpackage's __init__ first
    found |= {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
    return frozenset(m for m in found if m and m != module and _exists(m))


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
