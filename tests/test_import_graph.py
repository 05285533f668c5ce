"""The import graph of the whole project has no circle (issue 12, principle 4).

import-linter's contracts (pyproject.toml ``[tool.importlinter]``, run by scripts/test as ``lint-imports``) keep
the core from importing a worker and the workers from importing each other; this test covers what a contract
cannot say: no module imports itself through others, in any package of the project (a package's ``__init__``
and its own modules included), with function-level (late) imports counted — a late import only hides a circle,
it does not remove it. Imports under ``TYPE_CHECKING`` run only for the type checker and are left out.
"""

from __future__ import annotations

import grimp

from scripts.stack import ROOT


def project_packages() -> list[str]:
    """Every top-level package of the repository (a directory with an ``__init__.py``)."""
    return sorted(path.parent.name for path in ROOT.glob("*/__init__.py") if not path.parent.name.startswith("."))


def circles(graph: grimp.ImportGraph) -> list[str]:
    """Each direct import ``a -> b`` of ``graph`` that closes a circle (``b`` reaches ``a`` again), as
    ``a -> b -> ... -> a`` (grimp's shortest chain back)."""
    found = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                found.append(" -> ".join((importer, *back)))
    return found


def test_circles_finds_a_circle_and_only_a_circle() -> None:
    graph = grimp.ImportGraph()
    for importer, imported in (("a", "b"), ("b", "c"), ("c", "a"), ("d", "a"), ("e", "f")):
        graph.add_import(importer=importer, imported=imported)
    assert circles(graph) == ["a -> b -> c -> a", "b -> c -> a -> b", "c -> a -> b -> c"]
    acyclic = grimp.ImportGraph()
    acyclic.add_import(importer="a", imported="b")
    assert circles(acyclic) == []


def test_the_project_has_no_import_circle() -> None:
    packages = project_packages()
    assert {"services", "modem_worker", "simulator", "sync_worker", "task_poller", "result_reporter"} <= set(packages)
    graph = grimp.build_graph(*packages, exclude_type_checking_imports=True, cache_dir=None)
    found = circles(graph)
    assert not found, "import circles (each module imports itself through the others):\n" + "\n".join(found)
