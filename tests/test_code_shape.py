"""The shape of the code stays one the next engineer can carry on (issue 12): small modules, classes and
functions, and tests that go through public interfaces.

Limits: no module of code over 600 lines, no class over 400, no function over 60 (tests and the demo script
excepted); tests read at most 25 private attributes of the objects under test in total (``obj._x``), since a
test that reaches into privates pins the implementation instead of the behaviour.
"""

from __future__ import annotations

import ast
import re
import subprocess

from scripts.stack import ROOT

MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_PRIVATE_READS_IN_TESTS = 25
EXCEPTED = {"scripts/demo.py"}
# ``obj._name`` where obj is not self/cls (a test's own helpers may use their own privates).
_PRIVATE_READ = re.compile(r"(?<![\w.])(?!self\b|cls\b)[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*\._[a-z]\w*")


def tracked_python_files() -> list[str]:
    """The project's Python files as git tracks them (what CI checks out)."""
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def oversized(path: str, source: str) -> list[str]:
    """What in ``source`` (the file at ``path``) is over the limits, one line each."""
    found = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"{path}: module of {lines} lines (> {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if size > limit:
                found.append(f"{path}:{node.lineno}: {node.name} of {size} lines (> {limit})")
    return found


def test_oversized_finds_what_is_over_the_limits() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert oversized("f.py", f"def long():\n{body}\n") == [f"f.py:1: long of {MAX_FUNCTION_LINES + 1} lines (> 60)"]
    assert oversized("f.py", "def short():\n    return 1\n") == []


def test_no_module_class_or_function_over_the_limits() -> None:
    found = []
    for path in tracked_python_files():
        if path.startswith("tests/") or path in EXCEPTED:
            continue
        found += oversized(path, (ROOT / path).read_text(encoding="utf-8"))
    assert not found, "split these:\n" + "\n".join(found)


def test_private_reads_in_tests_stay_within_the_budget() -> None:
    assert _PRIVATE_READ.findall("worker._modem = x; self._ok; obj.attr._inner") == ["worker._modem", "obj.attr._inner"]
    reads = {
        path: len(_PRIVATE_READ.findall((ROOT / path).read_text(encoding="utf-8")))
        for path in tracked_python_files()
        if path.startswith("tests/")
    }
    total = sum(reads.values())
    worst = sorted(((n, p) for p, n in reads.items() if n), reverse=True)[:5]
    assert total <= MAX_PRIVATE_READS_IN_TESTS, f"{total} private reads in tests; most in {worst}"
