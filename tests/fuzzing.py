"""Hypothesis settings and strategies shared by the fuzz tests (``tests/test_fuzz_*.py``).

The default profile is for the test command: a fixed number of examples, derandomized (a run is reproducible:
the same inputs on every machine) and without a deadline (a loaded 2-core machine must not flake). A long,
randomized run by hand: ``SMSGW_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_fuzz_*.py``.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

_EXAMPLES = int(os.environ.get("SMSGW_FUZZ_EXAMPLES", "0") or 0)

# Every fuzz test is decorated with ``@FUZZ``.
FUZZ = settings(
    max_examples=_EXAMPLES or 150,
    deadline=None,
    derandomize=not _EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,  # no .hypothesis/ directory: failures are pinned as @example, not replayed from a cache
)

# Numbers servers send that break naive code: huge ints, floats beyond int range, NaN/Infinity (Python's json
# reads them), negative zero.
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
)
# Text with lone surrogates, controls, line breaks and NULs.
texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)


def json_values(keys: st.SearchStrategy[str] = texts) -> st.SearchStrategy[Any]:
    """Arbitrary JSON values (nested nulls, wrong types, huge numbers); objects draw their keys from ``keys``."""
    scalars = st.none() | st.booleans() | numbers | texts
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=6),
        max_leaves=25,
    )


def one_line(message: str) -> bool:
    """True when ``message`` is one non-empty line (what every rejection must be, for one log line)."""
    return bool(message.strip()) and len(message.splitlines()) == 1
