"""Benchmark of the gateway (``python -m bench.run``); not a test suite."""
