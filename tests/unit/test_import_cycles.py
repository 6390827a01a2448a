"""No import cycle among sglang-ft's own modules (python/sglang_ft and ft).

The graph is read from the source (the AST), not by importing: every `import` and `from ... import` anywhere in a
module counts, a function-level one too (an import deferred to run time is still a dependency, and a cycle hidden
that way is the one that breaks when someone moves the import to the top).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"sglang_ft": ROOT / "python" / "sglang_ft", "ft": ROOT / "ft"}


def module_files() -> dict[str, Path]:
    """Module name -> file, for every module of the packages (a package is its `__init__`)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = (package, *path.relative_to(folder).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name `module` imports (absolute, relative imports resolved)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name resolves to the longest module it starts with)."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for name in imported_names(tree, module, path.name == "__init__.py"):
            parts = name.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in files:
                    if candidate != module and not module.startswith(candidate + "."):  # a package's own parent
                        targets.add(candidate)
                    break
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of modules (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "ft.planner" in graph["sglang_ft.elastic_tp.regroup"]  # a top-level import
    assert "sglang_ft.elastic_tp.reshard" in graph["sglang_ft.elastic_tp.regroup"]  # a function-level one
    assert "ft.partition" in graph["ft.planner"]


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no cycle


def test_no_import_cycle_in_sglang_ft_or_ft():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_tokenizer_and_dp_controller_code_import_no_scheduler_side_module():
    """Code running in the tokenizer manager or the DP controller takes message types from `managers.io_struct`,
    never from a module of the scheduler side (which would drag the scheduler's code into their process)."""
    graph = import_graph()
    scheduler_side = ("sglang_ft.managers.scheduler_components", "sglang_ft.elastic_tp", "sglang_ft.layers",
                      "sglang_ft.models")
    other_sides = [m for m in graph if m.startswith(("sglang_ft.managers.tokenizer_manager_components.",
                                                     "sglang_ft.managers.data_parallel_controller_components."))]
    assert len(other_sides) >= 3
    for module in other_sides:
        wrong = sorted(m for m in reachable(graph, module) if m.startswith(scheduler_side))
        assert not wrong, f"{module} imports scheduler-side modules {wrong}"
