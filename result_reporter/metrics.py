"""The result reporter's metrics: ``?task=result`` rounds, the rows they report, the events held for them.

Registered as the ``result_reporter`` group of services.metrics (with the Sync URL latency it shares with the
task poller, and the park counter of its events queues). The reporter creates its per-endpoint series at 0
(result_reporter.reporter.init_metrics).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge

from services.metrics import HTTP_SECONDS as HTTP_SECONDS  # noqa: PLC0414 (re-exported: the reporter times its requests here)
from services.metrics import MESSAGES_RETRIED, PARKED, RETRIES, init_consumer, register_group
from services.platforms import ENDPOINT_INFO

RESULT_ROUNDS = Counter("smsgw_result_rounds_total", "?task=result rounds, by outcome", ["endpoint", "outcome"])
RESULT_ROWS = Counter("smsgw_result_rows_total", "Message Results rows, by outcome", ["endpoint", "outcome"])
RESULT_EVENTS_HELD = Gauge(
    "smsgw_result_events_held",
    "Sent/delivery events held unacked until the server accepts their report",
    ["endpoint"],
)
STATUS_PUSHES = Counter(
    "smsgw_status_pushes",
    "States pushed to rapidpro, kannel and webhook endpoints, by state and outcome (ok, retry, parked)",
    ["endpoint", "state", "outcome"],
)

# The rounds' consumer parks malformed or refused events and never schedules a delayed retry; the status
# pushers' consumers retry through the delay tiers (smsgw_retries_total) and park refused pushes.
register_group(
    "result_reporter",
    RESULT_ROUNDS,
    RESULT_ROWS,
    HTTP_SECONDS,
    RESULT_EVENTS_HELD,
    STATUS_PUSHES,
    ENDPOINT_INFO,
    RETRIES,
    MESSAGES_RETRIED,
    PARKED,
)

RESULT_PARK_LABELS = ("refused", "malformed")
PUSH_PARK_LABELS = ("refused", "malformed", "redirect", "crash", "max_age")


def init_events_queues(queues: Iterable[str]) -> None:
    """Create ``smsgw_parked_total`` of the rounds' events ``queues`` at 0 for every label the reporter parks
    with."""
    init_consumer(queues, RESULT_PARK_LABELS, retries=False)


def init_push_queues(queues: Iterable[str]) -> None:
    """Create ``smsgw_parked_total`` (every push park label) and the retry counters of the status pushers'
    events ``queues`` at 0."""
    init_consumer(queues, PUSH_PARK_LABELS)
