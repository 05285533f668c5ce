"""Prometheus machinery every worker shares: buckets, the consumer series, per-worker registries, ``/metrics``.

Each worker defines its own metrics in its own module (``<worker>/metrics.py``) and declares there, with
``register_group``, what its ``/metrics`` serves; this module knows no worker. Names: ``smsgw_`` prefix, base
units, ``_total`` counters. Labels are low-cardinality only (modem id, outcome, leg) — never phone numbers, uuids
or message ids.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.metrics import MetricWrapperBase

# ``smsgw_x_created`` series double every counter and histogram and no panel or alert reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# One request or one send: seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Across retries (an SMS waiting out a Sync URL outage): up to SMSGW_MAX_RETRY_AGE's default, 7 days, so a p99
# in an outage shows the outage instead of flat-lining at the last bucket. 30.0 stays: SmsgwInboundLatencyHigh
# reads le="30".
RETRY_HORIZON_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    21600.0,
    43200.0,
    86400.0,
    172800.0,
    345600.0,
    604800.0,
)

# --- shared by every consumer (services/broker) -------------------------------------------------------------
RETRIES = Counter("smsgw_retries_total", "Messages scheduled for a delayed retry", ["queue"])
# Per message, not per attempt: failure ratios (SmsgwSyncFailuresHigh) count SMS. The delay queues are shared by
# every work queue, so RabbitMQ cannot say whose messages wait there.
MESSAGES_RETRIED = Counter(
    "smsgw_messages_retried_total",
    "Messages whose first delayed retry was scheduled (each counted once, however often it is retried)",
    ["queue"],
)
PARKED = Counter("smsgw_parked_total", "Messages moved to a parked queue", ["queue", "reason"])

# --- shared by the task_poller and the result_reporter (one Sync URL, several tasks) ---------------------------
HTTP_SECONDS = Histogram(
    "smsgw_http_request_seconds", "Sync URL request latency by task", ["endpoint", "task"], buckets=LATENCY_BUCKETS
)


# --- which worker exports what ------------------------------------------------------------------------------------
# Every metric object is registered in the default registry (tests read it); a worker's /metrics serves a registry
# of its own holding only its group (``worker_registry``): no empty smsgw_modem_up on the sync worker, no five
# copies of smsgw_result_events_held. Each worker's metrics module fills in its group when it is imported;
# tests/test_metrics.py checks that every metric belongs to a group.
GROUPS: dict[str, tuple[MetricWrapperBase, ...]] = {}


def register_group(worker: str, *group: MetricWrapperBase) -> None:
    """Declare ``group`` as the metrics ``worker``'s ``/metrics`` serves (called once, by the worker's metrics
    module); a second call for the same worker replaces the first."""
    GROUPS[worker] = group


def worker_registry(worker: str) -> CollectorRegistry:
    """A registry holding ``worker``'s group of metrics and the process/platform/GC collectors.

    Raises:
        KeyError: ``worker`` registered no group (its metrics module was not imported).
    """
    registry = CollectorRegistry(auto_describe=True)
    for collector in (*GROUPS[worker], PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def init_consumer(queues: Iterable[str], park_labels: Iterable[str], *, retries: bool = True) -> None:
    """Create ``smsgw_parked_total{queue, reason}`` for every queue and park label (and, with ``retries``,
    ``smsgw_retries_total{queue}`` and ``smsgw_messages_retried_total{queue}``) at 0.

    A counter that appears at its first increment, at 1, hides that increment from increase(): the first parked
    message would never alert. Park labels: the ``label`` of every ``Park``/``Budget`` and ``park(..., label=)``
    the worker uses (tests/test_metrics.py checks the code uses no other).
    """
    labels = tuple(park_labels)
    for queue in queues:
        if retries:
            RETRIES.labels(queue)
            MESSAGES_RETRIED.labels(queue)
        for label in labels:
            PARKED.labels(queue, label)


def serve_metrics(worker: str, port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``worker``'s ``/metrics`` (``worker_registry``) on ``addr:port`` from a daemon thread; port 0 disables
    it.

    Raises:
        OSError: the port is taken (the worker exits with a clear message).
        KeyError: ``worker`` registered no group (its metrics module was not imported).
    """
    if port:
        start_http_server(port, addr=addr, registry=worker_registry(worker))
