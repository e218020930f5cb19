"""Which fm source files a stage depends on: the import closure of its function's module.

DVC reruns a stage when one of its declared deps changes, so a stage's code deps must hold
every fm module its function can execute. They are computed, not listed by hand: start at the
module that defines the stage function, follow every `import fm...` / `from fm... import` /
relative import anywhere in each module (function-level imports included, since they run
too), and add the `__init__.py` of every package on the way (Python executes those on import).

    module_files("fm.data.curate")   # ['fm/__init__.py', 'fm/config.py', 'fm/data/__init__.py', ...]

Imports by string (importlib.import_module("fm." + name)) are not followed; fm does not use them
in stage code, and tests/test_wiring.py checks the committed dvc.yaml against this function.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PACKAGE = "fm"
ROOT = Path(__file__).resolve().parent.parent  # the project root that holds fm/


def _module_path(name: str) -> Path | None:
    """fm.data.curate -> ROOT/fm/data/curate.py (or .../__init__.py for a package); None if not fm's."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = ROOT.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _imported_modules(path: Path, module: str) -> set[str]:
    """Every fm module named by an import statement in the file (dotted names)."""
    is_package = path.name == "__init__.py"
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from ..models import y
                anchor = package_parts[: len(package_parts) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from fm.data import curate` imports the submodule fm.data.curate
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if _module_path(name) is not None}


@lru_cache(maxsize=None)
def module_files(module: str) -> tuple[str, ...]:
    """The project-relative source files of `module` and every fm module it imports, transitively."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run their __init__
        path = _module_path(name)
        if path is not None:
            todo.extend(_imported_modules(path, name) - seen)
    files = {_module_path(name) for name in seen}
    return tuple(sorted(str(p.relative_to(ROOT)) for p in files if p is not None))
