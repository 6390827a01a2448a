"""The regroup's late imports are made at the worker's start (`regroup.import_stage_modules`), not during its
first failure, where every survivor paid about 23 ms of imports at once on the critical path."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

from sglang_ft.elastic_tp import regroup


def late_imports(path: Path) -> set[str]:
    """The modules a file imports inside its functions (`from a.b import c` names a.b.c where that is a module)."""
    found = set()
    for function in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    found.add(submodule if _is_module(submodule) else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith(("sglang_ft", "ft."))}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_every_late_import_of_the_regroup_is_made_at_the_start():
    assert late_imports(Path(regroup.__file__)) - {"sglang_ft.elastic_tp.regroup"} <= set(regroup.STAGE_MODULES)


def test_importing_them_needs_nothing_else_first():
    """In a fresh interpreter, as early as the worker's start could call it."""
    code = ("import sys; from sglang_ft.elastic_tp.regroup import STAGE_MODULES, import_stage_modules; "
            "import_stage_modules(); missing = [m for m in STAGE_MODULES if m not in sys.modules]; "
            "assert not missing, missing")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
