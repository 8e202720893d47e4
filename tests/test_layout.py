"""The architecture as the README states it, checked on the source rather than trusted.

- three packages: dualmap_pd (pure core) imports neither other; connectors and scheduler
  depend on dualmap_pd and never on each other;
- no runtime import cycle among the product's modules (imports at module level, outside
  ``if TYPE_CHECKING``; imports inside functions are deliberate lazy loads and are left out);
- scheduler/ keeps at most a dozen modules at its top, every subpackage says in its
  ``__init__`` docstring what it owns, and no product file passes 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dualmap_pd", "connectors", "scheduler")
MAX_LINES = 600
MAX_SCHEDULER_TOP = 12


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _product_files() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, module: str, runtime_only: bool) -> set[str]:
    """Product modules imported by ``module`` (module level only when ``runtime_only``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                if not runtime_only:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, (ast.If, ast.Try, ast.With)) or (
                    not runtime_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, []) or []:
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])

    visit(tree.body)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _graph(runtime_only: bool) -> dict[str, set[str]]:
    files = _product_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        # "from pkg import name" names a module only when pkg.name is one.
        graph[module] = {m for m in _imports(path, module, runtime_only) if m in files and m != module}
    return graph


@pytest.mark.parametrize("package, forbidden", [
    ("dualmap_pd", {"scheduler", "connectors"}),
    ("connectors", {"scheduler"}),
    ("scheduler", {"connectors"}),
])  # fmt: skip
def test_package_dependencies_point_one_way(package: str, forbidden: set[str]) -> None:
    bad = {(m, dep) for m, deps in _graph(runtime_only=False).items() if m.split(".")[0] == package
           for dep in deps if dep.split(".")[0] in forbidden}  # fmt: skip
    assert not bad, f"{package} must not import {sorted(forbidden)}: {sorted(bad)}"


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := walk(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_no_runtime_import_cycle() -> None:
    graph = _graph(runtime_only=True)
    # A package's __init__ importing its own submodules is not a cycle of the design.
    for module in graph:
        graph[module] = {d for d in graph[module] if not d.startswith(module + ".")}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_scheduler_top_level_stays_small_and_subpackages_say_what_they_own() -> None:
    top = sorted(p.name for p in (ROOT / "scheduler").glob("*.py"))
    assert len(top) <= MAX_SCHEDULER_TOP, top
    for init in (ROOT / "scheduler").glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init.parent.name}/__init__.py must say what it owns and may import"


def test_no_product_file_is_huge() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _product_files().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert not long, f"split these (> {MAX_LINES} lines): {long}"


def test_components_do_not_reach_into_the_scheduler() -> None:
    """Only the wiring (serve, the HTTP app, the admin API) may know the Scheduler class; the
    parts it builds get the narrow interfaces of scheduler.ports."""
    allowed = {"scheduler.serve", "scheduler.http.app", "scheduler.http.admin", "scheduler.cli"}
    users = {m for m, deps in _graph(runtime_only=False).items() if "scheduler.service" in deps}
    assert users <= allowed, sorted(users - allowed)
