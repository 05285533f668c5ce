"""The modem worker's metrics: SMS in and out of one modem, its health, its SIM's limits and its supervisor.

Registered as the ``modem_worker`` group of services.metrics (with the consumer series of its outbound queues
and ``smsgw_ledger_up``, the ledger watch's gauge: services/ledger/watch.py, 1 from start-up, 0 while ledger
operations fail).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from services.ledger import LEDGER_UP as LEDGER_UP  # noqa: PLC0414 (re-exported: one gauge per process, in each group)
from services.metrics import LATENCY_BUCKETS, MESSAGES_RETRIED, PARKED, RETRIES, init_consumer, register_group

# --- modem -> inbound queue, outbound queue -> modem ---------------------------------------------------------
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

# --- fleet: routing, failover and per-SIM limits -------------------------------------------------------------
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

# --- SIM protection, balance, storage (issue 7) ------------------------------------------------------------------
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


# --- modem supervisor: watchdog, reboots, SIM PIN, identity (issue 7) --------------------------------------------
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

register_group(
    "modem_worker",
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
    LEDGER_UP,
    RETRIES,
    MESSAGES_RETRIED,
    PARKED,
)

# Labels the worker counts with, created at 0 at start-up (services.metrics.init_consumer says why).
SMS_SENT_OUTCOMES = ("sent", "failed", "unknown", "expired", "limited", "duplicate")
DELIVERY_OUTCOMES = ("delivered", "failed")
SMS_LIMITS = ("recipient_hour",)
MODEM_PARK_LABELS = ("malformed", "send_refused", "crash")


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
