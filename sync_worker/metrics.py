"""The sync worker's metrics: POSTs of inbound SMS to each endpoint's Sync URL, filters, replies, the URL probe.

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

# --- Sync URL probe (sync_worker/probe.py, issue 9) -------------------------------------------------------------
SYNC_URL_UP = Gauge(
    "smsgw_sync_url_up",
    "1 while a bare GET of the endpoint's Sync URL gets an HTTP answer below 500; 0 after a network error or 5xx",
    ["endpoint"],
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
    their inbound ``queues`` (``sync_park_labels(park_at_once)``); ``smsgw_sync_url_up`` waits for the first
    probe."""
    for endpoint in endpoints:
        init_metrics(endpoint)
    init_consumer(queues, sync_park_labels(park_at_once))
