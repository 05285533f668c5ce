"""The result reporter's metrics: ``?task=result`` rounds, the rows they report, the events held for them.

Registered as the ``result_reporter`` group of services.metrics (with the Sync URL latency it shares with the
task poller, and the park counter of its events queues). The reporter creates its per-endpoint series at 0
(result_reporter.reporter.init_metrics).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge

from services.metrics import HTTP_SECONDS as HTTP_SECONDS  # noqa: PLC0414 (re-exported: the reporter times its requests here)
from services.metrics import PARKED, init_consumer, register_group

RESULT_ROUNDS = Counter("smsgw_result_rounds_total", "?task=result rounds, by outcome", ["endpoint", "outcome"])
RESULT_ROWS = Counter("smsgw_result_rows_total", "Message Results rows, by outcome", ["endpoint", "outcome"])
RESULT_EVENTS_HELD = Gauge(
    "smsgw_result_events_held",
    "Sent/delivery events held unacked until the server accepts their report",
    ["endpoint"],
)

# The events consumer parks malformed or refused events; it never schedules a delayed retry.
register_group("result_reporter", RESULT_ROUNDS, RESULT_ROWS, HTTP_SECONDS, RESULT_EVENTS_HELD, PARKED)

RESULT_PARK_LABELS = ("refused", "malformed")


def init_events_queues(queues: Iterable[str]) -> None:
    """Create ``smsgw_parked_total`` of the events ``queues`` at 0 for every label the reporter parks with."""
    init_consumer(queues, RESULT_PARK_LABELS, retries=False)
