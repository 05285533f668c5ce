"""The chaos suite: the gateway as real processes with faults played into it (issue 13).

``proxy.py`` (a cuttable TCP proxy), ``flaky.py`` (flaky and sticky Sync servers), ``harness.py`` (the stack, the
faults, the settling), ``counts.py`` (what is counted and the table), ``scenarios.py`` (short and long form).
The short form is tests/test_chaos.py; the long form is ``python -m tests.chaos --long``.
"""
