"""The send API's metrics (registered as the ``send_api`` group of services.metrics; every series at 0 from
start-up, ``init_metrics``). Labels: the API, the outcome, the endpoint — never a number, key or message id."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Histogram

from services.metrics import LATENCY_BUCKETS, register_group

APIS = ("rapidpro", "kannel", "rest")
OUTCOMES = (
    "accepted",
    "duplicate",
    "unauthorized",
    "bad_request",
    "too_large",
    "rate_limited",
    "backpressure",
    "error",
)
MESSAGE_OUTCOMES = ("queued", "duplicate")

REQUESTS = Counter("smsgw_api_requests_total", "Send API requests, by API and outcome", ["api", "outcome"])
REQUEST_SECONDS = Histogram(
    "smsgw_api_request_seconds", "Send API request latency (until the answer)", ["api"], buckets=LATENCY_BUCKETS
)
MESSAGES = Counter(
    "smsgw_api_messages_total",
    "Messages of accepted send API requests, by endpoint: queued (published now) or duplicate (queued before)",
    ["endpoint", "outcome"],
)

register_group("send_api", REQUESTS, REQUEST_SECONDS, MESSAGES)


def init_metrics(endpoints: Iterable[str]) -> None:
    """Create every series at 0 (a scrape must never see a counter appear later at 1)."""
    for api in APIS:
        REQUEST_SECONDS.labels(api)
        for outcome in OUTCOMES:
            REQUESTS.labels(api, outcome)
    for endpoint in endpoints:
        for outcome in MESSAGE_OUTCOMES:
            MESSAGES.labels(endpoint, outcome)
