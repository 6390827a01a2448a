"""ft/ is the engine-agnostic runtime: no module under it imports sglang, sglang_ft or torch, at its top or inside a
function (read from each file's syntax tree, so a lazy import counts as much as a top-level one)."""

from __future__ import annotations

import ast
from pathlib import Path

FT = Path(__file__).resolve().parents[2] / "ft"
FORBIDDEN = ("sglang", "sglang_ft", "torch")


def forbidden_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import of a FORBIDDEN package in `source`, wherever it stands; also
    `importlib.import_module("...")` and `__import__("...")` with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []  # a relative import stays inside ft/
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id == "__import__")
                   or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"))):
            names = [node.args[0].value]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in FORBIDDEN]
    return found


def test_the_checker_finds_imports_at_every_depth():
    source = """
import os
import torch.distributed as dist
from sglang.srt import server_args

def lazy():
    from sglang_ft.server_args import ft_args
    import importlib
    importlib.import_module("torch")
    return __import__("sglang_ft.hooks")

from ft.partition import ModelShape
import sglang_ftx
"""
    assert forbidden_imports(source) == [(3, "torch.distributed"), (4, "sglang.srt"), (7, "sglang_ft.server_args"),
                                         (9, "torch"), (10, "sglang_ft.hooks")]


def test_no_module_under_ft_imports_sglang_sglang_ft_or_torch():
    files = sorted(FT.rglob("*.py"))
    assert {"controller.py", "agent.py", "kv_store_keeper.py", "metrics.py", "options.py", "faults.py"} <= {
        f.name for f in files}
    offenders = {str(f.relative_to(FT.parent)): hits for f in files if (hits := forbidden_imports(f.read_text()))}
    assert offenders == {}
