"""The task poller's metrics: ``?task=send`` polls, the messages they bring, claims republished or released.

Registered as the ``task_poller`` group of services.metrics (with the Sync URL latency it shares with the result
reporter). The poller creates its series at 0 (task_poller.poller.init_metrics). ``smsgw_ledger_up`` is the
ledger watch's gauge (services/ledger/watch.py): 1 from start-up, 0 while ledger operations fail.
"""

from __future__ import annotations

from prometheus_client import Counter

from services.ledger import LEDGER_UP as LEDGER_UP  # noqa: PLC0414 (re-exported: the ledger watch sets it)
from services.metrics import HTTP_SECONDS as HTTP_SECONDS  # noqa: PLC0414 (re-exported: the poller times its requests here)
from services.metrics import register_group

TASK_POLLS = Counter("smsgw_task_polls_total", "?task=send polls, by outcome", ["endpoint", "outcome"])
TASK_MESSAGES = Counter("smsgw_task_messages_total", "Messages from ?task=send, by outcome", ["endpoint", "outcome"])
TASK_REPUBLISHED = Counter(
    "smsgw_task_republished_total",
    "Claimed task messages published again after a poller died before its confirm",
    ["endpoint"],
)
# Servers that differ (issue 8).
TASK_RELEASED = Counter(
    "smsgw_task_released_total",
    "Task messages that may be lost unsent at a server that marks messages sent when it hands them out, by reason: "
    "sent_refused (claims released after the server refused ?task=sent, HTTP 3xx/4xx; one per message), "
    "send_timeout (a ?task=send whose answer did not come in time; one per poll, its messages unknown)",
    ["endpoint", "reason"],
)
RELEASE_REASONS = ("sent_refused", "send_timeout")

register_group("task_poller", TASK_POLLS, TASK_MESSAGES, HTTP_SECONDS, TASK_REPUBLISHED, TASK_RELEASED, LEDGER_UP)
