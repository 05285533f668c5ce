"""Prometheus metrics of every leg, in one place so that the Grafana dashboard and the code agree.

Names: ``smsgw_`` prefix, base units, ``_total`` counters. Labels are low-cardinality only (modem id, outcome,
leg) — never phone numbers, uuids or message ids.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
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

# --- modem_worker: modem -> inbound queue, outbound queue -> modem -------------------------------------------
SMS_RECEIVED = Counter("smsgw_sms_received_total", "SMS read from the SIM and confirmed by the broker", ["modem"])
SMS_SENT = Counter("smsgw_sms_sent_total", "Outbound SMS handed to a modem, by outcome", ["modem", "outcome"])
SEND_SECONDS = Histogram(
    "smsgw_sms_send_seconds",
    "Time to send one SMS (all parts) through the modem",
    ["modem"],
    buckets=LATENCY_BUCKETS,
)
DELIVERY_REPORTS = Counter("smsgw_delivery_reports_total", "Status reports, by outcome", ["modem", "outcome"])
MODEM_UP = Gauge("smsgw_modem_up", "1 while the modem answers AT commands", ["modem"])
MODEM_SIGNAL = Gauge("smsgw_modem_signal_rssi", "AT+CSQ RSSI (0-31; -1 unknown)", ["modem"])
MODEM_BATTERY = Gauge("smsgw_modem_battery_percent", "AT+CBC battery charge (0-100; -1 unknown)", ["modem"])
MODEM_REGISTERED = Gauge(
    "smsgw_modem_registered", "1 while registered on the home network or roaming (AT+CREG)", ["modem"]
)
MODEM_RECONNECTS = Counter(
    "smsgw_modem_reconnects_total",
    "Reconnections to the modem after a lost link (not connect attempts; the first connect does not count)",
    ["modem"],
)

# --- sync_worker: inbound queue -> Sync URL ----------------------------------------------------------------
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

# --- shared by every consumer -------------------------------------------------------------------------------
RETRIES = Counter("smsgw_retries_total", "Messages scheduled for a delayed retry", ["queue"])
# Per message, not per attempt: failure ratios (SmsgwSyncFailuresHigh) count SMS. The delay queues are shared by
# every work queue, so RabbitMQ cannot say whose messages wait there.
MESSAGES_RETRIED = Counter(
    "smsgw_messages_retried_total",
    "Messages whose first delayed retry was scheduled (each counted once, however often it is retried)",
    ["queue"],
)
PARKED = Counter("smsgw_parked_total", "Messages moved to a parked queue", ["queue", "reason"])

# --- task_poller / result_reporter ----------------------------------------------------------------------------
TASK_POLLS = Counter("smsgw_task_polls_total", "?task=send polls, by outcome", ["endpoint", "outcome"])
TASK_MESSAGES = Counter("smsgw_task_messages_total", "Messages from ?task=send, by outcome", ["endpoint", "outcome"])
RESULT_ROWS = Counter("smsgw_result_rows_total", "Message Results rows, by outcome", ["endpoint", "outcome"])
HTTP_SECONDS = Histogram(
    "smsgw_http_request_seconds", "Sync URL request latency by task", ["endpoint", "task"], buckets=LATENCY_BUCKETS
)

RESULT_ROUNDS = Counter("smsgw_result_rounds_total", "?task=result rounds, by outcome", ["endpoint", "outcome"])
RESULT_EVENTS_HELD = Gauge(
    "smsgw_result_events_held",
    "Sent/delivery events held unacked until the server accepts their report",
    ["endpoint"],
)
TASK_REPUBLISHED = Counter(
    "smsgw_task_republished_total",
    "Claimed task messages published again after a poller died before its confirm",
    ["endpoint"],
)

# --- fleet: routing, failover and per-SIM limits (modem_worker) -----------------------------------------------
SMS_LIMITED = Counter(
    "smsgw_sms_limited_total",
    "Outbound SMS not sent because a per-SIM limit refused them (reported failed), by limit",
    ["modem", "limit"],
)
MODEM_SENT_TODAY = Gauge("smsgw_modem_sent_today", "SMS sent by the SIM since local midnight (max_per_day)", ["modem"])
MODEM_CAPPED = Gauge(
    "smsgw_modem_capped", "1 while the SIM reached max_per_day and takes no shared work until midnight", ["modem"]
)
OUTBOUND_FAILOVER = Counter(
    "smsgw_outbound_failover_total",
    "Outbound SMS a modem handed on (its modem down, capped or not allowed) instead of sending",
    ["modem", "reason"],
)

# --- SIM protection, balance, storage (modem_worker, issue 7) ---------------------------------------------------
SEND_REFUSALS = Counter(
    "smsgw_send_refusals_total",
    "Sends the network or modem refused (+CMS/+CME ERROR), by class of cause (modem_worker/send_errors.py)",
    ["modem", "kind"],
)
MODEM_PAUSED = Gauge(
    "smsgw_modem_paused",
    "1 while the SIM is paused (SIM-level refusal or failures in a row) and sends nothing",
    ["modem"],
)
MODEM_PAUSE_REASON = Gauge(
    "smsgw_modem_pause_reason",
    "1 for the reason of the current pause (sim_refused, failures), else 0",
    ["modem", "reason"],
)
MODEM_PAUSES = Counter("smsgw_modem_pauses_total", "Pauses of the SIM, by reason", ["modem", "reason"])
SIM_BALANCE = Gauge(
    "smsgw_sim_balance",
    "First number of the SMSGW_BALANCE_USSD answer (the SIM's credit); NaN until read",
    ["modem"],
)
SIM_STORAGE_USED_RATIO = Gauge(
    "smsgw_sim_storage_used_ratio",
    "Used share of a message memory (AT+CPMS?): SM = SIM, ME = modem",
    ["modem", "memory"],
)


# --- modem supervisor: watchdog, reboots, SIM PIN, identity (modem_worker, issue 7) ----------------------------
MODEM_WATCHDOG_RESETS = Counter(
    "smsgw_modem_watchdog_resets_total",
    "Recovery actions of the modem supervisor: reopen (port closed and reopened, modem re-initialised, SIM swept), "
    "reset_command (SMSGW_MODEM_RESET_COMMAND run)",
    ["modem", "action"],
)
WATCHDOG_ACTIONS = ("reopen", "reset_command")
MODEM_REBOOTS = Counter(
    "smsgw_modem_reboots_total",
    "Modem restarts detected (boot lines, or its settings found reset); re-initialised",
    ["modem"],
)
MODEM_SIM_LOCKED = Gauge(
    "smsgw_modem_sim_locked",
    "1 while the worker is blocked because the SIM needs a PIN/PUK it may not enter (see docs/modem.md)",
    ["modem"],
)
MODEM_IDENTITY_MISMATCH = Gauge(
    "smsgw_modem_identity_mismatch",
    "1 while the modem with SMSGW_MODEM_IMEI is not where it should be (another IMEI on the port, or not found)",
    ["modem"],
)
# The one exception to low-cardinality labels: one series per modem, value always 1 (an info metric).
MODEM_INFO = Gauge(
    "smsgw_modem_info", "Identity of the connected modem and SIM (always 1)", ["modem", "imei", "iccid", "imsi"]
)

# --- Sync URL probe (sync_worker/probe.py, issue 9) -------------------------------------------------------------
SYNC_URL_UP = Gauge(
    "smsgw_sync_url_up",
    "1 while a bare GET of the endpoint's Sync URL gets an HTTP answer below 500; 0 after a network error or 5xx",
    ["endpoint"],
)

# --- servers that differ (task_poller, issue 8) -------------------------------------------------------------------
TASK_RELEASED = Counter(
    "smsgw_task_released_total",
    "Claimed task messages released unsent because the server refused ?task=sent (HTTP 3xx/4xx); a server that "
    "marks messages sent when it hands them out never offers them again",
    ["endpoint"],
)


# --- which worker exports what ------------------------------------------------------------------------------------
# Every metric object above is registered in the default registry (tests read it); a worker's /metrics serves a
# registry of its own holding only its group (``worker_registry``): no empty smsgw_modem_up on the sync worker,
# no five copies of smsgw_result_events_held. tests/test_metrics.py checks that every metric belongs to a group.
GROUPS: dict[str, tuple[MetricWrapperBase, ...]] = {
    "modem_worker": (
        SMS_RECEIVED,
        SMS_SENT,
        SEND_SECONDS,
        DELIVERY_REPORTS,
        MODEM_UP,
        MODEM_SIGNAL,
        MODEM_BATTERY,
        MODEM_REGISTERED,
        MODEM_RECONNECTS,
        SMS_LIMITED,
        MODEM_SENT_TODAY,
        MODEM_CAPPED,
        OUTBOUND_FAILOVER,
        SEND_REFUSALS,
        MODEM_PAUSED,
        MODEM_PAUSE_REASON,
        MODEM_PAUSES,
        SIM_BALANCE,
        SIM_STORAGE_USED_RATIO,
        MODEM_WATCHDOG_RESETS,
        MODEM_REBOOTS,
        MODEM_SIM_LOCKED,
        MODEM_IDENTITY_MISMATCH,
        MODEM_INFO,
        RETRIES,
        MESSAGES_RETRIED,
        PARKED,
    ),
    "sync_worker": (
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
    ),
    "task_poller": (TASK_POLLS, TASK_MESSAGES, HTTP_SECONDS, TASK_REPUBLISHED, TASK_RELEASED),
    # The events consumer parks malformed or refused events; it never schedules a delayed retry.
    "result_reporter": (RESULT_ROUNDS, RESULT_ROWS, HTTP_SECONDS, RESULT_EVENTS_HELD, PARKED),
}

# Labels each worker counts with, created at 0 at start-up (a counter that appears at its first increment, at 1,
# hides that increment from increase(): the first parked SMS would never alert). Park labels: the ``label`` of
# every ``Park``/``Budget`` and ``park(..., label=)`` of the worker (tests/test_metrics.py checks the code uses no
# other).
SMS_SENT_OUTCOMES = ("sent", "failed", "unknown", "expired", "limited", "duplicate")
DELIVERY_OUTCOMES = ("delivered", "failed")
SMS_LIMITS = ("recipient_hour",)
MODEM_PARK_LABELS = ("malformed", "send_refused", "crash")
# The sync worker also parks http_<status> for every status it parks at once (sync_worker.forwarder.PARK_AT_ONCE).
SYNC_PARK_LABELS = ("malformed", "redirect", "refused", "http_500", "crash", "max_age")
RESULT_PARK_LABELS = ("refused", "malformed")


def worker_registry(worker: str) -> CollectorRegistry:
    """A registry holding ``worker``'s group of metrics and the process/platform/GC collectors.

    Raises:
        KeyError: ``worker`` is not one of ``GROUPS``.
    """
    registry = CollectorRegistry(auto_describe=True)
    for collector in (*GROUPS[worker], PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def init_consumer(queues: Iterable[str], park_labels: Iterable[str], *, retries: bool = True) -> None:
    """Create ``smsgw_parked_total{queue, reason}`` for every queue and park label (and, with ``retries``,
    ``smsgw_retries_total{queue}`` and ``smsgw_messages_retried_total{queue}``) at 0."""
    labels = tuple(park_labels)
    for queue in queues:
        if retries:
            RETRIES.labels(queue)
            MESSAGES_RETRIED.labels(queue)
        for label in labels:
            PARKED.labels(queue, label)


def init_modem_worker(modem_id: str, queues: Iterable[str]) -> None:
    """Create the modem worker's counters at 0 for ``modem_id`` and the outbound ``queues`` it may consume.

    The supervisor, the SIM guard and the worker create the series of their own labels (watchdog actions,
    pause reasons, failover reasons, refusal kinds) as they start; gauges whose 0 would be a lie (balance,
    storage, signal before the first reading) stay absent.
    """
    SMS_RECEIVED.labels(modem_id)
    SEND_SECONDS.labels(modem_id)
    MODEM_RECONNECTS.labels(modem_id)
    MODEM_REBOOTS.labels(modem_id)
    for outcome in SMS_SENT_OUTCOMES:
        SMS_SENT.labels(modem_id, outcome)
    for outcome in DELIVERY_OUTCOMES:
        DELIVERY_REPORTS.labels(modem_id, outcome)
    for limit in SMS_LIMITS:
        SMS_LIMITED.labels(modem_id, limit)
    init_consumer(queues, MODEM_PARK_LABELS)


def sync_park_labels() -> tuple[str, ...]:
    """Every label the sync worker parks with: ``SYNC_PARK_LABELS`` and ``http_<status>`` of the statuses it parks
    at once."""
    from sync_worker.forwarder import PARK_AT_ONCE  # late: the forwarder imports this module

    return (*SYNC_PARK_LABELS, *(f"http_{status}" for status in sorted(PARK_AT_ONCE)))


def init_sync_worker(endpoints: Iterable[str], queues: Iterable[str]) -> None:
    """Create the sync worker's series at 0 for ``endpoints`` (sync_worker.forwarder.init_metrics: every outcome,
    filter reason and reply origin) and their inbound ``queues``; ``smsgw_sync_url_up`` waits for the first
    probe."""
    from sync_worker.forwarder import init_metrics  # late: the forwarder imports this module

    for endpoint in endpoints:
        init_metrics(endpoint)
    init_consumer(queues, sync_park_labels())


def init_task_poller(endpoints: Iterable[str]) -> None:
    """Create the task poller's series at 0 for ``endpoints`` (task_poller.poller.init_metrics: every outcome)."""
    from task_poller.poller import init_metrics  # late: the poller imports this module

    for endpoint in endpoints:
        init_metrics(endpoint)


def init_result_reporter(endpoints: Iterable[str], queues: Iterable[str]) -> None:
    """Create the result reporter's series at 0 for ``endpoints`` and their events ``queues``."""
    from result_reporter.reporter import init_metrics  # late: the reporter imports this module

    for endpoint in endpoints:
        init_metrics(endpoint)
    init_consumer(queues, RESULT_PARK_LABELS, retries=False)


def serve_metrics(worker: str, port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``worker``'s ``/metrics`` (``worker_registry``) on ``addr:port`` from a daemon thread; port 0 disables
    it.

    Raises:
        OSError: the port is taken (the worker exits with a clear message).
        KeyError: ``worker`` is not one of ``GROUPS``.
    """
    if port:
        start_http_server(port, addr=addr, registry=worker_registry(worker))
