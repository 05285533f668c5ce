"""The sync worker's metrics: POSTs of inbound SMS to each endpoint's Sync URL, filters, replies, the Sync URL's
state, the retry backlog.

Registered as the ``sync_worker`` group of services.metrics (with the consumer series of its inbound queues).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from services.config import FILTER_REASONS
from services.metrics import (
    LATENCY_BUCKETS,
    MESSAGES_RETRIED,
    PARKED,
    RETRIES,
    RETRY_HORIZON_BUCKETS,
    init_consumer,
    register_group,
)
from services.platforms import ENDPOINT_INFO

# --- inbound queue -> Sync URL ------------------------------------------------------------------------------
SYNC_REQUESTS = Counter(
    "smsgw_sync_requests_total", "POSTs of inbound SMS to the Sync URL, by outcome", ["endpoint", "outcome"]
)
SYNC_SECONDS = Histogram("smsgw_sync_request_seconds", "Sync URL POST latency", ["endpoint"], buckets=LATENCY_BUCKETS)
SYNC_END_TO_END_SECONDS = Histogram(
    "smsgw_sync_end_to_end_seconds",
    "From reading the SMS off the SIM to the Sync URL accepting it (retries included)",
    ["endpoint"],
    buckets=RETRY_HORIZON_BUCKETS,
)
SMS_FILTERED = Counter(
    "smsgw_sms_filtered_total",
    "Inbound SMS not forwarded to an endpoint, by the filter's reason",
    ["endpoint", "reason"],
)
REPLIES_QUEUED = Counter(
    "smsgw_replies_queued_total", "Server replies and auto-responses queued as SMS", ["endpoint", "origin"]
)
REPLIES_SKIPPED = Counter("smsgw_replies_skipped_total", "Server reply messages skipped as invalid", ["endpoint"])

# --- Sync URL state (sync_worker/probe.py: the POSTs' outcomes, a probe while they are quiet) ---------------------
SYNC_URL_UP = Gauge(
    "smsgw_sync_url_up",
    "1 while the endpoint's Sync URL works: its last POST (or, with none for a probe interval, a bare GET) got an "
    "answer other than 5xx or a 4xx besides 401/403; 0 when it did not or got no answer",
    ["endpoint"],
)

# --- retry backlog of the inbound queues (sync_worker/backlog.py) ------------------------------------------------
RETRY_BACKLOG = Gauge(
    "smsgw_retry_backlog_messages",
    "Retries of the queue's messages this sync_worker scheduled that have not come back from the delay queues",
    ["queue"],
)
RETRY_NEXT_ATTEMPT = Gauge(
    "smsgw_retry_next_attempt_timestamp_seconds",
    "When the earliest retry of the queue's backlog is due back (Unix time; 0: no retry waiting)",
    ["queue"],
)

register_group(
    "sync_worker",
    SYNC_REQUESTS,
    SYNC_SECONDS,
    SYNC_END_TO_END_SECONDS,
    SMS_FILTERED,
    REPLIES_QUEUED,
    REPLIES_SKIPPED,
    SYNC_URL_UP,
    ENDPOINT_INFO,
    RETRY_BACKLOG,
    RETRY_NEXT_ATTEMPT,
    RETRIES,
    MESSAGES_RETRIED,
    PARKED,
)

# Labels the worker counts with, created at 0 at start-up (services.metrics.init_consumer says why).
SYNC_OUTCOMES = ("accepted", "refused", "rejected", "server_error", "network_error", "bad_reply")
REPLY_ORIGINS = ("reply", "auto_response", "query_code")
# The sync worker also parks http_<status> for every status it parks at once (sync_worker.forwarder.PARK_AT_ONCE).
SYNC_PARK_LABELS = ("malformed", "redirect", "refused", "http_500", "bad_reply", "crash", "max_age")


def init_metrics(endpoint: str) -> None:
    """Create every inbound series of ``endpoint`` at 0, so dashboards and rate() see them before the first
    event (a counter that appears only on its first increment hides that increment from rate())."""
    for outcome in SYNC_OUTCOMES:
        SYNC_REQUESTS.labels(endpoint, outcome)
    for reason in FILTER_REASONS:
        SMS_FILTERED.labels(endpoint, reason)
    for origin in REPLY_ORIGINS:
        REPLIES_QUEUED.labels(endpoint, origin)
    REPLIES_SKIPPED.labels(endpoint)
    SYNC_SECONDS.labels(endpoint)
    SYNC_END_TO_END_SECONDS.labels(endpoint)


def sync_park_labels(park_at_once: Iterable[int]) -> tuple[str, ...]:
    """Every label the sync worker parks with: ``SYNC_PARK_LABELS`` and ``http_<status>`` of the statuses it parks
    at once (``park_at_once``: sync_worker.forwarder.PARK_AT_ONCE)."""
    return (*SYNC_PARK_LABELS, *(f"http_{status}" for status in sorted(park_at_once)))


def init_sync_worker(endpoints: Iterable[str], queues: Iterable[str], park_at_once: Iterable[int]) -> None:
    """Create the sync worker's series at 0 for ``endpoints`` (every outcome, filter reason and reply origin) and
    their inbound ``queues`` (``sync_park_labels(park_at_once)``, the retry backlog); ``smsgw_sync_url_up`` waits
    for the first verdict on the Sync URL (sync_worker/probe.py)."""
    for endpoint in endpoints:
        init_metrics(endpoint)
    queues = tuple(queues)
    init_consumer(queues, sync_park_labels(park_at_once))
    for queue in queues:
        RETRY_BACKLOG.labels(queue).set(0)
        RETRY_NEXT_ATTEMPT.labels(queue).set(0)
