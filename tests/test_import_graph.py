"""The import graph of the whole project has no circle (issue 12, principle 4).

import-linter's contracts (pyproject.toml ``[tool.importlinter]``, run by scripts/test as ``lint-imports``) keep
the core from importing a worker and the workers from importing each other; this test covers what a contract
cannot say: no module imports itself through others, in any package of the project, with function-level (late)
imports counted — a late import only hides a circle, it does not remove it. Imports under ``TYPE_CHECKING`` run
only for the type checker and are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import grimp

from scripts.stack import ROOT


def project_packages() -> list[str]:
    """Every top-level package of the repository (a directory with an ``__init__.py``)."""
    return sorted(path.parent.name for path in ROOT.glob("*/__init__.py") if not path.parent.name.startswith("."))


def circles(modules: Iterable[str], imports_of: Callable[[str], set[str]]) -> list[list[str]]:
    """The import circles among ``modules``: each strongly connected group of more than one module, or a module
    importing itself (Tarjan's algorithm, iterative: a deep import chain must not hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(modules):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(imports_of(root)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, pending = work[-1]
            if pending:
                target = pending.pop()
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, sorted(imports_of(target))))
                elif target in on_stack:
                    low[module] = min(low[module], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[module])
            if low[module] == index[module]:
                group: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == module:
                        break
                if len(group) > 1 or module in imports_of(module):
                    found.append(sorted(group))
    return found


def test_circles_finds_a_circle_and_only_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert sorted(circles(graph, lambda module: graph[module])) == [["a", "b", "c"], ["e"]]
    assert circles({"a": {"b"}, "b": set()}, lambda module: {"a": {"b"}, "b": set()}[module]) == []


def test_the_project_has_no_import_circle() -> None:
    packages = project_packages()
    assert {"services", "modem_worker", "sync_worker", "task_poller", "result_reporter", "tests"} <= set(packages)
    graph = grimp.build_graph(*packages, exclude_type_checking_imports=True, cache_dir=None)
    found = circles(graph.modules, graph.find_modules_directly_imported_by)
    assert not found, "import circles (each group imports itself through the others):\n" + "\n".join(
        " <-> ".join(group) for group in found
    )
